"""X Xᵀ kept as rows while they are fewer than the inputs, as a matrix beyond: same numbers either way."""

import pytest
import torch

from bitplan.methods.calibration_stats import InputStats, OuterSum


def batches(widths=64, rows=(10, 20, 30), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, widths, generator=generator, dtype=torch.float64) for n in rows]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_and_matrix_give_the_same_sum(dtype):
    parts = batches()
    exact = sum(x.T @ x for x in parts)
    few, many = OuterSum(64, dtype), OuterSum(64, dtype)  # 60 rows: kept as rows; 120: becomes the matrix
    for x in parts:
        few.add(x)
    for x in parts + parts:
        many.add(x)
    assert few.gram is None and many.gram is not None and many.rows == []
    assert torch.allclose(few.matrix().double(), exact, rtol=1e-5, atol=1e-4)
    assert torch.allclose(many.matrix().double(), 2 * exact, rtol=1e-5, atol=1e-4)
    delta = torch.randn(7, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    direct = ((delta @ exact) * delta).sum(1)
    assert torch.allclose(few.quadratic(delta), direct, rtol=1e-4)
    assert torch.allclose(many.quadratic(delta), 2 * direct, rtol=1e-4)


def test_rows_take_less_memory_than_the_matrix_they_stand_for():
    """An 8B model's down_proj on a few hundred tokens: rows, not a 14336² matrix."""
    s = OuterSum(14336)
    s.add(torch.randn(512, 14336))
    assert s.gram is None and s.nbytes == 512 * 14336 * 4 < 14336 * 14336 * 8 // 20


def test_merged_sums_equal_one_sum():
    parts = batches(rows=(30, 30, 30))
    whole, left, right = InputStats(64), InputStats(64), InputStats(64)
    for x in parts:
        whole.add(x)
    left.add(parts[0])
    for x in parts[1:]:
        right.add(x)
    left.merge(right)
    assert left.count == whole.count == 90
    assert torch.allclose(left.second_moment(), whole.second_moment(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(left.hessian(), 2 * whole.second_moment(), rtol=1e-5, atol=1e-6)


def test_the_diagonal_needs_no_matrix():
    stats = InputStats(64)
    for x in batches():
        stats.add(x)
    assert torch.allclose(stats.second_moment_diagonal(), torch.diagonal(stats.second_moment()), rtol=1e-5)
