"""Architecture knowledge as data: which Linears a family has, their kinds, shapes and fused groups.

Each entry of ``LINEAR_TEMPLATES`` names a Linear inside a decoder block, its kind, the config
dimensions it maps between, and the group of Linears serving engines fuse into one kernel
(they must share a scheme there). Adding a family that shares the Llama layout is one line in
``FAMILIES``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearTemplate:
    suffix: str  # module path inside the block, e.g. "self_attn.q_proj"
    kind: str
    in_dim: str  # "hidden", "q", "kv", "intermediate"
    out_dim: str
    fused_group: str  # engines fuse Linears with the same group ("qkv", "gate_up") or "" for none
    norm: str  # the norm (or Linear) that feeds this Linear's input, for smoothing and AWQ


LLAMA_BLOCK = (
    LinearTemplate("self_attn.q_proj", "q", "hidden", "q", "qkv", "input_layernorm"),
    LinearTemplate("self_attn.k_proj", "k", "hidden", "kv", "qkv", "input_layernorm"),
    LinearTemplate("self_attn.v_proj", "v", "hidden", "kv", "qkv", "input_layernorm"),
    LinearTemplate("self_attn.o_proj", "o", "q", "hidden", "", "self_attn.v_proj"),
    LinearTemplate("mlp.gate_proj", "gate", "hidden", "intermediate", "gate_up", "post_attention_layernorm"),
    LinearTemplate("mlp.up_proj", "up", "hidden", "intermediate", "gate_up", "post_attention_layernorm"),
    LinearTemplate("mlp.down_proj", "down", "intermediate", "hidden", "", "mlp.up_proj"),
)


@dataclass(frozen=True)
class Family:
    name: str
    block_prefix: str  # e.g. "model.layers"
    block: tuple[LinearTemplate, ...]
    block_norms: tuple[str, ...]
    final_norm: str
    embedding: str
    lm_head: str
    attention_bias: bool  # q/k/v carry a bias (Qwen2)


_LLAMA = dict(
    block_prefix="model.layers",
    block=LLAMA_BLOCK,
    block_norms=("input_layernorm", "post_attention_layernorm"),
    final_norm="model.norm",
    embedding="model.embed_tokens",
    lm_head="lm_head",
)

# model_type in config.json -> family. Qwen3 adds per-head q/k norms (head_dim each).
FAMILIES: dict[str, Family] = {
    "llama": Family(name="llama", attention_bias=False, **_LLAMA),
    "mistral": Family(name="mistral", attention_bias=False, **_LLAMA),
    "qwen2": Family(name="qwen2", attention_bias=True, **_LLAMA),
    "qwen3": Family(
        name="qwen3",
        attention_bias=False,
        **{**_LLAMA, "block_norms": ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")},
    ),
}
