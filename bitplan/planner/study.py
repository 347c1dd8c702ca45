"""Where refinement's Optuna study lives: in memory (one process), or in shared storage so that
several workers (processes or machines) add trials to one study.

``storage`` is an RDB URL (``sqlite:///refine.db``, ``postgresql://...``; Optuna's RDB storage)
or a file path (Optuna's journal file storage, for a shared file system). The study is named by
the refinement problem (:func:`study_name`), so workers on the same problem meet in one study and
a different problem never reads its trials. Every worker goes on from the study's latest finished
generation and ends with the same choice over the study's finished trials (``planner.refine``):
the plan one worker would keep given the same trials.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np
import optuna
import torch

from bitplan.profiles.tables import SensitivityTable
from bitplan.profiles.text import tokens_hash

log = logging.getLogger(__name__)
RDB_SCHEMES = ("sqlite:", "postgresql:", "postgresql+", "mysql:", "mysql+")
WAIT_FOR_OTHERS_S = 3600  # how long a worker waits for other workers' running trials before it decides
SEARCH = "measured-search-2"  # the search's trial format (``planner.refine``): part of the study's name
STOP_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)  # a queued trial (the exact plan) is yet to run


def study_name(table: SensitivityTable, weight_budget_bytes: int, tie_fused: bool, windows: torch.Tensor, seed: int,
               extra_cost: np.ndarray | None, slice_bounds: dict[str, float] | None = None) -> str:
    """``refine-<hash>`` of everything a trial's value depends on: the table (layers, schemes,
    scores, bytes, provenance), the budget, the ties, the measured tokens, the seed, the extra cost,
    the slice bounds (with the per-slice scores)."""
    digest = hashlib.sha256()
    problem = [SEARCH, table.layers, table.schemes, table.provenance, weight_budget_bytes, tie_fused, tokens_hash(windows), seed]
    if slice_bounds:
        problem.append(sorted(slice_bounds.items()))
        digest.update(table.slice_scores.numpy().tobytes())
    digest.update(json.dumps(problem, sort_keys=True).encode())
    digest.update(table.scores.numpy().tobytes())
    digest.update(table.bytes.numpy().tobytes())
    if extra_cost is not None:
        digest.update(np.ascontiguousarray(extra_cost, dtype=np.float64).tobytes())
    return f"refine-{digest.hexdigest()[:24]}"


def open_study(storage: str | None, name: str, seed: int) -> optuna.Study:
    """A new in-memory study (``storage`` None), or the shared one named ``name`` in ``storage``,
    created by whichever worker comes first. The search draws its own candidates (``planner.evolve``,
    seeded by the seed and the trial number); the sampler, seeded likewise, proposes nothing."""
    if storage is None:
        return optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    if storage.startswith(RDB_SCHEMES):
        backend = optuna.storages.RDBStorage(storage)
    else:
        from optuna.storages.journal import JournalFileBackend

        backend = optuna.storages.JournalStorage(JournalFileBackend(storage))
    return optuna.create_study(storage=backend, study_name=name, direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed),
                               load_if_exists=True)


def counted_trials(study: optuna.Study) -> int:
    """Trials that count towards the study's total: finished or running (the queued exact plan still runs)."""
    return len(study.get_trials(deepcopy=False, states=STOP_STATES))


def finished_trials(study: optuna.Study, wait_s: float = WAIT_FOR_OTHERS_S) -> list[optuna.trial.FrozenTrial]:
    """The study's finished trials once no other worker is still running one (or ``wait_s`` passed)."""
    deadline = time.monotonic() + wait_s
    while study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) and time.monotonic() < deadline:
        time.sleep(0.2)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if running:
        log.warning("%d trials of study %s are still running after %.0f s (a worker died?): deciding without them",
                    len(running), study.study_name, wait_s)
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
