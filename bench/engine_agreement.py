"""Which engine loaded which bitplan checkpoint, and how close its numbers are to bitplan.load's.

    .venv/bin/python bench/engine_agreement.py [--vllm-python .venv-vllm/bin/python]

Plans SmolLM2-135M for each engine (RTN, GPTQ and SmoothQuant candidates at 4 and 8 bits on a
170 MB budget without runtime overhead, 2048-token KV cache, 8 x 512 calibration tokens), emits, and asks the engine:
transformers' ``AutoModelForCausalLM`` (logits against ``bitplan.load`` on 2 x 128 held-out
tokens), vLLM's scheme and kernel selection for sm_80 and sm_90 (vLLM's own code under a
stand-in CUDA platform: no GPU here, so selection only), and ``vllm.LLM`` on this CPU (3 prompts
x 24 greedy tokens, log-probabilities against ``bitplan.load``). Prints a table and writes
``bench/results/engine_agreement.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

import bitplan
from bitplan.api import CalibrationSettings, Candidates
from bitplan.checkpoints.verify import transformers_agreement, vllm_generation_agreement, vllm_kernel_agreement, vllm_python

BUDGET = "170MB"
CALIBRATION = CalibrationSettings((), 8, 512)
CANDIDATES = Candidates(("rtn", "gptq", "smoothquant"), (4, 8), (32, 64, 0), (True,))
RESULTS = Path(__file__).parent / "results" / "engine_agreement.json"


def cpu_platform() -> str:
    return "cpu-avx512" if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") else "cpu-avx2"


def planned(engine: str, target: str | None, out: Path):
    # no runtime overhead: a GPU target would add its CUDA context (about 1 GB); this compares formats, not fit
    plan = bitplan.plan("smollm2-135m", budget=BUDGET, context=2048, engine=engine, target=target, trials=0, overhead=0,
                        calibration=CALIBRATION, candidates=CANDIDATES)
    counts = Counter(plan.assignments.values())
    return bitplan.emit(plan, out), ", ".join(f"{name} x{n}" for name, n in counts.most_common())


def row(engine: str, hardware: str, schemes: str, result) -> dict:
    return {"engine": engine, "hardware": hardware, "checkpoint": schemes, "loaded_by": result.loaded_by, "ok": result.ok,
            "agreement": result.detail, "max_logit_diff": result.max_logit_diff, "top1": result.top1_agreement, **result.extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", help="Python of vLLM's venv (default $BITPLAN_VLLM_PYTHON)")
    args = parser.parse_args()
    python = vllm_python(args.vllm_python)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        start = time.perf_counter()
        checkpoint, schemes = planned("transformers", None, scratch / "transformers")
        rows.append(row("transformers", "CPU", schemes, transformers_agreement(checkpoint)))
        checkpoint, schemes = planned("vllm", None, scratch / "vllm-sm80")
        rows.append(row("vllm", "CUDA sm_80 (selection)", schemes, vllm_kernel_agreement(checkpoint, python, "cuda-sm80")))
        checkpoint, schemes = planned("vllm", "h100-sxm", scratch / "vllm-sm90")
        rows.append(row("vllm", "CUDA sm_90 (selection)", schemes, vllm_kernel_agreement(checkpoint, python, "cuda-sm90")))
        platform = cpu_platform()
        checkpoint, schemes = planned("vllm", platform, scratch / "vllm-cpu")
        rows.append(row("vllm", f"this CPU ({platform}, selection)", schemes, vllm_kernel_agreement(checkpoint, python, platform)))
        rows.append(row("vllm", f"this CPU ({platform}, generate)", schemes, vllm_generation_agreement(checkpoint, python)))
        elapsed = time.perf_counter() - start
    print("| engine | hardware | checkpoint (schemes x layers) | loaded by | agreement with bitplan.load |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['hardware']} | {r['checkpoint']} | {r['loaded_by']} | {'ok' if r['ok'] else 'FAILED'}: {r['agreement']} |")
    print(f"total {elapsed:.0f} s")
    RESULTS.write_text(json.dumps({"rows": rows, "elapsed_s": elapsed, "budget": BUDGET}, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
