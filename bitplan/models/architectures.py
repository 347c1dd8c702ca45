"""Architecture knowledge as data: which Linears a family has, their kinds, shapes and fused groups.

Each entry of a block template names a Linear inside a decoder block, its kind, the config
dimensions it maps between, and the group of Linears serving engines fuse into one kernel
(they must share a scheme there). Adding a family that shares the Llama layout is one line in
``FAMILIES``.

Dimensions: ``hidden``, ``q`` (heads x head_dim), ``kv`` (KV heads x head_dim), ``intermediate``,
and the two fused widths checkpoints store as one tensor: ``qkv`` (q + 2 kv, Phi-3's ``qkv_proj``)
and ``gate_up`` (2 x intermediate, Phi-3's ``gate_up_proj``). A Linear stored fused is one
quantization decision (one matmul in vLLM too), so it has no fused group of its own.

``norm`` names what feeds a Linear's input, for AWQ/SmoothQuant folding: a norm of the block, a
Linear of the block, or "" when no scale can fold there (Phi-3's o_proj is fed by the v rows of
``qkv_proj`` only, and down_proj by ``gate(x) * up(x)`` from one fused tensor).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearTemplate:
    suffix: str  # module path inside the block, e.g. "self_attn.q_proj"
    kind: str
    in_dim: str  # "hidden", "q", "kv", "intermediate", "qkv", "gate_up", or a family's config_dims
    out_dim: str
    fused_group: str  # engines fuse Linears with the same group ("qkv", "gate_up") or "" for none
    norm: str  # the norm (or Linear) that feeds this Linear's input, for smoothing and AWQ; "" when nothing folds


def swiglu_block(mlp_norm: str) -> tuple[LinearTemplate, ...]:
    """Separate q/k/v/o and gate/up/down (Llama, Mistral, Qwen, Gemma); ``mlp_norm`` feeds gate and up."""
    return (
        LinearTemplate("self_attn.q_proj", "q", "hidden", "q", "qkv", "input_layernorm"),
        LinearTemplate("self_attn.k_proj", "k", "hidden", "kv", "qkv", "input_layernorm"),
        LinearTemplate("self_attn.v_proj", "v", "hidden", "kv", "qkv", "input_layernorm"),
        LinearTemplate("self_attn.o_proj", "o", "q", "hidden", "", "self_attn.v_proj"),
        LinearTemplate("mlp.gate_proj", "gate", "hidden", "intermediate", "gate_up", mlp_norm),
        LinearTemplate("mlp.up_proj", "up", "hidden", "intermediate", "gate_up", mlp_norm),
        LinearTemplate("mlp.down_proj", "down", "intermediate", "hidden", "", "mlp.up_proj"),
    )


LLAMA_BLOCK = swiglu_block("post_attention_layernorm")
# Gemma 2/3: post_attention_layernorm normalises o_proj's *output*; gate/up read pre_feedforward_layernorm.
GEMMA_BLOCK = swiglu_block("pre_feedforward_layernorm")
PHI3_BLOCK = (
    LinearTemplate("self_attn.qkv_proj", "qkv", "hidden", "qkv", "", "input_layernorm"),
    LinearTemplate("self_attn.o_proj", "o", "q", "hidden", "", ""),
    LinearTemplate("mlp.gate_up_proj", "gate_up", "hidden", "gate_up", "", "post_attention_layernorm"),
    LinearTemplate("mlp.down_proj", "down", "intermediate", "hidden", "", ""),
)


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts block's experts, as checkpoints store them: one Linear per expert and
    projection, ``{path}.{expert}.{suffix}``. ``projections``: (suffix, role, in_dim, out_dim) with
    role gate/up/down and dims as in ``LinearTemplate`` ("expert" is the expert's intermediate
    width). The router (``router``, hidden -> experts) stays dense. vLLM's FusedMoE holds all
    experts of a block in one tensor under one quantization method, so they share a scheme."""

    path: str  # inside the block, e.g. "mlp.experts"
    router: str
    projections: tuple[tuple[str, str, str, str], ...]
    num_experts_key: str
    experts_per_token_key: str
    intermediate_key: str  # config key of one expert's intermediate width
    shared_gate: str = ""  # a dense hidden -> 1 Linear gating a shared expert (Qwen2-MoE), "" when none


@dataclass(frozen=True)
class Family:
    name: str
    block_prefix: str  # e.g. "model.layers"
    block: tuple[LinearTemplate, ...]
    block_norms: tuple[str, ...]  # per-head norms (q_norm, k_norm) hold head_dim weights, the others hidden
    final_norm: str
    embedding: str
    lm_head: str
    attention_bias: bool  # q/k/v carry a bias (Qwen2)
    norm_offset: float = 0.0  # RMSNorm computes x * (norm_offset + weight): Gemma's (1 + weight)
    embedding_scale: str = ""  # "sqrt_hidden": embeddings are multiplied by sqrt(hidden_size) (Gemma)
    attention: str = "sdpa"  # transformers attention implementation that runs the family exactly ("eager": soft-capping)
    defaults: tuple[tuple[str, object], ...] = ()  # config.json fields transformers fills in when absent
    experts: Experts | None = None  # mixture of experts: every block's experts after its ``block`` Linears
    measured: str = ""  # why bitplan cannot run it block by block (profile, emit, load); "" when it can
    norm_widths: tuple[tuple[str, str], ...] = (("self_attn.q_norm", "head"), ("self_attn.k_norm", "head"))  # others: hidden
    config_dims: tuple[tuple[str, str], ...] = ()  # more template dimensions, from config keys: (dim, key)
    # (checkpoint name, transformers module name) of block submodules transformers renames on load;
    # bitplan keeps the checkpoint's name (``models.experts.rename_modules``)
    module_renames: tuple[tuple[str, str], ...] = ()


_LLAMA = dict(
    block_prefix="model.layers",
    block=LLAMA_BLOCK,
    block_norms=("input_layernorm", "post_attention_layernorm"),
    final_norm="model.norm",
    embedding="model.embed_tokens",
    lm_head="lm_head",
)
_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
_GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
_GEMMA = dict(_LLAMA, block=GEMMA_BLOCK, norm_offset=1.0, embedding_scale="sqrt_hidden",
              defaults=(("head_dim", 256), ("tie_word_embeddings", True)))

_SWIGLU_EXPERT = (("gate_proj", "gate", "hidden", "expert"), ("up_proj", "up", "hidden", "expert"),
                  ("down_proj", "down", "expert", "hidden"))
_MIXTRAL_EXPERTS = Experts("block_sparse_moe.experts", "block_sparse_moe.gate",
                           (("w1", "gate", "hidden", "expert"), ("w3", "up", "hidden", "expert"), ("w2", "down", "expert", "hidden")),
                           "num_local_experts", "num_experts_per_tok", "intermediate_size")
_QWEN_MOE_EXPERTS = Experts("mlp.experts", "mlp.gate", _SWIGLU_EXPERT, "num_experts", "num_experts_per_tok", "moe_intermediate_size")
# Qwen2-MoE adds a shared expert every token runs, scaled by sigmoid(shared_expert_gate(x)). Its
# input norm also feeds the router and the routed experts, so no scale folds there; up -> down does.
_SHARED_EXPERT = (
    LinearTemplate("mlp.shared_expert.gate_proj", "gate", "hidden", "shared_expert", "gate_up", ""),
    LinearTemplate("mlp.shared_expert.up_proj", "up", "hidden", "shared_expert", "gate_up", ""),
    LinearTemplate("mlp.shared_expert.down_proj", "down", "shared_expert", "hidden", "", "mlp.shared_expert.up_proj"),
)

# model_type in config.json -> family. Qwen3 and Gemma 3 add per-head q/k norms (head_dim each).
FAMILIES: dict[str, Family] = {
    "llama": Family(name="llama", attention_bias=False, **_LLAMA),
    "mistral": Family(name="mistral", attention_bias=False, **_LLAMA),
    "qwen2": Family(name="qwen2", attention_bias=True, **_LLAMA),
    "qwen3": Family(name="qwen3", attention_bias=False, **{**_LLAMA, "block_norms": _LLAMA["block_norms"] + _QK_NORMS}),
    # Gemma 2: attention and final logits are soft-capped (tanh), which only eager attention computes.
    "gemma2": Family(name="gemma2", attention_bias=False, **{**_GEMMA, "block_norms": _GEMMA_NORMS, "attention": "eager"}),
    "gemma3_text": Family(name="gemma3_text", attention_bias=False, **{**_GEMMA, "block_norms": _GEMMA_NORMS + _QK_NORMS}),
    "phi3": Family(name="phi3", attention_bias=False, **{**_LLAMA, "block": PHI3_BLOCK}),
    # Mixtral checkpoints name the MoE block ``block_sparse_moe`` and its experts w1/w3/w2; transformers
    # renames the block ``mlp`` on load (conversion_mapping.py: WeightRenaming(".block_sparse_moe.", ".mlp.")),
    # bitplan runs it under the checkpoint's name, which vLLM's MixtralMoE also uses (models/mixtral.py:
    # prefix ".block_sparse_moe.experts", ckpt_names ("w1", "w2", "w3")).
    "mixtral": Family(name="mixtral", attention_bias=False, experts=_MIXTRAL_EXPERTS, module_renames=(("block_sparse_moe", "mlp"),),
                      **{**_LLAMA, "block": LLAMA_BLOCK[:4]}),
    "qwen3_moe": Family(name="qwen3_moe", attention_bias=False, experts=_QWEN_MOE_EXPERTS,
                        **{**_LLAMA, "block": LLAMA_BLOCK[:4], "block_norms": _LLAMA["block_norms"] + _QK_NORMS}),
    "qwen2_moe": Family(name="qwen2_moe", attention_bias=True, config_dims=(("shared_expert", "shared_expert_intermediate_size"),),
                        experts=Experts("mlp.experts", "mlp.gate", _SWIGLU_EXPERT, "num_experts", "num_experts_per_tok",
                                        "moe_intermediate_size", shared_gate="mlp.shared_expert_gate"),
                        **{**_LLAMA, "block": LLAMA_BLOCK[:4] + _SHARED_EXPERT}),
    # OLMoE normalises whole q and k projections (widths q and kv), not each head.
    "olmoe": Family(name="olmoe", attention_bias=False, norm_widths=(("self_attn.q_norm", "q"), ("self_attn.k_norm", "kv")),
                    experts=Experts("mlp.experts", "mlp.gate", _SWIGLU_EXPERT, "num_experts", "num_experts_per_tok", "intermediate_size"),
                    **{**_LLAMA, "block": LLAMA_BLOCK[:4], "block_norms": _LLAMA["block_norms"] + _QK_NORMS}),
}

# model_types bitplan recognises but does not plan, with what to do instead.
REFUSED: dict[str, str] = {
    "gemma3": "a Gemma 3 vision-language checkpoint (model_type gemma3, text and vision towers); bitplan plans text-only "
              "checkpoints: use a text-only Gemma 3 (model_type gemma3_text, e.g. gemma-3-1b) or extract the language model",
}
