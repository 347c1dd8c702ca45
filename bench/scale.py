"""Memory and time of bitplan's stages against model depth: peak resident memory of each stage in
a fresh child process (the kernel's peak counter, VmHWM, reset after imports and set-up, so the
peak is the stage's own; "above start" subtracts the resident memory at that point), wall time,
and the KL it measured.

Stages:
- ``refine-whole``: the previous refinement meter, ``QualityMeter`` (the model in float32 plus a
  deep copy), measuring one mixed 4/8-bit RTN plan on the held-in windows (``--plan gptq``: GPTQ
  on q/k/v/gate/up, with the calibration pass it needs);
- ``refine-streaming``: the same plan measured block by block (``StreamingMeter``), which
  refinement now uses;
- ``profile``: the sensitivity profile (one RTN scheme, no cache);
- ``eval-whole``: what ``bitplan eval`` did before issue 14: the original (float32) and the
  emitted checkpoint of the same plan (``bitplan.load``) both whole in memory, scored on
  ``--eval-samples`` held-out windows per slice (prose and code);
- ``eval-streaming``: ``bitplan eval`` now (``checkpoints.evaluate.measure``): the original's and
  the checkpoint's blocks one at a time, on the same windows.

The eval stages read a checkpoint the script emits once per model from a hand-made plan (the RTN
plan above, every Linear assigned, bytes counted as the planner counts them); its KL is the
prose slice's.

Models: the built-in SmolLM2-135M (30 blocks) and random-weight models of its width with more
blocks, written by this script (``--depths``), to show what grows with depth and what does not.
Random weights prove memory and time, never quality.

    PYTHONPATH=. .venv/bin/python bench/scale.py [--depths 60] [--seq-len 256] [--plan rtn|gptq] [--stages ...] [--eval-samples 4]

Real shapes (issue 14 part 6): ``--config tests/data/configs/llama-3-8b.json`` writes a
random-weight model of that config (``bench/random_model.py``, 16 GB of bf16 safetensors for
Llama-3-8B) and runs the whole measured path on it through the CLI, each stage in a fresh process:
``profile`` (RTN and GPTQ candidates), ``plan`` (exact allocation and measured refinement trials,
block by block), ``emit`` (compressed-tensors), ``eval`` (streaming, a few windows). Each row has
the stage's peak resident memory, its wall time per decoder block, the bound the issue sets
(2 decoder blocks' float32 weights + activations + 2 GiB; the activations held are the block
inputs and one block's input statistics, itemised), and a labelled extrapolation to Llama-3-70B
on this machine and on one H100 (per-block time x the 70B block's share of work, x 80 blocks; on
the H100 also x this machine's measured float32 matmul rate / the H100's float32 peak:
compute-bound, ignoring disk reads). Saved to bench/results/scale_shape-<config>.json (``--stages`` runs some
stages only, reusing the work folder's profile, plan and checkpoint; the saved rows of the others are kept, and every row
names its commit). ``--layers N``
writes the same width with N decoder blocks (per-block memory and time at the real width, in a
fraction of the time; saved as scale_shape-<config>-<N>-blocks.json). ``--resume`` keeps the work folder's
cache: a profile stopped with SIGTERM resumes at its first unfinished block on the same command, and the
profile row sums the parts' times (``<label>-profile-parts.json``).

    PYTHONPATH=. .venv/bin/python bench/scale.py --config tests/data/configs/llama-3-8b.json --work /big/disk [--budget 9GB]

Rows are merged into bench/results/scale.json by (model, stage): a run of some stages keeps the
rows of the others, and each row records its own sequence length and command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, code_commit, save

CHILD = """
import json, os, resource, sys, time
import torch
from bitplan.methods.scheme import Scheme
from bitplan.models.source import open_model
from bitplan.profiles.calibration import CalibrationSettings, calibration_windows
stage, model, seq_len, calibrated = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "gptq"
checkpoint, eval_samples = sys.argv[5], int(sys.argv[6])
source = open_model(model)
settings = CalibrationSettings((), 4, seq_len)
windows = calibration_windows(source.folder, settings, 4)
method = "gptq" if calibrated else "rtn"
kinds = {"q": f"{method}-w4g64s", "k": f"{method}-w4g64s", "v": f"{method}-w4g64s", "o": "rtn-w4g64s", "gate": f"{method}-w4g64s",
         "up": f"{method}-w4g64s", "down": "rtn-w8gcs"}
plan = {layer.name: Scheme.parse(kinds.get(layer.kind, "none")) for layer in source.spec.layers}
def status(field):  # bytes, from /proc/self/status (VmRSS: now, VmHWM: peak since the last reset)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
if stage.startswith("eval"):
    from bitplan.checkpoints.evaluate import prepare_evaluation
    prepared = prepare_evaluation(checkpoint, samples=eval_samples, seq_len=seq_len)
baseline = status("VmRSS")
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # resets VmHWM: the peak below is the stage's own, not the imports'
started = time.time()
result = {}
if stage == "profile":
    from bitplan.profiles.sensitivity import sensitivity_table
    sensitivity_table(source, [Scheme.parse("rtn-w4g64s")], settings, use_cache=False)
elif stage.startswith("eval"):
    if stage == "eval-whole":  # the path bitplan eval took before it streamed
        from bitplan.checkpoints.load import load
        from bitplan.planner.quality import load_dense_model, measure_pair
        reference, candidate = load_dense_model(prepared.reference_folder), load(prepared.checkpoint)
        slices = {name: measure_pair(reference, candidate, text.windows) for name, text in prepared.texts.items()}
    else:
        from bitplan.checkpoints.evaluate import measure
        slices = measure(prepared).slices
    result["slices"] = {name: quality.to_dict() for name, quality in slices.items()}
    result["kl"] = slices["prose"].kl
else:
    if stage == "refine-whole":
        from bitplan.planner.quality import QualityMeter, load_dense_model
        meter = QualityMeter(load_dense_model(source.folder), source.spec)
    else:
        from bitplan.planner.streaming import StreamingMeter
        meter = StreamingMeter(source.folder, source.config, source.spec)
    if calibrated:
        meter.calibrate(windows[:4])
    meter.apply(plan)
    result["kl"] = meter.measure(windows[4:]).kl
print(json.dumps(dict(result, seconds=time.time() - started, baseline_rss_bytes=baseline, peak_rss_bytes=status("VmHWM"),
                      process_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


def deeper_model(depth: int, root: Path) -> Path:
    """A random-weight model of SmolLM2-135M's width and tokenizer with ``depth`` blocks (bf16, seed 0)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bitplan.models.source import ensure_builtin

    smollm = ensure_builtin("smollm2-135m")
    folder = root / f"smollm2-width-{depth}-blocks"
    if (folder / "config.json").is_file():
        return folder
    config = json.loads((smollm / "config.json").read_text())
    config["num_hidden_layers"] = depth
    torch.manual_seed(0)
    hf = AutoConfig.for_model(config.pop("model_type"), **{k: v for k, v in config.items() if k != "architectures"})
    AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm / name, folder / name)
    return folder


def emitted_checkpoint(model: str, root: Path) -> Path:
    """The checkpoint of the RTN plan the refine stages measure (4-bit g64 q/k/v/o/gate/up, 8-bit
    per-channel down), from a hand-made plan for vLLM (no profiling: the eval stages need only a
    checkpoint); emitted once per model under ``root``."""
    from bitplan.checkpoints.emit import emit
    from bitplan.methods.scheme import Scheme
    from bitplan.models.source import folder_hash, open_model
    from bitplan.planner.baselines import assignment_bytes
    from bitplan.planner.deployment import Deployment, memory_breakdown
    from bitplan.planner.plan import EngineRecord, ModelRef, Plan, Prediction, Provenance, SearchRecord
    from bitplan.profiles.calibration import CalibrationSettings

    source = open_model(model)
    out = root / f"checkpoint-{source.folder.name}"
    if (out / "plan.json").is_file():
        return out
    kinds = {"q": "rtn-w4g64s", "k": "rtn-w4g64s", "v": "rtn-w4g64s", "o": "rtn-w4g64s", "gate": "rtn-w4g64s", "up": "rtn-w4g64s",
             "down": "rtn-w8gcs"}
    assignments = {layer.name: Scheme.parse(kinds.get(layer.kind, "none")) for layer in source.spec.layers}
    deployment = Deployment(budget_bytes=10**12)
    model_hash = folder_hash(source.folder)
    plan = Plan(model=ModelRef(model, source.spec.model_type, model_hash), deployment=deployment, target=None,
                assignments={name: str(scheme) for name, scheme in assignments.items()},
                memory=memory_breakdown(source.spec, assignment_bytes(source.spec, assignments), deployment),
                predicted=Prediction(score_kl=0.0), search=SearchRecord("hand-made", "optimal", 0.0, False, 10**12, "quality"),
                provenance=Provenance(model_hash, "", "bench", 0, None, None, tuple(sorted(set(kinds.values()))), CalibrationSettings()),
                engine=EngineRecord("vllm", "cuda-sm80", "compressed-tensors"))
    return emit(plan, out)


def run_stage(stage: str, model: str, seq_len: int, cache: str, plan: str, checkpoint: str = "", eval_samples: int = 4) -> dict:
    env = dict(os.environ, BITPLAN_CACHE=cache, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path]))
    if "TRITON_INTERPRET" in env:
        del env["TRITON_INTERPRET"]
    out = subprocess.run([sys.executable, "-c", CHILD, stage, model, str(seq_len), plan, checkpoint, str(eval_samples)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def merged_rows(rows: list[dict]) -> list[dict]:
    """The rows already in scale.json, each (model, stage) measured again replaced by its new row."""
    path = RESULTS / "scale.json"
    if not path.is_file():
        return rows
    old = json.loads(path.read_text())
    new = {(row["model"], row["stage"]) for row in rows}
    kept = [{"seq_len": old.get("seq_len"), "command": old.get("command"), **row} for row in old.get("rows", [])
            if (row["model"], row["stage"]) not in new]
    return kept + rows


STAGE = """
import json, sys, time
from bitplan.cli import main
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
baseline = status("VmRSS")
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # resets VmHWM after the imports: the peak is the stage's own plus what was resident then
started = time.time()
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print(json.dumps({"rc": code or 0, "seconds": time.time() - started, "baseline_rss_bytes": baseline, "peak_rss_bytes": status("VmHWM")}))
"""


def matmul_flops() -> float:
    """This machine's float32 matmul rate (FLOP/s), 4096 x 4096 x 4096, best of 3."""
    import time

    import torch

    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * 4096**3 / best


def block_numbers(config: dict) -> dict:
    """One decoder block's float32 weight bytes and its Linears' input widths (dense Llama-like shapes)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    params = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter + 2 * hidden
    return {"params": params, "fp32_bytes": 4 * params,
            "inputs": [hidden] * 3 + [q] + [hidden] * 2 + [inter]}  # q k v o gate up down


def statistics_bytes(inputs: list[int], tokens: int) -> int:
    """One block's calibration statistics as the profile keeps them (``calibration_stats.OuterSum``): per
    Linear, X Xᵀ (float32 rows) and the Fisher-weighted H (float64 rows) as rows while the tokens are at
    most the inputs, as float64 matrices beyond; q/k/v and gate/up each keep their own."""
    return sum(tokens * width * (4 + 8) if tokens <= width else 2 * 8 * width * width for width in inputs)


def finished_units(cache: Path) -> int:
    """Profile units (head and decoder blocks) finished in ``cache``'s resumable profile checkpoints."""
    return sum(1 for path in cache.rglob("*.safetensors") if path.name == "head.safetensors" or path.name.startswith("block-"))


def gptq_variant(source: Path, out: Path) -> None:
    """``source`` with every RTN assignment made GPTQ of the same bits, group and symmetry (the same
    checkpoint format and bytes), sealed again: emit's calibrated path on a whole plan."""
    import dataclasses

    from bitplan.planner.plan import load_plan

    plan = load_plan(source)
    swap = {scheme: "gptq-" + scheme.removeprefix("rtn-") for scheme in set(plan.assignments.values()) if scheme.startswith("rtn-")}
    if not swap:
        raise SystemExit(f"{source} assigns no RTN scheme: nothing to make GPTQ")
    plan = dataclasses.replace(plan, assignments={name: swap.get(scheme, scheme) for name, scheme in plan.assignments.items()},
                               formats={swap.get(name, name): count for name, count in plan.formats.items()})
    plan.save(out)
    print(f"{out.name}: {sum(1 for s in plan.assignments.values() if s.startswith('gptq-'))} Linears made GPTQ ({', '.join(sorted(swap.values()))})")


def shape_run(config_path: Path, work: Path, budget: str, samples: int, seq_len: int, trials: int, eval_samples: int,
              layers: int | None = None, only: list[str] | None = None, resume: bool = False, methods: str = "rtn,gptq") -> None:
    from random_model import write_random_model

    config = json.loads(config_path.read_text())
    label = config_path.stem
    if layers is not None:  # the real width at a shallower depth: per-block memory and time, not the whole model
        config["num_hidden_layers"] = layers
        label = f"{config_path.stem}-{layers}-blocks"
        shallow = work / f"{label}.json"
        shallow.write_text(json.dumps(config, indent=2))
        config_path = shallow
    model = write_random_model(config_path, work / f"{label}-random") if not (work / f"{label}-random").is_dir() else work / f"{label}-random"
    if methods != "rtn,gptq":  # another candidate set: its own plan, checkpoint and results file, the same model
        label += "-" + methods.replace(",", "+")
    text = work / "pydoc.txt"
    if not text.is_file():
        import pydoc_data.topics as topics

        text.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics)))
    cache = work / "cache"
    parts_file = work / f"{label}-profile-parts.json"
    if cache.exists() and (only is None or "profile" in only) and not resume:
        parts_file.unlink(missing_ok=True)
        import shutil

        shutil.rmtree(cache)  # every stage measured afresh (a run of later stages only reuses the profile)
    cache.mkdir(exist_ok=True)
    calibration = ["--text", str(text), "--samples", str(samples), "--seq-len", str(seq_len)]
    candidates = ["--methods", methods, "--bits", "4", "--groups", "128", "--symmetric-only"]
    plan, checkpoint = work / f"{label}-plan.json", work / f"{label}-checkpoint"
    plan_gptq, checkpoint_gptq = work / f"{label}-plan-gptq.json", work / f"{label}-checkpoint-gptq"
    for stage, folder in (("emit", checkpoint), ("emit-gptq", checkpoint_gptq)):
        if folder.exists() and (only is None or stage in only):
            import shutil

            shutil.rmtree(folder)  # emit refuses to overwrite
    stages = {
        "profile": ["profile", str(model), *calibration, *candidates],
        "plan": ["plan", str(model), "--budget", budget, "--context", "2048", "--trials", str(trials), "--out", str(plan),
                 *calibration, *candidates],
        "emit": ["emit", str(plan), "--out", str(checkpoint)],
        "eval": ["eval", str(checkpoint), "--text", str(text), "--samples", str(eval_samples), "--seq-len", str(seq_len),
                 "--json", str(work / f"{label}-scorecard.json")],
        # the plan with every RTN Linear quantized by GPTQ instead (same format and bytes): emit's heaviest path, the
        # calibration tokens run block by block for GPTQ's statistics; only on request (a plan edited here, not planned)
        "emit-gptq": ["emit", str(plan_gptq), "--out", str(checkpoint_gptq)],
        "eval-gptq": ["eval", str(checkpoint_gptq), "--text", str(text), "--samples", str(eval_samples), "--seq-len", str(seq_len),
                      "--json", str(work / f"{label}-scorecard-gptq.json")],
    }
    if only is None:
        stages = {stage: argv for stage, argv in stages.items() if not stage.endswith("-gptq")}
    if only is not None:
        unknown = [stage for stage in only if stage not in stages]
        if unknown:
            raise SystemExit(f"unknown stages {unknown}: choose from {', '.join(stages)}")
        stages = {stage: argv for stage, argv in stages.items() if stage in only}
    env = dict(os.environ, BITPLAN_CACHE=str(cache), PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path]))
    env.pop("TRITON_INTERPRET", None)
    commit = code_commit()
    saved = RESULTS / f"scale_shape-{label}.json"
    # a run of some stages keeps the saved rows of the others (each row names its commit)
    kept = [] if only is None or not saved.is_file() else [row for row in json.loads(saved.read_text()).get("rows", [])
                                                          if row["stage"] not in stages]
    blocks = int(config["num_hidden_layers"])
    block = block_numbers(config)
    hidden = int(config["hidden_size"])
    # every block's calibration input (in memory up to the spill cap, profiles.spill) + two in flight
    held = min(samples * seq_len * hidden * 4 * blocks, 2**30) + 2 * samples * seq_len * hidden * 4
    statistics = statistics_bytes(block["inputs"], samples * seq_len)
    bound = 2 * block["fp32_bytes"] + held + statistics + 2 * 2**30
    seventy = block_numbers(json.loads((Path(__file__).parents[1] / "tests/data/configs/llama-3-70b.json").read_text()))
    share = seventy["params"] / block["params"]
    rate = matmul_flops()
    h100 = 66.9e12  # float32 peak (reference/accelerators.toml, h100-sxm)
    rows = []
    print(f"{label}: {blocks} blocks, block {block['fp32_bytes'] / 2**30:.2f} GiB in float32; this machine {rate / 1e9:.0f} GFLOP/s fp32")
    print(f"{'stage':8} {'peak RSS GiB':>12} {'bound GiB':>9} {'s/block':>8} {'70B here (extrap.) h':>21} {'70B on H100 (extrap.) min':>26}")
    for stage, argv in stages.items():
        before = finished_units(cache) if stage == "profile" else 0
        if stage == "emit-gptq":
            gptq_variant(plan, plan_gptq)
        out = subprocess.run([sys.executable, "-c", STAGE, *argv], env=env, capture_output=True, text=True)
        lines = out.stdout.strip().splitlines()
        if out.returncode or not lines:
            raise SystemExit(f"{stage} failed: {out.stderr[-2000:]}")
        result = json.loads(lines[-1])
        if stage == "profile" and resume:
            # a profile run in parts (SIGTERM, then the same command with --resume): each part's time and
            # peak is recorded; the row sums the parts' times (each part repeats the forward pass to the
            # first unfinished block, so the sum is what the interruptions cost too) and keeps the highest peak
            parts = json.loads(parts_file.read_text()) if parts_file.is_file() else []
            parts.append({"seconds": result["seconds"], "peak_rss_bytes": result["peak_rss_bytes"], "rc": result["rc"],
                          "units_before": before, "units_after": finished_units(cache) if result["rc"] else blocks + 1})
            parts_file.write_text(json.dumps(parts, indent=1))
            print(f"profile part {len(parts)}: {result['seconds']:.0f} s, units {before} -> {parts[-1]['units_after']} of {blocks + 1}")
            if result["rc"]:
                raise SystemExit(f"profile stopped ({result['rc']}); run the same command again to resume it")
            result = dict(result, seconds=sum(part["seconds"] for part in parts),
                          peak_rss_bytes=max(part["peak_rss_bytes"] for part in parts), parts=parts)
        if result["rc"]:
            raise SystemExit(f"{stage} exited with {result['rc']}: {out.stderr[-2000:]}")
        per_block = result["seconds"] / blocks
        here = per_block * share * 80
        row = {"stage": stage, "commit": commit, "command": "bitplan " + " ".join(argv), **result, "seconds_per_block": per_block,
               "bound_bytes": bound, "within_bound": result["peak_rss_bytes"] <= bound,
               "extrapolated_70b_here_s": here, "extrapolated_70b_h100_s": here * rate / h100}
        rows.append(row)
        print(f"{stage:8} {result['peak_rss_bytes'] / 2**30:12.2f} {bound / 2**30:9.2f} {per_block:8.1f} {here / 3600:21.1f} "
              f"{here * rate / h100 / 60:26.2f}", flush=True)
        save(f"scale_shape-{label}", {"config": str(config_path), "blocks": blocks, "block_fp32_bytes": block["fp32_bytes"],
                             "bound": {"blocks_fp32": 2 * block["fp32_bytes"], "activations": held, "statistics": statistics,
                                       "slack": 2 * 2**30, "total": bound},
                             "matmul_flops_here": rate, "h100_fp32_flops": h100, "block_work_70b_over_this": share,
                             "settings": {"samples": samples, "seq_len": seq_len, "trials": trials, "eval_samples": eval_samples,
                                          "budget": budget}, "rows": kept + rows,
                             "note": "extrapolations scale the measured per-block time; GPTQ's O(in^2 out) share grows faster "
                                     "than the block's parameters, so the 70B figures are lower bounds"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=lambda text: [int(d) for d in text.split(",") if d], default=[60])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--stages", help="stages to run (default: refine-whole,refine-streaming,profile; with --config: "
                        "profile,plan,emit,eval; on request emit-gptq,eval-gptq: the plan with GPTQ wherever it has RTN; "
                        "later stages reuse the work folder's profile, plan and checkpoint)")
    parser.add_argument("--plan", choices=("rtn", "gptq"), default="rtn")
    parser.add_argument("--eval-samples", type=int, default=4, help="windows per held-out slice for the eval stages")
    parser.add_argument("--config", type=Path, help="a real model's config.json: run the whole measured path on random weights of that shape")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bitplan-scale-shape", help="with --config: model, cache, outputs")
    parser.add_argument("--budget", default="9GB", help="with --config: the plan's budget")
    parser.add_argument("--samples", type=int, default=4, help="with --config: calibration windows")
    parser.add_argument("--trials", type=int, default=2, help="with --config: measured refinement trials")
    parser.add_argument("--layers", type=int, help="with --config: that many decoder blocks of the real width (per-block figures)")
    parser.add_argument("--resume", action="store_true", help="with --config: keep the work folder's cache, so an interrupted "
                        "profile (SIGTERM) resumes at its first unfinished block; the profile row sums the parts")
    parser.add_argument("--methods", default="rtn,gptq", help="with --config: the candidate methods (another set than the default "
                        "saves to its own scale_shape-<config>-<methods>.json)")
    args = parser.parse_args()
    if args.config:
        args.work.mkdir(parents=True, exist_ok=True)
        shape_run(args.config, args.work, args.budget, args.samples, args.seq_len, args.trials, args.eval_samples, args.layers,
                  args.stages.split(",") if args.stages else None, args.resume, args.methods)
        return
    args.stages = args.stages or "refine-whole,refine-streaming,profile"
    cache = tempfile.mkdtemp(prefix="bitplan-scale-")
    from bitplan.models.source import ensure_builtin

    (Path(cache) / "models").mkdir()
    (Path(cache) / "models" / "smollm2-135m").symlink_to(ensure_builtin("smollm2-135m"))
    models = {"smollm2-135m (30 blocks)": "smollm2-135m"}
    for depth in args.depths:
        models[f"random, SmolLM2 width ({depth} blocks)"] = str(deeper_model(depth, Path(cache)))
    command = "PYTHONPATH=. python bench/scale.py " + " ".join(sys.argv[1:])
    rows = []
    print(f"{'model':36} {'stage':18} {'stage peak RSS MiB':>18} {'above start':>11} {'seconds':>8} {'KL':>10}")
    for label, model in models.items():
        checkpoint = str(emitted_checkpoint(model, Path(cache))) if "eval" in args.stages else ""
        for stage in args.stages.split(","):
            result = run_stage(stage, model, args.seq_len, cache, args.plan, checkpoint, args.eval_samples)
            rows.append({"model": label, "stage": stage, "seq_len": args.seq_len, "command": command, **result})
            kl = f"{result['kl']:.6f}" if "kl" in result else ""
            print(f"{label:36} {stage:18} {result['peak_rss_bytes'] / 2**20:18.0f} "
                  f"{(result['peak_rss_bytes'] - result['baseline_rss_bytes']) / 2**20:11.0f} {result['seconds']:8.1f} {kl:>10}", flush=True)
            path = save("scale", {"plan": args.plan, "windows": {"calibration": 4, "measured": 4, "eval_per_slice": args.eval_samples},
                                  "rows": merged_rows(rows)})  # after every row
    print(f"saved {path}")


if __name__ == "__main__":
    main()
