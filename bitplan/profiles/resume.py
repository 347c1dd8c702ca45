"""Resumable profiles: each finished block's rows of the table are written to the cache as the
profile goes, so a profile interrupted by SIGINT or ``kill -9`` resumes where it stopped.

The profile scores the head first, then the decoder blocks from the top down; each block needs
the gradient that flows into its output (the gradient at the input of the block above). A
checkpoint folder, named by the table's key, holds:

- ``head.safetensors`` and ``block-00007.safetensors``: the finished unit's score, per-slice score and byte rows,
  and its layers' Fisher statistics (channel weight ``b_c`` and summed token weight) — write once;
- ``grad-00007.safetensors``: the gradient at the input of block 7 (``grad-<num_blocks>`` is the
  head's), which the next block down starts from. Only the newest is kept.

Every file is written atomically (temporary name, then rename), the gradient of a unit before its
rows, and the previous gradient removed only after, so whatever moment the process dies the folder
describes a consistent prefix of the work. The profile is deterministic on CPU, so a resumed table
is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bitplan.atomic import write_safetensors

HEAD = "head"


def unit_name(block: int | None) -> str:
    return HEAD if block is None else f"block-{block:05d}"


class ProfileCheckpoint:
    """The finished units of one profile (``folder`` is named by its table key)."""

    def __init__(self, folder: Path, num_blocks: int):
        self.folder = Path(folder)
        self.num_blocks = num_blocks

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def save_unit(self, block: int | None, rows: list[int], scores: torch.Tensor, sizes: torch.Tensor, stats: dict | None = None,
                  slice_scores: torch.Tensor | None = None) -> None:
        """Record block ``block``'s (``None``: the head's) table rows (and per-slice rows) and its layers' statistics."""
        tensors = {"rows": torch.tensor(rows, dtype=torch.int64), "scores": scores[rows].contiguous(), "bytes": sizes[rows].contiguous()}
        if slice_scores is not None:
            tensors["slice_scores"] = slice_scores[:, rows].contiguous()
        names = sorted(stats or {})
        for index, name in enumerate(names):
            tensors[f"channel_weight.{index}"] = stats[name].channel_weight().contiguous()
            tensors[f"token_weight.{index}"] = torch.tensor([stats[name].token_weight], dtype=torch.float64)
        meta = {"layers": json.dumps(names)}
        write_safetensors(self._path(unit_name(block)), tensors, meta)

    def save_gradient(self, block: int, grad: torch.Tensor) -> None:
        """The gradient at the input of ``block`` (``num_blocks``: at the head's input); older ones go."""
        write_safetensors(self._path(f"grad-{block:05d}"), {"grad": grad})

    def drop_gradient(self, block: int) -> None:
        self._path(f"grad-{block:05d}").unlink(missing_ok=True)

    def finished(self, block: int | None) -> bool:
        return self._path(unit_name(block)).is_file()

    def resume_point(self) -> int | None:
        """The lowest block ``b`` such that the head and blocks ``b..top`` are finished and the
        gradient at ``b``'s input is kept; ``None`` when nothing can be resumed."""
        if not self.finished(None):
            return None
        point = None
        for block in range(self.num_blocks, -1, -1):
            if block < self.num_blocks and not self.finished(block):
                break
            if self._path(f"grad-{block:05d}").is_file():
                point = block
        return point

    def resume(self) -> tuple[int, torch.Tensor] | None:
        """:meth:`resume_point` and the gradient kept there, read at once: another run on the same
        cache drops a block's gradient once it has the next one, so reading it later (after the
        forward pass) could find it gone; if it goes between the two calls, look again."""
        while True:
            point = self.resume_point()
            if point is None:
                return None
            try:
                return point, self.load_gradient(point)
            except FileNotFoundError:
                continue

    def load_gradient(self, block: int) -> torch.Tensor:
        return load_file(str(self._path(f"grad-{block:05d}")))["grad"]

    def load_unit(self, block: int | None, scores: torch.Tensor, sizes: torch.Tensor, slice_scores: torch.Tensor | None = None) -> None:
        """Write a finished unit's rows back into ``scores`` and ``sizes`` (and ``slice_scores``)."""
        tensors = load_file(str(self._path(unit_name(block))))
        rows = tensors["rows"]
        scores[rows] = tensors["scores"]
        sizes[rows] = tensors["bytes"]
        if slice_scores is not None:
            slice_scores[:, rows] = tensors["slice_scores"]

    def unit_layers(self, block: int | None) -> list[str]:
        with safe_open(str(self._path(unit_name(block))), framework="pt") as handle:
            return json.loads(handle.metadata()["layers"])

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
