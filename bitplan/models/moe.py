"""Mixture-of-experts models: routing, and the ModelSpec entry point for capacity planning.

Where a family keeps its experts is data (``architectures.Experts``): Mixtral's
``block_sparse_moe.experts.{e}.w1/w3/w2``, Qwen3-MoE's ``mlp.experts.{e}.gate_proj/up_proj/down_proj``.
``spec_from_config`` lists every expert's Linears (kind ``"expert"``, one fused group per block,
since vLLM's FusedMoE keeps a block's experts in one tensor under one quantization method); the
routers stay dense and count among the unquantized bytes. Each token runs ``experts_per_token``
of a block's experts (``ModelSpec.routing``): the memory model counts every expert, the speed model the active ones.

``load_spec(config)`` is the one entry point for capacity planning: it returns the ModelSpec and
the routing (None for a dense model) that the memory and speed models need.
"""

from __future__ import annotations

from bitplan.models.architectures import FAMILIES
from bitplan.models.spec import EXPERT_GROUP, EXPERT_KIND, LayerSpec, ModelSpec, Routing, spec_from_config

__all__ = ["EXPERT_GROUP", "EXPERT_KIND", "EXPERT_ROLES", "Routing", "expert_role", "is_moe", "load_spec", "routing_from_config"]

# checkpoint name of an expert projection -> its SwiGLU role, over every family
EXPERT_ROLES = {suffix: role for family in FAMILIES.values() if family.experts for suffix, role, _, _ in family.experts.projections}


def is_moe(config: dict) -> bool:
    family = FAMILIES.get(config.get("model_type"))
    return family is not None and family.experts is not None


def routing_from_config(config: dict) -> Routing | None:
    """The routing of a MoE config, None for a dense one."""
    return spec_from_config(config).routing if is_moe(config) else None


def load_spec(config: dict, dtype: str | None = None) -> tuple[ModelSpec, Routing | None]:
    """ModelSpec and routing for any supported config.json (dense or mixture-of-experts)."""
    spec = spec_from_config(config, dtype)
    return spec, spec.routing


def expert_role(layer: LayerSpec) -> str:
    """gate / up / down for an expert Linear (from its weight name), else the layer's kind."""
    if layer.kind != EXPERT_KIND:
        return layer.kind
    return EXPERT_ROLES.get(layer.name.rsplit(".", 1)[-1], "up")
