"""GGUF quantizers (bitplan.methods.ggml) against gguf-py and against llama.cpp's own ggml.

The gguf-py comparisons always run. The comparisons with ggml itself call
``ggml_quantize_chunk`` / the ``to_float`` type traits of a built ``libggml-base.so`` through
ctypes: set ``BITPLAN_LLAMA_CPP`` to a llama.cpp build prefix (``scripts/build_llama_cpp.sh``
makes one), otherwise they skip.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.kernels.layout import GGML_TYPES, GGMLType, is_valid_row_size, llama_quantize_type, row_size_bytes, tensor_size_bytes
from bitplan.methods.ggml import dequantize_ggml, quantize_ggml, quantize_ggml_bytes
from bitplan.models.source import WeightReader

LEGACY = [GGMLType.Q8_0, GGMLType.Q5_1, GGMLType.Q5_0, GGMLType.Q4_1, GGMLType.Q4_0]
K_QUANTS = [GGMLType.Q6_K, GGMLType.Q5_K, GGMLType.Q4_K, GGMLType.Q3_K, GGMLType.Q2_K]
FLOATS = [GGMLType.F32, GGMLType.F16, GGMLType.BF16]
ALL = FLOATS + LEGACY + K_QUANTS
LAYER = "model.layers.3"


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def real_weights(smollm_folder) -> dict[str, np.ndarray]:
    """Two SmolLM2 Linears: down_proj [576, 1536] (k-quant rows) and q_proj [576, 576] (legacy only)."""
    reader = WeightReader(smollm_folder)
    return {
        "down_proj": reader.tensor(f"{LAYER}.mlp.down_proj.weight").numpy(),
        "q_proj": reader.tensor(f"{LAYER}.self_attn.q_proj.weight").numpy(),
    }


def importance(n: int, kind: str) -> np.ndarray | None:
    """Synthetic imatrices: positive log-normal, or with a third of the columns zero (unused inputs)."""
    rng = np.random.default_rng(7)
    if kind == "none":
        return None
    values = rng.lognormal(size=n)
    if kind == "sparse":
        values = np.where(rng.random(n) < 0.3, 0.0, values)
    return values.astype(np.float32)


SIGNED_ZEROS_ROW = 1


def edge_rows(n: int = 512) -> np.ndarray:
    """Rows that exercise ggml's special cases: zeros (row 1: with -0.0), constant and one-signed blocks,
    lone spikes, scales near fp16 underflow/overflow, heavy tails and values on a grid (ties)."""
    rng = np.random.default_rng(3)
    signed_zeros = np.zeros(n)
    signed_zeros[::7] = -0.0
    spikes = np.zeros(n)
    spikes[5], spikes[300] = 1.0, -2.5
    mixed = rng.standard_normal(n)
    mixed[:32], mixed[64:96], mixed[128:144] = 0.0, 5.0, 1e-30
    rows = [
        np.zeros(n), signed_zeros, np.full(n, 0.37), np.full(n, -0.37),
        np.abs(rng.standard_normal(n)), -np.abs(rng.standard_normal(n)), spikes, mixed,
        rng.standard_normal(n) * 1e-6, rng.standard_normal(n) * 1e-9, rng.standard_normal(n) * 1e5,
        rng.standard_t(1.5, n), np.round(rng.standard_normal(n) * 4) / 4,
    ]
    return np.stack(rows).astype(np.float32)


def random_weight(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.02).astype(np.float32)


# -------------------------------------------------------------------------- ggml itself


class TypeTraits(ctypes.Structure):
    """``struct ggml_type_traits`` (ggml.h)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def find_libggml() -> Path | None:
    prefix = os.environ.get("BITPLAN_LLAMA_CPP")
    if not prefix:
        return None
    for folder in ("build/bin", "lib", "lib64", "bin", "."):
        candidate = Path(prefix) / folder / "libggml-base.so"
        if candidate.is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def ggml():
    path = find_libggml()
    if path is None:
        pytest.skip("no llama.cpp build: set BITPLAN_LLAMA_CPP to a prefix holding build/bin/libggml-base.so "
                    "(scripts/build_llama_cpp.sh) to compare with ggml_quantize_chunk")
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def ggml_quantize(lib, weight: np.ndarray, ggml_type: GGMLType, quant_weights: np.ndarray | None) -> np.ndarray:
    """``ggml_quantize_chunk(type, weight, dst, 0, rows, n_per_row, quant_weights)`` -> ``[rows, row_bytes]``."""
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    rows, n_per_row = weight.shape
    out = np.zeros((rows, row_size_bytes(ggml_type, n_per_row)), np.uint8)
    qw = None if quant_weights is None else np.ascontiguousarray(quant_weights, dtype=np.float32)
    written = lib.ggml_quantize_chunk(GGML_TYPES[ggml_type].type_id, weight.ctypes.data, out.ctypes.data, 0, rows,
                                      n_per_row, None if qw is None else qw.ctypes.data)
    assert written == out.size
    return out


def ggml_dequantize(lib, data: np.ndarray, ggml_type: GGMLType, n_per_row: int) -> np.ndarray:
    data = np.ascontiguousarray(data)
    out = np.zeros(data.shape[0] * n_per_row, np.float32)
    to_float = TO_FLOAT(lib.ggml_get_type_traits(GGML_TYPES[ggml_type].type_id).contents.to_float)
    to_float(data.ctypes.data, out.ctypes.data, out.size)
    return out.reshape(data.shape[0], n_per_row)


def assert_same_bytes(ours: np.ndarray, theirs: np.ndarray, label: str) -> None:
    rows = np.nonzero((ours != theirs).any(axis=1))[0]
    assert rows.size == 0, f"{label}: {rows.size} rows differ, first {rows[:5].tolist()}"


# ----------------------------------------------------------------------- sizes and table


def test_type_table_matches_gguf():
    for ggml_type, info in GGML_TYPES.items():
        assert gguf.GGMLQuantizationType[ggml_type.value].value == info.type_id
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(info.type_id)] == (info.block_size, info.type_size)
    assert GGML_TYPES[GGMLType.Q4_K].bits_per_weight == 4.5
    assert GGML_TYPES[GGMLType.Q6_K].bits_per_weight == 6.5625


def test_sizes_and_row_validity():
    assert tensor_size_bytes(GGMLType.Q4_K, (576, 1536)) == 576 * 6 * 144
    assert tensor_size_bytes("Q8_0", (576, 576)) == 576 * 18 * 34
    assert tensor_size_bytes(GGMLType.F16, (49152, 576)) == 49152 * 576 * 2
    assert is_valid_row_size(GGMLType.Q4_0, 576) and not is_valid_row_size(GGMLType.Q4_K, 576)
    assert not is_valid_row_size(GGMLType.Q8_0, 48)
    with pytest.raises(BitplanError, match="multiple"):
        row_size_bytes(GGMLType.Q2_K, 576)


def test_llama_quantize_fallback_types():
    """As llama-quantize --pure wrote them for SmolLM2 (bench/ggml_vs_llama_quantize.py)."""
    assert llama_quantize_type(GGMLType.Q4_K, 1536) == GGMLType.Q4_K
    expected = {GGMLType.Q6_K: GGMLType.Q8_0, GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q4_K: GGMLType.Q5_0,
                GGMLType.Q3_K: GGMLType.Q4_0, GGMLType.Q2_K: GGMLType.Q4_0, GGMLType.Q8_0: GGMLType.Q8_0}
    for asked, written in expected.items():
        assert llama_quantize_type(asked, 576) == written
    assert llama_quantize_type(GGMLType.Q4_K, 48) == GGMLType.F16
    assert llama_quantize_type(GGMLType.Q8_0, 48) == GGMLType.F16


def test_bad_inputs_raise_user_errors():
    with pytest.raises(BitplanError, match="2-D"):
        quantize_ggml(torch.zeros(4, 4, 32), GGMLType.Q8_0)
    with pytest.raises(BitplanError, match="importance matrix"):
        quantize_ggml(torch.zeros(4, 64), GGMLType.Q4_0, torch.ones(32))
    with pytest.raises(BitplanError, match="blocks of 256"):
        quantize_ggml(torch.zeros(4, 576), GGMLType.Q4_K)


# ------------------------------------------------------------------- hand-built answers


def test_q8_0_and_q4_0_known_blocks():
    codes = np.arange(-127, 129, 8, dtype=np.float32)[:32]
    codes[-1] = 127.0  # amax 127 -> d = 1: the codes come back unchanged
    q8 = quantize_ggml(codes[None], GGMLType.Q8_0)
    assert q8.data[0, :2].numpy().view(np.float16)[0] == 1.0
    assert np.array_equal(q8.data[0, 2:].numpy().view(np.int8), codes.astype(np.int8))
    assert torch.equal(q8.dequantized[0], torch.from_numpy(codes))
    x = np.tile(np.arange(-8, 8, dtype=np.float32), 2) * 0.5  # max is -4 -> d = 0.5, levels = x/d + 8
    q4 = quantize_ggml(x[None], GGMLType.Q4_0)
    assert q4.data[0, :2].numpy().view(np.float16)[0] == 0.5
    assert np.array_equal(q4.data[0, 2:].numpy(), (np.arange(16) | (np.arange(16) << 4)).astype(np.uint8))
    assert torch.equal(q4.dequantized[0], torch.from_numpy(x))


def test_quantize_accepts_other_float_dtypes():
    weight = torch.from_numpy(random_weight(8, 256)).to(torch.bfloat16)
    assert torch.equal(quantize_ggml(weight, GGMLType.Q4_K).data, quantize_ggml(weight.float(), GGMLType.Q4_K).data)


# --------------------------------------------------------------------------- vs gguf-py


@pytest.mark.parametrize("ggml_type", [t for t in ALL if t not in K_QUANTS])
def test_bytes_match_gguf_quantize(real_weights, ggml_type):
    """gguf-py quantizes F32/F16/BF16 and the legacy types (k-quants: dequantize only)."""
    edge = np.delete(edge_rows(), SIGNED_ZEROS_ROW, axis=0)  # see test_gguf_py_differs_from_ggml_on_signed_zeros
    for name, weight in [("q_proj", real_weights["q_proj"]), ("down_proj", real_weights["down_proj"][:64]),
                         ("random", random_weight(48, 512)), ("edge", edge)]:
        with np.errstate(all="ignore"):  # gguf-py warns on the fp16 overflow of the 1e5 row
            theirs = gguf.quants.quantize(weight, gguf.GGMLQuantizationType[ggml_type.value])
        ours = quantize_ggml_bytes(weight, ggml_type).numpy()
        assert_same_bytes(ours, theirs.view(np.uint8).reshape(ours.shape), f"{ggml_type} {name}")


@pytest.mark.parametrize("ggml_type", [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1])
def test_gguf_py_differs_from_ggml_on_signed_zeros(ggml_type):
    """An all-zero block whose first element is -0.0: ggml keeps the sign of its first minimum / writes
    d = 0.0/-8 = -0.0; gguf-py writes +0. bitplan follows ggml (checked in the ggml tests below)."""
    block = np.zeros((1, 32), np.float32)
    block[0, 0] = -0.0
    theirs = gguf.quants.quantize(block, gguf.GGMLQuantizationType[ggml_type.value]).view(np.uint8).reshape(1, -1)
    ours = quantize_ggml_bytes(block, ggml_type).numpy()
    sign_byte = 1 if ggml_type.value.endswith("_0") else 3  # high byte of d (Q*_0) or of m (Q*_1)
    assert ours[0, sign_byte] == 0x80 and theirs[0, sign_byte] == 0x00
    assert np.array_equal(np.delete(ours, sign_byte, axis=1), np.delete(theirs, sign_byte, axis=1))


@pytest.mark.parametrize("imatrix", ["none", "lognormal"])
@pytest.mark.parametrize("ggml_type", ALL)
def test_dequantized_matches_gguf_dequantize(real_weights, ggml_type, imatrix):
    weight = real_weights["down_proj"][:32]
    result = quantize_ggml(weight, ggml_type, importance(weight.shape[1], imatrix))
    theirs = gguf.quants.dequantize(result.data.numpy(), gguf.GGMLQuantizationType[ggml_type.value])
    assert np.array_equal(theirs.reshape(weight.shape), result.dequantized.numpy())
    assert result.data.dtype == torch.uint8 and tuple(result.data.shape) == (32, row_size_bytes(ggml_type, 1536))
    assert torch.equal(dequantize_ggml(result.data, ggml_type, 1536), result.dequantized)


def test_imatrix_changes_the_choice_and_lowers_weighted_error(real_weights):
    weight = real_weights["down_proj"][:64]
    qw = importance(weight.shape[1], "lognormal")
    plain = quantize_ggml(weight, GGMLType.Q4_K).dequantized.numpy()
    guided = quantize_ggml(weight, GGMLType.Q4_K, qw).dequantized.numpy()
    weighted = lambda deq: float((((deq - weight) ** 2) * qw).sum())  # noqa: E731
    assert not np.array_equal(plain, guided)
    assert weighted(guided) < weighted(plain)


# ------------------------------------------------------------------------- vs ggml itself


def test_type_table_matches_ggml_traits(ggml):
    for ggml_type, info in GGML_TYPES.items():
        traits = ggml.ggml_get_type_traits(info.type_id).contents
        assert traits.type_name.decode().upper() == ggml_type.value
        assert (traits.blck_size, traits.type_size) == (info.block_size, info.type_size)


@pytest.mark.parametrize("imatrix", ["none", "lognormal", "sparse"])
@pytest.mark.parametrize("ggml_type", ALL)
def test_bit_exact_with_ggml_quantize_chunk(ggml, real_weights, ggml_type, imatrix):
    """32 rows of a real down_proj, 32 of q_proj (legacy) and the edge rows, byte for byte."""
    cases = [("down_proj", real_weights["down_proj"][:32]), ("edge", edge_rows())]
    if is_valid_row_size(ggml_type, 576):
        cases.append(("q_proj", real_weights["q_proj"][:32]))
    for name, weight in cases:
        qw = importance(weight.shape[1], imatrix)
        ours = quantize_ggml_bytes(weight, ggml_type, qw).numpy()
        assert_same_bytes(ours, ggml_quantize(ggml, weight, ggml_type, qw), f"{ggml_type} {name} imatrix={imatrix}")


@pytest.mark.parametrize("ggml_type", [t for t in ALL if t != GGMLType.F32])
def test_dequantized_matches_ggml_to_float(ggml, real_weights, ggml_type):
    weight = real_weights["down_proj"][:32]
    result = quantize_ggml(weight, ggml_type)
    assert np.array_equal(ggml_dequantize(ggml, result.data.numpy(), ggml_type, 1536), result.dequantized.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("imatrix", ["none", "lognormal"])
@pytest.mark.parametrize("ggml_type", ALL)
def test_bit_exact_with_ggml_on_whole_layers(ggml, real_weights, ggml_type, imatrix):
    """Every row of down_proj [576, 1536] and (legacy) q_proj [576, 576]."""
    for name, weight in real_weights.items():
        if not is_valid_row_size(ggml_type, weight.shape[1]):
            continue
        qw = importance(weight.shape[1], imatrix)
        ours = quantize_ggml(weight, ggml_type, qw)
        theirs = ggml_quantize(ggml, weight, ggml_type, qw)
        assert_same_bytes(ours.data.numpy(), theirs, f"{ggml_type} {name} imatrix={imatrix}")
        if ggml_type != GGMLType.F32:
            assert np.array_equal(ggml_dequantize(ggml, theirs, ggml_type, weight.shape[1]), ours.dequantized.numpy())
