"""bitplan's GGUF against llama.cpp's own Q3_K_M, Q4_K_M and Q5_K_M on SmolLM2-135M, judged by llama.cpp.

1. the F32 GGUF (``convert_hf_to_gguf.py``), and ``llama-imatrix`` on the calibration text (the
   calibration part of Python's documentation: ``--imatrix-chunks`` chunks of 512 tokens, the same
   amount of text bitplan's plan calibrates on: 16 windows of 512 tokens);
2. ``llama-quantize --imatrix`` with each preset;
3. for each preset, ``bitplan plan --engine llama.cpp`` with a budget that leaves the planned
   Linears exactly the bytes the preset gives them (token embedding Q8_0 and F32 norms as in the
   preset), then ``bitplan emit --format gguf``;
4. ``llama-perplexity --kl-divergence`` of every file against the F32 GGUF on held-out text
   (topics the planner never saw: ``builtin_text("heldout")``), ``--kl-chunks`` chunks of 512.

SmolLM2's weights were published as Q4_1 (bitplan's built-in folder is converted from that GGUF):
every 32-block of every Linear lies on a 16-level affine grid. Q4_1 reproduces it, and so does
Q5_1 (its scale search finds half the Q4_1 step: the profile scores both ~1e-7, against 5e-5 for
Q5_0 and 2e-6 for Q8_0). A plan may use them and win for free, so the main rows plan WITHOUT Q4_1
and Q5_1 (``--ggml-types``); ``--with-grid`` adds rows with every type allowed, for the record
only. Q4_K/Q5_K (affine sub-blocks of 32 with 6-bit scales) sit partly on the grid too; the
presets use them as well.

    BITPLAN_LLAMA_CPP=~/.cache/bitplan-tools/llama.cpp-11434.0.0 python bench/gguf_presets.py [--with-grid] [--trials N] [--threads 1]

Writes bench/results/gguf_presets.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import save

import bitplan
from bitplan.checkpoints import gguf as bg
from bitplan.checkpoints import llamacpp
from bitplan.checkpoints.emit_gguf import emit_gguf
from bitplan.checkpoints.gguf_file import read_gguf
from bitplan.engines import deployed_spec, get_rules
from bitplan.models.source import open_model
from bitplan.planner.candidates import Candidates
from bitplan.planner.deployment import deployment_for, weight_budget_bytes
from bitplan.profiles.calibration import CalibrationSettings

PRESETS = ("Q3_K_M", "Q4_K_M", "Q5_K_M")
NO_Q4_1 = ("Q2_K", "Q3_K", "Q4_0", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")
# all but the types on or near SmolLM2's published grid (peer_bytes.GRID_TYPES, measured by bench/grid_ride.py:
# Q4_1, Q5_1, and since that bench Q4_K and Q5_K; results saved before it allowed Q4_K and Q5_K)
OFF_GRID = ("Q2_K", "Q3_K", "Q4_0", "Q5_0", "Q6_K", "Q8_0")
CONTEXT = 16  # plan's KV cache context: only to size the deployment; the budget is then set so the Linears get the target bytes


def file_summary(path: Path) -> dict:
    tensors = read_gguf(path).tensors
    types: dict[str, int] = {}
    for tensor in tensors.values():
        types[tensor.ggml_type] = types.get(tensor.ggml_type, 0) + 1
    return {"file_bytes": path.stat().st_size, "tensor_bytes": sum(t.nbytes for t in tensors.values()),
            "token_embd": tensors["token_embd.weight"].ggml_type, "types": dict(sorted(types.items()))}


def budget_for(model: str, linear_bytes: int, engine: str = "llama.cpp") -> int:
    """The --budget (bytes) whose weight budget for the Linears is exactly ``linear_bytes`` (``CONTEXT``, no overhead)."""
    spec = deployed_spec(open_model(model).spec, get_rules(engine))
    probe = 10**9
    return probe - weight_budget_bytes(spec, deployment_for(probe, None, CONTEXT, 1, "float16", 1, 0)) + linear_bytes


def quantize_preset(build: llamacpp.LlamaCppBuild, source: Path, imatrix: Path | None, preset: str, out: Path, threads: int) -> Path:
    """``llama-quantize [--imatrix IMATRIX] SOURCE OUT PRESET THREADS`` unless ``out`` exists (reused)."""
    if not out.is_file():
        options = ["--imatrix", imatrix] if imatrix is not None else []
        llamacpp.run_tool([build.tool("llama-quantize"), *options, source, out, preset, threads], f"llama-quantize {preset}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=0, help="bitplan's measured refinement trials (0: exact allocation only)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--imatrix-chunks", type=int, default=16)
    parser.add_argument("--kl-chunks", type=int, default=8)
    parser.add_argument("--with-grid", action="store_true", help="also plan with Q4_1/Q5_1 allowed (SmolLM2's own grid: not a fair row)")
    parser.add_argument("--no-q4-1", action="store_true", help="plan only with every type but Q4_1 (Q5_1 allowed, as the Q5_K_M preset "
                                                               "uses it through llama-quantize's fallback); results in gguf_presets-no-q4_1.json")
    parser.add_argument("--presets", type=lambda text: tuple(text.split(",")), default=PRESETS)
    parser.add_argument("--work", type=Path, default=None, help="folder for the GGUF files (default: a temporary one)")
    args = parser.parse_args()

    build = llamacpp.find_llama_cpp()
    model = "smollm2-135m"
    source_model = open_model(model)
    work = args.work or Path(tempfile.mkdtemp(prefix="bitplan-gguf-presets-"))
    work.mkdir(parents=True, exist_ok=True)
    source = bg.source_gguf(source_model.folder, build=build)
    calibration_text = llamacpp.write_text_file(llamacpp.builtin_text("calibration"), work / "calibration.txt")
    heldout_text = llamacpp.write_text_file(llamacpp.builtin_text("heldout"), work / "heldout.txt")
    start = time.perf_counter()
    if not (work / "imatrix.gguf").is_file():  # reused from an earlier run in the same --work folder
        llamacpp.compute_imatrix(source, calibration_text, work / "imatrix.gguf", ctx=512, chunks=args.imatrix_chunks,
                                 threads=args.threads, build=build)
    timings = {"imatrix_s": round(time.perf_counter() - start, 1)}
    base_kld = work / "base.kld"

    def kl(path: Path) -> dict:
        saved = path.with_suffix(f".kl{args.kl_chunks}.json")  # reused while the file is unchanged
        if saved.is_file() and saved.stat().st_mtime > path.stat().st_mtime:
            return json.loads(saved.read_text())
        result = llamacpp.kl_divergence(source, path, heldout_text, ctx=512, chunks=args.kl_chunks, threads=args.threads,
                                        base_logprobs=base_kld, build=build).to_dict()
        saved.write_text(json.dumps(result))
        return result

    calibration = CalibrationSettings()
    variants = {"bitplan (no Q4_1/Q5_1/Q4_K/Q5_K)": OFF_GRID}
    if args.no_q4_1:
        variants = {"bitplan (no Q4_1; Q5_1 allowed, as the preset's fallback uses it)": NO_Q4_1}
    if args.with_grid:
        variants["bitplan (every type: Q4_1/Q5_1 sit on SmolLM2's own grid)"] = None
    rows = []
    for preset in args.presets:
        preset_path = quantize_preset(build, source, work / "imatrix.gguf", preset, work / f"llama-{preset}.gguf", args.threads)
        summary = file_summary(preset_path)
        preset_linear = summary["tensor_bytes"] - deployed_spec(source_model.spec, get_rules("llama.cpp")).unquantized_bytes
        rows.append({"file": f"llama.cpp {preset} (imatrix)", "preset": preset, **summary, "kl": kl(preset_path)})
        print(rows[-1]["file"], rows[-1]["file_bytes"], rows[-1]["kl"]["mean_kld"], flush=True)
        for label, types in variants.items():
            start = time.perf_counter()
            plan = bitplan.plan(model, budget=budget_for(model, preset_linear), context=CONTEXT, overhead=0, engine="llama.cpp",
                                candidates=Candidates(ggml_types=types), calibration=calibration, trials=args.trials)
            tag = {OFF_GRID: "off-grid", NO_Q4_1: "no-q4_1", None: "every-type"}[types]
            plan.save(work / f"bitplan-{preset}-{tag}.json")
            out = work / f"bitplan-{preset}-{tag}.gguf"
            out.unlink(missing_ok=True)
            emit_gguf(plan, out)
            seconds = round(time.perf_counter() - start, 1)
            counts: dict[str, int] = {}
            for scheme in plan.assignments.values():
                counts[scheme] = counts.get(scheme, 0) + 1
            rows.append({"file": f"{label} at {preset}'s size", "preset": preset, **file_summary(out), "kl": kl(out),
                         "plan_seconds": seconds, "schemes": dict(sorted(counts.items())),
                         "predicted_quantized_bytes": plan.memory.quantized_weights_bytes, "preset_linear_bytes": preset_linear,
                         "predicted": plan.predicted.to_dict()})
            print(rows[-1]["file"], rows[-1]["file_bytes"], rows[-1]["kl"]["mean_kld"], counts, flush=True)
    path = save("gguf_presets-no-q4_1" if args.no_q4_1 else "gguf_presets", {"model": model, "llama_cpp": llamacpp.LLAMA_CPP_VERSION, "threads": args.threads,
                                 "imatrix_chunks": args.imatrix_chunks, "kl_chunks": args.kl_chunks, "trials": args.trials,
                                 "calibration": calibration.to_dict(), "timings": timings, "rows": rows,
                                 "load_average": os.getloadavg()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
