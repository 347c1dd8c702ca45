"""Bad input: one clear line naming the problem and the fix, exit status 2, nothing written."""

import json

import pytest

from bitplan.planner.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


@pytest.fixture
def folders(tmp_path):
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)))
    return {"no_config": no_config, "gpt2": gpt2, "pickled": pickled, "empty": empty, "binary": binary, "root": tmp_path}


CASES = {
    "missing folder": (["plan", "{root}/nowhere", "--budget", "1GB"], "does not exist"),
    "no config.json": (["plan", "{no_config}", "--budget", "1GB"], "has no config.json"),
    "unsupported architecture": (["plan", "{gpt2}", "--budget", "1GB"], "unsupported architecture 'gpt2'"),
    "pickle only": (["plan", "{pickled}", "--budget", "1GB"], "never loads"),
    "malformed budget": (["plan", "smollm2-135m", "--budget", "150 megabytes"], "e.g. 150MB"),
    "impossible budget": (["plan", "smollm2-135m", "--budget", "1MB"], "smallest feasible deployment"),
    "unknown target": (["plan", "smollm2-135m", "--target", "h100"], "did you mean"),
    "no budget at all": (["plan", "smollm2-135m"], "give a memory budget"),
    "empty text": (["plan", "smollm2-135m", "--budget", "1GB", "--text", "{empty}"], "is empty"),
    "binary text": (["plan", "smollm2-135m", "--budget", "1GB", "--text", "{binary}"], "binary"),
    "missing plan": (["emit", "{root}/no-plan.json", "--out", "{root}/ckpt"], "does not exist"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_one_line_and_status_2(case, folders, capsys, private_cache):
    argv, message = CASES[case]
    out = folders["root"] / "out" / "plan.json"
    argv = [a.format(**folders) for a in argv]
    if argv[0] == "plan":
        argv += ["--out", str(out)]
    code, lines = run_cli(capsys, *argv)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("bitplan: error:") and message in lines[0], lines
    assert not out.exists() and not (folders["root"] / "ckpt").exists()


def test_tampered_plan_is_refused_and_nothing_is_emitted(tmp_path, capsys):
    from bitplan.planner.plan import Plan

    path = tmp_path / "plan.json"
    Plan(model={"source": "smollm2-135m", "hash": "ab"}, deployment={}, target=None,
         assignments={"model.layers.0.self_attn.q_proj": "rtn-w4g64s"}, memory={}, predicted={}, search={},
         provenance={}).save(path)
    path.write_text(path.read_text().replace("rtn-w4g64s", "rtn-w8g64s"))
    code, lines = run_cli(capsys, "emit", str(path), "--out", str(tmp_path / "ckpt"))
    assert code == 2 and "modified after bitplan wrote it" in lines[0]
    assert not (tmp_path / "ckpt").exists()
