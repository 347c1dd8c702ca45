"""The sensitivity table: its type and file, and the cache that serves it.

A table is keyed by everything a score depends on (the model's weights, the calibration tokens,
the metric and its version, each method's implementation version and settings, the seed) plus
its scheme set; files are written once under their key by atomic rename, so concurrent runs
sharing a cache at worst both compute the same table; each scheme is scored on its own, so
a cached table of a superset serves any subset.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from bitplan.atomic import write_safetensors
from bitplan.methods.registry import implementations
from bitplan.methods.scheme import Scheme

log = logging.getLogger(__name__)

METRIC = "fisher-kl"
METRIC_VERSION = 3  # the score's formula (2: per-slice scores, the aggregate their weighted mean; 3: H from weighted rows, calibration_stats.OuterSum); methods' versions: registry.implementations()


@dataclass
class SensitivityTable:
    """Score (predicted KL, nats/token) and exact bytes for every (layer, scheme).

    ``scores[i, j]`` is NaN and ``bytes[i, j]`` is -1 where scheme ``j`` cannot store layer ``i``.
    A measured table also keeps each calibration slice's own score, ``slice_scores[s, i, j]``
    for slice ``slices[s]``; ``scores`` is their mean weighted by ``slice_weights``.
    """

    layers: list[str]
    schemes: list[str]
    scores: torch.Tensor  # float64 [layers, schemes]
    bytes: torch.Tensor  # int64 [layers, schemes]
    provenance: dict = field(default_factory=dict)
    slices: list[str] = field(default_factory=list)
    slice_scores: torch.Tensor | None = None  # float64 [slices, layers, schemes]
    slice_weights: list[float] = field(default_factory=list)

    def scheme_index(self, name: str) -> int:
        return self.schemes.index(name)

    def slice_matrix(self, name: str) -> torch.Tensor:
        """``[layers, schemes]`` scores of slice ``name``."""
        return self.slice_scores[self.slices.index(name)]

    def subset(self, schemes: list[str]) -> "SensitivityTable":
        """The same table with only ``schemes``' columns, in that order."""
        columns = [self.schemes.index(name) for name in schemes]
        per_slice = None if self.slice_scores is None else self.slice_scores[:, :, columns].clone()
        return SensitivityTable(list(self.layers), list(schemes), self.scores[:, columns].clone(), self.bytes[:, columns].clone(),
                                dict(self.provenance), list(self.slices), per_slice, list(self.slice_weights))

    def save(self, path: Path) -> None:
        """One safetensors file; names and provenance in its metadata. Written atomically, the same
        bytes for the same table."""
        meta = {"layers": json.dumps(self.layers), "schemes": json.dumps(self.schemes), "provenance": json.dumps(self.provenance, sort_keys=True)}
        tensors = {"scores": self.scores.contiguous(), "bytes": self.bytes.contiguous()}
        if self.slice_scores is not None:
            meta.update(slices=json.dumps(self.slices), slice_weights=json.dumps(self.slice_weights))
            tensors["slice_scores"] = self.slice_scores.contiguous()
        write_safetensors(Path(path), tensors, meta)

    @classmethod
    def load(cls, path: Path) -> "SensitivityTable":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
        tensors = load_file(str(path))
        return cls(json.loads(meta["layers"]), json.loads(meta["schemes"]), tensors["scores"], tensors["bytes"], json.loads(meta["provenance"]),
                   json.loads(meta.get("slices", "[]")), tensors.get("slice_scores"), json.loads(meta.get("slice_weights", "[]")))


def table_key(model_hash: str, tokens_hash: str, schemes: list[Scheme], seed: int, slices_digest: str = "") -> str:
    """``<inputs>-<schemes>``: the first part names everything a score depends on but its scheme
    (each scheme is scored on its own), so a cached table of a superset serves a subset. The
    inputs include every method's implementation version and settings
    (``methods.registry.implementations``): changing GPTQ's damping or AWQ's grid re-profiles."""
    inputs = json.dumps([model_hash, tokens_hash, slices_digest, METRIC, METRIC_VERSION, seed, implementations()], sort_keys=True)
    names = json.dumps([s.name for s in schemes])
    return f"{hashlib.sha256(inputs.encode()).hexdigest()[:24]}-{hashlib.sha256(names.encode()).hexdigest()[:12]}"


def cached_table(folder: Path, key: str, schemes: list[Scheme]) -> "SensitivityTable | None":
    """A cached table holding every scheme in ``schemes`` for the same inputs, narrowed to them."""
    exact = folder / f"{key}.safetensors"
    candidates = [exact] if exact.is_file() else []
    candidates += sorted(p for p in folder.glob(f"{key.split('-')[0]}-*.safetensors") if p != exact)
    wanted = [s.name for s in schemes]
    for path in candidates:
        try:
            table = SensitivityTable.load(path)
        except Exception as exc:  # a damaged file (bitplan writes atomically, so not by bitplan): ignore it, it is rewritten
            log.warning("ignoring the unreadable cached table %s (%s)", path, exc)
            continue
        if set(wanted) <= set(table.schemes):
            return table.subset(wanted)
    return None

