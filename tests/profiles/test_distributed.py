"""Distributed profiling: two gloo workers on this machine write the table one worker writes, byte for byte."""

from __future__ import annotations

import os

import pytest
import torch

from bitplan.methods.scheme import Scheme
from bitplan.models.source import open_model
from bitplan.profiles.calibration import CalibrationSettings
from bitplan.profiles.distributed import world
from bitplan.profiles.sensitivity import sensitivity_table

SCHEMES = [Scheme.parse(name) for name in ("rtn-w4g64s", "nf4-w4g64s", "rtn-w8gcs", "smoothquant-w8gcsa8", "none")]


@pytest.mark.slow  # two spawned processes import torch and transformers
def test_two_gloo_workers_write_the_one_worker_table(tiny_llama_folder, tmp_path, monkeypatch):
    source = open_model(tiny_llama_folder)
    calibration = CalibrationSettings((), 2, 32)
    tables = {}
    threads = torch.get_num_threads()
    try:
        for workers in (1, 2):
            monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path / f"workers-{workers}"))
            # One worker at the threads each of two workers gets: CPU reductions split by thread count.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
            tables[workers] = sensitivity_table(source, SCHEMES, calibration, workers=workers)
    finally:
        torch.set_num_threads(threads)
    assert world() == (0, 1)  # the parent never joined a group
    [one] = (tmp_path / "workers-1" / "profiles").glob("*.safetensors")
    [two] = (tmp_path / "workers-2" / "profiles").glob("*.safetensors")
    assert one.name == two.name and one.read_bytes() == two.read_bytes()
    assert torch.equal(tables[1].scores.nan_to_num(-1), tables[2].scores.nan_to_num(-1))
    assert (tables[2].bytes >= 0).all() and (tables[2].scores[:, :-1] > 0).all()  # every rank's columns arrived
