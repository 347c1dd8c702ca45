"""NF4: the code book is the paper's, quantization picks the nearest level, double quantization."""

import pytest
import torch
from smollm2_layers import real_layers  # noqa: F401  (fixture)

from bitplan.kernels.layout import nf4_weight_bytes
from bitplan.kernels.numerics import NF4_CODE_BOOK, nf4_code_book
from bitplan.methods.nf4 import (
    double_quantize,
    nearest_level,
    normal_float_levels,
    pack_nf4,
    quantize_nf4,
    unpack_nf4,
)

# QLoRA appendix E, to the digits printed there.
PAPER_TABLE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
               -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
               0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
               0.7229568362236023, 1.0]


def test_code_book_is_the_papers_table():
    assert list(NF4_CODE_BOOK) == PAPER_TABLE
    assert nf4_code_book().shape == (16,) and bool((nf4_code_book().diff() > 0).all())


def test_code_book_follows_from_normal_quantiles():
    torch.testing.assert_close(normal_float_levels(), nf4_code_book(), rtol=0, atol=1e-6)


def test_nearest_level_and_exact_levels_round_trip():
    levels = nf4_code_book()
    assert torch.equal(nearest_level(levels), torch.arange(16, dtype=torch.uint8))
    x = torch.rand(1000) * 2 - 1
    brute = (x.unsqueeze(1) - levels).abs().argmin(dim=1)
    assert torch.equal(nearest_level(x).to(torch.int64), brute)
    weight = (levels[torch.randint(0, 16, (8, 128))] * 0.3)
    weight[:, ::64] = 0.3  # every block holds its absmax exactly
    torch.testing.assert_close(quantize_nf4(weight).dequantize(), weight, rtol=0, atol=1e-7)


def test_quantize_error_and_zero_blocks():
    weight = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    weight[0, :64] = 0.0
    q = quantize_nf4(weight, block_size=64)
    assert q.codes.dtype == torch.uint8 and q.absmax.shape == (16, 4)
    deq = q.dequantize()
    assert torch.equal(deq[0, :64], torch.zeros(64))
    assert float((weight - deq).norm() / weight.norm()) < 0.11


def test_double_quantization():
    weight = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    plain, dq = quantize_nf4(weight), quantize_nf4(weight, double_quant=True)
    assert torch.equal(plain.codes, dq.codes)
    assert dq.absmax.codes.dtype == torch.float8_e4m3fn and dq.absmax.scale.numel() == 2
    rel = (dq.block_absmax() - plain.absmax).abs() / plain.absmax
    assert float(rel.max()) < 0.05
    assert float((weight - dq.dequantize()).norm()) < 1.01 * float((weight - plain.dequantize()).norm())
    constants = torch.rand(300) + 1.0
    torch.testing.assert_close(double_quantize(constants).dequantize(), constants, rtol=0.02, atol=0.0)


def test_packing_and_bytes():
    codes = torch.randint(0, 16, (6, 128), dtype=torch.uint8)
    packed = pack_nf4(codes)
    assert packed.shape == (6, 64) and int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)
    assert torch.equal(unpack_nf4(packed), codes)
    assert nf4_weight_bytes(576, 1536, 64, False) == 576 * 768 + 576 * 24 * 4
    assert nf4_weight_bytes(576, 1536, 64, True) == 576 * 768 + 576 * 24 + 54 * 4 + 4
    with pytest.raises(ValueError):
        quantize_nf4(torch.randn(4, 96), block_size=64)


@pytest.mark.slow
def test_real_layers_nf4_beats_uniform_4bit_absmax(real_layers):
    """NF4 suits normally distributed weights: on real layers it beats symmetric 4-bit absmax RTN."""
    from bitplan.methods.rtn import quantize_rtn
    from bitplan.methods.scheme import Scheme

    for name, (weight, _, _) in real_layers.items():
        nf4 = (weight - quantize_nf4(weight, 64).dequantize()).norm()
        rtn = (weight - quantize_rtn(weight, Scheme("rtn", 4, 64, True), torch.float32).dequantize()).norm()
        assert nf4 < rtn, name
