"""SmoothQuant W8A8: smoothing formula, exact simulation of the int8 kernel, α search."""

import pytest
import torch
from smollm2_layers import real_layers  # noqa: F401  (fixture)

from bitplan.kernels.numerics import fake_quant_activations, per_token_int
from bitplan.methods.rtn import quantize_rtn
from bitplan.methods.smoothquant import (
    W8A8,
    quantize_smoothquant,
    search_alpha,
    smoothing_scales,
    w8a8_linear,
)


def outlier_activations(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=g)
    x[:, :4] *= 60.0  # a few outlier channels, as in LLM activations
    return x


def test_alpha_one_flattens_activations_and_alpha_zero_flattens_weights():
    x = outlier_activations(256, 64)
    weight = torch.randn(32, 64)
    absmax = x.abs().amax(dim=0)
    s1 = smoothing_scales(absmax, [weight], 1.0)
    torch.testing.assert_close((x / s1).abs().amax(dim=0), torch.ones(64))
    s0 = smoothing_scales(absmax, [weight], 0.0)
    torch.testing.assert_close((weight * s0).abs().amax(dim=0), torch.ones(64))
    half = smoothing_scales(absmax, [weight], 0.5)
    torch.testing.assert_close((x / half).abs().amax(dim=0), (weight * half).abs().amax(dim=0))


def test_no_smoothing_candidate_leaves_weights_unchanged():
    """s = 1 is always a candidate; when chosen, the weights are plain int8 W8A8 of W."""
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(1))
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    plain = search_alpha([weight], x.abs().amax(dim=0), x, alphas=())
    assert plain.alpha is None and torch.equal(plain.scales, torch.ones(64))
    assert torch.equal(plain.quantized[0].codes, quantize_rtn(weight, W8A8).codes)
    full = search_alpha([weight], x.abs().amax(dim=0), x)
    assert None in full.errors and full.errors[full.alpha] == min(full.errors.values())


def test_activation_quantization_matches_the_kernel_rules():
    x = torch.tensor([[0.5, -1.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [127.0, 63.5, -128.0, 1.0]])
    codes, scale = per_token_int(x)
    assert torch.equal(codes[0], torch.tensor([64.0, -127.0, 32.0, 0.0]))  # 63.5 rounds half to even
    assert torch.equal(codes[1], torch.zeros(4)) and float(scale[1]) == 0.0
    assert torch.equal(codes[2], torch.tensor([126.0, 63.0, -127.0, 1.0]))
    torch.testing.assert_close(scale[:, 0], torch.tensor([1 / 127, 0.0, 128 / 127]))
    assert torch.equal(fake_quant_activations(x, "int8"), codes * scale)


def test_w8a8_linear_equals_integer_gemm():
    x = outlier_activations(33, 128, seed=3)
    weight = torch.randn(24, 128, generator=torch.Generator().manual_seed(4))
    q = quantize_rtn(weight, W8A8, scale_dtype=torch.float32)
    codes, token_scale = per_token_int(x)
    exact = (codes.to(torch.int64) @ q.codes.to(torch.int64).T).to(torch.float32) * token_scale * q.scale.T
    assert torch.equal(w8a8_linear(x, q), exact)
    torch.testing.assert_close(w8a8_linear(x, q), fake_quant_activations(x, "int8") @ q.dequantize().T, rtol=1e-4, atol=1e-3)


def test_smoothing_lowers_w8a8_error_with_outliers():
    x = outlier_activations(1024, 128, seed=5)
    weights = [torch.randn(32, 128, generator=torch.Generator().manual_seed(s)) * 0.05 for s in (6, 7)]
    result = search_alpha(weights, x.abs().amax(dim=0), x)
    assert result.alpha is not None and 0.0 < result.alpha <= 1.0
    assert result.errors[result.alpha] < 0.5 * result.errors[None]
    scales, quantized = quantize_smoothquant(weights, x.abs().amax(dim=0), result.alpha)
    assert torch.equal(scales, result.scales) and torch.equal(quantized[1].codes, result.quantized[1].codes)


def test_rejects_non_w8a8_schemes():
    with pytest.raises(ValueError):
        search_alpha([torch.randn(4, 8)], torch.ones(8), torch.randn(3, 8), scheme=W8A8.__class__("smoothquant", 4, 0, True, 8))


@pytest.mark.slow
def test_real_layers_smoothquant_not_worse_than_plain_w8a8(real_layers):
    weight, calib, held = real_layers["model.layers.3.mlp.up_proj"]
    result = search_alpha([weight], calib.absmax(), calib.samples[:512])
    x = held.samples[:1024]
    ref = x @ weight.T
    smoothed = (w8a8_linear(x / result.scales, result.quantized[0]) - ref).norm()
    plain = (w8a8_linear(x, quantize_rtn(weight, W8A8)) - ref).norm()
    assert smoothed <= plain * 1.02 and smoothed / ref.norm() < 0.05
