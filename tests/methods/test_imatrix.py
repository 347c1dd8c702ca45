"""imatrix: llama.cpp's importance-weighted scale search on bitplan's symmetric integer grids."""

from __future__ import annotations

import pytest
import torch

from bitplan.methods import imatrix
from bitplan.methods.ggml import quantize_ggml
from bitplan.methods.imatrix import importance_weights, quantize_imatrix
from bitplan.methods.registry import candidate_schemes
from bitplan.methods.rtn import quantize_rtn
from bitplan.methods.scheme import Scheme


def layer(seed: int = 0, out: int = 96, inputs: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with outlier columns and an importance vector that differs from column to column by 10^4."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inputs, generator=generator) * (0.2 + 3 * torch.rand(1, inputs, generator=generator) ** 3)
    importance = torch.rand(inputs, generator=generator) ** 4 * 10 + 1e-3
    return weight, importance


def weighted_error(weight, decoded, importance) -> float:
    return float((importance_weights(weight, importance) * (decoded - weight) ** 2).sum())


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 32), (4, 32), (4, 128), (5, 64), (8, 0)])
def test_it_loses_less_than_rtn_where_the_importance_says_it_matters(bits, group):
    weight, importance = layer()
    ours = quantize_imatrix(weight, Scheme("imatrix", bits, group, True), importance, torch.float16)
    rtn = quantize_rtn(weight, Scheme("rtn", bits, group, True), torch.float16)
    assert weighted_error(weight, ours.dequantize(), importance) < 0.97 * weighted_error(weight, rtn.dequantize(), importance)


def test_codes_span_the_whole_signed_range_and_decode_as_code_times_scale():
    weight, importance = layer(1)
    q = quantize_imatrix(weight, Scheme("imatrix", 3, 32, True), importance, torch.bfloat16)
    assert int(q.codes.min()) == -4 and int(q.codes.max()) == 3
    assert bool((q.scale.to(torch.float32) > 0).any()) and bool((q.scale.to(torch.float32) < 0).any())  # either side takes -4
    torch.testing.assert_close(q.dequantize(), (q.codes.float().reshape(96, -1, 32) * q.scale.float()[..., None]).reshape(96, 256))


def test_it_loses_no_more_than_llama_cpps_q4_0_with_the_same_importance_matrix():
    """imatrix-w4g32s is Q4_0's grid; its search is a superset of ggml's (both signs, more steps, the
    refinement), so its weighted error is at most ggml's own Q4_0's (bit-exact port, methods/ggml.py)."""
    weight, importance = layer(2, inputs=512)
    ours = weighted_error(weight, quantize_imatrix(weight, Scheme("imatrix", 4, 32, True), importance, torch.float16).dequantize(), importance)
    ggml = weighted_error(weight, quantize_ggml(weight, "Q4_0", importance).dequantize(), importance)
    assert 0.5 * ggml < ours <= ggml * 1.001, (ours, ggml)


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_the_refinement_never_raises_a_groups_error_and_lowers_the_total(bits, monkeypatch):
    """Per group, the refined stored scale's weighted error is at most the searched one's; over the layer it is lower."""
    weight, importance = layer(5)
    scheme = Scheme("imatrix", bits, 32, True)

    def per_group(q):
        return (importance_weights(weight, importance) * (q.dequantize() - weight) ** 2).reshape(96, -1, 32).sum(-1)

    refined = per_group(quantize_imatrix(weight, scheme, importance, torch.bfloat16))
    monkeypatch.setattr(imatrix, "REFINE_ITERATIONS", 0)
    searched = per_group(quantize_imatrix(weight, scheme, importance, torch.bfloat16))
    assert bool((refined <= searched * (1 + 1e-6)).all())
    assert float(refined.sum()) < float(searched.sum())


def test_clipping_further_than_llama_cpps_steps_helps_where_an_outlier_matters_little(monkeypatch):
    """One large weight per group on an input the importance matrix ranks low: clipping it past
    llama.cpp's 19 steps buys the other 63 a finer step, and the weighted error at 3 bits drops."""
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(96, 256, generator=generator)
    weight[:, ::64] *= 6
    importance = torch.rand(256, generator=generator) + 0.5
    importance[::64] = 0.01
    scheme = Scheme("imatrix", 3, 64, True)
    wide = weighted_error(weight, quantize_imatrix(weight, scheme, importance, torch.float32).dequantize(), importance)
    monkeypatch.setattr(imatrix, "STEPS", imatrix.STEPS[:19])
    narrow = weighted_error(weight, quantize_imatrix(weight, scheme, importance, torch.float32).dequantize(), importance)
    assert wide < 0.9 * narrow, (wide, narrow)


def test_a_layer_no_token_reached_falls_back_to_the_weights_own_magnitude():
    weight, _ = layer(3)
    q = quantize_imatrix(weight, Scheme("imatrix", 4, 64, True), None, torch.float16)
    rtn = quantize_rtn(weight, Scheme("rtn", 4, 64, True), torch.float16)
    assert weighted_error(weight, q.dequantize(), None) < weighted_error(weight, rtn.dequantize(), None)


def test_an_all_zero_group_stays_zero():
    weight, importance = layer(4)
    weight[:, :32] = 0
    q = quantize_imatrix(weight, Scheme("imatrix", 4, 32, True), importance, torch.float16)
    assert bool((q.dequantize()[:, :32] == 0).all()) and bool(torch.isfinite(q.scale.float()).all())


def test_it_is_offered_symmetric_only():
    schemes = candidate_schemes(["imatrix"], bits=(3, 4), group_sizes=(32, 64), symmetric=(True, False), include_dense=False)
    assert [s.name for s in schemes] == ["imatrix-w3g32s", "imatrix-w3g64s", "imatrix-w4g32s", "imatrix-w4g64s"]
    with pytest.raises(ValueError, match="symmetric only"):
        quantize_imatrix(torch.ones(4, 32), Scheme("imatrix", 4, 32, False), None)
