"""Every Triton kernel against the reference kernel (dequantize, then ``F.linear``).

Inputs are fresh random draws each run (the seed is in the failure message), outputs are
poisoned with NaN before each launch, M covers the GEMV (1), split-K tensor-core (3) and tiled
GEMM (17) paths. Shapes are small for the CPU interpreter, plus a few real smollm2-135m Linears.
"""

from __future__ import annotations

import secrets

import pytest
import torch

from bitplan.kernels import configs, launch, layout
from bitplan.kernels.launch import KernelConfig, WeightFormat
from bitplan.kernels.numerics import NF4_CODE_BOOK
from bitplan.kernels.qlinear import quantize_per_token_reference, w8a8_reference
from bitplan.kernels.reference import linear_reference
from bitplan.methods.rtn import quantize_rtn
from bitplan.methods.scheme import Scheme

pytestmark = pytest.mark.triton

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128, 0)
FP16_BOUND, BF16_BOUND = 1e-3, 1e-2


@pytest.fixture
def seed() -> int:
    value = secrets.randbits(31)
    torch.manual_seed(value)
    return value


def bound(dtype: torch.dtype) -> float:
    return FP16_BOUND if dtype == torch.float16 else BF16_BOUND


def packed_int(n: int, k: int, bits: int, group: int, symmetric: bool, device, scale_dtype=torch.float16):
    """Random weight quantized by RTN, packed as emitted; returns (codes, scale, zero, packed, packed_zero)."""
    qw = quantize_rtn(torch.randn(n, k) * 0.05, Scheme("rtn", bits, group, symmetric), scale_dtype)
    packed = layout.pack_codes(qw.codes, bits).to(device)
    packed_zero = None if qw.zero is None else layout.pack_codes(qw.zero, bits, dim=0).to(device)
    return qw.codes, qw.scale, qw.zero, packed, packed_zero


def run_int(m, n, k, bits, group, symmetric, dtype, device, poisoned, config=None, with_bias=True):
    codes, scale, zero, packed, packed_zero = packed_int(n, k, bits, group, symmetric, device)
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(n, dtype=dtype) if with_bias else None
    ref = linear_reference(x.float(), codes, scale, zero, group, None if bias is None else bias.float())
    out = poisoned((m, n), dtype, device)
    launch.weight_only_linear(
        x.to(device), packed, scale.to(device), packed_zero, fmt="int", bits=bits, group_size=group,
        out_features=n, bias=None if bias is None else bias.to(device), config=config, out=out)
    return out, ref


CASES = [(b, g, s) for b in BITS for g in GROUPS for s in (True, False)]


@pytest.mark.parametrize("bits,group,symmetric", CASES, ids=[f"w{b}g{g}{'s' if s else 'a'}" for b, g, s in CASES])
def test_integer_kernels_match_reference(bits, group, symmetric, seed, device, poisoned, rel_err):
    """Every bit width, group and symmetry; GEMV (M=1) and one of the tensor-core paths (M=3 or 17)."""
    index = CASES.index((bits, group, symmetric))
    dtype = (torch.float16, torch.bfloat16)[index % 2]
    k = 384 if group else 200  # per channel: K not a multiple of the packing unit
    for m in (1, (3, 17)[index // 2 % 2]):
        out, ref = run_int(m, 40, k, bits, group, symmetric, dtype, device, poisoned)
        err = rel_err(out, ref)
        assert err < bound(dtype), f"M={m} {dtype} seed={seed}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_w4_all_paths_and_dtypes(m, dtype, seed, device, poisoned, rel_err):
    for symmetric in (True, False):
        out, ref = run_int(m, 72, 256, 4, 128, symmetric, dtype, device, poisoned)
        err = rel_err(out, ref)
        assert err < bound(dtype), f"symmetric={symmetric} seed={seed}: relative error {err:.2e}"


SMOLLM2 = [  # (name, out, in, scheme, M): real smollm2-135m Linears (hidden 576, MLP 1536)
    ("k_proj", 192, 576, "rtn-w4g64a", 3),
    ("down_proj", 576, 1536, "rtn-w4g128s", 1),
    ("up_proj", 1536, 576, "rtn-w8gcs", 17),
    ("o_proj", 576, 576, "rtn-w3g64a", 1),
]


@pytest.mark.parametrize("name,n,k,scheme,m", SMOLLM2, ids=[case[0] for case in SMOLLM2])
def test_smollm2_shapes(name, n, k, scheme, m, seed, device, poisoned, rel_err):
    parsed = Scheme.parse(scheme)
    out, ref = run_int(m, n, k, parsed.bits, parsed.group_size, parsed.symmetric, torch.float16, device, poisoned)
    assert rel_err(out, ref) < FP16_BOUND, f"{name} {scheme} seed={seed}"


@pytest.mark.parametrize("m,block_m", [(1, 1), (5, 16)])
def test_explicit_split_k(m, block_m, seed, device, poisoned, rel_err):
    """Split-K sums partial products through a float32 workspace; the bias is added once."""
    config = KernelConfig(block_m, 16, 64, 4, 1, split_k=4)
    out, ref = run_int(m, 24, 512, 4, 64, False, torch.float16, device, poisoned, config=config)
    assert rel_err(out, ref) < FP16_BOUND, f"seed={seed}"


@pytest.mark.parametrize("m,bits,split", [(3, 4, 2), (17, 3, 1)])
def test_swapped_operands(m, bits, split, seed, device, poisoned, rel_err):
    """``swap_ab`` computes ``W @ x.T`` (weights as the left operand) and stores the transpose."""
    config = KernelConfig(16, 32, 64, 4, 1, split_k=split, swap_ab=True)
    out, ref = run_int(m, 40, 256, bits, 64, False, torch.float16, device, poisoned, config=config)
    assert rel_err(out, ref) < FP16_BOUND, f"seed={seed}"


@pytest.mark.parametrize("in_place", [True, False])
def test_w4_gemv_decodings(in_place, seed, device, poisoned, rel_err, monkeypatch):
    """The 4-bit GEMV decodes nibbles in place (four shifts per word) or with a shift per code."""
    monkeypatch.setattr(configs, "GEMV_NIBBLES_IN_PLACE", in_place)
    for group, symmetric, dtype in ((128, True, torch.float16), (32, False, torch.bfloat16), (0, False, torch.float16)):
        out, ref = run_int(1, 40, 384, 4, group, symmetric, dtype, device, poisoned)
        err = rel_err(out, ref)
        assert err < bound(dtype), f"g{group} symmetric={symmetric} seed={seed}: relative error {err:.2e}"


@pytest.mark.parametrize("bits,group,symmetric", [(4, 128, True), (8, 0, False), (2, 32, False)])
def test_prefill_dequantize_then_matmul(bits, group, symmetric, seed, device, poisoned, rel_err, monkeypatch):
    """From ``PREFILL_DEQUANT_MIN_M`` rows the weight is dequantized (``int_dequant_kernel``), then matmul."""
    monkeypatch.setattr(configs, "PREFILL_DEQUANT_MIN_M", 17)
    out, ref = run_int(17, 40, 384, bits, group, symmetric, torch.float16, device, poisoned)
    assert rel_err(out, ref) < FP16_BOUND, f"seed={seed}"


def test_gemv_handles_several_rows(seed, device, poisoned, rel_err):
    """A GEMV config (block_m 1) may be used for M > 1: one program row per activation row."""
    out, ref = run_int(3, 40, 256, 5, 32, True, torch.float16, device, poisoned,
                       config=KernelConfig(1, 16, 128, 4, 1, split_k=1), with_bias=False)
    assert rel_err(out, ref) < FP16_BOUND, f"seed={seed}"


def nf4_case(n, k, group):
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    scale = (torch.rand(n, k // group if group else 1) + 0.5).to(torch.float16)
    table = torch.tensor(NF4_CODE_BOOK)
    width = group or k
    weight = (table[codes.long() + 8].view(n, -1, width) * scale.float().unsqueeze(-1)).reshape(n, k)
    return layout.pack_codes(codes, 4), scale, weight


@pytest.mark.parametrize("m,dtype", [(1, torch.float16), (3, torch.bfloat16), (17, torch.float16)])
def test_nf4(m, dtype, seed, device, poisoned, rel_err):
    n, k, group = 48, 256, 64
    packed, scale, weight = nf4_case(n, k, group)
    x = torch.randn(m, k, dtype=dtype)
    out = poisoned((m, n), dtype, device)
    launch.weight_only_linear(x.to(device), packed.to(device), scale.to(device), None, fmt=WeightFormat.NF4,
                              bits=4, group_size=group, out_features=n, out=out)
    err = rel_err(out, x.float() @ weight.T)
    assert err < bound(dtype), f"seed={seed}: relative error {err:.2e}"


@pytest.mark.parametrize("m,group,dtype", [(1, 0, torch.float16), (3, 128, torch.bfloat16), (17, 0, torch.float16)])
def test_fp8_e4m3(m, group, dtype, seed, device, poisoned, rel_err):
    n, k = 40, 256
    w8 = (torch.randn(n, k) * 2).to(torch.float8_e4m3fn)
    scale = (torch.rand(n, k // group if group else 1) * 0.01 + 0.001).to(torch.bfloat16)
    width = group or k
    weight = (w8.float().view(n, -1, width) * scale.float().unsqueeze(-1)).reshape(n, k)
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(n, dtype=dtype)
    out = poisoned((m, n), dtype, device)
    launch.weight_only_linear(x.to(device), w8.to(device), scale.to(device), None, fmt="fp8", bits=8,
                              group_size=group, out_features=n, bias=bias.to(device), out=out)
    err = rel_err(out, x.float() @ weight.T + bias.float())
    assert err < bound(dtype), f"seed={seed}: relative error {err:.2e}"


def test_quantize_per_token_matches_torch(seed, device):
    x = torch.randn(5, 300, dtype=torch.float16) * torch.rand(5, 1, dtype=torch.float16) * 4
    x[2] = 0  # an all-zero row gets scale 0 and codes 0
    x[3] = x[3].clamp(-100, 100)
    x[3, :5] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5])  # scale 1: exact ties round half to even
    xq, xs = launch.quantize_per_token(x.to(device))
    ref_q, ref_s = quantize_per_token_reference(x)
    assert torch.equal(xs.cpu(), ref_s), f"seed={seed}"
    # Codes match exactly, except that a product landing within float32 rounding of a .5 tie may
    # round either way (the interpreter and torch order the multiply differently): off by one there only.
    scaled = x.float() * torch.where(ref_s > 0, 1.0 / ref_s.clamp_min(1e-30), torch.zeros_like(ref_s))[:, None]
    near_tie = ((scaled - scaled.floor()) - 0.5).abs() < 1e-4
    diff = (xq.cpu().int() - ref_q.int()).abs()
    assert int(diff.max()) <= 1 and bool((near_tie | (diff == 0)).all()), f"seed={seed}"
    assert xq[3, :5].tolist() == [127, 0, 2, 2, 0] and float(xs[2]) == 0.0


@pytest.mark.parametrize("m,dtype", [(1, torch.float16), (3, torch.bfloat16), (17, torch.float16)])
def test_w8a8(m, dtype, seed, device, poisoned, rel_err, away_from_ties):
    n, k = 40, 320
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    weight_scale = (torch.rand(n, 1) * 0.01).to(torch.float16)
    x = away_from_ties(torch.randn(m, k, dtype=dtype))
    bias = torch.randn(n, dtype=dtype)
    out = poisoned((m, n), dtype, device)
    launch.w8a8_linear(x.to(device), weight.to(device), weight_scale.to(device), bias.to(device), out=out)
    err = rel_err(out, w8a8_reference(x.float(), weight, weight_scale, bias))
    assert err < bound(dtype), f"seed={seed}: relative error {err:.2e}"


def test_launcher_rejects_bad_layouts(device):
    _, scale, _, packed, _ = packed_int(8, 64, 4, 32, True, device)
    x = torch.randn(2, 64, dtype=torch.float16, device=device)
    kwargs = dict(fmt="int", bits=4, group_size=32, out_features=8)
    with pytest.raises(ValueError, match="weight must be"):
        launch.weight_only_linear(x, packed[:, :4], scale, None, **kwargs)
    with pytest.raises(ValueError, match="weight_scale"):
        launch.weight_only_linear(x, packed, scale[:, :1], None, **kwargs)
    with pytest.raises(ValueError, match="weight must be"):  # K comes from x: the packed words disagree
        launch.weight_only_linear(x[:, :32], packed, scale, None, **kwargs)
    with pytest.raises(ValueError, match="group_size"):
        launch.weight_only_linear(x, packed, scale, None, **dict(kwargs, bits=3, group_size=16))
    with pytest.raises(ValueError, match="activations"):
        launch.weight_only_linear(x.to(torch.int32), packed, scale, None, **kwargs)
    with pytest.raises(ValueError, match="weight_zero_point"):
        launch.weight_only_linear(x, packed, scale, torch.zeros(3, 2, dtype=torch.int32, device=device), **kwargs)
