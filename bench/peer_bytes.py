"""Bytes of the quantized Linears, counted the same way for every peer (``bench/peers.py``).

Only the Linears of the transformer blocks (q, k, v, o, gate, up, down) count: their packed
weights with every scale, minimum and zero point they store. The token embedding, the head (tied
to the embedding in SmolLM2) and the norms are left out for everyone: every peer is measured with
them unquantized, as the original model holds them.

- GGUF (llama.cpp): the bytes of each Linear tensor in the file (ggml's block layouts: Q4_K's
  144 bytes per 256 weights hold its scales and minimums), whatever type llama-quantize chose.
- a bitplan assignment (uniform GPTQ/AWQ, a plan): ``Scheme.weight_bytes``, the bytes the
  emitted checkpoint writes (b-bit codes packed, one scale per group in the model's dtype, plus an
  integer zero point per group when asymmetric).
- AutoRound: each Linear's (bits, group, symmetric) as auto-round configured it, counted as the
  same bitplan integer scheme (b-bit codes, one 16-bit scale per group, zero points only when
  asymmetric). auto-round's own ``auto_round:auto_gptq`` export would add packed zero points
  even when symmetric (b bits per group: under 0.1 % here); they are not counted.
"""

from __future__ import annotations

import os
import re

from bitplan.checkpoints.gguf_file import read_gguf
from bitplan.methods.scheme import Method, Scheme
from bitplan.models.spec import ModelSpec
from bitplan.planner.baselines import assignment_bytes

GGUF_LINEAR = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")
# GGUF types that ride SmolLM2's published grid, measured by bench/grid_ride.py (weight error on the published
# weights over the error on the same weights moved off the grid, with ggml's importance-weighted search): Q4_1
# 0.00 (the grid itself), Q5_1 0.00 (its search lands on half the step), Q4_K 0.25 and Q5_K 0.44 (groups of 32
# with a minimum, 6-bit scales); Q4_0, Q5_0 0.93, Q3_K 0.99, Q6_K 0.96 do not.
GRID_TYPES = ("Q4_1", "Q5_1", "Q4_K", "Q5_K")
BEFORE_GRID_RIDE = ("Q4_1", "Q5_1")  # what rows measured before bench/grid_ride.py counted as on the grid


def gguf_linear_types(path: str | os.PathLike) -> dict[str, tuple[str, int]]:
    """{GGUF tensor name: (ggml type, bytes)} of the block Linears in a GGUF file."""
    return {name: (t.ggml_type, t.nbytes) for name, t in read_gguf(path).tensors.items() if GGUF_LINEAR.match(name)}


def gguf_linear_bytes(path: str | os.PathLike) -> int:
    return sum(nbytes for _, nbytes in gguf_linear_types(path).values())


def scheme_linear_bytes(spec: ModelSpec, assignments: dict[str, Scheme]) -> int:
    """Bytes of a bitplan assignment (every Linear of ``spec`` must be assigned)."""
    return assignment_bytes(spec, assignments)


def autoround_assignment(spec: ModelSpec, layer_config: dict[str, dict]) -> dict[str, Scheme]:
    """auto-round's per-Linear {bits, group_size, sym} as the equivalent bitplan integer schemes (RTN: the
    bytes do not depend on how the codes were chosen). A Linear auto-round left unquantized is dense."""
    out = {}
    for layer in spec.layers:
        item = layer_config.get(layer.name)
        out[layer.name] = (Scheme(Method.RTN, item["bits"], item["group_size"], item["sym"]) if item is not None
                           else Scheme.parse("none"))
    return out


def autoround_linear_bytes(spec: ModelSpec, layer_config: dict[str, dict]) -> int:
    return assignment_bytes(spec, autoround_assignment(spec, layer_config))


def linear_weights(spec: ModelSpec) -> int:
    """How many weights the Linears hold (bits per weight = 8 * bytes / this)."""
    return sum(layer.out_features * layer.in_features for layer in spec.layers)


def grid_share_from_counts(counts: dict[str, int], spec: ModelSpec, counted: tuple[int, int], counted_types: tuple[str, ...]) -> tuple[int, int]:
    """(tensors, bytes) on the grid of a row that kept only its type counts (``{"Q4_K": 16}`` or ``{"ggml-q4_k": 16}``),
    measured when ``counted_types`` were the grid types and ``counted`` its (tensors, bytes) of those: adds the
    k-quant types since found on the grid. A k-quant needs rows of 256; the Linears of SmolLM2 that have them
    (down_proj) share one shape, so each such tensor's bytes are known."""
    from bitplan.kernels.layout import row_size_bytes

    tensors, nbytes = counted
    for name, count in counts.items():
        kind = name.removeprefix("ggml-").upper()
        if kind not in GRID_TYPES or kind in counted_types:
            continue
        shapes = {(layer.out_features, layer.in_features) for layer in spec.layers if layer.in_features % 256 == 0}
        if len(shapes) != 1:
            raise ValueError(f"{kind} may sit on Linears of shapes {sorted(shapes)}: re-measure the row to count its bytes")
        (out_features, in_features), = shapes
        tensors += count
        nbytes += count * out_features * row_size_bytes(kind, in_features)
    return tensors, nbytes


def grid_share(types: dict[str, tuple[str, int]]) -> tuple[int, int]:
    """(tensors, bytes) of a GGUF's Linears in the grid types (``GRID_TYPES``)."""
    on = [nbytes for kind, nbytes in types.values() if kind in GRID_TYPES]
    return len(on), sum(on)


def scheme_near_grid(scheme: Scheme) -> bool:
    """A bitplan scheme on or near SmolLM2's published grid (4-bit, groups of 32, float minimum):
    ggml Q4_1/Q5_1, and asymmetric integer schemes with groups of 32 at 4 or 5 bits (an integer zero
    point instead of a float minimum: near the grid, not on it)."""
    if scheme.method == Method.GGML:
        return scheme.ggml_type in GRID_TYPES
    return (not scheme.is_dense and not scheme.symmetric and scheme.group_size == 32 and scheme.bits in (4, 5)
            and scheme.method in (Method.RTN, Method.GPTQ, Method.AWQ, Method.HQQ))
