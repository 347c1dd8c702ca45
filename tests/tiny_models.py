"""Tiny random-weight Llama folders for tests that need a model on disk but not real weights.

The tokenizer is the built-in model's (so calibration text tokenizes as usual); the weights are
seeded random bfloat16, so the same call writes the same bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from bitplan.models.source import TOKENIZER_FILES

CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 49152,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "dtype": "bfloat16",
}


def tiny_state(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor a Llama folder of ``config``'s shape holds, seeded random."""
    generator = torch.Generator().manual_seed(seed)
    hidden, inter, heads, kv = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["head_dim"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    for block in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{block}"
        shapes |= {
            f"{prefix}.self_attn.q_proj.weight": (heads * head_dim, hidden),
            f"{prefix}.self_attn.k_proj.weight": (kv * head_dim, hidden),
            f"{prefix}.self_attn.v_proj.weight": (kv * head_dim, hidden),
            f"{prefix}.self_attn.o_proj.weight": (hidden, heads * head_dim),
            f"{prefix}.mlp.gate_proj.weight": (inter, hidden),
            f"{prefix}.mlp.up_proj.weight": (inter, hidden),
            f"{prefix}.mlp.down_proj.weight": (hidden, inter),
            f"{prefix}.input_layernorm.weight": (hidden,),
            f"{prefix}.post_attention_layernorm.weight": (hidden,),
        }
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    state = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            state[name] = (torch.randn(shape, generator=generator) * 0.05).to(torch.bfloat16)
    return state


def write_tiny_model(folder: Path, tokenizer_from: Path, seed: int = 0, config: dict | None = None,
                     state: dict[str, torch.Tensor] | None = None) -> Path:
    """A Hugging Face folder: config.json, model.safetensors and the tokenizer files of ``tokenizer_from``."""
    config = dict(CONFIG if config is None else config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(tiny_state(config, seed) if state is None else state, folder / "model.safetensors", metadata={"format": "pt"})
    for filename in TOKENIZER_FILES:
        if (Path(tokenizer_from) / filename).is_file():
            shutil.copy2(Path(tokenizer_from) / filename, folder / filename)
    return folder


TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16)


def write_tiny_llama(folder, smollm_folder, **overrides):
    """A random-weight Llama of SmolLM2's config and tokenizer, only 6 blocks of width 64 (bf16, seed 0),
    ``overrides`` on top of that config: for tests that need real files and real block-by-block runs,
    not trained weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((smollm_folder / "config.json").read_text())
    config.update(TINY_LLAMA, **overrides)
    torch.manual_seed(0)
    hf = AutoConfig.for_model(config.pop("model_type"), **{k: v for k, v in config.items() if k != "architectures"})
    AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm_folder / name, folder / name)
    return folder
