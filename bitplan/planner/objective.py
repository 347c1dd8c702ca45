"""What the search minimises: ``--objective quality|speed|balanced`` (``bitplan plan`` and ``compare``).

Every option the search weighs (a scheme for one Linear, or for a group of Linears decided
together) has two predicted costs:

- ``score``: its loss, the sensitivity table's KL score (nats/token; the documented prior in
  ``compare`` without a measured table), summed over its layers;
- ``time_s``: the seconds it adds to one decode step on the target device, from the roofline of
  ``planner.speed`` (``linear_decode_time_s``) at the deployment's batch, context and tensor
  parallelism. Only the Linears depend on the plan; attention, the tied logits and all-reduces
  are the same for every plan and leave the choice unchanged.

Two reference scales, summed over the decision units (the Linears for ``plan``, the fused
groups for ``compare``):

    score_ref = sum over units of the largest score among the unit's options
                (the predicted loss if every unit took its worst candidate)
    time_ref  = sum over units of the largest time among the unit's options
                (the Linear decode time of the unquantized model when ``none`` is a candidate)

and the search minimises, summed over the units, under the byte budget:

- ``quality``: ``score``. Latency plays no part: ``bitplan plan`` needs no device and makes the
  same assignments as before objectives existed.
- ``speed``: ``time / time_ref + SPEED_SCORE_TIE * score / max(score_ref, BALANCED_KL_SCALE)``.
  The loss only breaks ties: between options of equal time (``rtn`` and ``gptq`` at one bit
  width and group, say) the lower loss wins, and the whole ``score_ref`` is worth 0.1% of
  ``time_ref``. Decode at small batch is bandwidth-bound, so this takes the smallest schemes
  whatever the loss (on SmolLM2 at 170 MB: 2 bits everywhere, predicted KL 15 nats/token):
  it is the fast end of the trade, use ``balanced`` for a usable model.
- ``balanced``: ``score / BALANCED_KL_SCALE + time / time_ref`` with ``BALANCED_KL_SCALE`` = 0.1
  nats/token: cutting 1% of the unquantized Linear decode time is worth 0.001 nats/token of
  predicted KL. The KL scale is absolute on purpose: KL in nats/token means the same thing on
  every model, while the worst-case ``score_ref`` is dominated by 2-bit per-channel disasters
  (tens of nats) and, used as the scale, would accept a broken model (predicted KL 1.6 on
  SmolLM2) for 40% less Linear time. With 0.1, a budget that is already tight gives the
  ``quality`` plan (SmolLM2 with 170 MB for weights, KV cache and the rest: every byte saved
  costs more KL than it is worth), and a loose one halves bf16's Linear decode time at a
  predicted KL of 0.006 (SmolLM2, RTX 4090, 1400 MB: 1.5x the decode tokens/s, since the tied
  logits and attention do not shrink).

Minimising ``score + w * time`` with an exact solver for a larger weight ``w`` never gives a
slower plan nor a lower loss (add the two optimality inequalities), and ``w`` grows from
``quality`` (0) to ``balanced`` (0.1 / time_ref) to ``speed`` (at least 100 / time_ref), so
under one budget ``balanced`` lies between ``quality`` and ``speed`` on predicted loss and time.

``search.allocate`` adds ``extra_cost`` to the scores, so ``extra_cost`` expresses the time term
in score units: ``(time_weight / score_weight) * time_s`` (:func:`latency_cost`). The Optuna
refinement adds the same term, summed over the chosen cells, to the KL it measures.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from bitplan.errors import BitplanError
from bitplan.methods.scheme import Scheme
from bitplan.models.spec import ModelSpec
from bitplan.planner.speed import Efficiency, Roofline, linear_decode_time_s
from bitplan.profiles.hardware import HardwareProfile

OBJECTIVES = ("quality", "speed", "balanced")
SPEED_SCORE_TIE = 1e-3  # weight of score / score_ref under ``speed`` (see the module notes)
BALANCED_KL_SCALE = 0.1  # nats/token of predicted KL worth the whole time_ref under ``balanced``


def check_objective(objective: str, device: HardwareProfile | None = None, needs_device: bool = False) -> str:
    """The objective, checked; with ``needs_device``, ``speed`` and ``balanced`` need a catalog device."""
    if objective not in OBJECTIVES:
        raise BitplanError(f"unknown objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if needs_device and objective != "quality" and device is None:
        raise BitplanError(f"--objective {objective} predicts decode time on a device: pass --target NAME (see `bitplan devices`)")
    return objective


def objective_costs(objective: str, table, spec: ModelSpec, device: HardwareProfile | None, deployment) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(times, extra_cost)`` for a plan on ``device``: each cell's predicted decode seconds and the
    objective's time term in score units; ``(None, None)`` without a device."""
    if device is None:
        return None, None
    times = decode_time_matrix(spec, table.layers, table.schemes, table.bytes.numpy() >= 0, device, deployment)
    return times, latency_cost(objective, table, times)


def reference_scales(units: Iterable[tuple[Sequence[float], Sequence[float]]]) -> tuple[float, float]:
    """``(score_ref, time_ref)`` from each unit's option scores and times (1.0 where a sum is 0)."""
    score_ref = time_ref = 0.0
    for scores, times in units:
        score_ref += max(scores)
        time_ref += max(times)
    return (score_ref or 1.0), (time_ref or 1.0)


@dataclass(frozen=True)
class CostWeights:
    """The minimised cost of an option: ``score_weight * score + time_weight * time_s``."""

    score_weight: float
    time_weight: float

    def __call__(self, score: float, time_s: float) -> float:
        return self.score_weight * score + self.time_weight * time_s

    @property
    def time_in_score_units(self) -> float:
        """Nats (of score) one second of decode time is worth: the factor of ``extra_cost``."""
        return self.time_weight / self.score_weight


def cost_weights(objective: str, score_ref: float, time_ref: float) -> CostWeights:
    """The weights of each objective (see the module notes)."""
    check_objective(objective)
    if objective == "quality":
        return CostWeights(1.0, 0.0)
    if objective == "speed":
        return CostWeights(SPEED_SCORE_TIE / max(score_ref, BALANCED_KL_SCALE), 1.0 / time_ref)
    return CostWeights(1.0 / BALANCED_KL_SCALE, 1.0 / time_ref)


def decode_time_matrix(spec: ModelSpec, layers: Sequence[str], schemes: Sequence[str], valid: np.ndarray,
                       profile: HardwareProfile, deployment) -> np.ndarray:
    """Seconds each Linear adds to a decode step under each scheme, ``[layers, schemes]``; 0 where not ``valid``."""
    roof = Roofline(profile, Efficiency.for_profile(profile), spec.dtype)
    parsed = [Scheme.parse(name) for name in schemes]
    cache: dict[tuple, float] = {}  # many Linears share a shape, kind and scheme
    times = np.zeros((len(layers), len(schemes)))
    for row, name in enumerate(layers):
        layer = spec.layer(name)
        for column, scheme in enumerate(parsed):
            if not valid[row, column]:
                continue
            key = (layer.in_features, layer.out_features, layer.kind, column)
            if key not in cache:
                cache[key] = linear_decode_time_s(roof, spec, layer, scheme, deployment)
            times[row, column] = cache[key]
    return times


def latency_cost(objective: str, table, times: np.ndarray) -> np.ndarray | None:
    """``extra_cost`` for ``search.allocate``: the objective's time term in score units (None for quality)."""
    if check_objective(objective) == "quality":
        return None
    valid = table.bytes.numpy() >= 0
    scores = table.scores.numpy()
    units = ((scores[row][valid[row]], times[row][valid[row]]) for row in range(len(table.layers)) if valid[row].any())
    weights = cost_weights(objective, *reference_scales(units))
    return np.where(valid, times * weights.time_in_score_units, 0.0)


def assignment_sum(table, choice: dict[str, str], matrix: np.ndarray) -> float:
    """Sum of a ``[layers, schemes]`` matrix (times, extra cost) over an assignment's cells."""
    columns = {name: column for column, name in enumerate(table.schemes)}
    return float(sum(matrix[row, columns[choice[name]]] for row, name in enumerate(table.layers)))
