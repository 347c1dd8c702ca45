"""Per-slice limits in the exact allocation: a bound per limited slice, met exactly, with one line
naming the slice and the smallest budget when the budget cannot meet it."""

from __future__ import annotations

import itertools

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.models.spec import LayerSpec, ModelSpec
from bitplan.planner.limits import SliceLimits, parse_slice_limits
from bitplan.planner.search import allocate
from bitplan.planner.slices import best_uniform, predicted_slice_kl, resolve_limits
from bitplan.profiles.tables import SensitivityTable


def spec_of(count: int) -> ModelSpec:
    layers = tuple(LayerSpec(f"model.layers.0.l{i}", "down", 0, 64, 64, "") for i in range(count))
    return ModelSpec("llama", "llama", layers, 64, 128, 1, 4, 4, 16, 100, True, "bfloat16", 0)


def sliced_table(code, prose, sizes, weights=(0.5, 0.5)) -> SensitivityTable:
    code, prose = torch.tensor(code, dtype=torch.float64), torch.tensor(prose, dtype=torch.float64)
    return SensitivityTable([f"model.layers.0.l{i}" for i in range(len(sizes))], ["s2", "s4", "s8"][: len(sizes[0])],
                            weights[0] * code + weights[1] * prose, torch.tensor(sizes, dtype=torch.int64),
                            {"model_hash": "synthetic"}, ["code", "prose"], torch.stack([code, prose]), list(weights))


# Layer 0 matters for prose, layer 1 for code: the aggregate prefers spending bytes on layer 0.
CODE = [[0.10, 0.05, 0.0], [0.40, 0.10, 0.0]]
PROSE = [[1.00, 0.30, 0.0], [0.10, 0.05, 0.0]]
SIZES = [[20, 40, 80], [20, 40, 80]]


def brute_force(table, budget, bounds):
    best = None
    codes = table.slice_scores.numpy()
    for pick in itertools.product(range(len(table.schemes)), repeat=len(table.layers)):
        size = sum(int(table.bytes[i, j]) for i, j in enumerate(pick))
        score = sum(float(table.scores[i, j]) for i, j in enumerate(pick))
        ok = all(sum(codes[table.slices.index(n)][i, j] for i, j in enumerate(pick)) <= b for n, b in bounds.items())
        if size <= budget and ok and (best is None or (score, size) < best[:2]):
            best = (score, size, pick)
    return best


def test_a_slice_limit_changes_the_allocation_and_is_met():
    table, spec = sliced_table(CODE, PROSE, SIZES), spec_of(2)
    plain = allocate(table, spec, 60)
    assert plain.choice == {"model.layers.0.l0": "s4", "model.layers.0.l1": "s2"}
    assert predicted_slice_kl(table, plain.choice)["code"] == pytest.approx(0.45)
    limited = allocate(table, spec, 60, slice_bounds={"code": 0.25})
    assert limited.choice == {"model.layers.0.l0": "s2", "model.layers.0.l1": "s4"}
    assert predicted_slice_kl(table, limited.choice)["code"] <= 0.25 and limited.score > plain.score
    assert brute_force(table, 60, {"code": 0.25})[0] == pytest.approx(limited.score)


@pytest.mark.parametrize("seed", range(4))
def test_limited_allocation_matches_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    code, prose = torch.rand(4, 3, generator=generator), torch.rand(4, 3, generator=generator)
    sizes = torch.randint(10, 60, (4, 3), generator=generator)
    table = sliced_table(code.tolist(), prose.tolist(), sizes.tolist(), (0.3, 0.7))
    budget = int(sizes.float().mean() * 4)
    bound = float(code.min(1).values.sum() + 0.3 * (code.max(1).values - code.min(1).values).sum())
    expected = brute_force(table, budget, {"code": bound})
    if expected is None:
        with pytest.raises(BitplanError, match="'code'"):
            allocate(table, spec_of(4), budget, slice_bounds={"code": bound})
        return
    assert allocate(table, spec_of(4), budget, slice_bounds={"code": bound}).score == pytest.approx(expected[0])


def test_an_infeasible_limit_names_the_slice_and_the_smallest_budget():
    table, spec = sliced_table(CODE, PROSE, SIZES), spec_of(2)
    with pytest.raises(BitplanError) as error:
        allocate(table, spec, 60, slice_bounds={"code": 0.12}, budget_offset_bytes=1000)
    message = str(error.value)
    assert "\n" not in message and "slice 'code'" in message
    smallest = min(brute_force(table, budget, {"code": 0.12})[1] for budget in range(60, 200) if brute_force(table, budget, {"code": 0.12}))
    assert smallest == 100 and "the smallest budget that meets it is 1.10 KB (1100 bytes, 40 B more)" in message
    with pytest.raises(BitplanError, match="at any budget"):
        allocate(table, spec, 60, slice_bounds={"code": -1.0})


def test_relative_limits_refer_to_the_best_uniform_plan_within_the_budget():
    table = sliced_table(CODE, PROSE, SIZES)
    assert best_uniform(table, 80) == "s4" and best_uniform(table, 79) == "s2" and best_uniform(table, 39) is None
    resolved = resolve_limits(parse_slice_limits("prose=0.5", "code=1.2"), table, 80)
    assert resolved.uniform_scheme == "s4" and resolved.bounds == {"code": pytest.approx(1.2 * 0.15), "prose": 0.5}
    allocation = allocate(table, spec_of(2), 80, slice_bounds=resolved.bounds)
    assert predicted_slice_kl(table, allocation.choice)["code"] <= 1.2 * 0.15
    with pytest.raises(BitplanError, match="only the slices code, prose"):
        resolve_limits(SliceLimits({"chat": 0.1}), table, 80)
    with pytest.raises(BitplanError, match="no single candidate scheme fits"):
        resolve_limits(SliceLimits({}, {"code": 1.1}), table, 39)
