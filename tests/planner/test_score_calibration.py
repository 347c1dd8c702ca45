"""The calibrated prediction: constants fitted by bench/score_calibration.py on measured plans,
for the score formula in use, and never applied to another."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from bitplan.planner.score_calibration import CONSTANTS, score_calibration
from bitplan.profiles.tables import METRIC_VERSION

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_calibration_is_for_the_score_in_use():
    """A change of the score's formula (METRIC_VERSION) needs `bench/score_calibration.py --write`."""
    calibration = score_calibration(METRIC_VERSION)
    assert calibration is not None, "re-fit: .venv/bin/python bench/score_calibration.py --write"
    assert score_calibration(METRIC_VERSION - 1) is None
    assert calibration.plans >= 20 and 1.0 <= calibration.factor < 3.0
    assert calibration.predict(0.1) < calibration.predict(0.5)


def test_the_constants_are_the_fit_of_the_measured_plans_and_hold_the_stated_factor():
    """The shipped constants are what the bench fitted to its saved measurements (not edited by
    hand), and every measured plan's held-out KL lies within the stated factor of its prediction."""
    sys.path.insert(0, str(ROOT / "bench"))
    from score_calibration import fit

    results = json.loads((ROOT / "bench/results/score_calibration.json").read_text())
    rows = results["rows"]
    c, gamma, factor = fit([r["predicted_kl"] for r in rows], [r["measured_kl_pydoc"] for r in rows])
    shipped = json.loads(CONSTANTS.read_text())
    assert shipped["metric_version"] == results["calibration"]["metric_version"] == METRIC_VERSION
    assert math.isclose(shipped["c"], c, rel_tol=1e-4) and math.isclose(shipped["gamma"], gamma, rel_tol=1e-4)
    calibration = score_calibration(METRIC_VERSION)
    for row in rows:
        ratio = calibration.predict(row["predicted_kl"]) / row["measured_kl_pydoc"]
        assert 1 / calibration.factor - 1e-3 <= ratio <= calibration.factor + 1e-3, row["plan"]
