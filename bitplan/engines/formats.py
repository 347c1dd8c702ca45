"""Checkpoint formats: which format each scheme is written in.

compressed-tensors names a format per config group; bitplan writes these:

- ``pack-quantized``: integer weight-only schemes (RTN, GPTQ, AWQ, HQQ): ``weight_packed`` int32,
  ``weight_scale``, ``weight_zero_point`` when asymmetric, ``weight_shape``;
- ``int-quantized``: SmoothQuant W8A8 (int8 weights per channel, int8 activations per token);
- ``float-quantized``: W8A8-FP8 (E4M3 weights per channel, E4M3 activations per token);
- ``naive-quantized``: weight-only FP8 (E4M3 weights per channel or per group);
- ``bitplan-nf4``: NF4, which has no compressed-tensors home; only ``bitplan.load`` reads it;
- ``gguf``: ggml's types, written as a GGUF file for llama.cpp (``bitplan emit --format gguf``).

These are the formats compressed-tensors' own ``infer_module_format`` gives for the same
schemes (checked in ``tests/checkpoints``).
"""

from __future__ import annotations

from enum import StrEnum

from bitplan.methods.scheme import Method, Scheme

BITPLAN_MODEL_TYPE = "bitplan"  # config.json model_type of checkpoints only bitplan.load reads (checkpoints.emit.mark_for_bitplan)


class Format(StrEnum):
    PACKED = "pack-quantized"
    INT = "int-quantized"
    FLOAT = "float-quantized"
    NAIVE = "naive-quantized"
    NF4 = "bitplan-nf4"
    GGUF = "gguf"
    DENSE = "dense"


def checkpoint_format(scheme: Scheme) -> Format:
    """The format a scheme is written in (see the module docstring)."""
    if scheme.is_dense:
        return Format.DENSE
    if scheme.method == Method.FP8:
        return Format.FLOAT if scheme.act_quantized else Format.NAIVE
    if scheme.method == Method.SMOOTHQUANT:
        return Format.INT
    if scheme.method == Method.NF4:
        return Format.NF4
    if scheme.method == Method.GGML:
        return Format.GGUF
    return Format.PACKED


def activation_type(scheme: Scheme) -> str:
    """The run-time activation format: "16" (weight-only), "int8" or "fp8" per token."""
    if not scheme.act_quantized:
        return "16"
    return "fp8" if scheme.method == Method.FP8 else "int8"


def weight_type(scheme: Scheme) -> str:
    """How weights are stored: "int" codes, "float" (E4M3), "nf4" code-book indices, or "dense"."""
    if scheme.is_dense:
        return "dense"
    return {Method.FP8: "float", Method.NF4: "nf4", Method.GGML: "ggml"}.get(scheme.method, "int")


def format_counts(assignments: dict[str, Scheme]) -> dict[str, tuple[str, int]]:
    """Each scheme of an assignment with its checkpoint format and its number of layers, sorted."""
    counts: dict[str, list] = {}
    for scheme in assignments.values():
        counts.setdefault(scheme.name, [str(checkpoint_format(scheme)), 0])[1] += 1
    return {name: (fmt, layers) for name, (fmt, layers) in sorted(counts.items())}
