"""The measured search's moves and its staged selection (after EvoPress, IST-DASLab, ICML 2025).

A plan is one option per unit (``search.Unit``: a layer, a group of Linears the engine fuses
and ties, or a smoothing group), every option a cell the engine allows. A unit's options are its
*levels*: per distinct size the best-scored option, plus every option of the Pareto frontier the
exact allocation chooses from, plus the method probes' schemes (:func:`levels`), sorted by bytes.

A mutation is a level switch at equal or fewer bytes: one unit moves up to its next larger
level, then other units move down one level each (drawn among those whose step down frees
enough, else among all) until the plan fits the weight budget again; a unit raised is not
lowered in the same offspring, nor the reverse. Or (with chance ``SWITCH_SHARE``, and always
when no unit can move up, as at the budget's floor) one unit switches to another option of its
size: another method at the same bytes. Units are drawn by rank (the score's gain or
loss per byte: moves the score favours come first, every move stays possible) from a seeded
``numpy.random.Generator``. An offspring takes 1 to ``MAX_MUTATIONS`` of them; offspring that
break a slice bound are never offered.

Selection is staged (:func:`generation`): ``OFFSPRING`` offspring are measured on a few tokens of
the generation's selection windows, the best few of them on a whole window, and the survivor is
returned (``planner.refine`` then compares it with its parent on other windows); most candidates
cost a fraction of one forward pass over the selection windows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from bitplan.models.spec import ModelSpec
from bitplan.planner.search import Option, Unit, build_units, pareto
from bitplan.profiles.tables import SensitivityTable

MAX_MUTATIONS = 3  # level switches per offspring, drawn from 1..MAX_MUTATIONS
OFFSPRING = 16  # offspring per generation
SWITCH_SHARE = 0.5  # chance that a mutation switches a unit to another option of its size, when one exists
STAGES = ((1 / 16, 4), (1 / 4, 1))  # (share of the selection windows' tokens measured, offspring kept)


def levels(options: list[Option], keep: frozenset[int] = frozenset()) -> tuple[Option, ...]:
    """Per distinct size the best-scored option, the Pareto frontier, and every option that gives
    the whole unit one column of ``keep``; sorted by (bytes, score)."""
    kept = {option for option in options if len(set(option[0])) == 1 and option[0][0] in keep}
    best: dict[int, Option] = {}
    for option in options:
        if option[1] not in best or (option[2], option[0]) < (best[option[1]][2], best[option[1]][0]):
            best[option[1]] = option
    return tuple(sorted(set(pareto(options)) | set(best.values()) | kept, key=lambda o: (o[1], o[2], o[3], o[0])))


def search_units(table: SensitivityTable, spec: ModelSpec, tie_fused: bool, extra_cost: np.ndarray | None = None,
                 limited: tuple[str, ...] = (), keep: frozenset[int] = frozenset()) -> list[Unit]:
    """The units of :func:`search.build_units` (same ties and smoothing groups), with their levels;
    the scheme columns in ``keep`` (the method probes') stay options of every unit that can take them."""
    return build_units(table, spec, tie_fused, None, extra_cost, limited, prune=lambda options: levels(options, keep))


def columns_of(units: list[Unit], picks: list[int], rows: int) -> list[int]:
    """The scheme column of each table row under ``picks`` (one option index per unit)."""
    columns = [0] * rows
    for unit, pick in zip(units, picks):
        for row, column in zip(unit.rows, unit.options[pick][0]):
            columns[row] = column
    return columns


def locate(units: list[Unit], columns: list[int]) -> list[int] | None:
    """The option index per unit of a plan given as one column per row; None when some unit
    does not offer the plan's cells."""
    picks = []
    for unit in units:
        wanted = tuple(columns[row] for row in unit.rows)
        match = [index for index, option in enumerate(unit.options) if option[0] == wanted]
        if not match:
            return None
        picks.append(match[0])
    return picks


def plan_bytes(units: list[Unit], picks: list[int]) -> int:
    return sum(unit.options[pick][1] for unit, pick in zip(units, picks))


def within_limits(units: list[Unit], picks: list[int], limits: tuple[float, ...]) -> bool:
    """Each limited slice's summed score at or below its limit (``limits`` in the units' slice order)."""
    return all(sum(unit.options[pick][3][s] for unit, pick in zip(units, picks)) <= limit for s, limit in enumerate(limits))


def step(unit: Unit, pick: int, direction: int) -> int | None:
    """The option one level up (``direction`` 1: the best-scored of the next larger size) or down
    (-1: of the next smaller size); None at the end of the ladder."""
    size = unit.options[pick][1]
    sizes = sorted({option[1] for option in unit.options if (option[1] - size) * direction > 0})
    if not sizes:
        return None
    target = sizes[0] if direction > 0 else sizes[-1]
    return min((index for index, option in enumerate(unit.options) if option[1] == target),
               key=lambda index: (unit.options[index][2], index))


def same_size(unit: Unit, pick: int) -> list[int]:
    """The unit's other options of the size it has now (another method at the same bytes)."""
    size = unit.options[pick][1]
    return [index for index, option in enumerate(unit.options) if option[1] == size and index != pick]


def ranked(rng: np.random.Generator, items: list, key) -> object:
    """One of ``items`` drawn by rank: sorted by ``key`` (best first), the item at rank r with
    probability proportional to 1 / (r + 1), so moves the scores favour come first and every
    move stays possible."""
    order = sorted(items, key=key)
    weights = 1.0 / np.arange(1, len(order) + 1)
    return order[int(rng.choice(len(order), p=weights / weights.sum()))]


def mutate(units: list[Unit], parent: list[int], budget_bytes: int, limits: tuple[float, ...],
           rng: np.random.Generator) -> list[int] | None:
    """An offspring of ``parent`` within ``budget_bytes`` and ``limits`` (see the module notes), or None.

    Units are drawn by rank (:func:`ranked`): the unit to raise by the score it gains per byte
    added, the units to lower by the score they lose per byte freed."""
    picks = list(parent)
    raised: set[int] = set()
    lowered: set[int] = set()

    def per_byte(u: int, other: int) -> float:
        here, there = units[u].options[picks[u]], units[u].options[other]
        return (there[2] - here[2]) / max(abs(there[1] - here[1]), 1)

    for _ in range(int(rng.integers(1, MAX_MUTATIONS + 1))):
        up = [(u, higher) for u, unit in enumerate(units) if u not in lowered and (higher := step(unit, picks[u], 1)) is not None]
        across = [(u, other) for u, unit in enumerate(units) if u not in raised and u not in lowered
                  for other in same_size(unit, picks[u])]
        if across and (not up or rng.random() < SWITCH_SHARE):
            u, other = ranked(rng, across, lambda move: (per_byte(*move), move))
            picks[u] = other
            raised.add(u)
            lowered.add(u)
            continue
        if not up:
            return None
        chosen, higher = ranked(rng, up, lambda move: (per_byte(*move), move[0]))
        picks[chosen] = higher
        raised.add(chosen)
        while (excess := plan_bytes(units, picks) - budget_bytes) > 0:
            down = [(u, lower) for u, unit in enumerate(units)
                    if u not in raised and (lower := step(unit, picks[u], -1)) is not None]
            if not down:
                return None
            enough = [(u, lower) for u, lower in down if units[u].options[picks[u]][1] - units[u].options[lower][1] >= excess]
            u, lower = ranked(rng, enough or down, lambda move: (per_byte(*move), move[0]))
            picks[u] = lower
            lowered.add(u)
    return picks if within_limits(units, picks, limits) else None


def offspring(units: list[Unit], parent: list[int], budget_bytes: int, limits: tuple[float, ...], rng: np.random.Generator,
              count: int = OFFSPRING) -> list[list[int]]:
    """Up to ``count`` distinct offspring, none equal to the parent (fewer when few moves exist)."""
    children: list[list[int]] = []
    seen = {tuple(parent)}
    for _ in range(20 * count):
        if len(children) == count:
            break
        child = mutate(units, parent, budget_bytes, limits, rng)
        if child is not None and tuple(child) not in seen:
            seen.add(tuple(child))
            children.append(child)
    return children


def stage_windows(windows: torch.Tensor, share: float, start: int) -> torch.Tensor:
    """``share`` of the tokens of ``windows``: a prefix of one window when that is enough, else whole
    windows; the first window taken rotates with ``start`` (the generation) so that selection
    does not fit one window."""
    count, length = windows.shape
    tokens = max(2, round(share * count * length))
    if tokens <= length:
        return windows[start % count : start % count + 1, :tokens].contiguous()
    return windows[[(start + k) % count for k in range(min(count, tokens // length))]].contiguous()


def generation(children: list[list[int]], stages: list[tuple[torch.Tensor, int]], measure: Callable[[list[int], torch.Tensor], float],
               out_of_time: Callable[[], bool] = lambda: False) -> tuple[list[int], float] | None:
    """Staged selection: each stage ``(windows, keep)`` measures the remaining children on its
    windows and keeps the best ``keep`` (ties: the earlier child); a stage that would keep every
    child is skipped, except the last, whose value is returned with the survivor. None when
    ``out_of_time()`` says so before a stage."""
    value = float("nan")
    for number, (windows, keep) in enumerate(stages):
        last = number == len(stages) - 1
        if len(children) <= keep and not last:
            continue
        if out_of_time():
            return None
        values = [measure(child, windows) for child in children]
        order = sorted(range(len(children)), key=lambda i: (values[i], i))[:keep]
        children = [children[i] for i in order]
        value = values[order[0]]
    return children[0], value
