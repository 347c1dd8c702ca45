"""Mixture-of-experts models (Mixtral) as a ModelSpec, built from config.json alone.

A Mixtral block is Mistral attention (q, k, v, o) followed by ``num_local_experts`` experts,
each a SwiGLU MLP: ``w1`` (gate), ``w3`` (up), ``w2`` (down), and a router
(``block_sparse_moe.gate``, hidden -> experts) that stays unquantized. Each token runs
``num_experts_per_tok`` experts.

Expert Linears get kind ``"expert"`` and the fused group ``"experts"``: vLLM's FusedMoE keeps
all experts of a block in one tensor with one quantization method, so they must share a scheme.

``load_spec(config)`` is the one entry point for capacity planning: dense families go through
``model_spec.spec_from_config``, MoE families through here, and it returns the routing (or None)
that the memory and speed models need.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from bitplan.errors import BitplanError
from bitplan.models.spec import LayerSpec, ModelSpec, spec_from_config

EXPERT_KIND = "expert"
EXPERT_GROUP = "experts"
EXPERT_ROLES = {"w1": "gate", "w3": "up", "w2": "down"}  # Mixtral's names -> SwiGLU roles


@dataclass(frozen=True)
class MoeFamily:
    """Where a MoE family keeps its experts and which config keys count them."""

    attention_model_type: str  # a dense family with the same attention layout
    experts_path: str  # inside the block, e.g. "block_sparse_moe.experts"
    router_path: str
    num_experts_key: str
    experts_per_token_key: str


MOE_FAMILIES = {
    "mixtral": MoeFamily("mistral", "block_sparse_moe.experts", "block_sparse_moe.gate", "num_local_experts", "num_experts_per_tok"),
}


@dataclass(frozen=True)
class Routing:
    """How tokens reach experts: each token runs ``experts_per_token`` of ``num_experts``."""

    num_experts: int
    experts_per_token: int

    @property
    def active_fraction(self) -> float:
        """Share of a block's expert weights one token multiplies with."""
        return self.experts_per_token / self.num_experts

    def touched_fraction(self, tokens: int) -> float:
        """Expected share of a block's experts that at least one of ``tokens`` tokens uses,
        with uniform independent routing: 1 - (1 - k/E)^tokens. Decode reads only these."""
        return 1.0 - (1.0 - self.active_fraction) ** max(0, tokens)


def is_moe(config: dict) -> bool:
    return config.get("model_type") in MOE_FAMILIES


def routing_from_config(config: dict) -> Routing | None:
    """The routing of a MoE config, None for a dense one."""
    if not is_moe(config):
        return None
    family = MOE_FAMILIES[config["model_type"]]
    try:
        experts = int(config[family.num_experts_key])
        per_token = int(config[family.experts_per_token_key])
    except (KeyError, TypeError, ValueError) as exc:
        raise BitplanError(f"config.json lacks a usable {exc} field for a {config['model_type']} model: is the config complete?") from exc
    if experts < 1 or not 1 <= per_token <= experts:
        raise BitplanError(f"config.json has {per_token} experts per token out of {experts}: both must be >= 1 and per-token <= total")
    return Routing(experts, per_token)


def _expert_layers(prefix: str, block: int, family: MoeFamily, dims: dict, experts: int) -> list[LayerSpec]:
    shapes = {"w1": ("hidden", "intermediate"), "w3": ("hidden", "intermediate"), "w2": ("intermediate", "hidden")}
    return [
        LayerSpec(
            name=f"{prefix}.{block}.{family.experts_path}.{expert}.{weight}",
            kind=EXPERT_KIND,
            block=block,
            in_features=dims[shapes[weight][0]],
            out_features=dims[shapes[weight][1]],
            fused_group=EXPERT_GROUP,
        )
        for expert in range(experts)
        for weight in ("w1", "w3", "w2")
    ]


def spec_from_moe_config(config: dict, dtype: str | None = None) -> ModelSpec:
    """The ModelSpec of a MoE config: attention Linears, then every expert's w1, w3, w2."""
    family = MOE_FAMILIES[config["model_type"]]
    routing = routing_from_config(config)
    dense = spec_from_config({**config, "model_type": family.attention_model_type}, dtype)
    dims = {"hidden": dense.hidden_size, "intermediate": dense.intermediate_size}
    prefix = dense.layers[0].name.split(".")[0] + "." + dense.layers[0].name.split(".")[1]
    layers: list[LayerSpec] = []
    for block in range(dense.num_blocks):
        layers += [lay for lay in dense.layers if lay.block == block and lay.kind in ("q", "k", "v", "o")]
        layers += _expert_layers(prefix, block, family, dims, routing.num_experts)
    layers += [lay for lay in dense.layers if lay.block == -1]
    router_bytes = dense.num_blocks * routing.num_experts * dense.hidden_size * dense.dtype_bytes
    return replace(
        dense,
        family=config["model_type"],
        model_type=config["model_type"],
        layers=tuple(layers),
        unquantized_bytes=dense.unquantized_bytes + router_bytes,
    )


def load_spec(config: dict, dtype: str | None = None) -> tuple[ModelSpec, Routing | None]:
    """ModelSpec and routing for any supported config.json (dense or mixture-of-experts)."""
    if is_moe(config):
        return spec_from_moe_config(config, dtype), routing_from_config(config)
    return spec_from_config(config, dtype), None


def expert_role(layer: LayerSpec) -> str:
    """gate / up / down for an expert Linear (from its weight name), else the layer's kind."""
    if layer.kind != EXPERT_KIND:
        return layer.kind
    return EXPERT_ROLES.get(layer.name.rsplit(".", 1)[-1], "up")
