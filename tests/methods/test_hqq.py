"""HQQ: never worse than RTN in its own lp objective, better on heavy tails, same integer grid."""

import pytest
import torch
from smollm2_layers import real_layers  # noqa: F401  (fixture)

from bitplan.kernels.numerics import grouped
from bitplan.methods.calibration_stats import relative_output_error
from bitplan.methods.hqq import HqqOptions, hqq_params, lp_error, quantize_hqq, shrink_lp
from bitplan.methods.rtn import integer_range, quantize_rtn
from bitplan.methods.scheme import Scheme

SCHEMES = [Scheme("hqq", 4, 64, False), Scheme("hqq", 3, 32, False), Scheme("hqq", 2, 64, False), Scheme("hqq", 4, 64, True)]


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02 if seed == 0 else (
        torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) ** 3)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("select_norm", [0.7, 2.0])
def test_never_worse_than_rtn_in_its_objective_per_group(scheme, select_norm):
    torch.manual_seed(0)
    weight = heavy_tailed(96, 256)
    hqq = quantize_hqq(weight, scheme, HqqOptions(select_norm=select_norm))
    rtn = quantize_rtn(weight, scheme)
    p = select_norm
    groups = grouped(weight, scheme.group_size)
    hqq_err = lp_error(groups, grouped(hqq.dequantize(), scheme.group_size), p)
    rtn_err = lp_error(groups, grouped(rtn.dequantize(), scheme.group_size), p)
    assert bool((hqq_err <= rtn_err * (1 + 1e-6)).all())
    assert float(hqq_err.sum()) < 0.99 * float(rtn_err.sum())


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_output_is_on_the_integer_grid(scheme):
    weight = heavy_tailed(16, 128, seed=3)
    q = quantize_hqq(weight, scheme)
    qmin, qmax = integer_range(scheme.bits)
    assert q.codes.dtype == torch.int8 and int(q.codes.min()) >= qmin and int(q.codes.max()) <= qmax
    assert (q.zero is None) == scheme.symmetric
    if q.zero is not None:
        assert q.zero.dtype == torch.int8
    assert q.scale.dtype == torch.bfloat16 and q.scale.shape == (16, 128 // scheme.group_size)


def test_reported_error_matches_the_returned_grid():
    weight = heavy_tailed(8, 128, seed=4)
    scheme = SCHEMES[0]
    scale, zero, error = hqq_params(weight, scheme)
    q = quantize_hqq(weight, scheme)
    assert torch.equal(q.scale, scale) and torch.equal(q.zero, zero)
    recomputed = lp_error(grouped(weight, 64), grouped(q.dequantize(), 64), HqqOptions().select_norm)
    torch.testing.assert_close(recomputed, error, rtol=1e-5, atol=1e-6)


def test_shrink_operator():
    x = torch.tensor([-2.0, -0.05, 0.0, 0.05, 2.0])
    assert torch.equal(shrink_lp(x, 10.0, 1.0), torch.tensor([-1.9, 0.0, 0.0, 0.0, 1.9]))
    out = shrink_lp(x, 10.0, 0.7)
    assert float(out[2]) == 0.0 and float(out[1]) == 0.0 and 1.9 < float(out[4]) < 2.0


def test_constant_group_is_exact():
    weight = torch.full((4, 64), 0.25)
    q = quantize_hqq(weight, Scheme("hqq", 4, 64, False))
    torch.testing.assert_close(q.dequantize(), weight, rtol=0, atol=1e-3)


@pytest.mark.slow
def test_real_layers_hqq_not_worse_than_rtn_on_weights(real_layers):
    """On real layers HQQ's weight error is below RTN's, and its output error stays near RTN's."""
    for name, (weight, _, held) in real_layers.items():
        scheme = Scheme("hqq", 3, 128 if weight.shape[1] % 128 == 0 else 64, False)
        hqq, rtn = quantize_hqq(weight, scheme), quantize_rtn(weight, scheme)
        groups = grouped(weight, scheme.group_size)
        assert lp_error(groups, grouped(hqq.dequantize(), scheme.group_size), 2.0).sum() < lp_error(
            groups, grouped(rtn.dequantize(), scheme.group_size), 2.0).sum()
        moment = held.second_moment()
        assert relative_output_error(weight, hqq.dequantize(), moment) < 1.05 * relative_output_error(weight, rtn.dequantize(), moment)
