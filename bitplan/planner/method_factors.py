"""Each method's score, put on the scale of measured KL before the exact allocation.

The score (``profiles.sensitivity``) is a second-order estimate summed over layers, and its error
is not the same for every method: on SmolLM2-135M at 4 bits, group 64, the summed scores of
uniform plans overstate measured KL on held-out text by 1.7x for RTN, 1.3x for GPTQ and 3.2x for
AWQ (``bench/score_calibration.py``; cross-fitting does not cause it: AWQ scored in sample sums
to 0.64, cross-fitted to 0.59, measured 0.19). An allocation over mis-scaled columns trades AWQ,
the method whose gain carries best to other text, for GPTQ, whose gain does not.

So the measured search measures before it allocates: for each quantized method in the table,
one probe plan (that method's scheme nearest the budget's bits per weight, on every layer where
the engine allows it; other layers dense) is measured on the held-in anchor windows, and the method's
column scores are multiplied by ``measured KL / summed score`` of its probe, normalised so the
factors' geometric mean is 1 (the table's overall level, which the speed objective and slice
limits are expressed in, is kept). The probes' quantized weights stay in the meter's cache for
the search that follows, and the probes themselves join the search as measured trials
(``planner.refine``): a probe that fits the budget and measures better than the exact plan on
the anchor is where the search starts from, and every probe is a baseline the kept plan must beat
on held-back windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bitplan.methods.scheme import Scheme
from bitplan.models.spec import ModelSpec
from bitplan.profiles.tables import SensitivityTable


@dataclass(frozen=True)
class MethodFactor:
    """One method's probe: its scheme, the probe's summed score and measured KL, and the factor."""

    method: str
    scheme: str
    score: float
    measured_kl: float
    factor: float
    plan: dict[str, str] = field(default_factory=dict, repr=False, compare=False)  # layer -> scheme of the probe

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "score": round(self.score, 6), "measured_kl": round(self.measured_kl, 6), "factor": round(self.factor, 6)}


def probe_plans(table: SensitivityTable, spec: ModelSpec, weight_budget_bytes: int) -> dict[str, dict[str, str]]:
    """For each quantized method of ``table`` with at least two of them: the plan of its scheme whose
    bits per weight (over the layers it can store) is nearest the budget's, fewer bits on a tie;
    layers that scheme cannot store stay dense. Empty when there is nothing to weigh."""
    if "none" not in table.schemes:
        return {}
    by_name = {layer.name: layer.out_features * layer.in_features for layer in spec.layers}
    weights = torch.tensor([by_name[name] for name in table.layers], dtype=torch.float64)
    target = 8.0 * weight_budget_bytes / float(weights.sum())
    best: dict[str, tuple[float, float, str]] = {}
    for column, name in enumerate(table.schemes):
        if name == "none":
            continue
        stored = torch.isfinite(table.scores[:, column]) & (table.bytes[:, column] >= 0)
        if not bool(stored.any()):
            continue
        bits = 8.0 * float(table.bytes[stored, column].sum()) / float(weights[stored].sum())
        key = (abs(bits - target), bits, name)
        method = Scheme.parse(name).method.value
        if method not in best or key < best[method]:
            best[method] = key
    if len(best) < 2:
        return {}
    plans = {}
    for method, (_, _, name) in sorted(best.items()):
        column = table.schemes.index(name)
        plans[method] = {layer: name if bool(torch.isfinite(table.scores[row, column])) else "none" for row, layer in enumerate(table.layers)}
    return plans


def method_factors(table: SensitivityTable, spec: ModelSpec, weight_budget_bytes: int,
                   measure: Callable[[dict[str, str]], float]) -> dict[str, MethodFactor]:
    """Measure each probe plan (``measure`` returns its KL on the held-in windows) and derive the factors."""
    rows = torch.arange(len(table.layers))
    raw = {}
    for method, plan in probe_plans(table, spec, weight_budget_bytes).items():
        columns = torch.tensor([table.schemes.index(plan[name]) for name in table.layers])
        score = float(table.scores[rows, columns].sum())
        kl = measure(plan)
        raw[method] = (plan[next(name for name in table.layers if plan[name] != "none")], score, kl, plan)
    usable = {m: kl / score for m, (_, score, kl, _) in raw.items() if score > 0 and kl > 0 and math.isfinite(kl / score)}
    if len(usable) < 2:
        return {}
    mean_log = sum(math.log(r) for r in usable.values()) / len(usable)
    return {m: MethodFactor(m, raw[m][0], raw[m][1], raw[m][2], math.exp(math.log(r) - mean_log), raw[m][3]) for m, r in sorted(usable.items())}


def scaled_table(table: SensitivityTable, factors: dict[str, MethodFactor]) -> SensitivityTable:
    """``table`` with each method's columns multiplied by its factor. The per-slice scores are kept:
    slice limits bound the predicted (unscaled) KL of a slice, as the user set them."""
    scale = torch.ones(len(table.schemes), dtype=torch.float64)
    for column, name in enumerate(table.schemes):
        if name != "none" and Scheme.parse(name).method.value in factors:
            scale[column] = factors[Scheme.parse(name).method.value].factor
    return SensitivityTable(list(table.layers), list(table.schemes), table.scores * scale, table.bytes.clone(), dict(table.provenance),
                            list(table.slices), table.slice_scores, list(table.slice_weights))
