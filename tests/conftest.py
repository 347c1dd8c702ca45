"""Shared fixtures: the built-in model (converted once, cached) and a private bitplan cache."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from bitplan.models.source import ensure_builtin


@pytest.fixture(scope="session")
def smollm_folder():
    """The real test model: SmolLM2-135M-Instruct as an HF folder (converted once per machine)."""
    return ensure_builtin("smollm2-135m")


TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16)


def write_tiny_llama(folder, smollm_folder, **overrides):
    """A random-weight Llama of SmolLM2's config and tokenizer, only 6 blocks of width 64 (bf16, seed 0),
    ``overrides`` on top of that config: for tests that need real files and real block-by-block runs,
    not trained weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((smollm_folder / "config.json").read_text())
    config.update(TINY_LLAMA, **overrides)
    torch.manual_seed(0)
    hf = AutoConfig.for_model(config.pop("model_type"), **{k: v for k, v in config.items() if k != "architectures"})
    AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm_folder / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory, smollm_folder):
    """:func:`write_tiny_llama` with SmolLM2's tied head."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm_folder)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm_folder):
    """A tiny random-weight Llama folder (``tiny_models.py``) with the real tokenizer: for tests that need a model on disk, fast."""
    from tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", smollm_folder)


@pytest.fixture(scope="session")
def private_cache(tmp_path_factory, smollm_folder):
    """A fresh BITPLAN_CACHE (no stale profiles) that still sees the converted model."""
    root = tmp_path_factory.mktemp("bitplan-cache")
    (root / "models").mkdir()
    (root / "models" / "smollm2-135m").symlink_to(smollm_folder)
    previous = os.environ.get("BITPLAN_CACHE")
    os.environ["BITPLAN_CACHE"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("BITPLAN_CACHE", None)
    else:
        os.environ["BITPLAN_CACHE"] = previous
