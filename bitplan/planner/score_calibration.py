"""From the summed score to a prediction of measured KL on unseen text.

The score is a second-order, layer-by-layer estimate: errors of many Linears compound, so the sum
underestimates the KL a plan measures, more so the larger it is. ``bench/score_calibration.py``
measures many plans of different budgets and methods on held-out text and fits
``measured = c * score ** gamma`` in logs; the constants and the largest ratio either way over
those plans (``factor``) live in ``score_calibration.json`` next to this file, with the score's
metric version they were fitted for. A table of another metric version gets no calibrated
prediction: constants fitted to one formula are never applied to another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CONSTANTS = Path(__file__).with_name("score_calibration.json")


@dataclass(frozen=True)
class ScoreCalibration:
    c: float
    gamma: float
    factor: float  # every fitted plan's measured KL was within this ratio of its calibrated prediction
    metric_version: int
    model: str
    plans: int

    def predict(self, score: float) -> float:
        return self.c * max(score, 0.0) ** self.gamma


@lru_cache(maxsize=1)
def _load(path: Path) -> ScoreCalibration | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return ScoreCalibration(float(data["c"]), float(data["gamma"]), float(data["factor"]), int(data["metric_version"]),
                            str(data["model"]), int(data["plans"]))


def score_calibration(metric_version: int | None, path: Path = CONSTANTS) -> ScoreCalibration | None:
    """The fitted calibration for scores of ``metric_version`` (None when there is none for it)."""
    found = _load(path)
    return found if found is not None and found.metric_version == metric_version else None
