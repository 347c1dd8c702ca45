"""Distributed refinement: two ``bitplan plan`` workers share one Optuna study in a journal file,
both add trials (generations of the measured search), and both write the plan a single worker
keeps given the study's trials."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
import pytest

from bitplan.cli import main
from bitplan.models.source import open_model
from bitplan.planner.refine import origin

PLAN = ["--methods", "rtn", "--bits", "2,4,8", "--groups", "64", "--engine", "transformers", "--samples", "2", "--seq-len", "32"]
TRIALS = 6


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.slow  # three processes import torch and transformers: ~40 s on 2 idle cores
def test_two_workers_on_one_journal_study_keep_the_same_plan(tiny_llama_folder, cache, tmp_path):
    assert main(["profile", str(tiny_llama_folder), *PLAN]) == 0  # the workers share the cached table
    journal = tmp_path / "refine.journal"
    args = [str(tiny_llama_folder), *PLAN, "--budget", "7.35MB", "--context", "64", "--trials", str(TRIALS), "--study-storage", str(journal)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    code = "import sys; from bitplan.cli import main; sys.exit(main(sys.argv[1:]))"
    workers = [subprocess.Popen([sys.executable, "-c", code, "plan", *args, "--out", str(tmp_path / f"worker{n}.json")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for n in (1, 2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    [name] = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) >= TRIALS
    assert len({t.user_attrs["worker"] for t in trials}) == 2, "both workers ran trials"
    assert sum(bool(t.user_attrs.get("exact")) for t in trials) >= 1

    plans = [(tmp_path / f"worker{n}.json").read_text() for n in (1, 2)]
    assert plans[0] == plans[1]
    # a single worker given the same trials (the study is full, so it runs none) keeps the same plan
    assert main(["plan", *args, "--out", str(tmp_path / "single.json")]) == 0
    assert (tmp_path / "single.json").read_text() == plans[0]
    written = json.loads(plans[0])
    candidates = written["provenance"]["candidates"]
    layers = [layer.name for layer in open_model(tiny_llama_folder).spec.layers]  # the table's rows
    # the kept plan is one of the study's trials, the one confirmation chose on the held-back windows
    kept = [t for t in trials if origin(t) == written["search"]["refine_kept"]
            and written["assignments"] == {name: candidates[column] for name, column in zip(layers, t.user_attrs["plan"])}]
    assert kept
    # held-in KLs are reported on the anchor windows, where the exact plan (trial 0) was measured
    exact = min((t for t in trials if t.user_attrs.get("exact")), key=lambda t: t.number)
    assert written["predicted"]["exact_calibration_kl"] == exact.user_attrs["kl"]
    if origin(kept[0]) != "search":
        assert written["predicted"]["calibration_kl"] == kept[0].user_attrs["kl"]
    assert written["search"]["refine_trials"] == len(trials)
    assert written["search"]["refine_candidates"] == sum(t.user_attrs["candidates"] for t in trials)
    assert optuna.get_all_study_names(storage) == [name]  # the single worker joined the same study
