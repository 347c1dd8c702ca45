"""Shared bench set-up: the built-in model, held-out windows, results folder."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def heldout_windows(tokenizer, samples_per_slice: int, seq_len: int = 512) -> dict[str, torch.Tensor]:
    from bitplan.profiles.text import builtin_slices, tokenize_windows

    return {s.name: tokenize_windows(tokenizer, s.text, seq_len, samples_per_slice) for s in builtin_slices("heldout")}


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()}, "when": time.strftime("%Y-%m-%d %H:%M"), **payload}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))
    return path


def code_commit() -> str:
    """The checkout's short commit, ``+uncommitted`` when code (not saved results) differs from it: what a row was measured with."""
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    return head + ("+uncommitted" if dirty else "")
