"""The profile cache is keyed by the code and settings that made its scores: a change to a
method's settings is never served old scores, and an unchanged one is served from the cache."""

from __future__ import annotations

import pytest
import torch

from bitplan.methods import awq, gptq, nf4, smoothquant
from bitplan.methods.scheme import DENSE, Scheme
from bitplan.models.source import open_model
from bitplan.profiles import sensitivity
from bitplan.profiles.calibration import CalibrationSettings
from bitplan.profiles.sensitivity import sensitivity_table
from bitplan.profiles.tables import table_key

SCHEMES = [Scheme.parse("gptq-w4g32s"), DENSE]
SETTINGS = [(gptq, "DAMP", 0.1), (gptq, "SHRINK", 0.0), (gptq, "BLOCK", 32), (gptq, "ACT_ORDER", True), (awq, "N_GRID", 10), (awq, "MAX_SHRINK", 0.25),
            (smoothquant, "ALPHA_GRID", (0.5,)), (nf4, "NF4_OFFSET", 0.99)]


@pytest.mark.parametrize("module, name, value", SETTINGS, ids=[f"{m.__name__.split('.')[-1]}.{n}" for m, n, _ in SETTINGS])
def test_each_method_setting_is_part_of_the_key(module, name, value, monkeypatch):
    before = table_key("model", "tokens", SCHEMES, 0)
    monkeypatch.setattr(module, name, value)
    assert table_key("model", "tokens", SCHEMES, 0) != before


def test_a_method_version_is_part_of_the_key(monkeypatch):
    from bitplan.methods import registry

    before = table_key("model", "tokens", SCHEMES, 0)
    bumped = {**registry.implementations(), "rtn": {"version": registry.implementations()["rtn"]["version"] + 1}}
    monkeypatch.setattr(registry, "implementations", lambda: bumped)
    monkeypatch.setattr("bitplan.profiles.tables.implementations", lambda: bumped)
    assert table_key("model", "tokens", SCHEMES, 0) != before


def test_changing_gptq_damping_re_profiles_instead_of_serving_old_scores(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path))
    source, calibration = open_model(tiny_model), CalibrationSettings(samples=2, seq_len=32)
    first = sensitivity_table(source, SCHEMES, calibration)
    measured = []
    real = sensitivity.profile_sensitivity
    monkeypatch.setattr(sensitivity, "profile_sensitivity", lambda *a, **k: measured.append(1) or real(*a, **k))
    assert torch.equal(sensitivity_table(source, SCHEMES, calibration).scores, first.scores) and measured == []  # served
    monkeypatch.setattr(gptq, "DAMP", 10.0)
    changed = sensitivity_table(source, SCHEMES, calibration)
    assert measured == [1] and not torch.equal(changed.scores, first.scores)
    assert len(list((tmp_path / "profiles").glob("*.safetensors"))) == 2
