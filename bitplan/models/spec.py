"""ModelSpec: every quantizable Linear of a model, built from config.json alone."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch

from bitplan.errors import BitplanError
from bitplan.models.architectures import FAMILIES, REFUSED, Family

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
SCALE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}  # scales stored in the checkpoint dtype


@dataclass(frozen=True)
class LayerSpec:
    """One quantizable Linear: its module name, kind, block, shape and fused group."""

    name: str  # full module name, e.g. "model.layers.3.self_attn.q_proj"
    kind: str
    block: int  # decoder block index; -1 for layers outside the blocks (lm_head)
    in_features: int
    out_features: int
    fused_group: str  # "" when the layer is not fused with others
    smoothed_by: str = ""  # the op (inside the block) whose output is this input, when scales can fold into it

    @property
    def num_weights(self) -> int:
        return self.in_features * self.out_features

    @property
    def fused_key(self) -> str:
        """Layers with the same key must share a scheme when fused groups are tied."""
        return f"{self.block}.{self.fused_group}" if self.fused_group else self.name

    @property
    def smoothing_key(self) -> str:
        """Layers with the same key share one AWQ/SmoothQuant scale vector; "" when none can fold."""
        return f"{self.block}.{self.smoothed_by}" if self.smoothed_by else ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LayerSpec":
        return cls(**data)


@dataclass(frozen=True)
class Routing:
    """How tokens reach a mixture of experts' experts: each token runs ``experts_per_token`` of ``num_experts``."""

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


@dataclass(frozen=True)
class ModelSpec:
    """A model's shape: enough to count bytes and plan without loading a weight."""

    family: str
    model_type: str
    layers: tuple[LayerSpec, ...]
    hidden_size: int
    intermediate_size: int
    num_blocks: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    dtype: str  # the checkpoint's dtype for tensors left unquantized and for scales
    unquantized_bytes: int  # embeddings, norms, biases, and lm_head when it is not a candidate
    # mixture of experts (0 for a dense model): experts per block, and how many each token runs
    num_experts: int = 0
    experts_per_token: int = 0

    @property
    def routing(self) -> Routing | None:
        """How tokens reach the experts (None for a dense model): the speed model counts the
        active experts' bytes, the memory model every expert's."""
        return Routing(self.num_experts, self.experts_per_token) if self.num_experts else None

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def linear_weights(self) -> int:
        return sum(layer.num_weights for layer in self.layers)

    @cached_property
    def _by_name(self) -> dict[str, LayerSpec]:
        return {layer.name: layer for layer in self.layers}

    @cached_property
    def _by_fused_key(self) -> dict[str, tuple[LayerSpec, ...]]:
        groups: dict[str, list[LayerSpec]] = {}
        for layer in self.layers:
            groups.setdefault(layer.fused_key, []).append(layer)
        return {key: tuple(members) for key, members in groups.items()}

    def layer(self, name: str) -> LayerSpec:
        return self._by_name[name]

    def fused_members(self, layer: LayerSpec) -> tuple[LayerSpec, ...]:
        """The Linears an engine fuses with ``layer`` (itself included); just ``layer`` when none."""
        return self._by_fused_key[layer.fused_key]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layers"] = [layer.to_dict() for layer in self.layers]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        return cls(**{**data, "layers": tuple(LayerSpec.from_dict(d) for d in data["layers"])})


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_for(config: dict) -> Family:
    model_type = config.get("model_type")
    if model_type in REFUSED:
        raise BitplanError(f"unsupported architecture {model_type!r}: {REFUSED[model_type]}")
    if model_type not in FAMILIES:
        raise BitplanError(
            f"unsupported architecture {model_type!r}: bitplan supports model_type "
            f"{', '.join(supported_model_types())}; open an issue to add yours"
        )
    return FAMILIES[model_type]


def with_family_defaults(config: dict, family: Family) -> dict:
    """``config`` with the fields its family's transformers config fills in when config.json omits them."""
    return {**config, **{key: value for key, value in family.defaults if config.get(key) is None}}


def norm_offset(model_type: str) -> float:
    """What a family's RMSNorm adds to its weight (Gemma: x * (1 + w)); 0 for others and unknown types."""
    family = FAMILIES.get(model_type)
    return family.norm_offset if family else 0.0


def config_dtype(config: dict) -> str:
    dtype = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return dtype if dtype in DTYPE_BYTES else "bfloat16"


def config_size(config: dict, name: str, default: int | None = None) -> int:
    """A positive integer field of config.json (``default`` when absent or null)."""
    value = config.get(name)
    if value is None and default is not None:
        return default
    if value is None:
        raise BitplanError(f"config.json lacks the {name} field: is this a complete Hugging Face config?")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BitplanError(f"config.json gives {name} = {json.dumps(value)}, which must be a whole number of at least 1: "
                           f"restore the model's config.json")
    return value


def spec_from_config(config: dict, dtype: str | None = None) -> ModelSpec:
    """Build the ModelSpec of a Hugging Face config (a dict read from config.json)."""
    family = family_for(config)
    config = with_family_defaults(config, family)
    hidden, intermediate, num_blocks, num_heads, vocab = (config_size(config, name) for name in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"))
    num_kv_heads = config_size(config, "num_key_value_heads", num_heads)
    head_dim = config_size(config, "head_dim", hidden // num_heads)
    if num_heads % num_kv_heads:
        raise BitplanError(f"config.json gives {num_heads} attention heads and {num_kv_heads} KV heads, which do not divide them: "
                           f"restore the model's config.json")
    tied = bool(config.get("tie_word_embeddings", False))
    dtype = dtype or config_dtype(config)
    dims = {
        "hidden": hidden,
        "q": num_heads * head_dim,
        "kv": num_kv_heads * head_dim,
        "intermediate": intermediate,
        "qkv": (num_heads + 2 * num_kv_heads) * head_dim,
        "gate_up": 2 * intermediate,
        "head": head_dim,
        **{dim: config_size(config, key) for dim, key in family.config_dims},
    }
    from bitplan.models.smoothing import smoothing_groups

    foldable = {linear: group.previous for group in smoothing_groups(family, num_heads, num_kv_heads) for linear in group.linears}
    expert_width, num_experts = expert_shape(config, family)
    experts_per_token = experts_per_token_of(config, family, num_experts)
    dims["expert"] = expert_width
    layers = []
    for block in range(num_blocks):
        layers += [
            LayerSpec(name=f"{family.block_prefix}.{block}.{t.suffix}", kind=t.kind, block=block, in_features=dims[t.in_dim],
                      out_features=dims[t.out_dim], fused_group=t.fused_group, smoothed_by=foldable.get(t.suffix, ""))
            for t in family.block
        ]
        layers += expert_layers(family, block, dims, num_experts)
    if not tied:
        layers.append(LayerSpec(family.lm_head, "lm_head", -1, hidden, vocab, ""))
    widths = dict(family.norm_widths)
    norm_weights = num_blocks * sum(dims[widths.get(name, "hidden")] for name in family.block_norms)
    bias_weights = num_blocks * (dims["q"] + 2 * dims["kv"]) if family.attention_bias else 0
    shared_gates = 1 if family.experts and family.experts.shared_gate else 0
    router_weights = num_blocks * (num_experts + shared_gates) * hidden
    unquantized = (vocab * hidden + norm_weights + hidden + bias_weights + router_weights) * DTYPE_BYTES[dtype]
    return ModelSpec(
        family=family.name,
        model_type=config["model_type"],
        layers=tuple(layers),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_blocks=num_blocks,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        dtype=dtype,
        unquantized_bytes=unquantized,
        num_experts=num_experts,
        experts_per_token=experts_per_token,
    )


EXPERT_KIND = "expert"
EXPERT_GROUP = "experts"


def expert_shape(config: dict, family: Family) -> tuple[int, int]:
    """(one expert's intermediate width, experts per block); (0, 0) for a dense family."""
    if family.experts is None:
        return 0, 0
    dense_layers = config.get("mlp_only_layers") or []
    if dense_layers or int(config.get("decoder_sparse_step") or 1) != 1:
        raise BitplanError(f"config.json makes some blocks dense (mlp_only_layers {dense_layers}, decoder_sparse_step "
                           f"{config.get('decoder_sparse_step')}): bitplan plans {family.name} models whose every block is a mixture of experts")
    return config_size(config, family.experts.intermediate_key), config_size(config, family.experts.num_experts_key)


def experts_per_token_of(config: dict, family: Family, num_experts: int) -> int:
    """How many of a block's ``num_experts`` experts each token runs (the family's config key); 0 for a dense family."""
    if family.experts is None:
        return 0
    per_token = config_size(config, family.experts.experts_per_token_key)
    if per_token > num_experts:
        raise BitplanError(f"config.json has {per_token} experts per token ({family.experts.experts_per_token_key}) out of "
                           f"{num_experts} ({family.experts.num_experts_key}): per-token must be at most the total")
    return per_token


def expert_layers(family: Family, block: int, dims: dict[str, int], num_experts: int) -> list[LayerSpec]:
    """Every expert's Linears of one block (kind "expert", one fused group per block: vLLM's FusedMoE)."""
    if family.experts is None:
        return []
    prefix = f"{family.block_prefix}.{block}.{family.experts.path}"
    return [
        LayerSpec(name=f"{prefix}.{expert}.{suffix}", kind=EXPERT_KIND, block=block, in_features=dims[in_dim],
                  out_features=dims[out_dim], fused_group=EXPERT_GROUP)
        for expert in range(num_experts)
        for suffix, _, in_dim, out_dim in family.experts.projections
    ]


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise BitplanError(f"{folder} has no config.json: pass a Hugging Face model folder (config.json + *.safetensors)")
    return read_config_file(path)


def read_config_file(path: Path) -> dict:
    """A config.json file's contents; invalid JSON is a user error."""
    try:
        config = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BitplanError(f"{path} is not valid JSON ({exc}): restore the model's config.json") from exc
    if not isinstance(config, dict):
        raise BitplanError(f"{path} holds a JSON {type(config).__name__}, not an object: restore the model's config.json")
    return config


def spec_from_folder(folder: Path, dtype: str | None = None) -> ModelSpec:
    return spec_from_config(read_config(folder), dtype)
