"""Per-slice quality limits: what a deployment gate promises for each slice of the evaluation text.

A limit is either absolute (``--max-slice-kl code=0.05,prose=0.1``: the slice's KL to the original
model, nats per token, must stay at or below the number) or relative (``--max-slice-regression
code=1.2``: the slice's KL may be at most that multiple of the best uniform plan's KL on the same
slice at the same bytes). The planner turns limits into constraints; ``bitplan eval`` checks them
on held-out text and exits non-zero when one is broken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bitplan.errors import BitplanError


@dataclass(frozen=True)
class SliceLimits:
    """``max_kl[slice]`` in nats/token; ``max_regression[slice]`` as a factor (> 0) of the best
    uniform plan's KL on that slice at the same bytes."""

    max_kl: dict[str, float] = field(default_factory=dict)
    max_regression: dict[str, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.max_kl or self.max_regression)

    @property
    def slices(self) -> set[str]:
        return set(self.max_kl) | set(self.max_regression)

    def to_dict(self) -> dict:
        return {"max_kl": dict(sorted(self.max_kl.items())), "max_regression": dict(sorted(self.max_regression.items()))}

    @classmethod
    def from_dict(cls, data: dict | None) -> "SliceLimits":
        data = data or {}
        return cls(dict(data.get("max_kl", {})), dict(data.get("max_regression", {})))

    def check_slices(self, available: list[str] | set[str]) -> None:
        """Every limited slice must exist in the text; otherwise one line naming it and the slices there are."""
        missing = sorted(self.slices - set(available))
        if missing:
            raise BitplanError(f"limit for slice {missing[0]!r}, but the text has only the slices {', '.join(sorted(available))}: "
                               "name a slice the text has (the 'slice' field of JSONL rows, or the .txt file's name)")


def parse_limit_list(text: str | None, option: str) -> dict[str, float]:
    """``"code=0.05,prose=0.1"`` -> ``{"code": 0.05, "prose": 0.1}``; a malformed entry gets one line."""
    if not text:
        return {}
    limits: dict[str, float] = {}
    for entry in text.split(","):
        name, sep, number = entry.strip().partition("=")
        name = name.strip()
        try:
            value = float(number)
        except ValueError:
            value = math.nan
        if not sep or not name or not math.isfinite(value) or value <= 0:
            raise BitplanError(f"malformed limit {entry.strip()!r} in {option}: write slice=positive number, "
                               f"for example {option} code=0.05,prose=0.1")
        if name in limits:
            raise BitplanError(f"slice {name!r} is limited twice in {option}: give each slice one limit")
        limits[name] = value
    return limits


def parse_slice_limits(max_kl: str | None = None, max_regression: str | None = None) -> SliceLimits:
    return SliceLimits(parse_limit_list(max_kl, "--max-slice-kl"), parse_limit_list(max_regression, "--max-slice-regression"))
