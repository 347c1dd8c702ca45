"""Per-slice limits in the search: ``--max-slice-kl`` and ``--max-slice-regression`` as bounds on
each limited slice's predicted KL (the sum of that slice's scores over the plan's cells).

An absolute limit is its own bound. A relative limit ``slice=f`` bounds the slice at ``f`` times
the predicted KL, on that slice, of the **best uniform plan**: the one candidate scheme that,
given to every layer, fits the weight budget (at the same or fewer bytes) and has the least
aggregate predicted KL among such schemes (schemes the engine refuses for some layer, or whose
group does not divide some layer, cannot be uniform). A slice with both limits takes the smaller
bound. ``search.allocate`` turns the bounds into one linear constraint each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitplan.errors import BitplanError
from bitplan.planner.deployment import format_bytes
from bitplan.planner.limits import SliceLimits
from bitplan.profiles.tables import SensitivityTable


@dataclass(frozen=True)
class SliceBounds:
    """Each limited slice's bound on predicted KL (nats/token) and the uniform plan relative limits refer to."""

    bounds: dict[str, float]
    uniform_scheme: str | None = None
    uniform_slice_kl: dict[str, float] | None = None


def predicted_slice_kl(table: SensitivityTable, choice: dict[str, str]) -> dict[str, float]:
    """Each slice's predicted KL of an assignment: the slice's scores summed over its cells."""
    if table.slice_scores is None:
        return {}
    columns = [table.schemes.index(choice[name]) for name in table.layers]
    rows = np.arange(len(table.layers))
    return {name: float(table.slice_scores[s].numpy()[rows, columns].sum()) for s, name in enumerate(table.slices)}


def best_uniform(table: SensitivityTable, weight_budget_bytes: int) -> str | None:
    """The best uniform plan's scheme (see the module notes), or None when no single scheme fits."""
    sizes, scores = table.bytes.numpy(), table.scores.numpy()
    fitting = [c for c in range(len(table.schemes)) if (sizes[:, c] >= 0).all() and sizes[:, c].sum() <= weight_budget_bytes]
    if not fitting:
        return None
    return table.schemes[min(fitting, key=lambda c: (float(scores[:, c].sum()), int(sizes[:, c].sum()), c))]


def resolve_limits(limits: SliceLimits, table: SensitivityTable, weight_budget_bytes: int) -> SliceBounds:
    """The bounds ``limits`` put on ``table``'s slices at this weight budget (one line if they cannot be stated)."""
    if not limits:
        return SliceBounds({})
    if table.slice_scores is None:
        raise BitplanError("slice limits need a profile with per-slice scores, and this table has none: re-profile with this bitplan")
    limits.check_slices(table.slices)
    bounds = dict(limits.max_kl)
    uniform = uniform_kl = None
    if limits.max_regression:
        uniform = best_uniform(table, weight_budget_bytes)
        if uniform is None:
            raise BitplanError(f"--max-slice-regression compares with the best uniform plan, but no single candidate scheme fits the "
                               f"{format_bytes(weight_budget_bytes)} left for weights: raise --budget or use --max-slice-kl")
        uniform_kl = predicted_slice_kl(table, {name: uniform for name in table.layers})
        for name, factor in limits.max_regression.items():
            bounds[name] = min(bounds.get(name, float("inf")), factor * uniform_kl[name])
    return SliceBounds(dict(sorted(bounds.items())), uniform, uniform_kl)
