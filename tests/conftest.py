"""Shared fixtures: the built-in model (converted once, cached) and a private bitplan cache."""

from __future__ import annotations

import os

import pytest

from tiny_models import write_tiny_llama

from bitplan.models.source import ensure_builtin


@pytest.fixture(scope="session")
def smollm_folder():
    """The real test model: SmolLM2-135M-Instruct as an HF folder (converted once per machine)."""
    return ensure_builtin("smollm2-135m")


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
