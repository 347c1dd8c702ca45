"""Tiny random-weight models of each supported family, built by transformers from a config of that
``model_type``: the family's real module names and structure, a width of 64 and 2 blocks.

Norm weights are random too (transformers initialises Gemma's to 0 and Llama's to 1), so a fold
that forgets Gemma's ``1 + w`` shows. The tokenizer is SmolLM2's (vocabulary 49152), so the
built-in calibration text tokenizes as usual. ``real_config`` reads a real model's config.json
from ``tests/data/configs``, truncated to a few blocks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIGS = Path(__file__).parent / "data" / "configs"
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              vocab_size=49152, max_position_embeddings=512, rms_norm_eps=1e-6, dtype="bfloat16")

TINY_CONFIGS = {
    # sliding window 16 < the tests' sequences, so block 0's sliding mask differs from block 1's causal one
    "gemma2": dict(_SMALL, model_type="gemma2", architectures=["Gemma2ForCausalLM"], sliding_window=16, query_pre_attn_scalar=16,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh"),
    "gemma3_text": dict(_SMALL, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], sliding_window=16, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention"], rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                        hidden_activation="gelu_pytorch_tanh"),
    "qwen3_moe": dict(_SMALL, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], moe_intermediate_size=32, num_experts=4,
                      num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=True, hidden_act="silu"),
    "qwen2_moe": dict(_SMALL, model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], moe_intermediate_size=32, num_experts=4,
                      num_experts_per_tok=2, shared_expert_intermediate_size=64, norm_topk_prob=False, tie_word_embeddings=True,
                      hidden_act="silu", qkv_bias=True),
    "olmoe": dict(_SMALL, model_type="olmoe", architectures=["OlmoeForCausalLM"], intermediate_size=32, num_experts=4,
                  num_experts_per_tok=2, tie_word_embeddings=True, hidden_act="silu", clip_qkv=8.0, pad_token_id=1, eos_token_id=2),
    "mixtral": dict(_SMALL, model_type="mixtral", architectures=["MixtralForCausalLM"], intermediate_size=32, num_local_experts=4,
                    num_experts_per_tok=2, tie_word_embeddings=True, hidden_act="silu", sliding_window=None),
    "phi3": dict(_SMALL, model_type="phi3", architectures=["Phi3ForCausalLM"], num_key_value_heads=4, sliding_window=16,
                 tie_word_embeddings=False, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2),
}


def real_config(name: str, **overrides) -> dict:
    """A real model's config.json from tests/data/configs (``name`` without .json), with ``overrides``."""
    return {**json.loads((CONFIGS / f"{name}.json").read_text()), **overrides}


def build_model(config: dict, seed: int = 0) -> torch.nn.Module:
    """The transformers model of ``config`` in float32, seeded random weights, random norm weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "dtype")}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **fields), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand(param.shape, generator=generator) * 0.8 + 0.1 + (0 if param.mean() > 0.5 else -0.5))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval().requires_grad_(False)


def checkpoint_state(model: torch.nn.Module, config: dict) -> dict[str, torch.Tensor]:
    """The model's tensors as its checkpoints name them (``Family.module_renames`` undone): transformers' fused experts
    (``experts.gate_up_proj`` [experts, 2 x width, hidden], ``experts.down_proj``) split into one
    tensor per expert and projection, as in the released files."""
    from bitplan.models.architectures import FAMILIES

    family = FAMILIES[config["model_type"]]
    state = dict(model.state_dict())
    for checkpoint_name, module_name in family.module_renames:  # Mixtral: transformers' mlp is block_sparse_moe on disk
        state = {key.replace(f".{module_name}.", f".{checkpoint_name}."): value for key, value in state.items()}
    experts = family.experts
    if experts is None:
        return state
    names = {role: suffix for suffix, role, _, _ in experts.projections}
    for key in [k for k in state if k.endswith(".experts.gate_up_proj")]:
        prefix = key.removesuffix(".gate_up_proj")
        gate_up, down = state.pop(key), state.pop(f"{prefix}.down_proj")
        for index in range(gate_up.shape[0]):
            gate, up = gate_up[index].chunk(2, dim=0)
            for role, tensor in (("gate", gate), ("up", up), ("down", down[index])):
                state[f"{prefix}.{index}.{names[role]}.weight"] = tensor.clone()
    return state


def write_family_model(folder: Path, tokenizer_from: Path, config: dict, seed: int = 0) -> Path:
    """A Hugging Face folder of ``config``'s family: config.json, model.safetensors (bfloat16), SmolLM2's tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(config, seed)
    state = {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in checkpoint_state(model, config).items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(tokenizer_from) / name).is_file():
            shutil.copy(Path(tokenizer_from) / name, folder / name)
    return folder
