"""Resumable profiles: a profile killed mid-way (SIGKILL, SIGINT) resumes at the first unfinished
block and ends with the table an uninterrupted run writes, byte for byte, without recomputing the
blocks it had finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("profile_worker.py")
ARGS = ["2", "32", "rtn-w4g64s,nf4-w4g64s"]


def run_worker(folder: Path, cache: Path, kill_after_block: int | None = None, sig: int = signal.SIGKILL) -> list[str]:
    """Run a profile in its own process; with ``kill_after_block``, it gets ``sig`` right after that many blocks are saved."""
    env = dict(os.environ, BITPLAN_CACHE=str(cache), PYTHONPATH=os.pathsep.join(sys.path))
    if kill_after_block is not None:
        env.update(KILL_AFTER_BLOCK=str(kill_after_block), KILL_SIGNAL=signal.Signals(sig).name)
    done = subprocess.run([sys.executable, str(WORKER), str(folder), *ARGS], env=env, capture_output=True, text=True, timeout=300)
    if kill_after_block is None:
        assert done.returncode == 0, done.stderr[-2000:]
    else:
        assert done.returncode != 0 and "layers" not in done.stdout, "the profile ended despite the signal"
        assert sig != signal.SIGINT or "KeyboardInterrupt" in done.stderr
    return done.stdout.splitlines()


def saved_tables(cache: Path) -> list[Path]:
    return sorted((cache / "profiles").glob("*.safetensors"))


BLOCKS = 6  # tiny_llama_folder's depth


@pytest.fixture(scope="module")
def reference(tiny_llama_folder, tmp_path_factory) -> Path:
    """The table an uninterrupted profile writes."""
    cache = tmp_path_factory.mktemp("whole")
    whole = run_worker(tiny_llama_folder, cache)
    assert sum(line.startswith("score ") for line in whole) == BLOCKS
    assert not list(cache.glob("profiles/blocks/*/*")), "the finished profile leaves no block files"
    [table] = saved_tables(cache)
    return table


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "sigint"])
def test_a_killed_profile_resumes_to_the_same_bytes(tiny_llama_folder, reference, tmp_path, sig):
    blocks = BLOCKS

    cache = tmp_path / "killed"
    run_worker(tiny_llama_folder, cache, kill_after_block=3, sig=sig)  # blocks 5, 4, 3 are finished
    assert saved_tables(cache) == []
    finished = len(list(cache.glob("profiles/blocks/*/block-*.safetensors")))
    assert finished == 3
    assert not list(cache.glob("profiles/blocks/*/.*.tmp")), "no temporary file survives"

    resumed = run_worker(tiny_llama_folder, cache)
    assert f"resumed {finished} {blocks}" in resumed
    assert sum(line.startswith("score ") for line in resumed) == blocks - finished  # finished blocks are not recomputed
    [table] = saved_tables(cache)
    assert table.name == reference.name
    assert table.read_bytes() == reference.read_bytes()


def test_safetensors_bytes_depend_only_on_contents(tmp_path):
    """The writer the table uses: same contents in any insertion order, same bytes; safetensors reads them back."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from bitplan.atomic import safetensors_bytes, write_safetensors

    tensors = {"scores": torch.randn(3, 5, dtype=torch.float64), "bytes": torch.arange(7), "grad": torch.randn(2, 3).to(torch.bfloat16)}
    meta = {"schemes": '["a"]', "layers": '["x", "y"]', "provenance": "{}"}
    reordered = {name: tensors[name] for name in reversed(tensors)}
    assert safetensors_bytes(tensors, meta) == safetensors_bytes(reordered, dict(reversed(meta.items())))
    write_safetensors(tmp_path / "t.safetensors", tensors, meta)
    back = load_file(str(tmp_path / "t.safetensors"))
    assert all(torch.equal(back[name], tensors[name]) for name in tensors)
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as handle:
        assert handle.metadata() == meta
