"""Each method's scores put on the scale of measured KL (``planner.method_factors``): a method
whose score overstates its loss is measured once, its columns scaled, and the exact allocation
that follows picks it where it is better; one method alone changes nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bitplan.methods.scheme import Scheme
from bitplan.models.spec import spec_from_config
from bitplan.planner.quality import Quality
from bitplan.planner.method_factors import method_factors, probe_plans, scaled_table
from bitplan.planner.search import allocate
from bitplan.profiles.tables import SensitivityTable

CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}
SCHEMES = ["none"] + [f"{m}-w{b}g64s" for m in ("rtn", "gptq", "awq") for b in (3, 4, 8)]
ERROR = {3: 1.0, 4: 0.1, 8: 0.001}
TRUE = {"rtn": 1.0, "gptq": 0.8, "awq": 0.3}  # what each method really loses, per unit of RTN's
SCORED = {"rtn": 1.0, "gptq": 0.6, "awq": 0.9}  # what the score says: GPTQ flattered, AWQ overstated
WINDOWS = torch.arange(64).reshape(2, 32)


@pytest.fixture(scope="module")
def spec():
    return spec_from_config(CONFIG)


def table_and_truth(spec) -> tuple[SensitivityTable, np.ndarray]:
    sensitivity = np.geomspace(1e-3, 1.0, len(spec.layers))[np.random.default_rng(0).permutation(len(spec.layers))]
    scores, truth, sizes = (np.zeros((len(spec.layers), len(SCHEMES))) for _ in range(3))
    for column, name in enumerate(SCHEMES):
        if name == "none":
            sizes[:, column] = [layer.out_features * layer.in_features * 2 for layer in spec.layers]
            continue
        scheme = Scheme.parse(name)
        method = scheme.method.value
        scores[:, column] = sensitivity * ERROR[scheme.bits] * SCORED[method]
        truth[:, column] = sensitivity * ERROR[scheme.bits] * TRUE[method]
        sizes[:, column] = [scheme.weight_bytes(layer.out_features, layer.in_features, spec.dtype_bytes) for layer in spec.layers]
    awq_w3 = SCHEMES.index("awq-w3g64s")
    down = [row for row, layer in enumerate(spec.layers) if layer.kind == "down"]
    scores[down, awq_w3], sizes[down, awq_w3] = np.nan, -1  # a cell the engine refuses
    provenance = {"model_hash": "synthetic", "calibration_hash": "synthetic", "metric": "fisher-kl", "metric_version": 3}
    table = SensitivityTable([layer.name for layer in spec.layers], list(SCHEMES), torch.tensor(scores),
                             torch.tensor(sizes, dtype=torch.int64), provenance)
    return table, truth


def true_loss(table, truth, choice) -> float:
    return float(sum(truth[row, table.schemes.index(choice[name])] for row, name in enumerate(table.layers)))


def four_bits(table) -> int:
    return int(table.bytes[:, table.schemes.index("rtn-w4g64s")].sum())


def test_probes_take_each_methods_scheme_nearest_the_budget_and_leave_refused_cells_dense(spec):
    table, _ = table_and_truth(spec)
    plans = probe_plans(table, spec, four_bits(table))
    assert set(plans) == {"rtn", "gptq", "awq"}
    assert {plans[m][name] for m in plans for name in table.layers} == {"rtn-w4g64s", "gptq-w4g64s", "awq-w4g64s"}
    low = probe_plans(table, spec, int(table.bytes[:, table.schemes.index("rtn-w3g64s")].sum()))
    down = {layer.name for layer in spec.layers if layer.kind == "down"}
    assert all(low["awq"][name] == ("none" if name in down else "awq-w3g64s") for name in table.layers)
    assert probe_plans(table.subset(["none", "rtn-w3g64s", "rtn-w4g64s"]), spec, four_bits(table)) == {}, "one method: nothing to weigh"


def test_factors_are_measured_over_scored_and_keep_the_tables_level(spec):
    table, truth = table_and_truth(spec)
    factors = method_factors(table, spec, four_bits(table), lambda choice: true_loss(table, truth, choice))
    ratios = {m: TRUE[m] / SCORED[m] for m in TRUE}
    mean = math.exp(sum(math.log(r) for r in ratios.values()) / 3)
    assert {m: f.factor for m, f in factors.items()} == pytest.approx({m: r / mean for m, r in ratios.items()})
    assert factors["awq"].scheme == "awq-w4g64s" and factors["awq"].measured_kl == pytest.approx(true_loss(table, truth, {
        name: "awq-w4g64s" for name in table.layers}))
    scaled = scaled_table(table, factors)
    awq = [j for j, s in enumerate(table.schemes) if s.startswith("awq")]
    assert torch.allclose(scaled.scores[:, awq].nan_to_num(), (table.scores[:, awq] * factors["awq"].factor).nan_to_num())
    assert torch.equal(scaled.scores[:, 0], table.scores[:, 0]) and torch.equal(scaled.bytes, table.bytes)


class TruthMeter:
    def __init__(self, table, truth):
        self.table, self.truth, self.loss, self.plans = table, truth, None, []

    def apply(self, assignments):
        choice = {name: scheme.name for name, scheme in assignments.items()}
        self.plans.append(choice)
        self.loss = true_loss(self.table, self.truth, choice)

    def measure(self, windows):
        return Quality(self.loss, 1.0, 1.0, windows.numel(), (self.loss,) * windows.shape[0])


def test_the_search_allocates_on_measured_scales_and_loses_less(spec):
    from bitplan.planner.refine import refine

    table, truth = table_and_truth(spec)
    raw = allocate(table, spec, four_bits(table))
    meter = TruthMeter(table, truth)
    found = refine(table, spec, four_bits(table), False, meter, WINDOWS, 1, 0)
    assert len(meter.plans) == 4, "three probes, then the exact plan; the probes join the study without a second forward"
    assert found.trials == 4, "the exact trial and the three probes"
    assert set(found.factors) == {"rtn", "gptq", "awq"}
    methods = lambda choice: sum(Scheme.parse(s).method.value == "awq" for s in choice.values() if s != "none")  # noqa: E731
    assert methods(found.allocation.choice) > methods(raw.choice), "the overstated method is picked once measured"
    assert found.measured_kl < 0.7 * true_loss(table, truth, raw.choice)
    assert found.allocation.weight_bytes <= four_bits(table)
    assert found.allocation.score == pytest.approx(sum(float(table.scores[row, table.schemes.index(found.allocation.choice[name])])
                                                       for row, name in enumerate(table.layers))), "the reported score is the profile's"



class UniformFavouringMeter(TruthMeter):
    """Loss is not additive: a plan that is AWQ 4-bit throughout measures a fifth of its summed loss."""

    def apply(self, assignments):
        super().apply(assignments)
        if {scheme.name for scheme in assignments.values()} == {"awq-w4g64s"}:
            self.loss *= 0.2


def test_a_probe_that_measures_better_than_the_exact_plan_is_kept(spec):
    from bitplan.planner.refine import refine

    table, truth = table_and_truth(spec)
    table.scores[:, 0], table.bytes[:, 0] = float("nan"), -1  # no dense cells: every layer can take AWQ 4-bit
    meter = UniformFavouringMeter(table, truth)
    found = refine(table, spec, four_bits(table), False, meter, WINDOWS, 3, 0)
    assert set(found.allocation.choice.values()) == {"awq-w4g64s"}, "the measured uniform probe beats the exact plan"
    assert found.measured_kl == pytest.approx(found.factors["awq"].measured_kl) and found.measured_kl < found.exact_kl
    assert found.trials == 3 + 3, "the exact plan, three probes, two generations"


def test_at_the_budgets_floor_the_search_switches_methods_at_equal_bytes(spec):
    """Every layer at its smallest size: no unit can move up, so each offspring swaps a unit's
    method at the same bytes (the moves that took SmolLM2's 3-bit plan anywhere at all)."""
    from bitplan.planner.evolve import columns_of, locate, offspring, search_units

    table, _ = table_and_truth(spec)
    three = [j for j, s in enumerate(table.schemes) if "-w3" in s]
    floor = int(table.bytes[:, table.schemes.index("rtn-w3g64s")].sum())
    units = search_units(table, spec, False, keep=frozenset(three))
    columns = [table.schemes.index("rtn-w3g64s")] * len(table.layers)
    parent = locate(units, columns)
    assert parent is not None, "the kept probe columns make a uniform plan a point of the search"
    children = offspring(units, parent, floor, (), np.random.default_rng(0))
    assert children, "moves exist at the floor"
    for child in children:
        moved = [(table.schemes[a], table.schemes[b]) for a, b in zip(columns, columns_of(units, child, len(table.layers))) if a != b]
        assert moved and all(Scheme.parse(b).bits == 3 and Scheme.parse(a).method != Scheme.parse(b).method for a, b in moved)
        assert int(table.bytes[torch.arange(len(columns)), torch.tensor(columns_of(units, child, len(table.layers)))].sum()) <= floor
