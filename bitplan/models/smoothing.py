"""Smoothing pairs as data: which operation feeds which Linears, for AWQ and SmoothQuant folding.

Derived from each template's ``norm`` field in :mod:`bitplan.models.architectures`, so a
family added there gets its pairs here with no code. A pair is (previous op, Linears it feeds):

- previous op is a norm (``input_layernorm`` → q/k/v): per-channel scales divide the norm weight;
- previous op is a Linear (``self_attn.v_proj`` → o_proj, ``mlp.up_proj`` → down_proj): the
  scales divide that Linear's *output rows* (and bias). v → o is foldable only when v's output
  is o's input channel for channel, i.e. without grouped-query attention (kv heads = heads);
  up → down is always foldable (``silu(gate) * up`` is linear in up).
"""

from __future__ import annotations

from dataclasses import dataclass

from bitplan.models.architectures import FAMILIES, Family


@dataclass(frozen=True)
class SmoothingGroup:
    """Linears sharing one input, and the operation whose output is that input."""

    previous: str  # module path inside the block, e.g. "input_layernorm" or "mlp.up_proj"
    previous_is_norm: bool
    linears: tuple[str, ...]  # module paths inside the block, e.g. ("self_attn.q_proj", ...)


def smoothing_groups(family: Family | str, num_heads: int | None = None, num_kv_heads: int | None = None) -> list[SmoothingGroup]:
    """The smoothing groups of one decoder block of ``family``, in block order.

    A group fed by a Linear whose output width differs from the fed Linears' input (v → o with
    grouped-query attention) cannot be folded; pass ``num_heads`` and ``num_kv_heads`` to drop
    it. Without them, v → o is dropped whenever its templates say the dimensions differ.
    """
    fam = FAMILIES[family] if isinstance(family, str) else family
    norms = set(fam.block_norms)
    by_previous: dict[str, list] = {}
    for template in fam.block:
        if not template.norm:
            continue  # nothing to fold into (a fused feeder such as Phi-3's qkv_proj)
        by_previous.setdefault(template.norm, []).append(template)
    groups = []
    for previous, templates in by_previous.items():
        is_norm = previous in norms
        if not is_norm:
            feeder = next(t for t in fam.block if t.suffix == previous)
            gqa = num_heads is not None and num_kv_heads is not None and num_heads != num_kv_heads
            if feeder.out_dim != templates[0].in_dim and (gqa or num_heads is None):
                continue
        groups.append(SmoothingGroup(previous, is_norm, tuple(t.suffix for t in templates)))
    return groups
