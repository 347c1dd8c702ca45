"""Refinement: a search over individual layers driven by KL measured on held-in calibration tokens.

The summed score is additive and real loss is not (EvoPress, IST-DASLab, ICML 2025, showed that
summed per-layer errors mislead). The search starts from the exact allocation and moves units
(layers, or the fused groups the engine ties) between levels at equal or fewer bytes, measuring
candidates with staged token counts (``planner.evolve``). Every cell it can choose is one the
exact allocation could choose: the engine's (layer, scheme) cells, the ties, the smoothing
groups, the weight budget and the slice bounds.

The search is an Optuna study (``planner.study``: in memory, or in shared storage where several
workers add trials to it). It measures on a pool of ``HELD_IN_POOL`` held-in windows whose first
``REFINE_WINDOWS`` are the *anchor*. Trial 0 is the exact plan (``enqueue_trial``), measured on
the anchor; then each method's probe (``planner.method_factors``: that method's scheme nearest
the budget's bits on every layer), measured on the anchor before the allocation, where it fits
the budget and the slice limits. Every later trial is one generation of a (1 + lambda) chain, as
in EvoPress: its parent is the plan of the latest finished generation (before the first, the
best baseline on the anchor); with a generator seeded by ``(seed, trial number)`` it draws its
offspring and two fresh sets of ``REFINE_WINDOWS`` windows from the pool, selects a survivor on
the first (staged, ``planner.evolve``) and compares survivor and parent on the second, which
selection never saw: the survivor replaces the parent only where it measures lower there (the
parent wins ties). A plan that got lucky on some windows meets others in the next generation, so
the chain does not settle on a fit to four windows, as a best-of-all-trials on fixed windows
did. The trial's value is the winner's KL on the comparison windows; ``user_attrs`` hold the
plan (one scheme column per table row), that KL, and the candidates and tokens the generation
measured. Without validation the chain's last plan is kept.

Held-in windows still chose that plan, so its held-in KL flatters it (on SmolLM2 at 4.25 bits per
weight a best-of-all-trials search measured 0.133 held in against 0.146 for uniform AWQ + imatrix,
and held-out text gave 0.143 against 0.137). With ``validation`` windows (held back: never
measured by the search, spread through the rest of the calibration text) the plan is confirmed:
the exact plan, every probe (the baselines) and the chain's last ``CONFIRM_TOP`` distinct plans
are measured on them. The kept plan is the best baseline there, unless a searched plan beats it
there by a gain that window-to-window noise does not explain: the mean of its paired per-window
gains at least the one-sided ``GAIN_LEVEL`` critical value of Student's t times their standard
error (:func:`held_back_gain`); then the best such plan (:func:`kept_plan`). A gain that does not
carry to other windows of the same text is a fit to the held-in windows, and it carries still
less to other text: the baseline, uniform where a probe wins, is kept. The reported held-in KL
of the kept plan and of the exact plan is measured on the anchor.

Before the exact allocation each method's scores are put on the scale of measured KL by its
probe (``planner.method_factors``); the exact plan is allocated on the scaled table, and the
plan's reported score is the profile's own.

The search stops at ``trials`` (the study's total, plus the probes) or after ``search_minutes``, whichever comes
first; a generation the clock interrupts is dropped (a failed trial). Quantized weights and the
reference's log-probabilities are computed once (``quality.VariantCache``): no trial re-runs GPTQ.

With ``extra_cost`` (the latency term of ``--objective speed|balanced``, in score units, see
``planner.objective``) a candidate's value is its measured KL plus that term summed over its
cells, and the levels are ranked by score plus that term: the kept plan is never worse than the
exact one on that sum, though its KL alone may be higher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import optuna
import torch

from bitplan.methods.registry import needs_calibration
from bitplan.methods.scheme import Scheme
from bitplan.models.source import ModelSource
from bitplan.models.spec import ModelSpec
from bitplan.planner.method_factors import MethodFactor, method_factors, scaled_table
from bitplan.planner.evolve import STAGES, columns_of, generation, locate, offspring, search_units, stage_windows, within_limits
from bitplan.planner.objective import assignment_sum
from bitplan.planner.quality import QualityMeter, load_dense_model
from bitplan.planner.search import SLICE_SLACK, Allocation, SearchSettings, allocate, build_units
from bitplan.planner.streaming import StreamingMeter
from bitplan.planner.study import counted_trials, finished_trials, open_study, study_name
from bitplan.profiles.calibration import CalibrationSettings, calibration_slices
from bitplan.profiles.tables import SensitivityTable
from bitplan.profiles.text import tokens_hash, window_quotas

log = logging.getLogger(__name__)
REFINE_WINDOWS = 4  # held-in windows a measurement compares plans on: the anchor, each generation's selection and its comparison
HELD_IN_POOL = 16  # held-in calibration windows the search draws each generation's windows from; the first REFINE_WINDOWS are the anchor
VALIDATION_WINDOWS = 8  # calibration windows held back to confirm the kept plan, spread through the rest of the text
VALIDATION_POOL = 512  # windows after the held-in ones the validation windows are spread over, at most
CONFIRM_TOP = 3  # the search's best distinct plans measured on the validation windows
GAIN_LEVEL = 0.05  # one-sided level of the paired t-test a searched plan's held-back gain over the best baseline must pass
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # recorded on each trial of a shared study


@dataclass(frozen=True)
class Refinement:
    """The kept plan and what the search cost: trials, candidates measured and the tokens they
    ran (over the study's finished trials), this worker's seconds, and what ended the search
    ("trials", "clock", or "no moves": no offspring fits)."""

    allocation: Allocation
    measured_kl: float
    exact_kl: float
    trials: int
    distinct_plans: int
    candidates: int
    measured_tokens: int
    seconds: float
    stopped_by: str
    factors: dict[str, MethodFactor] | None = None
    exact: Allocation | None = None  # the exact allocation the search started from (on the probe-scaled table)
    validation_kl: float | None = None  # the kept plan's KL on the held-back windows (None: no validation)
    exact_validation_kl: float | None = None  # the exact plan's
    kept: str = "search"  # where the kept plan came from: "search", "exact", or "probe <method>"
    validation_tokens: int | None = None  # the held-back tokens it was confirmed on
    contenders: tuple[tuple[str, float, float, float, float], ...] = ()  # (origin, held-in KL, held-back KL, held-back gain over
    # the best baseline, its standard error) of each plan confirmed
    best_searched: Allocation | None = None  # the searched plan best on the held-back windows, kept or not
    search_gain: tuple[float, float] | None = None  # its held-back gain over the best baseline and its standard error


def plan_digest(columns: list[int]) -> str:
    return hashlib.sha256(json.dumps(columns).encode()).hexdigest()[:16]


def allocation_of(table: SensitivityTable, columns: list[int], exact: Allocation) -> Allocation:
    """The Allocation of one scheme column per row (the exact solver's status and gap kept)."""
    rows = np.arange(len(table.layers))
    choice = {name: table.schemes[column] for name, column in zip(table.layers, columns)}
    return Allocation(choice, int(table.bytes.numpy()[rows, columns].sum()), float(table.scores.numpy()[rows, columns].sum()),
                      exact.status, exact.mip_gap)


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
    search_minutes: float | None = None,
    validation: torch.Tensor | None = None,
) -> Refinement:
    """Run the measured search on the held-in pool ``windows`` until the study holds ``trials``
    trials (at least the exact one) or ``search_minutes`` passed, and keep the chain's last plan;
    with ``validation`` windows, the best of its contenders on those (see the module notes)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.monotonic()
    deadline = None if search_minutes is None else started + 60.0 * search_minutes
    out_of_time = lambda: deadline is not None and time.monotonic() >= deadline  # noqa: E731
    report = progress or (lambda stage, done, total: None)
    bounds = dict(sorted((slice_bounds or {}).items()))
    limits = tuple(bound * (1 + SLICE_SLACK) for bound in bounds.values())

    anchor = windows[:REFINE_WINDOWS].contiguous()

    def measure_plan(choice: dict[str, str]) -> float:
        meter.apply({name: Scheme.parse(scheme) for name, scheme in choice.items()})
        return meter.measure(anchor).kl

    plain = table  # the plan's reported score is the profile's
    factors = method_factors(table, spec, weight_budget_bytes, measure_plan) if trials > 0 else {}
    if factors:
        table = scaled_table(table, factors)
        log.info("method factors: %s", ", ".join(f"{m} {f.factor:.3f}" for m, f in factors.items()))
    exact = allocate(table, spec, weight_budget_bytes, tie_fused, extra_cost=extra_cost, slice_bounds=bounds)
    exact_columns = [table.schemes.index(exact.choice[name]) for name in table.layers]
    probe_columns = frozenset(table.schemes.index(factor.scheme) for factor in factors.values())
    units = search_units(table, spec, tie_fused, extra_cost, tuple(bounds), probe_columns)
    if locate(units, exact_columns) is None:  # a tie broken otherwise: search over the exact solver's own options
        units = build_units(table, spec, tie_fused, None, extra_cost, tuple(bounds))
    values: dict[tuple, tuple[float, float, tuple[float, ...]]] = {}  # (plan, windows) -> (value, KL, value per window)
    spent = {"candidates": 0, "tokens": 0}  # by the current trial

    def measure(picks: list[int], subset: torch.Tensor) -> float:
        columns = columns_of(units, picks, len(table.layers))
        key = measured_key(columns, subset)
        if key not in values:
            choice = {name: table.schemes[column] for name, column in zip(table.layers, columns)}
            meter.apply({name: Scheme.parse(scheme) for name, scheme in choice.items()})
            quality = meter.measure(subset)
            spent["candidates"] += 1
            spent["tokens"] += int(subset.numel())
            cost = assignment_sum(table, choice, extra_cost) if extra_cost is not None else 0.0
            values[key] = (quality.kl + cost, quality.kl, tuple(kl + cost for kl in quality.window_kl))
        return values[key][0]

    probes = {}  # method -> picks of each probe plan the search may keep: within the budget and the slice limits
    for method, factor in factors.items():
        columns = [table.schemes.index(factor.plan[name]) for name in table.layers]
        picks = locate(units, columns)
        if picks is None or int(table.bytes[torch.arange(len(columns)), torch.tensor(columns)].sum()) > weight_budget_bytes:
            continue
        if not within_limits(units, picks, limits):
            continue
        probes[method] = picks
        choice = {name: table.schemes[column] for name, column in zip(table.layers, columns)}  # measured already: no second forward
        values[measured_key(columns, anchor)] = (
            factor.measured_kl + (assignment_sum(table, choice, extra_cost) if extra_cost is not None else 0.0), factor.measured_kl, ())
    total = max(trials, 1) + len(probes)  # the probes are trials measured before the search: they cost no generation

    study = open_study(storage, study_name(table, weight_budget_bytes, tie_fused, windows, seed, extra_cost, bounds), seed)
    study.enqueue_trial({}, user_attrs={"exact": True}, skip_if_exists=True)
    for method in probes:
        study.enqueue_trial({"probe": method}, user_attrs={"probe": method}, skip_if_exists=True)  # distinct params: Optuna skips by params
    stopped_by = "trials"
    while counted_trials(study) < total:
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if out_of_time() and complete:
            stopped_by = "clock"
            break
        trial = study.ask()
        spent.update(candidates=0, tokens=0)
        measured_on = anchor
        if trial.user_attrs.get("exact"):
            picks, value = locate(units, exact_columns), measure(locate(units, exact_columns), anchor)
        elif trial.user_attrs.get("probe") in probes:
            picks = probes[trial.user_attrs["probe"]]
            value = measure(picks, anchor)
            spent.update(candidates=1, tokens=int(anchor.numel()))  # its measurement, made for the factors
        else:
            parent = locate(units, chain_head(complete).user_attrs["plan"]) if complete else locate(units, exact_columns)
            rng = np.random.default_rng([seed, trial.number])
            selection, comparison = draw_windows(windows, rng)
            children = offspring(units, parent, weight_budget_bytes, limits, rng)
            stages = [(stage_windows(selection, share, trial.number), keep) for share, keep in STAGES]
            found = generation(children, stages, measure, out_of_time) if children else None
            if found is None or out_of_time():
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                stopped_by = "clock" if children else "no moves"
                break
            survivor, parent_value = found[0], measure(parent, comparison)
            value = measure(survivor, comparison)
            picks, value = (survivor, value) if value < parent_value else (parent, parent_value)  # the parent wins ties
            measured_on = comparison
        columns = columns_of(units, picks, len(table.layers))
        trial.set_user_attr("plan", columns)
        trial.set_user_attr("kl", values[measured_key(columns, measured_on)][1])
        trial.set_user_attr("candidates", spent["candidates"])
        trial.set_user_attr("tokens", spent["tokens"])
        trial.set_user_attr("worker", WORKER)
        study.tell(trial, value)
        report("refine", min(counted_trials(study), total), total)
    done = finished_trials(study)
    exact_trial = min((t for t in done if t.user_attrs.get("exact")), key=lambda t: t.number)
    best = first_with_plan(done, chain_head(done))

    def anchor_kl(trial: optuna.trial.FrozenTrial) -> float:
        """A plan's KL on the anchor windows (measured once)."""
        measure(locate(units, trial.user_attrs["plan"]), anchor)
        return values[measured_key(trial.user_attrs["plan"], anchor)][1]

    checked = {}
    if validation is not None and validation.numel():

        def per_window(columns: list[int]) -> tuple[float, ...]:
            measure(locate(units, columns), validation)
            return values[measured_key(columns, validation)][2]

        checked = confirm(done, exact_trial, per_window)
        best = kept_plan(checked.values())
    allocation = allocation_of(plain, best.user_attrs["plan"], exact)
    assert allocation.weight_bytes <= weight_budget_bytes
    validation_kl = lambda trial: values[measured_key(trial.user_attrs["plan"], validation)][1] if checked else None  # noqa: E731
    baseline = best_baseline(checked.values()) if checked else None
    contenders = tuple((origin(t), anchor_kl(t), validation_kl(t), *held_back_gain(baseline[0], windows_of))
                       for windows_of, t in checked.values())
    searched = [pair for pair in checked.values() if origin(pair[1]) == "search"]
    top = min(searched, key=order) if searched else None  # the searched plan kept_plan would keep, if it kept one
    best_searched = allocation_of(plain, top[1].user_attrs["plan"], exact) if top else None
    search_gain = held_back_gain(baseline[0], top[0]) if top else None
    if checked:
        log.info("confirmed on %d held-back tokens (held in -> held back, gain over the best baseline ± its standard error): %s",
                 int(validation.numel()), ", ".join(f"{name} {held:.4f} -> {back:.4f} ({gain:+.4f} ± {se:.4f})"
                                                    for name, held, back, gain, se in contenders))
    return Refinement(allocation, anchor_kl(best), anchor_kl(exact_trial), len(done),
                      len({plan_digest(t.user_attrs["plan"]) for t in done}),
                      sum(t.user_attrs["candidates"] for t in done), sum(t.user_attrs["tokens"] for t in done),
                      time.monotonic() - started, stopped_by, factors or None, allocation_of(plain, exact_columns, exact),
                      validation_kl(best), validation_kl(exact_trial), origin(best), int(validation.numel()) if checked else None,
                      contenders, best_searched, search_gain)


def chain_head(done: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial:
    """The plan the search goes on from: the latest finished generation's, or, before the first,
    the best baseline (the exact plan or a probe) on the anchor windows."""
    searched = [t for t in done if origin(t) == "search"]
    if searched:
        return max(searched, key=lambda t: t.number)
    return min(done, key=lambda t: (t.value, t.number))


def first_with_plan(done: list[optuna.trial.FrozenTrial], trial: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
    """The first finished trial with ``trial``'s plan: where the plan came from (a chain that
    never moved is still the plan it started from)."""
    return min((t for t in done if t.user_attrs["plan"] == trial.user_attrs["plan"]), key=lambda t: t.number)


def draw_windows(windows: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One generation's ``(selection, comparison)`` windows, ``REFINE_WINDOWS`` each, drawn from the
    held-in pool ``windows`` without replacement: disjoint while the pool holds twice as many
    (with fewer, the comparison overlaps the selection; with ``REFINE_WINDOWS`` or fewer, both are
    the whole pool)."""
    count = windows.shape[0]
    take = min(REFINE_WINDOWS, count)
    order = rng.permutation(count)
    return windows[np.sort(order[:take])].contiguous(), windows[np.sort(order[-take:])].contiguous()


def held_back_gain(baseline: tuple[float, ...], plan: tuple[float, ...]) -> tuple[float, float]:
    """The mean of ``plan``'s paired per-window gains over ``baseline`` (values per held-back
    window, in the same order) and its standard error (inf with one window)."""
    gains = np.asarray(baseline, dtype=np.float64) - np.asarray(plan, dtype=np.float64)
    if len(gains) < 2:
        return float(gains.mean()), float("inf")
    return float(gains.mean()), float(gains.std(ddof=1) / np.sqrt(len(gains)))


def significant(mean: float, standard_error: float, windows: int) -> bool:
    """A positive mean gain at least Student's t one-sided ``GAIN_LEVEL`` critical value (``windows`` - 1
    degrees of freedom) times its standard error."""
    from scipy.stats import t as student

    return windows > 1 and mean > 0 and mean >= float(student.ppf(1 - GAIN_LEVEL, windows - 1)) * standard_error


def order(pair) -> tuple:
    """Rank of a ``(values per held-back window, trial)`` pair: the held-back mean, then the
    held-in value, then the earlier trial."""
    return float(np.mean(pair[0])), pair[1].value, pair[1].number


def best_baseline(checked) -> tuple:
    """The best ``(values per held-back window, trial)`` pair of the exact plan and the probes."""
    return min((pair for pair in checked if origin(pair[1]) != "search"), key=order)


def kept_plan(checked) -> optuna.trial.FrozenTrial:
    """The plan kept among the confirmed ones (``(values per held-back window, trial)`` pairs): the
    best baseline (the exact plan or a probe) on the held-back windows, unless a searched plan beats
    it there by a significant paired gain (:func:`significant`); then the best such plan there."""
    checked = list(checked)
    baseline = best_baseline(checked)
    carried = [pair for pair in checked if origin(pair[1]) == "search"
               and significant(*held_back_gain(baseline[0], pair[0]), len(pair[0]))]
    return min(carried or [baseline], key=order)[1]


def measured_key(columns: list[int], windows: torch.Tensor) -> tuple:
    """What a measurement is cached under: the plan's columns and the windows measured (their shape and tokens)."""
    return tuple(columns), tuple(windows.shape), tokens_hash(windows.contiguous())


def origin(trial: optuna.trial.FrozenTrial) -> str:
    """Where a trial's plan came from: "exact", "probe <method>" or "search"."""
    return "exact" if trial.user_attrs.get("exact") else f"probe {trial.user_attrs['probe']}" if "probe" in trial.user_attrs else "search"


def confirm(done: list[optuna.trial.FrozenTrial], exact: optuna.trial.FrozenTrial,
            measure: Callable[[list[int]], tuple[float, ...]]) -> dict[str, tuple[tuple[float, ...], optuna.trial.FrozenTrial]]:
    """The contenders' values per validation window, by plan digest: the exact plan, every probe,
    and the search's last ``CONFIRM_TOP`` distinct plans (the chain's latest first; each plan once,
    as its first trial)."""
    probes = sorted((t for t in done if origin(t).startswith("probe")), key=lambda t: t.number)
    latest = sorted((t for t in done if origin(t) == "search"), key=lambda t: -t.number)
    checked: dict[str, tuple[tuple[float, ...], optuna.trial.FrozenTrial]] = {}
    for trial in [exact, *probes, *latest]:
        digest = plan_digest(trial.user_attrs["plan"])
        if digest in checked:
            continue
        if origin(trial) == "search" and sum(origin(t) == "search" for _, t in checked.values()) == CONFIRM_TOP:
            break
        checked[digest] = (measure(trial.user_attrs["plan"]), first_with_plan(done, trial))
    return checked


WHOLE_MODEL_SHARE = 0.25  # the whole-model meter while its two float32 copies take at most this share of RAM


def choose_meter(source: ModelSource) -> QualityMeter | StreamingMeter:
    """The whole-model meter (the model and its quantized copy in float32: one forward per window,
    several times faster) while both copies fit in a quarter of this machine's memory; beyond
    that, the streaming meter (block by block: a constant number of blocks in memory)."""
    two_copies = 2 * 4 * (source.spec.linear_weights + source.spec.unquantized_bytes // source.spec.dtype_bytes)
    if two_copies <= WHOLE_MODEL_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"):
        return QualityMeter(load_dense_model(source.folder), source.spec)
    return StreamingMeter(source.folder, source.config, source.spec)


def held_windows(folder, calibration: CalibrationSettings, held_in: int = HELD_IN_POOL,
                 validation: int = VALIDATION_WINDOWS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(profile, held_in, validation)`` windows of the calibration text: the profile's
    ``samples``, the ``held_in`` after them (the search's pool; the profile's own first ones when
    the text has no more), and ``validation`` windows from the rest (up to ``VALIDATION_POOL`` windows on): each
    slice's share of them (by its weight), spread evenly through that slice's windows, so that
    they come from other documents than the held-in windows' neighbours (None when the text has
    no window left)."""
    windows = calibration_slices(folder, calibration, held_in + VALIDATION_POOL)
    start = calibration.samples + held_in
    profile, extra = windows.tokens[: calibration.samples], windows.tokens[calibration.samples :]
    held = extra[:held_in] if len(extra) else windows.tokens[:held_in]
    rest = [[i for i in range(start, len(windows.labels)) if windows.labels[i] == s] for s in range(len(windows.names))]
    quotas = window_quotas(list(windows.weights), [len(r) for r in rest], validation)
    picks = sorted(r[(2 * k + 1) * len(r) // (2 * q)] for r, q in zip(rest, quotas) for k in range(q))  # the middles of q equal parts
    return profile, held, windows.tokens[picks].contiguous() if picks else None


def refine_measured(source: ModelSource, table: SensitivityTable, weight_budget_bytes: int, settings: SearchSettings,
                    calibration: CalibrationSettings, progress: Callable[[str, int, int], None] | None = None,
                    extra_cost: np.ndarray | None = None, slice_bounds: dict[str, float] | None = None) -> tuple[Refinement, int]:
    """Refine on a pool of held-in calibration windows and confirm on held-back ones (:func:`held_windows`).
    Returns the refinement and the held-in pool's tokens. Plans are measured by :func:`choose_meter`'s meter."""
    profile, held_in, validation = held_windows(source.folder, calibration)
    if validation is None:
        log.warning("the calibration text has no windows left to confirm the searched plan on: the best held-in plan is kept")
    meter = choose_meter(source)
    schemes = [Scheme.parse(name) for name in table.schemes]
    if needs_calibration(schemes):
        meter.calibrate(profile)
    refinement = refine(table, source.spec, weight_budget_bytes, settings.tie_fused, meter, held_in, settings.trials,
                        settings.seed, progress, extra_cost, settings.study_storage, slice_bounds, settings.search_minutes,
                        validation)
    return refinement, int(held_in.numel())
