"""Exact allocation: one scheme per layer (or per fused group) minimising the summed score
under a byte budget. A multiple-choice knapsack, solved to optimality with ``scipy.optimize.milp``
(HiGHS) over each unit's Pareto frontier of (bytes, score).

Smoothing methods (AWQ, SmoothQuant) fold one scale vector into the op that feeds a group of
Linears (``methods.mappings``), so the members of such a group either all take the same
smoothing scheme or none takes one. Such a group is one unit whose options are the Pareto
frontier of its members' independent non-smoothing choices, plus each smoothing scheme for all.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from bitplan.errors import BitplanError
from bitplan.models.spec import ModelSpec
from bitplan.planner.deployment import format_bytes
from bitplan.profiles.tables import SensitivityTable

Option = tuple[tuple[int, ...], int, float, tuple[float, ...]]  # (scheme column per row, total bytes, total score, limited slices' scores)


@dataclass(frozen=True)
class Unit:
    """Layers decided together (a fused or smoothing group, or one layer), with their options."""

    key: str
    rows: tuple[int, ...]
    options: tuple[Option, ...]  # the Pareto frontier


@dataclass(frozen=True)
class SearchSettings:
    """How to search: tie fused groups, trials of the measured search after the exact allocation
    (``planner.refine``; each one generation), the seed, the objective (``planner.objective``),
    the shared study's storage, and the search's time budget in minutes (None: trials only)."""

    tie_fused: bool = False
    trials: int = 16
    seed: int = 0
    objective: str = "quality"
    study_storage: str | None = None  # Optuna storage shared by refinement workers (``planner.study``); None: in memory
    search_minutes: float | None = None  # stop the measured search after this long (or at ``trials``, whichever first)


@dataclass(frozen=True)
class Allocation:
    choice: dict[str, str]  # layer name -> scheme name
    weight_bytes: int
    score: float
    status: str
    mip_gap: float


def pareto(options: list[Option]) -> tuple[Option, ...]:
    """Keep options no other option beats on both bytes and score (ties: the first scheme); with
    limited slices, on bytes, score and every limited slice's score."""
    options = sorted(options, key=lambda o: (o[1], o[2], o[3], o[0]))
    if options and options[0][3]:
        costs = np.array([(o[1], o[2], *o[3]) for o in options])
        no_worse = (costs[None, :, :] <= costs[:, None, :]).all(2)  # [i, j]: option j is no worse than i everywhere
        earlier = np.tril(np.ones((len(options),) * 2, dtype=bool), -1)  # equal options: the first one stays
        beaten = (no_worse & ((costs[None, :, :] < costs[:, None, :]).any(2) | earlier)).any(1)
        return tuple(o for o, out in zip(options, beaten) if not out)
    frontier, best = [], float("inf")
    for option in options:
        if option[2] < best:
            frontier.append(option)
            best = option[2]
    return tuple(frontier)


def combine(first: tuple[Option, ...], second: tuple[Option, ...], prune=pareto) -> tuple[Option, ...]:
    """The Pareto frontier (or what ``prune`` keeps) of every pairing of two independent units' options."""
    return prune([(a[0] + b[0], a[1] + b[1], a[2] + b[2], tuple(x + y for x, y in zip(a[3], b[3]))) for a in first for b in second])


def smoothing_columns(table: SensitivityTable) -> set[int]:
    """Columns of schemes that fold scales into a neighbour (names that are not schemes: none)."""
    from bitplan.methods.registry import SMOOTHING
    from bitplan.methods.scheme import Scheme

    columns = set()
    for column, name in enumerate(table.schemes):
        try:
            if Scheme.parse(name).method in SMOOTHING:
                columns.add(column)
        except BitplanError:
            continue
    return columns


def build_units(table: SensitivityTable, spec: ModelSpec, tie_fused: bool, weights: np.ndarray | None = None,
                extra_cost: np.ndarray | None = None, limited: tuple[str, ...] = (), prune=pareto) -> list[Unit]:
    """Group rows into units and list each unit's feasible options.

    Rows share a unit when tied (``tie_fused``: one scheme for the fused group) or when they
    share a smoothing group and the table holds smoothing schemes (see the module docstring).
    ``weights`` multiplies each layer's scores (the refinement's knobs); ``extra_cost``
    ``[layers, schemes]`` is added to the weighted scores (e.g. predicted latency); bytes are untouched.
    Each option carries its summed score on each slice in ``limited`` (unweighted). ``prune``
    keeps the options worth offering (the Pareto frontier; the measured search keeps more).
    """
    scores = table.scores.numpy() * (np.ones(len(table.layers)) if weights is None else weights)[:, None]
    if extra_cost is not None:
        scores = scores + extra_cost
    sizes = table.bytes.numpy()
    per_slice = [np.nan_to_num(table.slice_matrix(name).numpy()) for name in limited]

    def option(rows: list[int], columns: tuple[int, ...]) -> Option:
        return (columns, int(sum(sizes[r, c] for r, c in zip(rows, columns))), float(sum(scores[r, c] for r, c in zip(rows, columns))),
                tuple(float(sum(m[r, c] for r, c in zip(rows, columns))) for m in per_slice))

    smoothing = smoothing_columns(table)
    tied: dict[str, list[int]] = defaultdict(list)  # rows that take one scheme together
    for row, name in enumerate(table.layers):
        layer = spec.layer(name)
        tied[layer.fused_key if tie_fused else name].append(row)
    coupled: dict[str, list[str]] = defaultdict(list)  # smoothing group -> tied keys in it
    for key, rows in tied.items():
        group = spec.layer(table.layers[rows[0]]).smoothing_key if smoothing else None
        coupled[group or key].append(key)
    units = []
    for group, keys in coupled.items():
        rows = [r for key in keys for r in tied[key]]
        free: tuple[Option, ...] | None = None  # the members' independent non-smoothing choices
        for key in keys:
            part = prune([option(tied[key], (column,) * len(tied[key])) for column in range(len(table.schemes))
                          if column not in smoothing and all(sizes[r, column] >= 0 for r in tied[key])])
            free = part if free is None else combine(free, part, prune)
        options = list(free)
        for column in sorted(smoothing):
            if all(sizes[r, column] >= 0 for r in rows):
                options.append(option(rows, (column,) * len(rows)))
        if not options:
            raise BitplanError(f"no candidate scheme can store {group}: widen --groups (per-channel always fits)")
        units.append(Unit(group, tuple(rows), prune(options)))
    return units


def smallest_bytes(units: list[Unit]) -> int:
    return sum(min(o[1] for o in unit.options) for unit in units)


def smallest_plan_bytes(spec: ModelSpec, schemes: list, tie_fused: bool = False, allowed=None) -> int:
    """Bytes of the smallest plan the candidates allow, from the ModelSpec alone (no profile).

    ``allowed(layer, scheme)`` narrows what each layer may take (an engine's rules); by default a
    scheme is allowed where its group divides the layer's inputs.
    """
    allowed = allowed or (lambda layer, scheme: scheme.fits(layer.in_features))
    members: dict[str, list] = defaultdict(list)
    for layer in spec.layers:
        members[layer.fused_key if tie_fused else layer.name].append(layer)
    total = 0
    for key, layers in members.items():
        sizes = [sum(s.weight_bytes(l.out_features, l.in_features, spec.dtype_bytes) for l in layers)
                 for s in schemes if all(allowed(l, s) for l in layers)]
        if not sizes:
            raise BitplanError(f"no candidate scheme can store {key}: widen --groups (per-channel always fits)")
        total += min(sizes)
    return total


def check_feasible(spec: ModelSpec, schemes: list, weight_budget_bytes: int, budget_bytes: int, tie_fused: bool = False,
                   allowed=None) -> None:
    """Fail fast, before any profiling, when no plan can fit; the message states the smallest size."""
    floor = smallest_plan_bytes(spec, schemes, tie_fused, allowed)
    if floor > weight_budget_bytes:
        needed = budget_bytes - weight_budget_bytes + floor
        raise BitplanError(
            f"the budget {format_bytes(budget_bytes)} is below the smallest feasible deployment, {format_bytes(needed)} "
            f"(weights at the smallest candidate scheme, plus embeddings, KV cache, workspace and overhead): "
            f"raise --budget to at least {format_bytes(needed)}, or lower --context/--batch"
        )


def smallest_allocation(table: SensitivityTable, spec: ModelSpec, tie_fused: bool = False) -> Allocation:
    """The plan of fewest bytes (ties: lowest score), whatever the budget: what a device that fits
    nothing would need."""
    units = build_units(table, spec, tie_fused)
    return _allocation(table, units, [min(range(len(u.options)), key=lambda o: (u.options[o][1], u.options[o][2])) for u in units],
                       "smallest plan", 0.0)


def _allocation(table: SensitivityTable, units: list[Unit], picks: list[int], status: str, gap: float) -> Allocation:
    """The Allocation of one option per unit."""
    choice, total_bytes, total_score = {}, 0, 0.0
    for unit, option in zip(units, picks):
        columns, unit_bytes = unit.options[option][:2]
        for row, column in zip(unit.rows, columns):
            choice[table.layers[row]] = table.schemes[column]
            total_score += float(table.scores[row, column])
        total_bytes += unit_bytes
    order = {name: index for index, name in enumerate(table.layers)}
    return Allocation(dict(sorted(choice.items(), key=lambda kv: order[kv[0]])), total_bytes, total_score, status, gap)


def allocate(table: SensitivityTable, spec: ModelSpec, weight_budget_bytes: int, tie_fused: bool = False,
             weights: np.ndarray | None = None, extra_cost: np.ndarray | None = None,
             slice_bounds: dict[str, float] | None = None, budget_offset_bytes: int = 0) -> Allocation:
    """The minimum-cost assignment whose quantized-weight bytes fit ``weight_budget_bytes``.

    The cost is the (weighted) score plus ``extra_cost``; ``Allocation.score`` is the plain score.
    ``slice_bounds`` adds one linear constraint per limited slice: the sum of that slice's
    (unweighted) scores over the chosen cells stays at or below its bound. When they cannot be
    met, one line names the slice and the smallest budget that meets it (``budget_offset_bytes``
    is added to weight bytes to state a whole budget).
    """
    bounds = dict(sorted((slice_bounds or {}).items()))
    units = build_units(table, spec, tie_fused, weights, extra_cost, tuple(bounds))
    floor = smallest_bytes(units)
    if floor > weight_budget_bytes:
        raise BitplanError(
            f"the budget leaves {format_bytes(weight_budget_bytes)} for quantized weights, but the smallest plan needs "
            f"{format_bytes(floor)} ({format_bytes(floor - weight_budget_bytes)} more): raise the budget or shorten the context"
        )
    index = [(u, o) for u, unit in enumerate(units) for o in range(len(unit.options))]
    cost = np.array([units[u].options[o][2] for u, o in index])
    result = _solve(units, index, cost, weight_budget_bytes, bounds)
    if result.x is None and bounds:
        raise BitplanError(slice_limit_message(units, index, bounds, weight_budget_bytes, budget_offset_bytes))
    if result.x is None:
        raise BitplanError(f"the allocation found no plan within {format_bytes(weight_budget_bytes)}: {result.message}")
    allocation = _allocation(table, units, _picks(units, index, result.x), "optimal" if result.status == 0 else result.message,
                             float(getattr(result, "mip_gap", 0.0) or 0.0))
    assert allocation.weight_bytes <= weight_budget_bytes and len(allocation.choice) == len(table.layers)
    return allocation


SLICE_SLACK = 1e-9  # relative: a bound met by a plan itself (the uniform reference at factor 1) stays feasible under HiGHS' tolerances


def _solve(units: list[Unit], index: list[tuple[int, int]], cost: np.ndarray, weight_budget_bytes: float | None, bounds: dict[str, float]):
    """``scipy.optimize.milp``: one option per unit, bytes within the budget (None: any), each bounded slice within its bound."""
    size = np.array([units[u].options[o][1] for u, o in index], dtype=float)
    pick_one = np.zeros((len(units), len(index)))
    for k, (u, _) in enumerate(index):
        pick_one[u, k] = 1.0
    constraints = [LinearConstraint(pick_one, 1, 1)]
    if weight_budget_bytes is not None:
        constraints.append(LinearConstraint(size[None, :], 0, float(weight_budget_bytes)))
    for position, bound in enumerate(bounds.values()):
        per_slice = np.array([units[u].options[o][3][position] for u, o in index])
        constraints.append(LinearConstraint(per_slice[None, :], -np.inf, bound * (1 + SLICE_SLACK)))
    return milp(cost, constraints=constraints, integrality=np.ones(len(index)), bounds=Bounds(0, 1),
                options={"mip_rel_gap": 0.0, "presolve": True})


def _picks(units: list[Unit], index: list[tuple[int, int]], x: np.ndarray) -> list[int]:
    picks = [0] * len(units)
    for k in np.flatnonzero(np.round(x).astype(bool)):
        u, o = index[k]
        picks[u] = o
    return picks


def fewest_bytes(units: list[Unit], index: list[tuple[int, int]], bounds: dict[str, float]) -> int | None:
    """The fewest weight bytes of a plan meeting ``bounds`` (None: no plan meets them at any budget)."""
    size = np.array([units[u].options[o][1] for u, o in index], dtype=float)
    result = _solve(units, index, size, None, bounds)
    return None if result.x is None else int(sum(unit.options[o][1] for unit, o in zip(units, _picks(units, index, result.x))))


def slice_limit_message(units: list[Unit], index: list[tuple[int, int]], bounds: dict[str, float], weight_budget_bytes: int,
                        offset_bytes: int) -> str:
    """One line: the slice whose bound the budget cannot meet and the smallest budget that meets it."""
    names = list(bounds)
    alone = {}
    for position, name in enumerate(names):
        least = sum(min(o[3][position] for o in unit.options) for unit in units)
        if least > bounds[name] * (1 + SLICE_SLACK):
            return (f"slice {name!r} cannot be held to a predicted KL of {bounds[name]:.4g} at any budget with these candidates "
                    f"(the least it can reach is {least:.4g}): loosen its limit or add candidates with more bits")
        alone[name] = fewest_bytes(units, index, {name: bounds[name]})
    worst = max(names, key=lambda name: (alone[name], name))
    joint = fewest_bytes(units, index, bounds)
    budget = format_bytes(weight_budget_bytes + offset_bytes)
    if alone[worst] > weight_budget_bytes:
        together = "" if joint is None or len(names) == 1 else f" (every limit together: {format_bytes(joint + offset_bytes)})"
        return (f"slice {worst!r} cannot be held to a predicted KL of {bounds[worst]:.4g} within the budget {budget}: the smallest "
                f"budget that meets it is {format_bytes(alone[worst] + offset_bytes)} ({alone[worst] + offset_bytes} bytes, "
                f"{format_bytes(alone[worst] - weight_budget_bytes)} more){together}; raise --budget or loosen the limit")
    if joint is None:
        return f"the slice limits on {', '.join(names)} cannot be met together at any budget with these candidates: loosen one of them"
    return (f"the slice limits on {', '.join(names)} cannot be met together within the budget {budget}: the smallest budget "
            f"that meets them all is {format_bytes(joint + offset_bytes)} ({joint + offset_bytes} bytes); raise --budget or loosen a limit")
