"""Slice limits and text weights on the command line: bad input is one line, exit 2, before any
profile; plan.json keeps the limits and the per-slice predictions, and older plans still load."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from sample_plans import sample_plan

from bitplan.cli import main
from bitplan.planner.limits import parse_slice_limits
from bitplan.planner.plan import SearchRecord, load_plan


def one_line_error(capsys, *argv) -> str:
    code = main(list(argv))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps({"slice": s, "text": "word " * 2000}) for s in ("code", "chat")) + "\n")
    return path


CASES = {
    "malformed limit": (["--max-slice-kl", "code=abc"], "malformed limit 'code=abc' in --max-slice-kl"),
    "limit without a slice": (["--max-slice-regression", "=1.2"], "malformed limit '=1.2' in --max-slice-regression"),
    "negative limit": (["--max-slice-kl", "code=-0.1"], "malformed limit"),
    "slice limited twice": (["--max-slice-kl", "code=0.1,code=0.2"], "limited twice"),
    "unknown slice of the built-in text": (["--max-slice-kl", "chat=0.1"], "limit for slice 'chat', but the text has only the slices code, prose"),
    "malformed text weight": (["--text", "{jsonl}:0"], "malformed weight '0' in --text"),
    "text weight not a number": (["--text", "{jsonl}:1.5.3"], "malformed weight '1.5.3'"),
    "unknown slice of the user's text": (["--text", "{jsonl}:2", "--max-slice-kl", "prose=0.1"], "the text has only the slices chat, code"),
}


@pytest.mark.parametrize("extra, expected", CASES.values(), ids=CASES.keys())
def test_bad_slice_input_is_one_line_exit_2(capsys, tmp_path, jsonl, extra, expected):
    argv = ["plan", "smollm2-135m", "--budget", "1GB", "--engine", "vllm", "--out", str(tmp_path / "plan.json")]
    line = one_line_error(capsys, *argv, *[a.format(jsonl=jsonl) for a in extra])
    assert expected in line
    assert not (tmp_path / "plan.json").exists()


def test_a_path_with_a_colon_is_a_path(capsys, tmp_path):
    odd = tmp_path / "data:set"
    odd.mkdir()
    line = one_line_error(capsys, "plan", "smollm2-135m", "--budget", "1GB", "--text", f"{odd}/missing.txt")
    assert f"{odd}/missing.txt does not exist" in line


def test_plan_file_roundtrip_with_limits(tmp_path):
    plan = sample_plan({"model.layers.0.self_attn.q_proj": "rtn-w4g64s"})
    search = SearchRecord(**{**plan.search.to_dict(), "slice_bounds": {"code": 0.06}, "uniform_scheme": "rtn-w4g64s"})
    limited = replace(plan, search=search, slice_limits=parse_slice_limits("code=0.06", "prose=1.2"),
                      predicted_slice_kl={"prose": 0.2, "code": 0.05})
    limited.save(tmp_path / "plan.json")
    loaded = load_plan(tmp_path / "plan.json")
    assert loaded == limited and loaded.slice_limits.max_regression == {"prose": 1.2}
    assert json.loads((tmp_path / "plan.json").read_text())["slice_limits"] == {"max_kl": {"code": 0.06}, "max_regression": {"prose": 1.2}}
    plan.save(tmp_path / "old.json")  # no limits: no new keys, as plans were written before
    assert "slice_limits" not in json.loads((tmp_path / "old.json").read_text())
    assert load_plan(tmp_path / "old.json").slice_limits is None


def test_a_limited_plan_end_to_end_meets_its_bound_and_says_so(capsys, tmp_path, tiny_model, monkeypatch):
    """The tiny model, two slices: the plain plan's predicted KL on code, then a plan held below it."""
    from bitplan.api import CalibrationSettings, Candidates, plan
    from bitplan.planner.baselines import assignment_bytes, uniform_assignment
    from bitplan.planner.deployment import Deployment, memory_breakdown
    from bitplan.methods.scheme import Scheme
    from bitplan.models.spec import spec_from_folder

    monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "mixed.jsonl"
    rows = [{"slice": "code", "text": f"def f{i}(x):\n    return [x * {i} for x in range({i})]\n" * 6} for i in range(30)]
    rows += [{"slice": "prose", "text": f"The {i}th traveller walked slowly along the quiet road home. " * 6} for i in range(30)]
    text.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = spec_from_folder(tiny_model)
    middle = sum(assignment_bytes(spec, uniform_assignment(spec, Scheme.parse(s))) for s in ("rtn-w2g32s", "rtn-w8g32s")) // 2
    budget = memory_breakdown(spec, middle, Deployment(budget_bytes=0, context=64)).total_bytes
    candidates = Candidates(("rtn",), (2, 4, 8), (32,), (True,))
    calibration = CalibrationSettings((text,), 4, 32)
    plain = plan(str(tiny_model), budget, context=64, candidates=candidates, calibration=calibration, trials=0, engine="bitplan")
    bound = 0.8 * plain.predicted_slice_kl["code"]  # random weights: slices move together, so this needs more bytes

    def argv(total: int) -> list[str]:
        return ["plan", str(tiny_model), "--budget", f"{total}B", "--context", "64", "--methods", "rtn", "--bits", "2,4,8", "--groups", "32",
                "--symmetric-only", "--samples", "4", "--seq-len", "32", "--text", str(text), "--trials", "2", "--engine", "bitplan",
                "--max-slice-kl", f"code={bound:.6g}", "--out", str(tmp_path / "plan.json")]

    assert main(argv(budget)) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "slice 'code' cannot be held" in line
    smallest = int(re.search(r"\((\d+) bytes", line).group(1))
    assert smallest > budget and main(argv(smallest - 1)) == 2
    capsys.readouterr()
    assert main(argv(smallest)) == 0
    out = capsys.readouterr().out
    assert "predicted KL per calibration slice" in out and "code" in out and "NO" not in out
    limited = load_plan(tmp_path / "plan.json")
    assert limited.slice_limits.max_kl == {"code": float(f"{bound:.6g}")}
    assert limited.predicted_slice_kl["code"] <= float(f"{bound:.6g}") * (1 + 1e-9)
    assert limited.memory.total_bytes <= smallest
