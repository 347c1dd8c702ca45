"""Profiling speed and memory on the built-in model: wall time and peak resident memory.

Runs the full sensitivity profile (no cache) in a fresh child process so its peak RSS is its
own: 16 x 512 calibration tokens, every RTN candidate (2/3/4/5/6/8 bits x groups 32/64/128/
per-channel x sym/asym = 48 schemes, plus "none").

    .venv/bin/python bench/profile_speed.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from common import save

CHILD = """
import json, os, resource, sys, time
os.environ["BITPLAN_CACHE"] = sys.argv[1]
import bitplan
from bitplan.api import Candidates, CalibrationSettings
started = time.time()
table = bitplan.profile("smollm2-135m", Candidates(), CalibrationSettings(samples=16, seq_len=512), use_cache=False)
seconds = time.time() - started
print(json.dumps({"seconds": seconds, "schemes": len(table.schemes), "layers": len(table.layers),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main() -> None:
    from bitplan.models.source import ensure_builtin

    model = ensure_builtin("smollm2-135m")
    with tempfile.TemporaryDirectory() as cache:
        os.makedirs(f"{cache}/models")
        os.symlink(model, f"{cache}/models/smollm2-135m")
        started = time.time()
        out = subprocess.run([sys.executable, "-c", CHILD, cache], capture_output=True, text=True, check=True)
        wall = time.time() - started
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print("| what | value |\n|---|---|")
    print(f"| layers x schemes | {result['layers']} x {result['schemes']} |")
    print("| calibration tokens | 16 x 512 |")
    print(f"| profile time | {result['seconds']:.1f} s (process {wall:.1f} s) |")
    print(f"| peak resident memory | {result['peak_rss_bytes'] / 2**30:.2f} GiB |")
    print(f"| load average during run | {os.getloadavg()[0]:.1f} (2 cores) |")
    print("saved", save("profile_speed", {**result, "process_seconds": wall, "loadavg": os.getloadavg()}))

if __name__ == "__main__":
    main()
