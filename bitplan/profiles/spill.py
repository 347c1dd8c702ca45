"""Block inputs of the calibration tokens, in memory up to a cap and on disk beyond it.

The profile runs every calibration window forward once and keeps each block's input for the
backward pass that scores it, from the top block down. For a 70B model on 16 x 512 tokens that is
80 x 268 MB: more than a 24 GiB machine holds. Inputs beyond ``cap_bytes`` go to a safetensors file
each, in a temporary folder of the cache that is removed with the store, and are read back when
their block is scored. What is read back is exactly what was written, so a spilled profile's table
is the in-memory one's, byte for byte.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bitplan.models.source import cache_dir

ACTIVATION_CAP_BYTES = int(os.environ.get("BITPLAN_ACTIVATION_CAP", 2**30))  # block inputs held in memory before they go to disk


class BlockInputs:
    """``put(i, hidden)`` / ``take(i)``: block ``i``'s input, in memory while the held inputs fit
    ``cap_bytes``, else in a file (``spilled`` counts them)."""

    def __init__(self, cap_bytes: int = ACTIVATION_CAP_BYTES):
        self.cap_bytes = cap_bytes
        self.memory: dict[int, torch.Tensor] = {}
        self.files: dict[int, Path] = {}
        self.held = 0
        self.work: tempfile.TemporaryDirectory | None = None

    @property
    def spilled(self) -> int:
        return len(self.files)

    def put(self, index: int, hidden: torch.Tensor) -> None:
        size = hidden.numel() * hidden.element_size()
        if self.held + size <= self.cap_bytes:
            self.memory[index] = hidden
            self.held += size
            return
        if self.work is None:
            cache_dir().mkdir(parents=True, exist_ok=True)
            self.work = tempfile.TemporaryDirectory(prefix="block-inputs-", dir=cache_dir())
        path = Path(self.work.name) / f"input-{index:05d}.safetensors"
        save_file({"hidden": hidden.contiguous()}, str(path))
        self.files[index] = path

    def take(self, index: int) -> torch.Tensor:
        """Block ``index``'s input, forgotten by the store (the backward pass needs it once)."""
        if index in self.memory:
            hidden = self.memory.pop(index)
            self.held -= hidden.numel() * hidden.element_size()
            return hidden
        path = self.files.pop(index)
        hidden = load_file(str(path))["hidden"]
        path.unlink()
        return hidden

    def close(self) -> None:
        self.memory.clear()
        self.files.clear()
        if self.work is not None:
            self.work.cleanup()
            self.work = None
