"""What the fault tests share: a tiny model folder, the plan arguments for it, a snapshot of
everything on disk (to assert nothing was written or changed) and running ``python -m bitplan``
as a real subprocess."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# A plan of the tiny model that profiles in about a second.
TINY_PLAN = ["--budget", "1GB", "--methods", "rtn,gptq", "--bits", "4,8", "--groups", "32", "--samples", "2", "--seq-len", "32",
             "--trials", "0", "--engine", "bitplan"]


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under ``roots`` (symlinks not followed) with a digest of its bytes."""
    found = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs:
                found[os.path.join(folder, name)] = "dir"
            for name in files:
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    found[path] = "link:" + os.readlink(path)
                    continue
                with open(path, "rb") as handle:
                    found[path] = hashlib.sha256(handle.read()).hexdigest()
    return found


def cli_env(cache: Path) -> dict[str, str]:
    """The environment for a subprocess: this checkout first on the path, a private cache."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "BITPLAN_CACHE": str(cache), "TRITON_INTERPRET": "1"}


def bitplan_process(argv: list[str], cache: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bitplan", *map(str, argv)], env=cli_env(cache), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def run_bitplan(argv: list[str], cache: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitplan", *map(str, argv)], env=cli_env(cache), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    """stderr without the progress bars (which draw on stderr too)."""
    return [line for line in stderr.splitlines() if line.startswith("bitplan:")]
