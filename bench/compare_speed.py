"""How long `bitplan compare` takes from config.json alone (issue 5's goal: under 5 s per model).

    .venv/bin/python bench/compare_speed.py

Six devices, context 8192, the prior; Llama-3-8B, Llama-3-70B and Mixtral-8x7B. Prints a table
and writes bench/results/compare_speed.json.
"""

import json
import time
from pathlib import Path

from bitplan.models.moe import load_spec
from bitplan.planner.compare import CompareSettings, compare
from bitplan.profiles.hardware import get_devices

CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "data" / "configs"
DEVICES = "h100-sxm,a100-pcie-40gb,l40s,rtx-4090,a10,mi300x"


def main() -> None:
    rows = []
    print("| model | devices | seconds |\n|---|---|---|")
    for name in ("llama-3-8b", "llama-3-70b", "mixtral-8x7b"):
        spec, routing = load_spec(json.loads((CONFIGS / f"{name}.json").read_text()))
        start = time.perf_counter()
        compare(spec, routing, get_devices(DEVICES), CompareSettings(context=8192))
        seconds = time.perf_counter() - start
        rows.append({"model": name, "devices": DEVICES, "seconds": seconds})
        print(f"| {name} | 6 | {seconds:.2f} |")
    out = Path(__file__).parent / "results" / "compare_speed.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
