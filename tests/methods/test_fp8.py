"""FP8 E4M3: representable values round-trip exactly; scales; the dynamic per-token activations."""

import pytest
import torch
from smollm2_layers import real_layers  # noqa: F401  (fixture)

from bitplan.kernels.layout import fp8_weight_bytes, int8_weight_bytes
from bitplan.kernels.numerics import E4M3_MAX, MIN_TOKEN_SCALE, fake_quant_activations, per_token_fp8, to_e4m3
from bitplan.methods.fp8 import fp8_linear, quantize_fp8, representable_values


def test_representable_values():
    values = representable_values()
    assert values.numel() == 253 and float(values.max()) == 448.0 and float(values.min()) == -448.0
    assert float(values[values > 0].min()) == 2.0**-9  # smallest subnormal
    assert torch.equal(to_e4m3(values).to(torch.float32), values)


def test_representable_weights_round_trip_exactly():
    values = representable_values()
    g = torch.Generator().manual_seed(0)
    weight = values[torch.randint(0, values.numel(), (16, 64), generator=g)]
    weight[:, 0] = 448.0  # each row's absmax is 448, so the scale is exactly 1
    q = quantize_fp8(weight)
    assert torch.equal(q.scale, torch.ones(16, 1)) and torch.equal(q.dequantize(), weight)
    scaled = weight * 2.0**-6  # a power-of-two scale keeps them representable
    assert torch.equal(quantize_fp8(scaled).dequantize(), scaled)


def test_group_scales_and_saturation():
    weight = torch.randn(8, 128, generator=torch.Generator().manual_seed(1))
    q = quantize_fp8(weight, group_size=64)
    assert q.scale.shape == (8, 2) and q.values.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(q.scale, weight.reshape(8, 2, 64).abs().amax(-1) / E4M3_MAX)
    assert float((weight - q.dequantize()).norm() / weight.norm()) < 0.04
    assert float(to_e4m3(torch.tensor([1e6])).to(torch.float32)) == 448.0
    with pytest.raises(ValueError):
        quantize_fp8(torch.randn(4, 96), group_size=64)


def test_dynamic_token_scales_follow_vllm():
    x = torch.tensor([[1.0, -448.0 * 3, 2.0], [0.0, 0.0, 0.0]])
    values, scale = per_token_fp8(x)
    assert float(scale[0]) == pytest.approx(3.0) and float(scale[1]) == pytest.approx(MIN_TOKEN_SCALE)
    assert float(values[0, 1].to(torch.float32)) == -448.0
    assert torch.equal(values[1].to(torch.float32), torch.zeros(3))
    torch.testing.assert_close(fake_quant_activations(x, "fp8")[0], x[0], rtol=0.07, atol=0.0)


def test_fp8_linear_matches_fake_quant_matmul():
    g = torch.Generator().manual_seed(2)
    x, weight = torch.randn(17, 256, generator=g), torch.randn(32, 256, generator=g)
    q = quantize_fp8(weight)
    torch.testing.assert_close(fp8_linear(x, q), fake_quant_activations(x, "fp8") @ q.dequantize().T, rtol=1e-5, atol=1e-5)
    assert float((fp8_linear(x, q) - x @ weight.T).norm() / (x @ weight.T).norm()) < 0.06
    with pytest.raises(ValueError):
        fp8_linear(x, quantize_fp8(weight, group_size=128))


def test_byte_counts():
    assert fp8_weight_bytes(576, 1536, 0) == 576 * 1536 + 576 * 4
    assert fp8_weight_bytes(576, 1536, 128, scale_bytes=2) == 576 * 1536 + 576 * 12 * 2
    assert int8_weight_bytes(576, 1536, 2) == 576 * 1536 + 576 * 2


@pytest.mark.slow
def test_real_layers_fp8_error_small(real_layers):
    for name, (weight, _, held) in real_layers.items():
        x = held.samples[:512]
        ref = x @ weight.T
        rel = float((fp8_linear(x, quantize_fp8(weight)) - ref).norm() / ref.norm())
        assert rel < 0.08, (name, rel)
