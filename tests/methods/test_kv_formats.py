"""KV cache formats: bytes, and rounding against independent references (the gguf package for
llama.cpp's q8_0/q4_0, torch's float8 dtypes for fp8)."""

from __future__ import annotations

from fractions import Fraction

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from bitplan.errors import BitplanError
from bitplan.methods.kv_cache import E4M3_MAX, canonical_kv_dtype, kv_format, round_kv, tensor_scale


def kv(seed: int = 0, head_dim: int = 64) -> torch.Tensor:
    return torch.randn(2, 3, 7, head_dim, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("name, ggml", [("q8_0", gguf.GGMLQuantizationType.Q8_0), ("q4_0", gguf.GGMLQuantizationType.Q4_0)])
def test_ggml_kv_formats_round_as_llama_cpp(name, ggml):
    x = kv()
    flat = x.reshape(-1, x.shape[-1]).numpy()
    reference = dequantize(quantize(flat, ggml), ggml).reshape(x.shape)
    np.testing.assert_allclose(round_kv(x, name).numpy(), reference, rtol=0, atol=1e-6)
    # bytes: llama.cpp's block of 32 values with one fp16 scale
    assert kv_format(name).bytes_per_value == Fraction(quantize(flat, ggml).nbytes, flat.size)


def test_fp8_e4m3_uses_the_layer_scale_and_saturates():
    x = kv()
    scale = tensor_scale(float(x.abs().max()))
    out = round_kv(x, "fp8_e4m3", scale)
    assert torch.equal(out, (x / scale).to(torch.float8_e4m3fn).float() * scale)
    assert float((out - x).abs().max()) <= float(x.abs().max()) / 16  # 3 mantissa bits
    assert float(round_kv(x * 10, "fp8_e4m3", scale).abs().max()) == pytest.approx(E4M3_MAX * scale)  # clamps, no inf
    with pytest.raises(ValueError):
        round_kv(x, "fp8_e4m3")


def test_sixteen_bit_formats_are_dtype_casts_and_aliases_resolve():
    x = kv()
    assert torch.equal(round_kv(x, "bfloat16"), x.to(torch.bfloat16).float())
    assert canonical_kv_dtype("fp8") == "fp8_e4m3" and canonical_kv_dtype("bf16") == "bfloat16"
    with pytest.raises(BitplanError, match="unknown KV cache dtype 'int3'"):
        kv_format("int3")


def test_block_formats_refuse_head_dims_llama_cpp_cannot_block():
    with pytest.raises(BitplanError, match="divisible by 32"):
        round_kv(kv(head_dim=48), "q8_0")
