"""Bad input: one clear line naming the problem and the fix, exit status 2, nothing written."""

import json

import pytest

from bitplan.cli import main


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
    "unknown engine": (["plan", "smollm2-135m", "--budget", "1GB", "--engine", "tensorrt"], "unknown engine 'tensorrt'"),
    "engine cannot run on the target": (["plan", "smollm2-135m", "--engine", "vllm", "--target", "mi300x"],
                                        "engine vllm has no rules in bitplan for mi300x"),
    "engine on a platform of another": (["plan", "smollm2-135m", "--budget", "1GB", "--engine", "transformers", "--target", "cpu-avx2"],
                                        "is a vLLM platform"),
    "tensor parallel across 9 heads": (["plan", "smollm2-135m", "--budget", "1GB", "--tp", "2"], "does not divide the model's 9 attention heads"),
    "tensor parallel on one-device engine": (["plan", "smollm2-135m", "--budget", "1GB", "--tp", "3", "--engine", "transformers"],
                                             "runs on one device"),
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
    from sample_plans import sample_plan

    path = tmp_path / "plan.json"
    sample_plan({"model.layers.0.self_attn.q_proj": "rtn-w4g64s"}).save(path)
    path.write_text(path.read_text().replace("rtn-w4g64s", "rtn-w8g64s"))
    code, lines = run_cli(capsys, "emit", str(path), "--out", str(tmp_path / "ckpt"))
    assert code == 2 and "modified after bitplan wrote it" in lines[0]
    assert not (tmp_path / "ckpt").exists()


def test_a_hand_made_plan_that_breaks_its_engines_rules_is_refused(tmp_path, capsys, private_cache, smollm_folder):
    """A plan written through the API (so its integrity hash is valid) that splits a fused group for vLLM."""
    from bitplan.methods.scheme import Scheme
    from bitplan.models.source import folder_hash
    from bitplan.models.spec import spec_from_folder

    spec = spec_from_folder(smollm_folder)
    chosen = {layer.name: "rtn-w4g64s" for layer in spec.layers}
    chosen["model.layers.7.self_attn.v_proj"] = "rtn-w8g64s"
    weight_bytes = sum(Scheme.parse(chosen[l.name]).weight_bytes(l.out_features, l.in_features, spec.dtype_bytes) for l in spec.layers)
    path = tmp_path / "plan.json"
    from sample_plans import sample_plan

    sample_plan(chosen, folder_hash(smollm_folder), weight_bytes, "vllm", "cuda-sm80").save(path)
    code, lines = run_cli(capsys, "emit", str(path), "--out", str(tmp_path / "ckpt"))
    assert code == 2 and len(lines) == 1, lines
    assert "breaks the rules of vllm@cuda-sm80: block 7 qkv: vllm runs qkv as one fused Linear" in lines[0]
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.glob(".ckpt*"))


EVAL_CASES = {
    "malformed slice limit": (["--max-slice-kl", "code"], "malformed limit 'code' in --max-slice-kl"),
    "zero slice limit": (["--max-slice-regression", "code=0", "--compare", "{root}/old.json"], "malformed limit 'code=0'"),
    "slice limited twice": (["--max-slice-kl", "code=0.1,code=0.2"], "slice 'code' is limited twice"),
    "regression limit without a baseline": (["--max-slice-regression", "code=1.2"], "pass --compare OLD.json"),
    "baseline scorecard missing": (["--compare", "{root}/nowhere.json"], "scorecard {root}/nowhere.json does not exist"),
    "baseline scorecard not JSON": (["--compare", "{binary}"], "is not valid JSON"),
    "baseline scorecard empty": (["--compare", "{empty}"], "is not valid JSON"),
    "scorecard named .png": (["--scorecard", "{root}/out/score.png"], "name the JSON file"),
}


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_bad_eval_input_gets_one_line_and_status_2_before_anything_loads(case, folders, capsys):
    """Refused before the checkpoint is even read (here it does not exist): one line, exit 2, no scorecard."""
    argv, message = EVAL_CASES[case]
    argv = ["eval", "{root}/ckpt", *argv]
    if "--scorecard" not in argv:
        argv += ["--scorecard", "{root}/out/score.json"]
    code, lines = run_cli(capsys, *[a.format(**folders) for a in argv])
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("bitplan: error:") and message.format(**folders) in lines[0], lines
    assert not (folders["root"] / "out").exists()
