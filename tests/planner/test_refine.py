"""The measured search (``planner.refine``, ``planner.evolve``): it starts from the exact plan,
never leaves the budget, the engine's cells, the ties or the slice bounds, finds a better plan
where the measured loss is not the sum of the scores, repeats itself given the seed, stops on
the clock, and the quantized tensors it reuses are the ones whole-block quantization makes."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from bitplan.methods.scheme import Scheme
from bitplan.models.spec import spec_from_config
from bitplan.planner.candidates import Candidates
from bitplan.planner.quality import Quality
from bitplan.planner.search import allocate
from bitplan.planner.slices import predicted_slice_kl
from bitplan.profiles.tables import SensitivityTable

CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}
CANDIDATES = Candidates(("rtn",), (2, 4, 8), (64, 0), (True,))
ERROR = {2: 1.0, 4: 0.06, 8: 0.0003, 16: 0.0}
WINDOWS = torch.arange(12 * 32).reshape(12, 32)  # the held-in pool: the first REFINE_WINDOWS are the anchor


@pytest.fixture(scope="module")
def spec():
    return spec_from_config(CONFIG)


def synthetic_table(spec, refused_kind: str | None = "down", slices: bool = False) -> SensitivityTable:
    """Scores from a layer sensitivity times a per-bit error; 2-bit cells of ``refused_kind`` are
    cells the engine refuses (bytes -1, as ``engines.rules.restrict_table`` marks them)."""
    schemes = CANDIDATES.schemes()
    sensitivity = np.geomspace(1e-3, 10.0, len(spec.layers))[np.random.default_rng(0).permutation(len(spec.layers))]
    scores = np.array([[sensitivity[i] * ERROR[s.bits] * (0.5 if s.group_size == 64 else 1.0) for s in schemes]
                       for i in range(len(spec.layers))])
    sizes = np.array([[s.weight_bytes(layer.out_features, layer.in_features, spec.dtype_bytes) for s in schemes] for layer in spec.layers])
    for row, layer in enumerate(spec.layers):
        for column, scheme in enumerate(schemes):
            if layer.kind == refused_kind and scheme.bits == 2:
                scores[row, column], sizes[row, column] = np.nan, -1
    extra = {}
    if slices:
        code = scores * np.random.default_rng(1).uniform(0.2, 1.8, scores.shape)
        extra = {"slices": ["code", "prose"], "slice_scores": torch.tensor(np.stack([code, 2 * scores - code])), "slice_weights": [0.5, 0.5]}
    provenance = {"model_hash": "synthetic", "calibration_hash": "synthetic", "metric": "fisher-kl", "metric_version": 1}
    return SensitivityTable([layer.name for layer in spec.layers], [s.name for s in schemes], torch.tensor(scores),
                            torch.tensor(sizes, dtype=torch.int64), provenance, **extra)


class InteractingMeter:
    """A model whose loss is not the summed score: the scores underrate every o_proj 20-fold, and
    errors of one block compound (plus the square of each block's summed score). It records every
    plan it was given."""

    def __init__(self, table, spec, delay_s: float = 0.0):
        self.table, self.spec, self.delay_s = table, spec, delay_s
        self.plans: list[dict[str, str]] = []
        self.loss = None

    def apply(self, assignments):
        choice = {name: scheme.name for name, scheme in assignments.items()}
        self.plans.append(choice)
        self.loss = loss(self.table, self.spec, choice)

    def measure(self, windows):
        time.sleep(self.delay_s)
        return quality(self.loss, windows)


def quality(kl: float, windows: torch.Tensor) -> Quality:
    """The same ``kl`` on every window."""
    return Quality(kl, 1.0, 1.0, windows.numel(), (kl,) * windows.shape[0])


def loss(table, spec, choice) -> float:
    scores = {name: float(table.scores[row, table.schemes.index(choice[name])]) for row, name in enumerate(table.layers)}
    blocks: dict[int, float] = {}
    for name, score in scores.items():
        blocks[spec.layer(name).block] = blocks.get(spec.layer(name).block, 0.0) + score
    return sum(score * (20 if spec.layer(name).kind == "o" else 1) for name, score in scores.items()) + sum(v**2 for v in blocks.values())


def plan_bytes(table, choice) -> int:
    return sum(int(table.bytes[row, table.schemes.index(choice[name])]) for row, name in enumerate(table.layers))


def budget(table) -> int:
    """The bytes of 4-bit RTN group 64 everywhere."""
    return int(table.bytes[:, table.schemes.index("rtn-w4g64s")].sum())


def run(table, spec, meter, trials=25, seed=0, **options):
    from bitplan.planner.refine import refine

    return refine(table, spec, budget(table), options.pop("tie_fused", False), meter, WINDOWS, trials, seed, **options)


def test_the_search_beats_the_exact_plan_where_loss_is_not_additive_and_never_leaves_the_budget(spec):
    table = synthetic_table(spec)
    meter = InteractingMeter(table, spec)
    exact = allocate(table, spec, budget(table))
    found = run(table, spec, meter)
    assert meter.plans[0] == exact.choice  # trial 0 is the exact plan
    assert found.exact_kl == pytest.approx(loss(table, spec, exact.choice))
    assert found.measured_kl == pytest.approx(loss(table, spec, found.allocation.choice))
    assert found.measured_kl < 0.5 * found.exact_kl, "the measured search finds what the summed score misses"
    assert found.allocation.weight_bytes == plan_bytes(table, found.allocation.choice) <= budget(table)
    assert max(plan_bytes(table, plan) for plan in meter.plans) <= budget(table), "no candidate exceeds the budget"
    down = {layer.name for layer in spec.layers if layer.kind == "down"}
    assert not any(Scheme.parse(plan[name]).bits == 2 for plan in meter.plans for name in down), "only cells the engine allows"
    assert found.trials == 25 and found.stopped_by == "trials"
    assert len(meter.plans) - found.candidates in (0, 1), "every measurement counted, but the kept plan's on the anchor"
    assert found.candidates > found.trials  # staged: many candidates per trial
    assert found.measured_tokens < found.candidates * 4 * 32  # most on a fraction of one generation's windows


class WindowLog(InteractingMeter):
    """Records the pool windows (by row) each measurement ran on."""

    def __init__(self, table, spec):
        super().__init__(table, spec)
        self.measured: list[tuple[int, ...]] = []

    def measure(self, windows):
        self.measured.append(tuple(sorted({int(w[0]) // 32 for w in windows})))
        return super().measure(windows)


def test_generations_draw_fresh_windows_and_compare_on_windows_selection_never_saw(spec):
    """The exact plan is measured on the anchor (the pool's first REFINE_WINDOWS windows); each
    generation draws its selection and comparison windows from the pool, disjoint, and different
    generations draw different windows, so the chain is not fitted to four of them."""
    from bitplan.planner.refine import REFINE_WINDOWS, draw_windows

    table = synthetic_table(spec)
    meter = WindowLog(table, spec)
    run(table, spec, meter, trials=12)
    assert meter.measured[0] == tuple(range(REFINE_WINDOWS))
    assert len({row for rows in meter.measured for row in rows}) == len(WINDOWS), "the whole pool is drawn from"
    for seed in range(20):
        selection, comparison = draw_windows(WINDOWS, np.random.default_rng([0, seed]))
        assert selection.shape == comparison.shape == (REFINE_WINDOWS, 32)
        assert not set(selection[:, 0].tolist()) & set(comparison[:, 0].tolist())
    again = draw_windows(WINDOWS, np.random.default_rng([0, 5]))
    assert all(torch.equal(a, b) for a, b in zip(again, draw_windows(WINDOWS, np.random.default_rng([0, 5]))))
    small = WINDOWS[:3]  # a pool no larger than a draw: both are the whole pool
    assert all(torch.equal(part, small) for part in draw_windows(small, np.random.default_rng(0)))


class FlatMeter(InteractingMeter):
    """Every plan measures the same: no offspring beats its parent."""

    def measure(self, windows):
        return quality(0.5, windows)


def test_a_parent_no_offspring_beats_stays(spec):
    """The parent wins ties: on a flat loss the chain never leaves the plan it started from."""
    table = synthetic_table(spec)
    found = run(table, spec, FlatMeter(table, spec), trials=8)
    assert found.allocation.choice == allocate(table, spec, budget(table)).choice and found.kept == "exact"
    assert found.distinct_plans == 1


VALIDATION = torch.arange(1000, 1064).reshape(2, 32)


class OverfitMeter(InteractingMeter):
    """Held-in windows measure the interacting loss; the held-back ones (``VALIDATION``) add
    ``penalty`` per layer that differs from ``reference``: a search gain that does not carry over."""

    def __init__(self, table, spec, reference: dict[str, str], penalty: float):
        super().__init__(table, spec)
        self.reference, self.penalty = reference, penalty
        self.validated: list[dict[str, str]] = []

    def measure(self, windows):
        kl = self.loss
        if windows.data_ptr() == VALIDATION.data_ptr():
            self.validated.append(self.plans[-1])
            kl += self.penalty * sum(scheme != self.reference[name] for name, scheme in self.plans[-1].items())
        return quality(kl, windows)


def test_held_back_windows_that_agree_keep_the_searched_plan(spec):
    table = synthetic_table(spec)
    plain = run(table, spec, InteractingMeter(table, spec), trials=12)
    meter = OverfitMeter(table, spec, allocate(table, spec, budget(table)).choice, penalty=0.0)
    confirmed = run(table, spec, meter, trials=12, validation=VALIDATION)
    assert confirmed.allocation == plain.allocation and confirmed.kept == "search"
    assert confirmed.validation_kl == pytest.approx(confirmed.measured_kl) and confirmed.validation_tokens == VALIDATION.numel()
    assert confirmed.exact_validation_kl == pytest.approx(confirmed.exact_kl)
    from bitplan.planner.refine import CONFIRM_TOP

    # the exact plan, the probes, the search's best few distinct plans, each measured once
    assert len(meter.validated) == len({json.dumps(p, sort_keys=True) for p in meter.validated}) == 1 + len(confirmed.factors or {}) + CONFIRM_TOP


def test_a_gain_that_does_not_carry_to_held_back_windows_is_not_kept(spec):
    """The search fits its held-in windows (its plan measures far below the exact one there) but
    every layer it moved costs on the held-back windows: the exact plan is kept, and reported so."""
    table = synthetic_table(spec)
    exact = allocate(table, spec, budget(table))
    plain = run(table, spec, InteractingMeter(table, spec), trials=12)
    assert plain.measured_kl < 0.5 * plain.exact_kl and plain.kept == "search"
    found = run(table, spec, OverfitMeter(table, spec, exact.choice, penalty=10.0), trials=12, validation=VALIDATION)
    assert found.kept == "exact" and found.allocation.choice == exact.choice
    assert found.validation_kl == found.exact_validation_kl == pytest.approx(found.exact_kl)
    assert found.measured_kl == found.exact_kl  # the kept plan's held-in KL, not the search's best
    # the searched plan it turned down is reported with its held-back loss against the kept plan
    assert found.best_searched is not None and found.best_searched.choice != exact.choice
    gain, standard_error = found.search_gain
    assert gain < 0 and standard_error >= 0


def test_same_seed_same_plan(spec):
    table = synthetic_table(spec)
    first, second = (run(table, spec, InteractingMeter(table, spec), trials=12, seed=3) for _ in range(2))
    assert first.allocation == second.allocation and first.measured_kl == second.measured_kl
    assert (first.candidates, first.measured_tokens) == (second.candidates, second.measured_tokens)


def test_tied_fused_groups_move_together(spec):
    table = synthetic_table(spec, refused_kind=None)
    meter = InteractingMeter(table, spec)
    found = run(table, spec, meter, trials=10, tie_fused=True)
    assert found.measured_kl <= found.exact_kl
    for plan in meter.plans:
        groups: dict[str, set[str]] = {}
        for name, scheme in plan.items():
            groups.setdefault(spec.layer(name).fused_key, set()).add(scheme)
        assert all(len(schemes) == 1 for schemes in groups.values())


def test_slice_bounds_hold_for_every_candidate(spec):
    table = synthetic_table(spec, slices=True)
    free = allocate(table, spec, budget(table))
    bound = 0.9 * predicted_slice_kl(table, free.choice)["code"]
    meter = InteractingMeter(table, spec)
    found = run(table, spec, meter, trials=15, slice_bounds={"code": bound})
    assert len({json.dumps(plan, sort_keys=True) for plan in meter.plans}) > 10
    assert all(predicted_slice_kl(table, plan)["code"] <= bound * (1 + 1e-9) for plan in meter.plans)
    assert found.measured_kl <= found.exact_kl


def test_the_clock_stops_the_search(spec):
    table = synthetic_table(spec)
    started = time.monotonic()
    found = run(table, spec, InteractingMeter(table, spec, delay_s=0.02), trials=10**6, search_minutes=0.02)
    assert time.monotonic() - started < 10
    assert found.stopped_by == "clock" and 1 <= found.trials < 10**6
    assert found.seconds >= 1.2 and found.measured_kl <= found.exact_kl
    # no time at all: the exact plan alone
    exact_only = run(table, spec, InteractingMeter(table, spec), trials=10, search_minutes=0)
    assert exact_only.trials == 1 and exact_only.measured_kl == exact_only.exact_kl


def test_two_workers_on_one_journal_study_keep_what_one_worker_keeps(spec, tmp_path):
    """Two workers (threads here; processes in test_study.py) add generations to one journal study;
    both keep the same plan, and a third worker joining the full study keeps it too."""
    import threading

    table = synthetic_table(spec)
    journal = str(tmp_path / "refine.journal")
    results = {}

    def worker(name):
        results[name] = run(table, spec, InteractingMeter(table, spec), trials=16, storage=journal)

    threads = [threading.Thread(target=worker, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[1].allocation == results[2].allocation and results[1].trials == results[2].trials >= 16
    single = run(table, spec, InteractingMeter(table, spec), trials=16, storage=journal)
    assert single.allocation == results[1].allocation and single.candidates == results[1].candidates
    assert single.measured_kl < single.exact_kl


def test_linears_cached_alone_equal_whole_block_quantization(tiny_llama_folder, private_cache):
    """GPTQ and RTN Linears quantized one at a time (and kept) give the tensors quantize_block
    gives for the whole block; a block with a smoothing scheme (AWQ folds into v_proj's rows) is
    kept whole. Re-applying a plan quantizes nothing again and measures the same."""
    from bitplan.models.source import open_model
    from bitplan.planner.quality import QualityMeter, block_variant, load_dense_model
    from bitplan.profiles.calibration import CalibrationSettings, calibration_windows

    source = open_model(tiny_llama_folder)
    windows = calibration_windows(source.folder, CalibrationSettings((), 4, 32), 2)
    meter = QualityMeter(load_dense_model(source.folder), source.spec)
    meter.calibrate(windows[:4])
    kinds = {"q": "gptq-w4g64s", "k": "rtn-w8g64s", "v": "gptq-w8g64s", "o": "none", "gate": "gptq-w4g64s", "up": "rtn-w4g64s",
             "down": "gptq-w8g64s"}
    plan = {layer.name: Scheme.parse(kinds[layer.kind]) for layer in source.spec.layers if layer.block >= 0}
    smoothed = dict(plan, **{layer.name: Scheme.parse("awq-w4g64s") for layer in source.spec.layers if layer.kind == "o"})
    for assignments in (plan, smoothed):
        full = {layer.name: assignments.get(layer.name, Scheme.parse("none")) for layer in source.spec.layers}
        for block, layers in meter.blocks.items():
            cached, formats = meter.block_tensors(block, full)
            whole, whole_formats = block_variant(layers, full, meter.read, meter.stats, source.spec)
            assert cached.keys() == whole.keys() and formats == whole_formats
            assert all(torch.equal(cached[name], whole[name]) for name in whole)
    meter.apply(plan)
    first = meter.measure(windows[4:]).kl
    computed = meter.cache.computed
    meter.apply(smoothed)
    meter.apply(plan)
    assert meter.measure(windows[4:]).kl == first and meter.cache.computed == computed
    assert first > 0


def test_cli_reports_the_cost_and_same_seed_writes_the_same_bytes(tiny_llama_folder, tmp_path, monkeypatch, capsys):
    from bitplan.cli import main

    monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path / "cache"))
    args = [str(tiny_llama_folder), "--methods", "rtn", "--bits", "2,4,8", "--groups", "64", "--engine", "transformers",
            "--samples", "2", "--seq-len", "32", "--budget", "7.35MB", "--context", "64"]
    for name in ("first", "second"):
        assert main(["plan", *args, "--trials", "4", "--search-minutes", "60", "--out", str(tmp_path / f"{name}.json")]) == 0
    assert (tmp_path / "first.json").read_bytes() == (tmp_path / "second.json").read_bytes()
    search = json.loads((tmp_path / "first.json").read_text())["search"]
    assert search["refine_trials"] == 4 and search["refine_stopped_by"] == "trials" and "refine_seconds" not in search
    assert search["refine_candidates"] > 4 and search["search_minutes"] == 60
    from bitplan.planner.refine import VALIDATION_WINDOWS

    assert search["refine_validation_tokens"] == VALIDATION_WINDOWS * 32  # confirmed on windows the search never measured
    predicted = json.loads((tmp_path / "first.json").read_text())["predicted"]
    assert predicted["validation_kl"] <= predicted["exact_validation_kl"]  # never worse than the exact plan where the search did not look
    out = capsys.readouterr().out
    assert "measured search: 4 trials" in out and f"kept: {search['refine_kept']}" in out
    if search.get("refine_search_gain") is not None:  # a searched plan was confirmed: its held-back gain and standard error
        gain, standard_error = search["refine_search_gain"]
        assert standard_error >= 0 and "the best searched plan's gain there" in " ".join(out.split())  # rich wraps lines
        assert (search["refine_kept"] == "search") <= (gain > 0)
    assert main(["plan", *args, "--trials", "4", "--search-minutes", "0", "--out", str(tmp_path / "clock.json")]) == 0
    search = json.loads((tmp_path / "clock.json").read_text())["search"]
    assert search["refine_trials"] == 1 and search["refine_stopped_by"] == "clock" and search["refine_seconds"] >= 0


def test_validation_windows_are_held_back_and_spread_over_the_slices(tiny_llama_folder):
    from bitplan.planner.refine import HELD_IN_POOL, VALIDATION_POOL, VALIDATION_WINDOWS, held_windows
    from bitplan.profiles.calibration import CalibrationSettings, calibration_slices

    calibration = CalibrationSettings((), 4, 32)
    every = calibration_slices(tiny_llama_folder, calibration, 10**4)
    profile, held_in, validation = held_windows(tiny_llama_folder, calibration)
    assert torch.equal(profile, every.tokens[:4]) and torch.equal(held_in, every.tokens[4 : 4 + HELD_IN_POOL])
    got = [next(i for i, window in enumerate(every.tokens) if torch.equal(window, w)) for w in validation]
    assert len(set(got)) == VALIDATION_WINDOWS and min(got) >= 4 + HELD_IN_POOL, "never a window the profile or the search measured"
    assert {every.labels[i] for i in got} == set(range(len(every.names))), "prose and code"
    assert max(got) - min(got) >= VALIDATION_POOL // 2, "spread through the text, not the held-in windows' neighbours"
    # a text with no window left after the held-in ones: nothing to confirm on
    short = CalibrationSettings((), len(every.labels) - HELD_IN_POOL, 32)
    assert held_windows(tiny_llama_folder, short)[2] is None


def test_a_searched_plan_is_kept_only_when_its_held_back_gain_is_more_than_window_noise():
    """The baseline (the exact plan or a probe, the best of them held back) gives way to a searched
    plan only when the searched plan's paired per-window gain over it passes the one-sided t-test."""
    from types import SimpleNamespace

    from bitplan.planner.refine import held_back_gain, kept_plan

    def trial(number, held_in, **attrs):
        return SimpleNamespace(number=number, value=held_in, user_attrs=attrs)

    exact, probe, searched = trial(0, 0.162, exact=True), trial(1, 0.146, probe="awqimatrix"), trial(5, 0.133)
    baseline = (0.150, 0.170, 0.140, 0.160, 0.155, 0.165, 0.145, 0.163)  # the probe, held back (the best baseline)
    worse = tuple(v + 0.007 for v in baseline)
    steady = tuple(v - 0.002 for v in baseline)  # 1.3% better on every window
    noisy = tuple(v - 0.002 + (0.006 if i % 2 else -0.006) for i, v in enumerate(baseline))  # the same mean gain, window to window noise 3x larger
    assert held_back_gain(baseline, steady)[0] == pytest.approx(held_back_gain(baseline, noisy)[0]) == pytest.approx(0.002)
    assert held_back_gain(baseline, steady)[1] < 1e-9 < held_back_gain(baseline, noisy)[1]
    assert kept_plan([(worse, exact), (baseline, probe), (steady, searched)]) is searched
    assert kept_plan([(worse, exact), (baseline, probe), (noisy, searched)]) is probe
    assert kept_plan([(worse, exact), (baseline, probe), (baseline, searched)]) is probe  # a tie is no gain
    # the best baseline held back, not held in: the exact plan here
    assert kept_plan([(tuple(v - 0.01 for v in baseline), exact), (baseline, probe), (steady, searched)]) is exact
    assert kept_plan([((0.160,), exact), ((0.156,), probe), ((0.100,), searched)]) is probe  # one window tells no noise from gain