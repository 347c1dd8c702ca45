"""GPTQ: known answers (diagonal Hessian = RTN, exact loss identity) and real layers."""

import pytest
import torch
from smollm2_layers import real_layers  # noqa: F401  (fixture)

from bitplan.methods.calibration_stats import InputStats, relative_output_error
from bitplan.methods.gptq import (
    gptq_rows,
    inverse_hessian_factor,
    quantize_gptq,
    split_rows,
)
from bitplan.methods.rtn import quantize_rtn
from bitplan.methods.scheme import Scheme

SCHEMES = [
    Scheme("gptq", 4, 64, True),
    Scheme("gptq", 3, 64, False),
    Scheme("gptq", 2, 32, False),
    Scheme("gptq", 8, 0, True),
    Scheme("gptq", 4, 128, False),
]


def correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated channels and uneven magnitudes, like real activations."""
    shape = torch.Generator().manual_seed(features)  # one distribution per width
    mix = torch.randn(features, features, generator=shape) / features**0.5 + torch.eye(features)
    magnitude = torch.rand(features, generator=shape) * 3 + 0.2
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, features, generator=g) @ mix) * magnitude


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_diagonal_hessian_equals_rtn(scheme, act_order):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 256, generator=g)
    H = torch.diag(torch.rand(256, generator=g) + 0.1)
    quantized, _ = quantize_gptq(weight, H, scheme, act_order=act_order)
    rtn = quantize_rtn(weight, scheme)
    assert torch.equal(quantized.codes, rtn.codes)
    assert torch.equal(quantized.scale, rtn.scale)
    assert (quantized.zero is None) == (rtn.zero is None)
    if rtn.zero is not None:
        assert torch.equal(quantized.zero, rtn.zero)


@pytest.mark.parametrize("act_order", [False, True])
def test_loss_is_the_damped_quadratic_error(act_order):
    weight = torch.randn(32, 256, generator=torch.Generator().manual_seed(2))
    x = correlated_inputs(1024, 256)
    H = 2 * x.T @ x / x.shape[0]
    scheme = Scheme("gptq", 3, 64, False)
    quantized, loss = quantize_gptq(weight, H, scheme, damp=0.01, act_order=act_order)
    _, lam = inverse_hessian_factor(H, 0.01)
    damped = H + lam * torch.eye(H.shape[0])
    delta = weight - quantized.dequantize()
    assert loss == pytest.approx(float(0.5 * ((delta @ damped) * delta).sum()), rel=1e-4)


@pytest.mark.parametrize("scheme", [SCHEMES[0], SCHEMES[1], SCHEMES[4]], ids=str)
def test_beats_rtn_on_correlated_inputs(scheme):
    """At 3-4 bits GPTQ lowers held-out error; at 2 bits with damp 0.01 it can lose (greedy)."""
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    x = correlated_inputs(2048, 256, seed=4)
    held_out = correlated_inputs(2048, 256, seed=5)
    H = 2 * x.T @ x / x.shape[0]
    moment = held_out.T @ held_out / held_out.shape[0]
    gptq = relative_output_error(weight, quantize_gptq(weight, H, scheme)[0].dequantize(), moment)
    rtn = relative_output_error(weight, quantize_rtn(weight, scheme).dequantize(), moment)
    assert gptq < 0.97 * rtn


def test_hessian_accumulation_matches_closed_form():
    x = correlated_inputs(300, 64)
    stats = InputStats(64)
    for chunk in x.split(70):
        stats.add(chunk.reshape(2, -1, 64) if chunk.shape[0] % 2 == 0 else chunk)
    assert stats.count == 300
    torch.testing.assert_close(stats.hessian(), 2 * x.T @ x / 300, rtol=1e-4, atol=1e-4)


def test_rows_are_independent_so_shared_inputs_batch():
    g = torch.Generator().manual_seed(6)
    q_weight, k_weight = torch.randn(32, 128, generator=g), torch.randn(16, 128, generator=g)
    x = correlated_inputs(512, 128)
    H = 2 * x.T @ x / 512
    scheme = Scheme("gptq", 4, 64, False)
    together, row_losses = gptq_rows(torch.cat([q_weight, k_weight]), H, scheme)
    parts = split_rows(together, [32, 16])
    alone_q, loss_q = quantize_gptq(q_weight, H, scheme)
    assert torch.equal(parts[0].codes, alone_q.codes) and torch.equal(parts[0].zero, alone_q.zero)
    assert float(row_losses[:32].sum()) == pytest.approx(loss_q, rel=1e-5)


def test_dead_inputs_and_bad_shapes():
    weight = torch.randn(8, 128)
    x = correlated_inputs(256, 128)
    x[:, 5] = 0.0
    quantized, loss = quantize_gptq(weight, 2 * x.T @ x / 256, Scheme("gptq", 4, 64, True))
    assert torch.isfinite(torch.tensor(loss)) and int(quantized.codes[:, 5].abs().max()) == 0
    with pytest.raises(ValueError):
        quantize_gptq(weight, torch.eye(64), Scheme("gptq", 4, 64, True))
    with pytest.raises(ValueError):
        quantize_gptq(torch.randn(8, 96), torch.eye(96), Scheme("gptq", 4, 64, True))


@pytest.mark.slow
def test_real_layers_gptq_beats_rtn(real_layers):
    """On real SmolLM2 layers (block 3), GPTQ lowers held-out output error versus RTN at 3 and 4 bits."""
    for name, (weight, calib, held_out) in real_layers.items():
        for bits in (3, 4):
            scheme = Scheme("gptq", bits, 128 if weight.shape[1] % 128 == 0 else 64, False)
            gptq, _ = quantize_gptq(weight, calib.hessian(), scheme)
            rtn = quantize_rtn(weight, scheme)
            moment = held_out.second_moment()
            assert relative_output_error(weight, gptq.dequantize(), moment) < relative_output_error(
                weight, rtn.dequantize(), moment
            ), (name, bits)


@pytest.mark.parametrize("group_size", [64, 256])
def test_lazy_block_updates_do_not_change_the_result(group_size):
    """Section 3.2: blocking only reorders the updates, so any block width gives the same codes."""
    weight = torch.randn(24, 512, generator=torch.Generator().manual_seed(7))
    x = correlated_inputs(2048, 512, seed=8)
    H = 2 * x.T @ x / x.shape[0]
    scheme = Scheme("gptq", 4, group_size, False)
    blocked, loss_blocked = quantize_gptq(weight, H, scheme, block=128)
    whole, loss_whole = quantize_gptq(weight, H, scheme, block=512)
    assert torch.equal(blocked.codes, whole.codes) and torch.equal(blocked.scale, whole.scale)
    assert loss_blocked == pytest.approx(loss_whole, rel=1e-4)


def test_shrink_moves_h_toward_its_diagonal_and_leaves_the_callers_h_alone():
    """shrink=1 is GPTQ on diag(H): RTN's codes; shrink=0.5 is GPTQ on H with halved
    correlations, and its loss is the quadratic error under that H."""
    weight = torch.randn(32, 256, generator=torch.Generator().manual_seed(3))
    x = correlated_inputs(1024, 256)
    H = 2 * x.T @ x / x.shape[0]
    before = H.clone()
    scheme = Scheme("gptq", 3, 64, True)
    assert torch.equal(quantize_gptq(weight, H, scheme, shrink=1.0)[0].codes, quantize_rtn(weight, scheme).codes)
    half = 0.5 * H + 0.5 * torch.diag(torch.diag(H))
    shrunk, loss = quantize_gptq(weight, H, scheme, shrink=0.5)
    assert torch.equal(shrunk.codes, quantize_gptq(weight, half, scheme)[0].codes)
    assert not torch.equal(shrunk.codes, quantize_gptq(weight, H, scheme)[0].codes)
    _, lam = inverse_hessian_factor(half, 0.01)
    delta = weight - shrunk.dequantize()
    assert loss == pytest.approx(float(0.5 * ((delta @ (half + lam * torch.eye(256))) * delta).sum()), rel=1e-4)
    assert torch.equal(H, before)
    with pytest.raises(ValueError, match="shrink"):
        quantize_gptq(weight, H, scheme, shrink=1.5)
