"""Per-slice sensitivity and weighted calibration text: each slice's score is measured on its own
windows, the table's score is their weighted mean, and text weights set the slices' window shares."""

from __future__ import annotations

import json

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.methods.scheme import DENSE, Scheme
from bitplan.models.source import open_model
from bitplan.profiles.calibration import CalibrationSettings, calibration_slices
from bitplan.profiles.sensitivity import sensitivity_table
from bitplan.profiles.tables import SensitivityTable
from bitplan.profiles.text import TextSlice, parse_text_arg, slice_windows, user_slices, window_quotas

SCHEMES = [Scheme.parse("rtn-w4g32s"), Scheme.parse("rtn-w2gcs"), DENSE]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    rows = [{"slice": "code", "text": f"def f{i}(x):\n    return x * {i} + sum(range({i}))\n" * 8} for i in range(40)]
    rows += [{"slice": "prose", "text": f"The river number {i} ran quietly past the old mill in the valley. " * 8} for i in range(40)]
    (folder / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "chat.txt").write_text(" ".join(f"Hello, how are you today, friend {i}? I am fine, thanks." for i in range(400)))
    return folder


def test_per_slice_scores_are_present_and_their_weighted_mean_is_the_score(tiny_model, texts, tmp_path, monkeypatch):
    monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path))
    table = sensitivity_table(open_model(tiny_model), SCHEMES, CalibrationSettings((texts / "mixed.jsonl",), 4, 32))
    assert table.slices == ["code", "prose"] and table.slice_scores.shape == (2, *table.scores.shape)
    assert table.slice_weights == [0.5, 0.5]
    mean = sum(w * table.slice_scores[s] for s, w in enumerate(table.slice_weights))
    assert torch.allclose(mean, table.scores, rtol=1e-12, atol=0)
    quantized = table.scores[:, :2]
    assert (quantized > 0).all() and not torch.equal(table.slice_scores[0], table.slice_scores[1])
    path = tmp_path / "table.safetensors"
    table.save(path)
    again = SensitivityTable.load(path)
    assert again.slices == table.slices and torch.equal(again.slice_scores, table.slice_scores)
    again.save(tmp_path / "again.safetensors")
    assert path.read_bytes() == (tmp_path / "again.safetensors").read_bytes()
    narrowed = table.subset(["rtn-w2gcs"])
    assert torch.equal(narrowed.slice_scores[:, :, 0], table.slice_scores[:, :, 1])


def test_text_weights_change_window_shares_and_aggregate_weights(tiny_model, texts):
    even = calibration_slices(tiny_model, CalibrationSettings((texts / "mixed.jsonl", texts / "chat.txt"), 12, 32))
    weighted = calibration_slices(tiny_model, CalibrationSettings((texts / "mixed.jsonl", texts / "chat.txt"), 16, 32, (1.0, 3.0)))
    assert even.names == weighted.names == ("code", "prose", "chat")
    assert [even.labels.count(i) for i in range(3)] == [4, 4, 4]
    assert [weighted.labels.count(i) for i in range(3)] == [2, 2, 12]  # mixed.jsonl's 1 split between code and prose
    assert weighted.weights == pytest.approx((0.125, 0.125, 0.75))
    assert weighted.labels[:4].count(2) >= 2  # shares hold along the sequence


def test_window_quotas_give_a_short_slice_s_share_to_the_others():
    assert window_quotas([3, 1], [100, 100], 16) == [12, 4]
    assert window_quotas([3, 1], [5, 100], 16) == [5, 11]
    assert sum(window_quotas([1, 2, 5], [7, 3, 100], 50)) == 50


def test_a_slice_given_no_window_is_left_out():
    class Words:  # one token per word
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(word) for word in text.split()]}

    windows = slice_windows(Words(), [TextSlice("a", "x " * 100, 1.0), TextSlice("b", "y " * 100, 0.001)], 10, 4)
    assert windows.names == ("a",) and windows.weights == (1.0,)


def test_text_argument_weights():
    assert parse_text_arg("code.jsonl:3") == (parse_text_arg("code.jsonl")[0], 3.0)
    assert parse_text_arg("data:set/chat.jsonl") == (parse_text_arg("data:set/chat.jsonl")[0], 1.0)
    assert str(parse_text_arg("data:set/chat.jsonl:0.5")[0]) == "data:set/chat.jsonl"
    for bad in ("code.jsonl:0", "code.jsonl:-2", "code.jsonl:1.5.2", "code.jsonl:", "code.jsonl:inf"):
        with pytest.raises(BitplanError, match="malformed weight"):
            parse_text_arg(bad)


def test_a_file_weight_splits_among_its_slices(texts):
    slices = {s.name: s.weight for s in user_slices([texts / "mixed.jsonl", texts / "chat.txt"], (2.0, 1.0))}
    assert {s.weight for s in user_slices([texts / "mixed.jsonl", texts / "chat.txt"], (2.0, 2.0))} == {1.0}
    assert slices == {"code": 1.0, "prose": 1.0, "chat": 1.0}
