"""Fixtures shared by the checkpoint tests that run the engines' own code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """vLLM's own interpreter (``make engines`` builds it; ``make test`` sets BITPLAN_VLLM_PYTHON)."""
    path = os.environ.get("BITPLAN_VLLM_PYTHON")
    if not path:
        pytest.skip("BITPLAN_VLLM_PYTHON is not set: `make test` builds vLLM's venv (make engines) and sets it")
    assert Path(path).is_file(), f"BITPLAN_VLLM_PYTHON={path} does not exist: run `make engines`"
    return Path(path)
