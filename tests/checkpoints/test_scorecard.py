"""`bitplan eval`'s scorecard, gate and comparison, on two checkpoints of the tiny random model.

Checkpoint "a" is mostly 8-bit, "b" all 4-bit (so b's KL is far above a's); the evaluation text is
two small slices of Python's documentation, 2 windows of 32 tokens each: every eval takes seconds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from bitplan.checkpoints.evaluate import prepare_evaluation
from bitplan.checkpoints.scorecard import (SCHEMA_VERSION, Scorecard, SliceScore, Verdict, check_same_text, load_scorecard,
                                           write_scorecard)
from bitplan.cli import main
from bitplan.errors import BitplanError
from bitplan.planner.limits import SliceLimits
from bitplan.profiles.text import user_slices

BUDGETS = {"a": "7.68MB", "b": "7.645MB"}  # the tiny model's Linears mostly at 8 bits, all at 4 bits
EVAL = ["--samples", "2", "--seq-len", "32"]
PLAN = ["--methods", "rtn", "--bits", "4,8", "--groups", "32", "--samples", "2", "--seq-len", "32", "--trials", "0", "--engine", "bitplan"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_text(path: Path, first_topic: int) -> Path:
    from pydoc_data.topics import topics

    keys = sorted(topics)[first_topic:]
    rows = [{"slice": "prose", "text": topics[k][:3000]} for k in keys[:6]] + [{"slice": "code", "text": topics[k][:3000]} for k in keys[6:12]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model, private_cache):
    root = tmp_path_factory.mktemp("scorecard")
    for name, budget in BUDGETS.items():
        assert main(["plan", str(tiny_model), *PLAN, "--budget", budget, "--out", str(root / f"plan-{name}.json")]) == 0
        assert main(["emit", str(root / f"plan-{name}.json"), "--out", str(root / f"ckpt-{name}")]) == 0
    world = {"root": root, "a": root / "ckpt-a", "b": root / "ckpt-b", "text": write_text(root / "text.jsonl", 0),
             "other_text": write_text(root / "other.jsonl", 20)}
    assert main(["eval", str(world["a"]), "--text", str(world["text"]), *EVAL, "--scorecard", str(root / "a.json")]) == 0
    world["a.json"] = root / "a.json"
    return world


def run_eval(capsys, world, checkpoint="b", *extra):
    code = main(["eval", str(world[checkpoint]), "--text", str(world["text"]), *EVAL, *map(str, extra)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def sample_card(**changes) -> Scorecard:
    slices = {"code": SliceScore(0.02, 14.5, 14.1, 256, 2, "t" * 64, "k" * 64), "prose": SliceScore(0.01, 20.0, 19.5, 256, 2, "u" * 64, "j" * 64)}
    card = Scorecard("ckpt", "smollm2-135m", "p" * 64, "0.1.0", 2, 128, slices, SliceLimits({"code": 0.05}),
                     (Verdict("code", "max_kl", 0.05, 0.05, 0.02),))
    return replace(card, **changes)


def test_scorecard_roundtrips_with_the_same_bytes(tmp_path):
    card = sample_card()
    assert Scorecard.from_dict(json.loads(card.to_json())) == card
    assert Scorecard.from_dict(json.loads(card.to_json())).to_json() == card.to_json()
    write_scorecard(card, tmp_path / "score.json")
    assert load_scorecard(tmp_path / "score.json") == card
    assert (tmp_path / "score.json").read_text() == card.to_json()
    data = json.loads(card.to_json())
    assert data["schema_version"] == SCHEMA_VERSION and data["passed"] is True and data["verdicts"][0]["margin_kl"] == pytest.approx(0.03)


def test_the_same_evaluation_writes_the_same_bytes(world, tmp_path, capsys):
    assert run_eval(capsys, world, "a", "--scorecard", tmp_path / "again.json")[0] == 0
    assert (tmp_path / "again.json").read_bytes() == world["a.json"].read_bytes()
    assert (tmp_path / "again.png").read_bytes() == world["a.json"].with_suffix(".png").read_bytes()


def test_hashes_follow_the_text_and_the_windows(world):
    same = prepare_evaluation(world["a"], [world["text"]], 2, 32)
    other = prepare_evaluation(world["a"], [world["other_text"]], 2, 32)
    fewer = prepare_evaluation(world["a"], [world["text"]], 1, 32)
    card = load_scorecard(world["a.json"])
    assert {n: (t.text_sha256, t.tokens_sha256) for n, t in same.texts.items()} == {n: (s.text_sha256, s.tokens_sha256)
                                                                                  for n, s in card.slices.items()}
    texts = {piece.name: piece.text for piece in user_slices([world["text"]])}
    assert card.slices["code"].text_sha256 == hashlib.sha256(texts["code"].encode()).hexdigest()
    for name in ("code", "prose"):
        assert other.texts[name].text_sha256 != same.texts[name].text_sha256
        assert other.texts[name].tokens_sha256 != same.texts[name].tokens_sha256
        assert fewer.texts[name].text_sha256 == same.texts[name].text_sha256
        assert fewer.texts[name].tokens_sha256 != same.texts[name].tokens_sha256
    hashes = {n: (t.text_sha256, t.tokens_sha256) for n, t in fewer.texts.items()}
    with pytest.raises(BitplanError, match="same text but other windows"):
        check_same_text(hashes, 1, 32, card, world["a.json"], allow_different=False)


def test_a_loose_limit_passes_and_writes_a_png(world, tmp_path, capsys):
    code, out, _ = run_eval(capsys, world, "b", "--scorecard", tmp_path / "score.json", "--max-slice-kl", "code=10,prose=10")
    assert code == 0
    card = load_scorecard(tmp_path / "score.json")
    assert card.passed and {v.slice for v in card.verdicts} == {"code", "prose"} and card.baseline is None
    assert "pass code: KL" in out
    png = (tmp_path / "score.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "score.png").shape[:2] == (300, 600)  # 6 x 3 in at 100 dpi


def test_a_tight_limit_fails_with_status_1_and_still_writes_the_verdict(world, tmp_path, capsys):
    code, out, err = run_eval(capsys, world, "b", "--scorecard", tmp_path / "score.json", "--max-slice-kl", "code=1e-9,prose=10")
    assert code == 1
    assert "FAIL code: KL" in out and "vs max_kl 1e-09" in out and "pass prose" in out
    assert "gate failed: code" in err[-1]
    card = load_scorecard(tmp_path / "score.json")
    failed = [v for v in card.verdicts if not v.passed]
    assert not card.passed and [v.slice for v in failed] == ["code"] and failed[0].margin_kl < 0
    assert json.loads((tmp_path / "score.json").read_text())["passed"] is False
    assert (tmp_path / "score.png").read_bytes().startswith(PNG_MAGIC)


def test_compare_prints_the_difference_and_gates_on_regression(world, tmp_path, capsys):
    code, out, _ = run_eval(capsys, world, "b", "--compare", world["a.json"], "--scorecard", tmp_path / "b.json",
                            "--max-slice-regression", "code=1.5")
    old, new = load_scorecard(world["a.json"]), load_scorecard(tmp_path / "b.json")
    assert code == 1  # 4 bits everywhere is far more than 1.5x the 8-bit KL
    assert "old KL" in out and "ratio" in out and "vs max_regression 1.5 x" in out
    verdict = new.verdicts[0]
    assert verdict.kind == "max_regression" and verdict.baseline_kl == old.slices["code"].kl
    assert verdict.limit_kl == pytest.approx(1.5 * old.slices["code"].kl) and not verdict.passed
    assert new.baseline == {"checkpoint": old.checkpoint, "scorecard_sha256": old.content_sha256()}
    assert new.tokens_sha256 == old.tokens_sha256
    code, out, _ = run_eval(capsys, world, "b", "--compare", world["a.json"], "--max-slice-regression", "code=1e6")
    assert code == 0 and "pass code" in out


def test_compare_refuses_other_text_unless_allowed(world, tmp_path, capsys):
    argv = ["eval", str(world["b"]), "--text", str(world["other_text"]), *EVAL, "--compare", str(world["a.json"]),
            "--scorecard", str(tmp_path / "out" / "b.json")]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "scored on another evaluation set" in lines[0] and "--allow-different-text" in lines[0], lines
    assert not (tmp_path / "out").exists()
    assert main([*argv, "--allow-different-text"]) == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "old KL" in captured.out


RECORDED = SliceLimits({"code": 1e-9}, {"prose": 1.2})


def record_limits(monkeypatch) -> None:
    """Checkpoints whose plan.json records ``RECORDED`` (as the planner writes ``SliceLimits.to_dict()`` under "slice_limits")."""
    import bitplan.checkpoints.evaluate as evaluate

    prepare = evaluate.prepare_evaluation

    def prepare_with_limits(*args, **kwargs):
        prepared = prepare(*args, **kwargs)
        return replace(prepared, plan_data={**prepared.plan_data, "slice_limits": RECORDED.to_dict()})

    monkeypatch.setattr(evaluate, "prepare_evaluation", prepare_with_limits)


def test_the_plans_recorded_limits_apply_unless_overridden(world, capsys, monkeypatch):
    record_limits(monkeypatch)
    code, out, err = run_eval(capsys, world)
    assert code == 1, err
    assert "FAIL code" in out and "not checked without --compare" in " ".join(err)
    code, out, _ = run_eval(capsys, world, "b", "--max-slice-kl", "code=10")
    assert code == 0 and "pass code: KL" in out
    code, out, _ = run_eval(capsys, world, "b", "--max-slice-kl", "code=10", "--compare", world["a.json"])
    assert code == 1 and "FAIL prose: KL" in out and "max_regression 1.2 x" in out


@pytest.mark.parametrize("recorded", [[], {"max_kl": {"code": "low"}}, {"max_kl": {"code": -1.0}}, {"max_kl": [1, 2]}])
def test_malformed_recorded_limits_are_one_line(world, recorded):
    from bitplan.checkpoints.evaluate import recorded_limits

    prepared = prepare_evaluation(world["b"], [world["text"]], 1, 32)
    assert recorded_limits(prepared) == SliceLimits()
    with pytest.raises(BitplanError, match="has malformed slice_limits"):
        recorded_limits(replace(prepared, plan_data={**prepared.plan_data, "slice_limits": recorded}))


def test_limits_recorded_in_a_real_plan_file_apply(world, tmp_path, capsys):
    import shutil

    checkpoint = shutil.copytree(world["b"], tmp_path / "ckpt")
    data = json.loads((checkpoint / "plan.json").read_text())
    data.pop("integrity")
    data["slice_limits"] = RECORDED.to_dict()
    data["integrity"] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    (checkpoint / "plan.json").write_text(json.dumps(data))
    code, out, err = run_eval(capsys, {**world, "ckpt": checkpoint}, "ckpt")
    assert code == 1 and "FAIL code" in out, err


def tamper(path: Path) -> None:
    path.write_text(path.read_text().replace('"windows": 2', '"windows": 3', 1))


def recompute_integrity_with_a_wrong_verdict(path: Path) -> None:
    data = json.loads(path.read_text())
    data.pop("integrity")
    data["passed"] = "yes"
    data["integrity"] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    path.write_text(json.dumps(data))


BAD_BASELINES = {
    "not JSON": (lambda p: p.write_text("{\"schema_version\": 1, "), "is not valid JSON"),
    "a JSON array": (lambda p: p.write_text("[]"), "is not a bitplan scorecard"),
    "another schema": (lambda p: p.write_text(p.read_text().replace('"schema_version": 1', '"schema_version": 7')), "schema version 7"),
    "edited numbers": (tamper, "modified after bitplan wrote it"),
    "edited verdict, hash redone": (recompute_integrity_with_a_wrong_verdict, "is inconsistent"),
    "missing": (lambda p: p.unlink(), "does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_BASELINES))
def test_a_bad_baseline_scorecard_gets_one_line_and_status_2(case, world, tmp_path, capsys):
    damage, message = BAD_BASELINES[case]
    baseline = tmp_path / "old.json"
    baseline.write_bytes(world["a.json"].read_bytes())
    damage(baseline)
    code, _, err = run_eval(capsys, world, "b", "--compare", baseline, "--scorecard", tmp_path / "out" / "new.json")
    assert code == 2 and len(err) == 1 and err[0].startswith("bitplan: error:") and message in err[0], err
    assert not (tmp_path / "out").exists()


BAD_LIMITS = {
    "unknown slice": (["--max-slice-kl", "math=0.1"], "limit for slice 'math', but the text has only the slices code, prose"),
    "unknown slice, relative": (["--max-slice-regression", "math=2", "--compare", "{baseline}"], "limit for slice 'math'"),
    "malformed": (["--max-slice-kl", "code:0.1"], "malformed limit 'code:0.1' in --max-slice-kl"),
    "negative": (["--max-slice-kl", "code=-1"], "malformed limit 'code=-1'"),
    "regression without compare": (["--max-slice-regression", "code=1.2"], "pass --compare OLD.json"),
    "PNG named as the scorecard": (["--max-slice-kl", "code=1"], "name the JSON file"),
}


@pytest.mark.parametrize("case", sorted(BAD_LIMITS))
def test_bad_limits_get_one_line_and_status_2(case, world, tmp_path, capsys):
    argv, message = BAD_LIMITS[case]
    target = tmp_path / "out" / ("score.png" if case.startswith("PNG") else "score.json")
    code, _, err = run_eval(capsys, world, "b", *[a.format(baseline=world["a.json"]) for a in argv], "--scorecard", target)
    assert code == 2 and len(err) == 1 and err[0].startswith("bitplan: error:") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_the_api_scores_and_judges(world):
    from bitplan.api import load_scorecard as api_load_scorecard
    from bitplan.api import score

    notes = []
    baseline = api_load_scorecard(world["a.json"])
    card = score(world["b"], [world["text"]], 2, 32, SliceLimits({"prose": 10.0}, {"code": 1e6}), baseline, note=notes.append)
    assert card.passed and not notes and card.baseline["scorecard_sha256"] == baseline.content_sha256()
    assert {(v.slice, v.kind) for v in card.verdicts} == {("prose", "max_kl"), ("code", "max_regression")}
