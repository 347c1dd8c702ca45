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
- ``profile``: the sensitivity profile (one RTN scheme, no cache).

Models: the built-in SmolLM2-135M (30 blocks) and random-weight models of its width with more
blocks, written by this script (``--depths``), to show what grows with depth and what does not.
Random weights prove memory and time, never quality.

    PYTHONPATH=. .venv/bin/python bench/scale.py [--depths 60] [--seq-len 256] [--plan rtn|gptq] [--stages ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import save

CHILD = """
import json, os, resource, sys, time
import torch
from bitplan.methods.scheme import Scheme
from bitplan.models.source import open_model
from bitplan.profiles.calibration import CalibrationSettings, calibration_windows
stage, model, seq_len, calibrated = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "gptq"
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
baseline = status("VmRSS")
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # resets VmHWM: the peak below is the stage's own, not the imports'
started = time.time()
result = {}
if stage == "profile":
    from bitplan.profiles.sensitivity import sensitivity_table
    sensitivity_table(source, [Scheme.parse("rtn-w4g64s")], settings, use_cache=False)
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


def run_stage(stage: str, model: str, seq_len: int, cache: str, plan: str) -> dict:
    env = dict(os.environ, BITPLAN_CACHE=cache, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path]))
    if "TRITON_INTERPRET" in env:
        del env["TRITON_INTERPRET"]
    out = subprocess.run([sys.executable, "-c", CHILD, stage, model, str(seq_len), plan], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=lambda text: [int(d) for d in text.split(",") if d], default=[60])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--stages", default="refine-whole,refine-streaming,profile")
    parser.add_argument("--plan", choices=("rtn", "gptq"), default="rtn")
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="bitplan-scale-")
    from bitplan.models.source import ensure_builtin

    (Path(cache) / "models").mkdir()
    (Path(cache) / "models" / "smollm2-135m").symlink_to(ensure_builtin("smollm2-135m"))
    models = {"smollm2-135m (30 blocks)": "smollm2-135m"}
    for depth in args.depths:
        models[f"random, SmolLM2 width ({depth} blocks)"] = str(deeper_model(depth, Path(cache)))
    rows = []
    print(f"{'model':36} {'stage':18} {'stage peak RSS MiB':>18} {'above start':>11} {'seconds':>8} {'KL':>10}")
    for label, model in models.items():
        for stage in args.stages.split(","):
            result = run_stage(stage, model, args.seq_len, cache, args.plan)
            rows.append({"model": label, "stage": stage, **result})
            kl = f"{result['kl']:.6f}" if "kl" in result else ""
            print(f"{label:36} {stage:18} {result['peak_rss_bytes'] / 2**20:18.0f} "
                  f"{(result['peak_rss_bytes'] - result['baseline_rss_bytes']) / 2**20:11.0f} {result['seconds']:8.1f} {kl:>10}", flush=True)
            path = save("scale", {"seq_len": args.seq_len, "plan": args.plan, "windows": {"calibration": 4, "measured": 4}, "rows": rows,
                                  "command": "PYTHONPATH=. python bench/scale.py " + " ".join(sys.argv[1:])})  # after every row
    print(f"saved {path}")


if __name__ == "__main__":
    main()
