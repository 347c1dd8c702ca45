"""Faults and bad input, as a matrix: a damaged model folder, bad text, impossible arguments,
damaged plans. Each case gets one line naming the problem and the fix, exit status 2, and leaves
every file (the model, the text, the plan, the cache, the output) exactly as it was.

Interrupted and concurrent runs, a full disk and the cache are in ``test_interrupts.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from faults_support import TINY_PLAN, snapshot
from safetensors.torch import load_file, save_file
from tiny_models import CONFIG, write_tiny_model

from bitplan.cli import main
from bitplan.cli.common import STAGES


@pytest.fixture(scope="session")
def tiny_plan(tmp_path_factory, tiny_model, private_cache):
    path = tmp_path_factory.mktemp("tiny-plan") / "plan.json"
    assert main(["plan", str(tiny_model), *TINY_PLAN, "--out", str(path)]) == 0
    return path


# --- damage done to a copy of the tiny model folder (``root / "model"``) or to files beside it ---

def truncate(fraction: float):
    def damage(root: Path) -> None:
        path = root / "model" / "model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])
    return damage


def replace_weights(data: bytes):
    return lambda root: (root / "model" / "model.safetensors").write_bytes(data)


def edit_config(**changes):
    def damage(root: Path) -> None:
        path = root / "model" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return damage


def write_config(text: str):
    return lambda root: (root / "model" / "config.json").write_text(text)


def poison(name: str, value: float):
    def damage(root: Path) -> None:
        path = root / "model" / "model.safetensors"
        state = load_file(path)
        state[name] = state[name].clone()
        state[name].view(-1)[7] = value
        save_file(state, path, metadata={"format": "pt"})
    return damage


def remove(filename: str):
    return lambda root: (root / "model" / filename).unlink()


def write_text(name: str, content: str | bytes):
    def damage(root: Path) -> None:
        path = root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return damage


def make_folder(name: str):
    return lambda root: (root / name).mkdir()


def nothing(root: Path) -> None:
    pass


PLAN = ["plan", "{model}", *TINY_PLAN, "--out", "{root}/out/plan.json"]
SMOLLM = ["plan", "smollm2-135m", "--budget", "1GB", "--out", "{root}/out/plan.json"]
LONG_TEXT = "Profiling needs text. " * 200
HEADER_ONLY = (20).to_bytes(8, "little") + b"this is not json at all"

# case: (damage, argv, text the one line holds)
CASES = {
    # the model folder
    "safetensors cut short (download stopped)": (truncate(0.6), PLAN, "is cut short (3865008 of 6441680 bytes; a download or copy that stopped): download or copy it again"),
    "safetensors header cut short": (truncate(0.0000008), PLAN, "is cut short or not a safetensors file (5 bytes, no complete header)"),
    "safetensors header not JSON": (replace_weights(HEADER_ONLY), PLAN, "has a corrupt safetensors header: download or copy it again"),
    "safetensors file empty": (replace_weights(b""), PLAN, "is cut short or not a safetensors file (0 bytes, no complete header)"),
    "config hidden_size disagrees with tensors": (edit_config(hidden_size=128), PLAN,
                                                  "config.json implies model.layers.0.self_attn.q_proj.weight is [64, 128] but model.safetensors holds [64, 64]"),
    "config KV heads disagree with tensors": (edit_config(num_key_value_heads=4), PLAN,
                                              "config.json implies model.layers.0.self_attn.k_proj.weight is [64, 64] but model.safetensors holds [32, 64]"),
    "config has more blocks than the tensors": (edit_config(num_hidden_layers=3), PLAN,
                                                "lacks the tensor model.layers.2.self_attn.q_proj.weight that config.json implies"),
    "config vocabulary disagrees with embedding": (edit_config(vocab_size=50000), PLAN,
                                                   "config.json implies model.embed_tokens.weight is [50000, 64] but model.safetensors holds [49152, 64]"),
    "config.json not JSON": (write_config("{'model_type': 'llama'"), PLAN, "config.json is not valid JSON"),
    "config.json a JSON list": (write_config("[1, 2]"), PLAN, "config.json holds a JSON list, not an object: restore the model's config.json"),
    "config size not a number": (edit_config(hidden_size="large"), PLAN,
                                 "config.json gives hidden_size = \"large\", which must be a whole number of at least 1: restore the model's config.json"),
    "config lacks a size": (edit_config(intermediate_size=None), PLAN, "config.json lacks the intermediate_size field: is this a complete Hugging Face config?"),
    "config zero attention heads": (edit_config(num_attention_heads=0), PLAN, "config.json gives num_attention_heads = 0, which must be a whole number of at least 1"),
    "config KV heads do not divide heads": (edit_config(num_key_value_heads=3), PLAN,
                                            "config.json gives 4 attention heads and 3 KV heads, which do not divide them"),
    "weights hold NaN": (poison("model.layers.1.self_attn.q_proj.weight", float("nan")), PLAN,
                         "model.layers.1.self_attn.q_proj.weight in {model}/model.safetensors holds NaN or Inf values: the weights are corrupt"),
    "weights hold Inf": (poison("model.layers.0.mlp.down_proj.weight", float("inf")), PLAN,
                         "model.layers.0.mlp.down_proj.weight in {model}/model.safetensors holds NaN or Inf values"),
    "tokenizer missing": (remove("tokenizer.json"), PLAN,
                          "{model} has no tokenizer (tokenizer.json, tokenizer.model, vocab.json): copy the model's tokenizer files into the folder"),
    "tokenizer unreadable": (write_text("model/tokenizer.json", "{not a tokenizer"), PLAN, "the tokenizer in {model} cannot be read ("),
    "model path is a file": (nothing, ["plan", "{model}/config.json", "--budget", "1GB"], "is a file, not a model folder"),
    # calibration text
    "JSONL text is a number": (write_text("t.jsonl", '{"text": 5}\n'), PLAN + ["--text", "{root}/t.jsonl"],
                               't.jsonl:1 has a number as its "text" field, not a string: write it as a JSON string'),
    "JSONL text is null": (write_text("t.jsonl", '{"text": "fine"}\n{"text": null}\n'), PLAN + ["--text", "{root}/t.jsonl"],
                           't.jsonl:2 has null as its "text" field, not a string'),
    "JSONL slice is an array": (write_text("t.jsonl", '{"text": "x", "slice": ["a"]}\n'), PLAN + ["--text", "{root}/t.jsonl"],
                                't.jsonl:1 has an array as its "slice" field, not a string'),
    "JSONL line not JSON": (write_text("t.jsonl", '{"text": "a"}\n{"text": "b"\n'), PLAN + ["--text", "{root}/t.jsonl"],
                            't.jsonl:2 is not a JSON object with a "text" field: fix that line'),
    "JSONL row without text": (write_text("t.jsonl", '{"body": "a"}\n'), PLAN + ["--text", "{root}/t.jsonl"], 't.jsonl:1 is not a JSON object with a "text" field'),
    "JSONL row is an array": (write_text("t.jsonl", '["a"]\n'), PLAN + ["--text", "{root}/t.jsonl"], 't.jsonl:1 is not a JSON object with a "text" field'),
    "text file missing": (nothing, PLAN + ["--text", "{root}/gone.txt"], "text file {root}/gone.txt does not exist: pass a .txt or .jsonl file"),
    "text path is a folder": (make_folder("texts"), PLAN + ["--text", "{root}/texts"], "text file {root}/texts is a folder: pass a .txt or .jsonl file"),
    "text not UTF-8": (write_text("t.txt", "caf\xe9 ".encode("latin-1") * 50), PLAN + ["--text", "{root}/t.txt"], "is not UTF-8 (invalid continuation byte at byte 3)"),
    "text shorter than one window": (write_text("t.txt", "Too short."), PLAN + ["--text", "{root}/t.txt"],
                                     "the text has 3 tokens, fewer than one window of 32: pass more text or a smaller --seq-len"),
    # arguments
    "group size no kernel takes": (nothing, PLAN + ["--groups", "48"],
                                   "unsupported group sizes 48: no bitplan kernel or engine stores them; choose from 32, 64, 128, c (c = per channel)"),
    "one bad group size among good ones": (nothing, PLAN + ["--groups", "32,100,c", "--engine", "vllm"], "unsupported group sizes 100:"),
    "group size not a number": (nothing, PLAN + ["--groups", "g32"], "argument --groups: expected comma-separated group sizes (c = per channel), got 'g32'"),
    "bit width no method takes": (nothing, PLAN + ["--bits", "7"], "unsupported bit widths [7]: choose from 2, 3, 4, 5, 6, 8"),
    "bit width not a number": (nothing, PLAN + ["--bits", "four"], "argument --bits: expected comma-separated integers, got 'four'"),
    "unknown method": (nothing, PLAN + ["--methods", "gptqq"], "unknown method 'gptqq': choose from"),
    "--tp 7 on 9 heads, 3 KV heads (vllm)": (nothing, SMOLLM + ["--tp", "7"],
                                             "--tp 7 does not divide the model's 9 attention heads: choose a divisor of 9"),
    "--tp 7 on engine bitplan": (nothing, SMOLLM + ["--tp", "7", "--engine", "bitplan"],
                                 "bitplan@any runs on one device: use --tp 1, or --engine vllm for tensor parallelism"),
    "--tp 9 splits heads but not the MLP": (nothing, SMOLLM + ["--tp", "9"], "--tp 9 does not divide the MLP width 1536"),
    "--tp 0": (nothing, SMOLLM + ["--tp", "0"], "argument --tp: must be at least 1, got 0"),
    "--tp 5 in compare on 32 heads": (nothing, ["compare", "{configs}/llama-3-8b.json", "--targets", "l40s", "--tp", "5"],
                                      "--tp 5 does not divide the model's 32 attention heads: choose a divisor of 32"),
    "negative trials": (nothing, PLAN + ["--trials", "-1"], "--trials must be 0 or more, got -1"),
    "negative search minutes": (nothing, PLAN + ["--search-minutes", "-1"], "--search-minutes must be 0 or more, got -1.0"),
    "zero samples": (nothing, PLAN + ["--samples", "0"], "argument --samples: must be at least 1, got 0"),
    "misspelt option": (nothing, PLAN + ["--budgett", "2GB"], "unrecognized arguments: --budgett 2GB (see `bitplan --help`)"),
    "unknown KV dtype": (nothing, PLAN + ["--kv-dtype", "int3"], "argument --kv-dtype: invalid choice: 'int3'"),
    # plans and checkpoints
    "plan.json cut short": (write_text("plan.json", '{"schema_version": 2, "model": {'), ["emit", "{root}/plan.json", "--out", "{root}/ckpt"],
                            "plan.json is not valid JSON"),
    "plan.json a JSON array": (write_text("plan.json", "[]"), ["emit", "{root}/plan.json", "--out", "{root}/ckpt"],
                               "plan.json is not a bitplan plan (no schema_version): re-create it with `bitplan plan`"),
    "emit into a non-empty folder": (write_text("ckpt", ""), ["emit", "{plan}", "--out", "{root}/out"],
                                     "{root}/out already exists and is not an empty folder: choose another --out or remove it"),
    "emit onto a file": (write_text("ckpt", "keep me"), ["emit", "{plan}", "--out", "{root}/ckpt"],
                         "{root}/ckpt already exists and is not an empty folder: choose another --out or remove it"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fault_gets_one_line_status_2_and_changes_nothing(case, tmp_path, tiny_model, tiny_plan, private_cache, capsys):
    damage, argv, message = CASES[case]
    shutil.copytree(tiny_model, tmp_path / "model")
    (tmp_path / "out").mkdir()
    if case == "emit into a non-empty folder":
        (tmp_path / "out" / "weights.safetensors").write_text("someone else's")
    damage(tmp_path)
    fields = {"model": tmp_path / "model", "root": tmp_path, "plan": tiny_plan, "configs": Path(__file__).parents[1] / "data" / "configs"}
    before = snapshot(tmp_path, private_cache, tiny_plan.parent)
    code = main([a.format(**fields) for a in argv]) if not case.startswith(("group size not", "bit width not", "--tp 0", "zero", "misspelt", "unknown KV")) \
        else argparse_exit(argv, fields)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert all(line.startswith(tuple(STAGES.values())) for line in lines[:-1]), lines  # progress bars, if work had started
    assert lines[-1].startswith("bitplan: error: ") and message.format(**fields) in lines[-1], lines[-1]
    assert snapshot(tmp_path, private_cache, tiny_plan.parent) == before


def argparse_exit(argv, fields) -> int:
    with pytest.raises(SystemExit) as stopped:
        main([a.format(**fields) for a in argv])
    return stopped.value.code


def test_a_plan_emitted_against_another_model_of_the_same_architecture_is_refused(tmp_path, tiny_model, private_cache, capsys):
    """The plan names a folder; the folder now holds another model with the same config (other weights)."""
    folder = shutil.copytree(tiny_model, tmp_path / "model")
    plan = tmp_path / "plan.json"
    assert main(["plan", str(folder), *TINY_PLAN, "--out", str(plan)]) == 0
    capsys.readouterr()
    write_tiny_model(folder, tiny_model, seed=1, config=CONFIG)
    before = snapshot(tmp_path, private_cache)
    assert main(["emit", str(plan), "--out", str(tmp_path / "ckpt")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"bitplan: error: the weights in {folder} differ from those the plan was made for: re-run `bitplan plan` on this model"]
    assert snapshot(tmp_path, private_cache) == before


def test_a_plan_whose_model_folder_is_gone_is_refused(tmp_path, tiny_model, private_cache, capsys):
    folder = shutil.copytree(tiny_model, tmp_path / "model")
    plan = tmp_path / "plan.json"
    assert main(["plan", str(folder), *TINY_PLAN, "--out", str(plan)]) == 0
    capsys.readouterr()
    shutil.rmtree(folder)
    assert main(["emit", str(plan), "--out", str(tmp_path / "ckpt")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"model folder {folder} does not exist" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_nan_weights_are_named_even_when_a_block_reads_them(tmp_path, tiny_model):
    """The check lives in the reader every stage uses, so no stage can quantize a NaN silently."""
    from bitplan.errors import BitplanError
    from bitplan.models.source import WeightReader

    folder = shutil.copytree(tiny_model, tmp_path / "model")
    poison("model.layers.0.mlp.up_proj.weight", float("-inf"))(tmp_path)
    reader = WeightReader(folder)
    assert torch.isfinite(reader.tensor("model.layers.0.mlp.gate_proj.weight")).all()
    with pytest.raises(BitplanError, match="model.layers.0.mlp.up_proj.weight in .* holds NaN or Inf"):
        reader.tensors("model.layers.0.")
