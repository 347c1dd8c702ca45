"""QuantLinear: construction from a method's output and from checkpoint tensors, shape and dtype
errors, and agreement of the Triton path (CUDA or interpreter) with the reference path."""

from __future__ import annotations

import secrets

import pytest
import torch
import torch.nn.functional as F

from bitplan.kernels import layout
from bitplan.kernels.launch import KernelConfig, WeightFormat
from bitplan.kernels.numerics import NF4_CODE_BOOK
from bitplan.kernels.qlinear import QuantLinear, w8a8_reference
from bitplan.methods.rtn import quantize_rtn
from bitplan.methods.scheme import QuantizedWeight, Scheme


@pytest.fixture
def seed() -> int:
    value = secrets.randbits(31)
    torch.manual_seed(value)
    return value


def rtn_layer(scheme: str, n=48, k=256, bias=True) -> tuple[QuantLinear, QuantizedWeight, torch.Tensor | None]:
    qw = quantize_rtn(torch.randn(n, k) * 0.05, Scheme.parse(scheme), torch.float16)
    b = torch.randn(n, dtype=torch.float16) if bias else None
    return QuantLinear.from_quantized(qw, bias=b), qw, b


@pytest.mark.parametrize("scheme", ["rtn-w4g128s", "rtn-w3g64a", "rtn-w8gcs", "rtn-w2g32a"])
def test_reference_path_is_dequantize_then_linear(scheme, seed):
    layer, qw, bias = rtn_layer(scheme)
    x = torch.randn(3, 5, 256)
    expected = F.linear(x, qw.dequantize(torch.float32), bias.float())
    out = layer.to(torch.float32)(x)
    assert out.shape == (3, 5, 48)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5), f"seed={seed}"


@pytest.mark.triton
@pytest.mark.parametrize("scheme,m,dtype", [
    ("rtn-w4g128s", 1, torch.float16), ("rtn-w4g64a", 17, torch.bfloat16),
    ("rtn-w6g32s", 3, torch.float16), ("rtn-w8gca", 1, torch.bfloat16),
])
def test_triton_path_matches_reference_path(scheme, m, dtype, seed, device, rel_err):
    layer, _, _ = rtn_layer(scheme)
    x = torch.randn(m, 256, dtype=dtype)
    layer.backend = "reference"
    ref = layer(x.float())
    layer = layer.to(device)
    layer.backend = "triton"
    out = layer(x.to(device))
    assert out.dtype == dtype and out.shape == (m, 48)
    assert rel_err(out, ref) < (1e-3 if dtype == torch.float16 else 1e-2), f"seed={seed}"


def nf4_weight(n=32, k=128, group=64) -> QuantizedWeight:
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    scale = (torch.rand(n, k // group) + 0.5).to(torch.float16)
    return QuantizedWeight(codes, scale, None, Scheme("nf4", 4, group, True))


def fp8_weight(n=32, k=128) -> QuantizedWeight:
    bits = (torch.randn(n, k) * 3).to(torch.float8_e4m3fn).view(torch.int8)
    scale = (torch.rand(n, 1) * 0.01 + 0.001).to(torch.float32)
    return QuantizedWeight(bits, scale, None, Scheme("fp8", 8, 0, True))


def w8a8_weight(n=32, k=128) -> QuantizedWeight:
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    return QuantizedWeight(codes, torch.rand(n, 1) * 0.01, None, Scheme("smoothquant", 8, 0, True, act_bits=8))


def test_nf4_fp8_w8a8_reference_values(seed):
    x = torch.randn(2, 128)
    nf4 = nf4_weight()
    expected = torch.tensor(NF4_CODE_BOOK)[nf4.codes.long() + 8] * nf4.scale.float().repeat_interleave(64, dim=1)
    assert torch.allclose(QuantLinear.from_quantized(nf4)(x), x @ expected.T, rtol=1e-5, atol=1e-5)
    fp8 = fp8_weight()
    expected = fp8.codes.view(torch.float8_e4m3fn).float() * fp8.scale
    assert torch.allclose(QuantLinear.from_quantized(fp8)(x), x @ expected.T, rtol=1e-5, atol=1e-5)
    w8 = w8a8_weight()
    layer = QuantLinear.from_quantized(w8)
    assert layer.fmt is WeightFormat.W8A8
    assert torch.equal(layer(x), w8a8_reference(x, w8.codes, w8.scale, None))
    assert (layer(x) - x @ (w8.codes.float() * w8.scale).T).norm() / layer(x).norm() < 2e-2


@pytest.mark.triton
@pytest.mark.parametrize("make,m,dtype", [
    (nf4_weight, 3, torch.float16), (fp8_weight, 1, torch.bfloat16), (w8a8_weight, 17, torch.float16),
    (w8a8_weight, 1, torch.bfloat16),
], ids=["nf4", "fp8", "w8a8-m17", "w8a8-m1"])
def test_other_formats_triton_matches_reference(make, m, dtype, seed, device, rel_err, away_from_ties):
    layer = QuantLinear.from_quantized(make(), bias=torch.randn(32))
    x = torch.randn(m, 128, dtype=dtype)
    if make is w8a8_weight:  # per-token activation codes: off the ties where the kernel and torch may round apart
        x = away_from_ties(x)
    layer.backend = "reference"
    ref = layer(x.float())
    layer = layer.to(device)
    layer.backend = "triton"
    out = layer(x.to(device))
    assert rel_err(out, ref) < (1e-3 if dtype == torch.float16 else 1e-2), f"seed={seed}"


def test_module_cast_keeps_fp8_bytes_and_codes():
    layer = QuantLinear.from_quantized(fp8_weight())
    before = layer.fp8_weight().float().clone()
    layer = layer.to(torch.float16)
    assert layer.weight_packed.dtype == torch.uint8
    assert torch.equal(layer.fp8_weight().float(), before)
    assert layer.weight_scale.dtype == torch.float16


def test_from_checkpoint_round_trip(seed):
    layer, qw, bias = rtn_layer("rtn-w4g64a")
    tensors = dict(layer.state_dict())
    assert set(tensors) == {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "bias"}
    assert tensors["weight_shape"].tolist() == [48, 256]
    again = QuantLinear.from_checkpoint(tensors, fmt="int", bits=4, group_size=64)
    x = torch.randn(4, 256, dtype=torch.float16)
    assert torch.equal(again(x), layer(x))
    fp8 = fp8_weight()
    ct = {"weight": fp8.codes.view(torch.float8_e4m3fn), "weight_scale": fp8.scale}
    layer8 = QuantLinear.from_checkpoint(ct, fmt="fp8", bits=8, group_size=0)
    assert layer8.out_features == 32 and layer8.in_features == 128


def test_constructor_errors():
    packed = layout.pack_codes(torch.zeros(8, 64, dtype=torch.int8), 4)
    scale = torch.ones(8, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match="int weight must be torch.int32 \\[8, 8\\]"):
        QuantLinear(packed[:, :4], scale, (8, 64), bits=4, group_size=32)
    with pytest.raises(ValueError, match="weight_scale"):
        QuantLinear(packed, scale.to(torch.int32), (8, 64), bits=4, group_size=32)
    with pytest.raises(ValueError, match="bias"):
        QuantLinear(packed, scale, (8, 64), bits=4, group_size=32, bias=torch.zeros(7))
    with pytest.raises(ValueError, match="weight_zero_point"):
        QuantLinear(packed, scale, (8, 64), bits=4, group_size=32, weight_zero_point=torch.zeros(8, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="backend"):
        QuantLinear(packed, scale, (8, 64), bits=4, group_size=32, backend="cuda")
    with pytest.raises(ValueError, match="w8a8 weight"):
        QuantLinear(packed, scale, (8, 64), fmt="w8a8")
    layer = QuantLinear(packed, scale, (8, 64), bits=4, group_size=32)
    with pytest.raises(ValueError, match="takes 64"):
        layer(torch.zeros(2, 63))
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        layer(torch.zeros(2, 64, dtype=torch.float64))


def test_kernel_configs_are_used_per_path():
    gemv = KernelConfig(1, 16, 64, 4, 1, split_k=2)
    layer, _, _ = rtn_layer("rtn-w4g128s")
    layer.kernel_configs = {"gemv": gemv}
    assert layer._config(torch.zeros(1, 1, 256)) is gemv
    assert layer._config(torch.zeros(4, 256)) is None
    assert KernelConfig.from_dict(gemv.to_dict()) == gemv


def test_methods_nf4_and_fp8_outputs_are_accepted(seed):
    """``bitplan.methods`` NF4 (uint8 indices, bytes [N, K/2]) and FP8 results load without copies of meaning."""
    nf4 = pytest.importorskip("bitplan.methods.nf4")
    fp8 = pytest.importorskip("bitplan.methods.fp8")
    weight = torch.randn(24, 128)
    q4 = nf4.quantize_nf4(weight, block_size=64)
    layer = QuantLinear.from_quantized(q4)
    assert torch.equal(layer.dequantized_weight(), q4.dequantize())
    from_bytes = QuantLinear.from_checkpoint({"weight_packed": nf4.pack_nf4(q4.codes), "weight_absmax": q4.absmax},
                                             fmt="nf4", bits=4, group_size=64)
    assert torch.equal(from_bytes.weight_packed, layer.weight_packed)
    q8 = fp8.quantize_fp8(weight, group_size=0)
    assert torch.equal(QuantLinear.from_quantized(q8).dequantized_weight(), q8.dequantize())


@pytest.mark.triton
def test_tune_keeps_a_candidate_and_stays_correct(seed, device, rel_err, monkeypatch):
    from bitplan.kernels import configs

    small = {"gemv": [KernelConfig(1, 16, 64, 4, 1), KernelConfig(1, 32, 128, 4, 1)],
             "small": [KernelConfig(16, 32, 64, 4, 1)], "gemm": [KernelConfig(32, 32, 64, 4, 1)]}
    monkeypatch.setattr(configs, "CANDIDATES", small)
    layer, _, _ = rtn_layer("rtn-w4g64a", n=32, k=128)
    layer = layer.to(device)
    layer.backend = "triton"
    cpu_timer = (lambda fn: (fn(), 1.0)[1]) if device.type == "cpu" else None  # interpreter: every config ties
    chosen = layer.tune(rows=(1, 3), timer=cpu_timer)
    assert chosen["gemv"] in small["gemv"] and chosen["small"] == small["small"][0]
    x = torch.randn(3, 128, dtype=torch.float16, device=device)
    reference = QuantLinear.from_checkpoint(dict(layer.state_dict()), fmt="int", bits=4, group_size=64, backend="reference")
    assert rel_err(layer(x), reference.cpu()(x.cpu().float())) < 1e-3, f"seed={seed}"
