"""Refinement: Optuna tunes a few knobs of the exact allocation against measured KL.

The summed score is additive; real loss is not quite. Optuna searches per-kind multipliers on
the scores (q, k, v, o, gate, up, down, ...) and a multiplier for the first and last blocks,
re-solves the exact allocation for each, and measures the resulting plan's KL on held-in
calibration tokens. The first trial is the exact solution itself (``enqueue_trial``), so the
kept plan is never worse, on the measured tokens, than the exact one. The study may live in shared
storage (``planner.study``), where several workers add trials to it.

With ``extra_cost`` (the latency term of ``--objective speed|balanced``, in score units, see
``planner.objective``) every allocation adds it to the scores, and a trial's value is the
measured KL plus the same term summed over the plan's cells: the kept plan is never worse than
the exact one on that sum, though its KL alone may be higher.

With ``slice_bounds`` (``planner.slices``) every allocation carries the per-slice constraints, and
a trial whose plan's predicted KL on a limited slice exceeds its bound is infeasible (Optuna's
``Trial.set_constraint``, which TPE reads; such a trial is never kept).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
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
from bitplan.planner.search import SLICE_SLACK, Allocation, SearchSettings, allocate
from bitplan.planner.slices import predicted_slice_kl
from bitplan.planner.streaming import StreamingMeter
from bitplan.planner.study import STOP_STATES, counted_trials, finished_trials, open_study, study_name
from bitplan.profiles.calibration import CalibrationSettings, calibration_windows
from bitplan.profiles.tables import SensitivityTable

log = logging.getLogger(__name__)
REFINE_WINDOWS = 4  # held-in calibration windows each trial is measured on
KNOB_RANGE = (0.25, 4.0)
EDGE_KNOB = "edge_blocks"
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # recorded on each trial of a shared study


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
    meter: QualityMeter | StreamingMeter,
    windows: torch.Tensor,
    trials: int,
    seed: int,
    progress: Callable[[str, int, int], None] | None = None,
    extra_cost: np.ndarray | None = None,
    storage: str | None = None,
    slice_bounds: dict[str, float] | None = None,
) -> Refinement:
    """Run ``trials`` trials (at least the exact one) and keep the best; with ``storage``
    (``planner.study``), run trials in the shared study until it holds ``trials``, then keep the
    best of all its workers' trials."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kinds = sorted({spec.layer(name).kind for name in table.layers})
    knob_names = [f"kind_{kind}" for kind in kinds] + [EDGE_KNOB]
    measured: dict[tuple, float] = {}
    report = progress or (lambda stage, done, total: None)
    total = max(trials, 1)

    bounds = dict(slice_bounds or {})

    def solve(knobs: dict[str, float]) -> Allocation:
        return allocate(table, spec, weight_budget_bytes, tie_fused, layer_weights(table, spec, knobs), extra_cost, bounds)

    def objective(trial: optuna.Trial) -> float:
        knobs = {name: trial.suggest_float(name, *KNOB_RANGE, log=True) for name in knob_names}
        allocation = solve(knobs)
        predicted = predicted_slice_kl(table, allocation.choice) if bounds else {}
        for name, bound in sorted(bounds.items()):
            trial.set_constraint(f"slice_{name}", predicted[name] - bound * (1 + SLICE_SLACK))
        key = tuple(allocation.choice.values())
        if key not in measured:
            meter.apply({name: Scheme.parse(s) for name, s in allocation.choice.items()})
            measured[key] = meter.measure(windows).kl
        report("refine", min(trial.number + 1, total), total)
        trial.set_user_attr("kl", measured[key])
        trial.set_user_attr("plan", hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16])
        trial.set_user_attr("worker", WORKER)
        if extra_cost is None:
            return measured[key]
        return measured[key] + assignment_sum(table, allocation.choice, extra_cost)

    study = open_study(storage, study_name(table, weight_budget_bytes, tie_fused, windows, seed, extra_cost, bounds), seed)
    study.enqueue_trial({name: 1.0 for name in knob_names}, user_attrs={"exact": True}, skip_if_exists=True)
    if counted_trials(study) < total:
        stop = optuna.study.MaxTrialsCallback(total, states=STOP_STATES)
        study.optimize(objective, n_trials=total, callbacks=[stop])
    done = finished_trials(study)
    exact_kl = min((t for t in done if t.user_attrs.get("exact")), key=lambda t: t.number).user_attrs["kl"]
    feasible = [t for t in done if all(excess <= 0 for excess in t.constraints.values())]
    best = min(feasible, key=lambda t: (t.value, t.number))
    knobs = {name: round(value, 6) for name, value in best.params.items()}
    allocation = solve(best.params)
    return Refinement(allocation, best.user_attrs["kl"], exact_kl, knobs, len(done), len({t.user_attrs["plan"] for t in done}))


WHOLE_MODEL_SHARE = 0.25  # the whole-model meter while its two float32 copies take at most this share of RAM


def choose_meter(source: ModelSource) -> QualityMeter | StreamingMeter:
    """The whole-model meter (the model and its quantized copy in float32: one forward per window,
    several times faster) while both copies fit in a quarter of this machine's memory; beyond
    that, the streaming meter (block by block: a constant number of blocks in memory)."""
    two_copies = 2 * 4 * (source.spec.linear_weights + source.spec.unquantized_bytes // source.spec.dtype_bytes)
    if two_copies <= WHOLE_MODEL_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"):
        return QualityMeter(load_dense_model(source.folder), source.spec)
    return StreamingMeter(source.folder, source.config, source.spec)


def refine_measured(source: ModelSource, table: SensitivityTable, weight_budget_bytes: int, settings: SearchSettings,
                    calibration: CalibrationSettings, progress: Callable[[str, int, int], None] | None = None,
                    extra_cost: np.ndarray | None = None, slice_bounds: dict[str, float] | None = None) -> tuple[Refinement, int]:
    """Refine on held-in calibration windows (those after the profile's; the profile's own first
    ``REFINE_WINDOWS`` when the text has no more). Returns the refinement and the tokens it measured on.
    Plans are measured by :func:`choose_meter`'s meter."""
    windows = calibration_windows(source.folder, calibration, REFINE_WINDOWS)
    held_in = windows[calibration.samples:] if len(windows) > calibration.samples else windows[:REFINE_WINDOWS]
    meter = choose_meter(source)
    schemes = [Scheme.parse(name) for name in table.schemes]
    if needs_calibration(schemes):
        meter.calibrate(windows[: calibration.samples])
    refinement = refine(table, source.spec, weight_budget_bytes, settings.tie_fused, meter, held_in, settings.trials,
                        settings.seed, progress, extra_cost, settings.study_storage, slice_bounds)
    return refinement, int(held_in.numel())
