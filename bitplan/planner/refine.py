"""Refinement: Optuna tunes a few knobs of the exact allocation against measured KL.

The summed score is additive; real loss is not quite. Optuna searches per-kind multipliers on
the scores (q, k, v, o, gate, up, down, ...) and a multiplier for the first and last blocks,
re-solves the exact allocation for each, and measures the resulting plan's KL on held-in
calibration tokens. The first trial is the exact solution itself (``enqueue_trial``), so the
kept plan is never worse, on the measured tokens, than the exact one.

With ``extra_cost`` (the latency term of ``--objective speed|balanced``, in score units, see
``planner.objective``) every allocation adds it to the scores, and a trial's value is the
measured KL plus the same term summed over the plan's cells: the kept plan is never worse than
the exact one on that sum, though its KL alone may be higher.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import optuna
import torch

from bitplan.methods.registry import needs_calibration
from bitplan.methods.scheme import Scheme
from bitplan.models.source import ModelSource
from bitplan.models.spec import ModelSpec
from bitplan.planner.objective import assignment_sum
from bitplan.planner.quality import QualityMeter, load_dense_model
from bitplan.planner.search import Allocation, SearchSettings, allocate
from bitplan.profiles.calibration import CalibrationSettings, calibration_windows
from bitplan.profiles.tables import SensitivityTable

log = logging.getLogger(__name__)
REFINE_WINDOWS = 4  # held-in calibration windows each trial is measured on
KNOB_RANGE = (0.25, 4.0)
EDGE_KNOB = "edge_blocks"


@dataclass(frozen=True)
class Refinement:
    allocation: Allocation
    measured_kl: float
    exact_kl: float
    knobs: dict[str, float]
    trials: int
    distinct_plans: int


def layer_weights(table: SensitivityTable, spec: ModelSpec, knobs: dict[str, float]) -> np.ndarray:
    last = spec.num_blocks - 1
    weights = np.ones(len(table.layers))
    for row, name in enumerate(table.layers):
        layer = spec.layer(name)
        weights[row] = knobs.get(f"kind_{layer.kind}", 1.0)
        if layer.block in (0, last):
            weights[row] *= knobs.get(EDGE_KNOB, 1.0)
    return weights


def refine(
    table: SensitivityTable,
    spec: ModelSpec,
    weight_budget_bytes: int,
    tie_fused: bool,
    meter: QualityMeter,
    windows: torch.Tensor,
    trials: int,
    seed: int,
    progress: Callable[[str, int, int], None] | None = None,
    extra_cost: np.ndarray | None = None,
) -> Refinement:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kinds = sorted({spec.layer(name).kind for name in table.layers})
    knob_names = [f"kind_{kind}" for kind in kinds] + [EDGE_KNOB]
    measured: dict[tuple, float] = {}
    allocations: dict[tuple, Allocation] = {}
    report = progress or (lambda stage, done, total: None)

    def objective(trial: optuna.Trial) -> float:
        knobs = {name: trial.suggest_float(name, *KNOB_RANGE, log=True) for name in knob_names}
        allocation = allocate(table, spec, weight_budget_bytes, tie_fused, layer_weights(table, spec, knobs), extra_cost)
        key = tuple(allocation.choice.values())
        if key not in measured:
            meter.apply({name: Scheme.parse(s) for name, s in allocation.choice.items()})
            measured[key] = meter.measure(windows).kl
            allocations[key] = allocation
        report("refine", trial.number + 1, trials)
        trial.set_user_attr("kl", measured[key])
        if extra_cost is None:
            return measured[key]
        return measured[key] + assignment_sum(table, allocation.choice, extra_cost)

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial({name: 1.0 for name in knob_names})
    study.optimize(objective, n_trials=max(trials, 1))
    exact_kl = study.trials[0].user_attrs["kl"]
    best = min(study.trials, key=lambda t: (t.value, t.number))
    knobs = {name: round(value, 6) for name, value in best.params.items()}
    allocation = allocate(table, spec, weight_budget_bytes, tie_fused, layer_weights(table, spec, best.params), extra_cost)
    return Refinement(allocation, best.user_attrs["kl"], exact_kl, knobs, len(study.trials), len(measured))


def refine_measured(source: ModelSource, table: SensitivityTable, weight_budget_bytes: int, settings: SearchSettings,
                    calibration: CalibrationSettings, progress: Callable[[str, int, int], None] | None = None,
                    extra_cost: np.ndarray | None = None) -> tuple[Refinement, int]:
    """Refine on held-in calibration windows (those after the profile's; the profile's own first
    ``REFINE_WINDOWS`` when the text has no more). Returns the refinement and the tokens it measured on."""
    windows = calibration_windows(source.folder, calibration, REFINE_WINDOWS)
    held_in = windows[calibration.samples:] if len(windows) > calibration.samples else windows[:REFINE_WINDOWS]
    meter = QualityMeter(load_dense_model(source.folder), source.spec)
    schemes = [Scheme.parse(name) for name in table.schemes]
    if needs_calibration(schemes):
        meter.calibrate(windows[: calibration.samples])
    refinement = refine(table, source.spec, weight_budget_bytes, settings.tie_fused, meter, held_in, settings.trials,
                        settings.seed, progress, extra_cost)
    return refinement, int(held_in.numel())
