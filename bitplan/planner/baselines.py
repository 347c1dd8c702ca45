"""Uniform baselines: one scheme for every layer, as a plan would state it.

A group size that does not divide a layer's inputs (576 = 4.5 x 128 in SmolLM2) falls back to
the largest candidate group below it that does, and per channel when none does: the same
fallback a user of a uniform quantizer would have to choose.
"""

from __future__ import annotations

from bitplan.methods.scheme import Scheme
from bitplan.models.spec import ModelSpec

FALLBACK_GROUPS = (128, 64, 32)


def uniform_assignment(spec: ModelSpec, scheme: Scheme) -> dict[str, Scheme]:
    assignments = {}
    for layer in spec.layers:
        chosen = scheme
        if not scheme.fits(layer.in_features):
            groups = [g for g in FALLBACK_GROUPS if g < scheme.group_size and layer.in_features % g == 0] or [0]
            chosen = Scheme(scheme.method, scheme.bits, groups[0], scheme.symmetric, scheme.act_bits)
        assignments[layer.name] = chosen
    return assignments


def assignment_bytes(spec: ModelSpec, assignments: dict[str, Scheme]) -> int:
    """Exact quantized-Linear bytes of an assignment (the same count the emitter writes)."""
    return sum(assignments[layer.name].weight_bytes(layer.out_features, layer.in_features, spec.dtype_bytes) for layer in spec.layers)
