"""``--objective quality|speed|balanced``: predicted decode time joins the search (``planner.objective``).

Synthetic: a tiny Llama config.json, a sensitivity table whose scores grow with each layer's
sensitivity and fall with bits, and the RTX 4090's roofline. No weights are read.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import bitplan.api as api
from bitplan.api import Candidates
from bitplan.cli import main
from bitplan.errors import BitplanError
from bitplan.methods.kv_cache import kv_format
from bitplan.models.moe import load_spec
from bitplan.models.source import ModelSource
from bitplan.models.spec import spec_from_config
from bitplan.planner.compare import CompareSettings, compare
from bitplan.planner.deployment import Deployment, memory_breakdown
from bitplan.planner.kv_choice import KVMeasured
from bitplan.planner.objective import (
    BALANCED_KL_SCALE,
    SPEED_SCORE_TIE,
    assignment_sum,
    cost_weights,
    decode_time_matrix,
    latency_cost,
    reference_scales,
)
from bitplan.planner.quality import Quality
from bitplan.planner.refine import refine
from bitplan.planner.search import allocate
from bitplan.profiles.hardware import get_device, get_devices
from bitplan.profiles.tables import SensitivityTable

CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}
CANDIDATES = Candidates(("rtn",), (2, 4, 8), (64, 0), (True,))
ERROR = {2: 1.0, 4: 0.06, 8: 0.0003, 16: 0.0}  # relative score by bit width; group 64 halves it
DEVICE = "rtx-4090"
CONFIGS = Path(__file__).resolve().parents[1] / "data" / "configs"


@pytest.fixture(scope="module")
def spec():
    return spec_from_config(CONFIG)


def synthetic_table(spec) -> SensitivityTable:
    schemes = CANDIDATES.schemes()
    sensitivity = np.geomspace(1e-3, 10.0, len(spec.layers))[np.random.default_rng(0).permutation(len(spec.layers))]
    scores = [[sensitivity[i] * ERROR[s.bits] * (0.5 if s.group_size == 64 else 1.0) for s in schemes]
              for i in range(len(spec.layers))]
    sizes = [[s.weight_bytes(layer.out_features, layer.in_features, spec.dtype_bytes) for s in schemes] for layer in spec.layers]
    provenance = {"model_hash": "synthetic", "calibration_hash": "synthetic", "metric": "fisher-kl", "metric_version": 1}
    return SensitivityTable([layer.name for layer in spec.layers], [s.name for s in schemes],
                            torch.tensor(scores, dtype=torch.float64), torch.tensor(sizes, dtype=torch.int64), provenance)


def dense_bytes(table) -> int:
    return int(table.bytes[:, table.schemes.index("none")].sum())


@pytest.fixture(scope="module")
def solved(spec):
    """Each objective's exact plan under one budget: (predicted KL, summed Linear decode seconds, choice)."""
    table = synthetic_table(spec)
    times = decode_time_matrix(spec, table.layers, table.schemes, table.bytes.numpy() >= 0, get_device(DEVICE),
                               Deployment(budget_bytes=10**9, context=512))
    out = {}
    for objective in ("quality", "balanced", "speed"):
        allocation = allocate(table, spec, dense_bytes(table), extra_cost=latency_cost(objective, table, times))
        out[objective] = (allocation.score, assignment_sum(table, allocation.choice, times), allocation.choice)
    return out


def test_speed_is_fastest_quality_is_best_and_balanced_lies_between(solved):
    (kl_q, t_q, _), (kl_b, t_b, _), (kl_s, t_s, _) = solved["quality"], solved["balanced"], solved["speed"]
    assert t_s < t_b < t_q, (t_s, t_b, t_q)
    assert kl_q < kl_b < kl_s, (kl_q, kl_b, kl_s)


def test_speed_takes_the_fastest_schemes(solved):
    assert set(solved["speed"][2].values()) == {"rtn-w2gcs"}  # decode is bandwidth-bound: fewest bytes


def test_speed_breaks_equal_times_by_score(spec):
    # rtn and gptq at 4 bits, group 64, store the same bytes and run the same kernel: equal times.
    # Ties go to the first column unless the score breaks them; gptq's lower score must win.
    names = ["rtn-w4g64s", "gptq-w4g64s", "none"]
    base = synthetic_table(spec)
    rows = [[1.0, 0.5, 0.0]] * len(spec.layers)
    sizes = [[int(base.bytes[i, base.schemes.index("rtn-w4g64s")])] * 2 + [int(base.bytes[i, base.schemes.index("none")])]
             for i in range(len(spec.layers))]
    table = SensitivityTable(base.layers, names, torch.tensor(rows, dtype=torch.float64), torch.tensor(sizes, dtype=torch.int64))
    times = decode_time_matrix(spec, table.layers, names, np.ones((len(table.layers), 3), bool), get_device(DEVICE),
                               Deployment(budget_bytes=10**9))
    assert np.array_equal(times[:, 0], times[:, 1])
    allocation = allocate(table, spec, int(table.bytes.sum()), extra_cost=latency_cost("speed", table, times))
    assert set(allocation.choice.values()) == {"gptq-w4g64s"}


class FakeMeter:
    """Measured KL = 1.5 x the summed scores of the applied plan (no model)."""

    def __init__(self, table):
        self.table, self.kl = table, None

    def apply(self, assignments):
        self.kl = 1.5 * assignment_sum(self.table, {k: v.name for k, v in assignments.items()}, self.table.scores.numpy())

    def measure(self, windows):
        return Quality(self.kl, 1.0, 1.0, windows.numel(), (self.kl,) * windows.shape[0])


def test_refinement_keeps_the_latency_term(spec):
    table = synthetic_table(spec)
    times = decode_time_matrix(spec, table.layers, table.schemes, table.bytes.numpy() >= 0, get_device(DEVICE),
                               Deployment(budget_bytes=10**9, context=512))
    extra = latency_cost("balanced", table, times)
    refined = refine(table, spec, dense_bytes(table), False, FakeMeter(table), torch.zeros(1, 4), 4, 0, extra_cost=extra)
    exact = allocate(table, spec, dense_bytes(table), extra_cost=extra)
    assert refined.exact_kl == pytest.approx(1.5 * exact.score)  # the KL, not KL + latency term
    assert refined.measured_kl == pytest.approx(1.5 * refined.allocation.score)
    value = lambda a: 1.5 * a.score + assignment_sum(table, a.choice, extra)  # noqa: E731
    assert value(refined.allocation) <= value(exact) + 1e-12
    quality = allocate(table, spec, dense_bytes(table))
    assert assignment_sum(table, refined.allocation.choice, times) < assignment_sum(table, quality.choice, times)


def test_refinement_without_latency_term_ranks_by_measured_kl(spec):
    table = synthetic_table(spec)
    refined = refine(table, spec, dense_bytes(table) // 3, False, FakeMeter(table), torch.zeros(1, 4), 4, 0)
    assert refined.measured_kl == pytest.approx(1.5 * refined.allocation.score)
    assert refined.measured_kl <= refined.exact_kl == pytest.approx(1.5 * allocate(table, spec, dense_bytes(table) // 3).score)


def test_quality_adds_no_latency_term(spec, solved):
    table = synthetic_table(spec)
    assert latency_cost("quality", table, np.ones((len(table.layers), len(table.schemes)))) is None
    assert allocate(table, spec, dense_bytes(table)).choice == solved["quality"][2]


def test_cost_weights_and_reference_scales():
    score_ref, time_ref = reference_scales([([1.0, 3.0], [2e-6, 1e-6]), ([0.5, 0.0], [4e-6, 3e-6])])
    assert (score_ref, time_ref) == (3.5, 6e-6)
    assert cost_weights("balanced", 2.0, 4.0)(1.0, 2.0) == pytest.approx(1.0 / BALANCED_KL_SCALE + 0.5)
    assert cost_weights("speed", 2.0, 4.0)(1.0, 2.0) == pytest.approx(0.5 + SPEED_SCORE_TIE * 0.5)
    assert cost_weights("speed", 0.001, 4.0)(1.0, 2.0) == pytest.approx(0.5 + SPEED_SCORE_TIE / BALANCED_KL_SCALE)
    assert cost_weights("quality", 2.0, 4.0)(1.0, 2.0) == 1.0
    # the time weight, in score units, grows from quality to balanced to speed
    ladder = [cost_weights(o, 0.001, 4.0).time_in_score_units for o in ("quality", "balanced", "speed")]
    assert ladder[0] < ladder[1] < ladder[2]
    with pytest.raises(BitplanError, match="unknown objective"):
        cost_weights("vibes", 1.0, 1.0)
    assert reference_scales([([0.0], [0.0])]) == (1.0, 1.0)


# ---- the API: plan(..., target, objective) ----------------------------------------------

@pytest.fixture
def model_folder(tmp_path, spec, monkeypatch):
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    # no weights: the model is its config, and the profile is the synthetic table
    monkeypatch.setattr(api, "open_model", lambda model: ModelSource(str(folder), folder, CONFIG, spec))
    monkeypatch.setattr(api, "sensitivity_table", lambda *args, **kwargs: synthetic_table(spec))
    # no weights to run either: the KV formats' costs are given (planner/test_kv_choice.py measures real ones)
    monkeypatch.setattr(api, "measure_kv", lambda source, dtypes, calibration: KVMeasured(
        {d: 0.0 if kv_format(d).native else 0.01 for d in dtypes}, 0, (0.1,) * spec.num_blocks, (0.1,) * spec.num_blocks))
    return folder


def plan_with(folder, spec, objective, target=DEVICE):
    table = synthetic_table(spec)
    deployment = Deployment(budget_bytes=10**9, context=512)
    budget = memory_breakdown(spec, 0, deployment).total_bytes + dense_bytes(table)
    return api.plan(str(folder), budget=budget, target=target, context=512, overhead=0, candidates=CANDIDATES,
                    trials=0, objective=objective)


def test_plan_records_objective_and_predicted_decode(model_folder, spec):
    quality, speed, balanced = (plan_with(model_folder, spec, o) for o in ("quality", "speed", "balanced"))
    assert [p.search.objective for p in (quality, speed, balanced)] == ["quality", "speed", "balanced"]
    ms = [p.predicted.decode_ms_per_token_batch1 for p in (quality, balanced, speed)]
    kl = [p.predicted.score_kl for p in (quality, balanced, speed)]
    assert ms[0] > ms[1] > ms[2] and kl[0] < kl[1] < kl[2]
    assert speed.predicted.decode_tokens_per_s == pytest.approx(1e3 / speed.predicted.decode_step_ms)
    assert 0 < speed.predicted.linear_decode_ms < speed.predicted.decode_step_ms
    assert speed.memory.total_bytes <= speed.deployment.budget_bytes
    assert plan_with(model_folder, spec, "speed").to_json() == speed.to_json()  # deterministic


def test_quality_plans_ignore_the_target(model_folder, spec):
    with_target, without = plan_with(model_folder, spec, "quality"), plan_with(model_folder, spec, "quality", target=None)
    assert with_target.assignments == without.assignments
    assert without.predicted.decode_step_ms is None and with_target.predicted.decode_step_ms is not None


@pytest.mark.parametrize("objective", ["speed", "balanced"])
def test_latency_objectives_need_a_target(model_folder, spec, objective):
    with pytest.raises(BitplanError, match="pass --target"):
        plan_with(model_folder, spec, objective, target=None)


def test_cli_speed_without_target_is_one_line_and_status_2(capsys, tmp_path):
    out = tmp_path / "plan.json"
    code = main(["plan", "smollm2-135m", "--budget", "1GB", "--objective", "speed", "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("bitplan: error:") and "--target" in lines[0], lines
    assert not out.exists()


def test_cli_prints_predicted_decode(model_folder, spec, capsys, tmp_path):
    table = synthetic_table(spec)
    budget = memory_breakdown(spec, 0, Deployment(budget_bytes=10**9, context=512)).total_bytes + dense_bytes(table)
    code = main(["plan", str(model_folder), "--budget", f"{budget}B", "--overhead", "1B", "--target", DEVICE,
                 "--context", "512", "--methods", "rtn", "--bits", "2,4,8", "--groups", "64,c", "--symmetric-only",
                 "--objective", "balanced", "--trials", "0", "--out", str(tmp_path / "plan.json")])
    assert code == 0
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "predicted decode on rtx-4090 (balanced objective" in printed and "ms/token at batch 1" in printed
    assert json.loads((tmp_path / "plan.json").read_text())["search"]["objective"] == "balanced"


# ---- compare shares the definitions -------------------------------------------------------

def test_compare_balanced_lies_between_quality_and_speed():
    spec, routing = load_spec(json.loads((CONFIGS / "llama-3-8b.json").read_text()))
    rows = {o: compare(spec, routing, get_devices("rtx-4090"), CompareSettings(context=8192, objective=o)).results[0]
            for o in ("quality", "balanced", "speed")}
    speeds = [rows[o].decode_tokens_per_s for o in ("quality", "balanced", "speed")]
    losses = [rows[o].predicted_loss for o in ("quality", "balanced", "speed")]
    assert speeds[0] <= speeds[1] <= speeds[2] and speeds[0] < speeds[2]
    assert losses[0] <= losses[1] <= losses[2] and losses[0] < losses[2]
