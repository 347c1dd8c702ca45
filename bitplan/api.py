"""The Python API: ``plan``, ``profile``, ``emit``, ``load``, ``evaluate``, ``score`` (a scorecard: evaluate and judge).

Each is a short pipeline of the stage functions that live in the rooms below (``models``,
``profiles``, ``engines``, ``planner``, ``checkpoints``); the CLI is a thin layer over these.
"""

from __future__ import annotations

import math

from collections.abc import Callable
from dataclasses import replace

from bitplan import __version__
from bitplan.checkpoints.emit import emit
from bitplan.checkpoints.evaluate import evaluate, score
from bitplan.checkpoints.load import load
from bitplan.checkpoints.scorecard import Scorecard, load_scorecard
from bitplan.engines import DEFAULT_ENGINE, Target, deployed_spec, resolve_target
from bitplan.engines.formats import format_counts
from bitplan.engines.rules import EngineRules, allowed, check_kv_dtype, check_tensor_parallel, kv_engine_flags, restrict_table
from bitplan.methods.kv_cache import kv_format
from bitplan.methods.scheme import Scheme
from bitplan.models.source import ModelSource, open_model
from bitplan.planner.candidates import Candidates
from bitplan.planner.deployment import Deployment, deployment_for, memory_breakdown, weight_budget_bytes
from bitplan.planner.limits import SliceLimits
from bitplan.planner.objective import assignment_sum, check_objective, objective_costs
from bitplan.planner.kv_choice import AUTO, KVMeasured, choose_kv, kv_candidates, measure_kv
from bitplan.planner.plan import EngineRecord, FormatCount, KVCacheRecord, ModelRef, Plan, Prediction, Provenance, SearchRecord
from bitplan.planner.refine import Refinement, refine_measured
from bitplan.planner.score_calibration import score_calibration
from bitplan.planner.search import Allocation, SearchSettings, allocate, check_feasible, smallest_allocation
from bitplan.planner.slices import SliceBounds, predicted_slice_kl, resolve_limits
from bitplan.planner.speed import decode_prediction
from bitplan.profiles.calibration import CalibrationSettings, calibration_slices
from bitplan.profiles.sensitivity import sensitivity_table
from bitplan.profiles.tables import SensitivityTable

__all__ = ["CalibrationSettings", "Candidates", "Scorecard", "SliceLimits", "emit", "evaluate", "load", "load_scorecard", "plan", "profile",
           "score"]
Progress = Callable[[str, int, int], None]
EXACT_SOLVER = "scipy.optimize.milp (HiGHS), exact multiple-choice knapsack"


def profile(model: str, candidates: Candidates = Candidates(), calibration: CalibrationSettings = CalibrationSettings(),
            seed: int = 0, progress: Progress | None = None, use_cache: bool = True,
            rules: EngineRules | None = None, workers: int = 1) -> SensitivityTable:
    """Measure (or read from the cache) the sensitivity table of ``model`` for the candidates
    (those ``rules``' engine runs, when given), in ``workers`` processes (``profiles.distributed``)."""
    return sensitivity_table(open_model(model), candidates.schemes(rules), calibration, seed, progress, use_cache, workers)


def plan(
    model: str,
    budget: str | int | None = None,
    target: str | None = None,
    context: int = 2048,
    batch: int = 1,
    kv_dtype: str = "float16",
    tensor_parallel: int = 1,
    overhead: str | int | None = None,
    candidates: Candidates = Candidates(),
    calibration: CalibrationSettings = CalibrationSettings(),
    tie_fused: bool = False,
    trials: int = 16,
    seed: int = 0,
    progress: Progress | None = None,
    objective: str = "quality",
    engine: str = DEFAULT_ENGINE,
    study_storage: str | None = None,
    workers: int = 1,
    slice_limits: SliceLimits | None = None,
    search_minutes: float | None = None,
) -> Plan:
    """Profile (or reuse the cached profile), allocate exactly under the engine's rules, refine, return the Plan.

    ``engine`` names what will serve the checkpoint (``bitplan.engines``); its rules on the
    ``target``'s hardware constrain the search. ``objective`` (``planner.objective``):
    ``quality`` minimises predicted KL; ``speed`` and ``balanced`` add the predicted decode time
    on ``target``, which they therefore need. ``study_storage`` (an RDB URL or a journal file path)
    shares refinement's Optuna study among workers running the same plan (``planner.study``);
    ``workers`` processes share the profile (``profiles.distributed``). ``kv_dtype`` "auto" makes
    the KV cache's format part of the search (``planner.kv_choice``): every format the engine runs
    is tried, its cost measured on the calibration text; a named format is checked against the engine.
    ``slice_limits`` (``planner.limits.parse_slice_limits``) bound each named calibration slice's
    predicted KL (``planner.slices``): constraints of the allocation (at every KV format weighed)
    and of the refinement. The refinement (``planner.refine``) is a search over individual layers
    measured on held-in calibration tokens; it stops after ``trials`` trials or ``search_minutes``
    minutes, whichever comes first; ``trials`` 0 keeps the exact allocation.
    """
    goal = resolve_target(engine, target)
    settings = SearchSettings(tie_fused or goal.rules.fused_share_scheme, trials, seed,
                              check_objective(objective, goal.device, needs_device=True), study_storage, search_minutes)
    source = open_model(model)
    source = replace(source, spec=deployed_spec(source.spec, goal.rules))
    check_tensor_parallel(source.spec, goal.rules, tensor_parallel)
    if kv_dtype != AUTO:
        check_kv_dtype(goal.rules, kv_dtype)
    kv_dtypes = kv_candidates(kv_dtype, goal.rules.kv_cache_dtypes, source.spec)
    smallest_kv = min(kv_dtypes, key=lambda d: kv_format(d).bytes_per_value)
    deployment = deployment_for(budget, goal.device, context, batch, smallest_kv, tensor_parallel, overhead)
    schemes = candidates.for_device(goal.device).schemes(goal.rules)
    check_feasible(source.spec, schemes, weight_budget_bytes(source.spec, deployment), deployment.budget_bytes, settings.tie_fused,
                   allowed(goal.rules, source.spec, tensor_parallel))
    limits = slice_limits or SliceLimits()
    if limits:  # an unknown slice is refused before the profile
        limits.check_slices(calibration_slices(source.folder, calibration).names)
    table = sensitivity_table(source, schemes, calibration, seed, progress, workers=workers)
    table = restrict_table(table, source.spec, goal.rules, tensor_parallel)
    times, extra_cost = objective_costs(settings.objective, table, source.spec, goal.device, deployment)
    kv_measured = measure_kv(source, kv_dtypes, calibration)

    def allocate_within(budget_bytes: int) -> Allocation:
        bounds = resolve_limits(limits, table, budget_bytes)
        return allocate(table, source.spec, budget_bytes, settings.tie_fused, extra_cost=extra_cost, slice_bounds=bounds.bounds,
                        budget_offset_bytes=deployment.budget_bytes - budget_bytes)

    kv_dtype, allocation, kv_options = choose_kv(source.spec, deployment, kv_measured.kl, allocate_within,
                                                 smallest_allocation(table, source.spec, settings.tie_fused).weight_bytes)
    deployment = replace(deployment, kv_dtype=kv_dtype)
    weight_budget = weight_budget_bytes(source.spec, deployment)
    bounds = resolve_limits(limits, table, weight_budget)
    kv_record = kv_cache_record(kv_dtype, kv_measured, kv_options, goal.rules)
    refinement = None
    if trials > 0:
        refinement = refine_measured(source, table, weight_budget, settings, calibration, progress, extra_cost, bounds.bounds)
        allocation = refinement[0].allocation
    return assemble_plan(source, deployment, goal, table, allocation, refinement, times, calibration, settings, kv_record, limits, bounds)


def kv_cache_record(dtype: str, measured: KVMeasured, options, rules: EngineRules) -> KVCacheRecord:
    """What the plan says about its KV cache: format, cost, every option, scales and the engine's run-time flag."""
    scaled = kv_format(dtype).scale == "tensor"
    return KVCacheRecord(dtype, measured.kl[dtype], measured.tokens, tuple(o.to_dict() for o in options),
                         measured.k_scales if scaled else (), measured.v_scales if scaled else (), kv_engine_flags(rules.engine, dtype))


def assemble_plan(source: ModelSource, deployment: Deployment, goal: Target, table: SensitivityTable, allocation: Allocation,
                  refinement: tuple[Refinement, int] | None, times, calibration: CalibrationSettings,
                  settings: SearchSettings, kv_record: KVCacheRecord | None = None, limits: SliceLimits | None = None,
                  bounds: SliceBounds | None = None) -> Plan:
    """The Plan product of the stages' results."""
    bounds = bounds or SliceBounds({})
    search = SearchRecord(EXACT_SOLVER, allocation.status, allocation.mip_gap, settings.tie_fused,
                          weight_budget_bytes(source.spec, deployment), settings.objective,
                          slice_bounds=bounds.bounds or None, uniform_scheme=bounds.uniform_scheme)
    predicted = {"score_kl": allocation.score, "metric": table.provenance.get("metric")}
    calibrated = score_calibration(table.provenance.get("metric_version"))
    if calibrated is not None:
        predicted.update(calibrated_kl=round(calibrated.predict(allocation.score), 6), calibrated_within=calibrated.factor)
    if kv_record is not None:
        predicted["kv_cache_kl"] = kv_record.kl
    if refinement is not None:
        found, tokens = refinement
        search = SearchRecord(**{**search.to_dict(), "refine_trials": found.trials, "refine_distinct_plans": found.distinct_plans,
                                 "refine_tokens": tokens, "refine_candidates": found.candidates,
                                 "refine_measured_tokens": found.measured_tokens, "refine_stopped_by": found.stopped_by,
                                 "refine_seconds": round(found.seconds, 1) if found.stopped_by == "clock" else None,
                                 "search_minutes": settings.search_minutes,
                                 "method_factors": {m: f.to_dict() for m, f in found.factors.items()} if found.factors else None,
                                 "refine_validation_tokens": found.validation_tokens, "refine_kept": found.kept,
                                 "refine_search_gain": [float(f"{v:.6g}") for v in found.search_gain]
                                 if found.search_gain and math.isfinite(found.search_gain[1]) else None})
        predicted.update(calibration_kl=found.measured_kl, exact_calibration_kl=found.exact_kl, validation_kl=found.validation_kl,
                         exact_validation_kl=found.exact_validation_kl)
    if goal.device is not None:
        predicted.update(decode_prediction(source.spec, allocation.choice, goal.device, deployment))
        predicted["linear_decode_ms"] = 1e3 * assignment_sum(table, allocation.choice, times)
    schemes = {name: Scheme.parse(s) for name, s in allocation.choice.items()}
    provenance = Provenance(table.provenance["model_hash"], table.provenance["calibration_hash"], __version__, settings.seed,
                            table.provenance.get("metric"), table.provenance.get("metric_version"), tuple(table.schemes), calibration)
    rules = goal.rules
    return Plan(
        model=ModelRef(source.name, source.spec.model_type, table.provenance["model_hash"]),
        deployment=deployment,
        target=goal.name,
        assignments=allocation.choice,
        memory=memory_breakdown(source.spec, allocation.weight_bytes, deployment),
        predicted=Prediction(**predicted),
        search=search,
        provenance=provenance,
        engine=EngineRecord(rules.engine, rules.platform, rules.loader, tuple(rules.summary())),
        formats={name: FormatCount(fmt, layers) for name, (fmt, layers) in format_counts(schemes).items()},
        kv_cache=kv_record,
        slice_limits=limits or None,
        predicted_slice_kl=predicted_slice_kl(table, allocation.choice) or None,
        search_seconds=refinement[0].seconds if refinement is not None else None,
    )
