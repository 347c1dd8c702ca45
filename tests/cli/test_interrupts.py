"""Interrupted and concurrent runs, a full disk, and the profile cache: each leaves nothing
half-written, and the next identical run succeeds with byte-identical output.

Every run here is a real ``python -m bitplan`` subprocess on the tiny model.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faults_support import REPO, TINY_PLAN, bitplan_process, cli_env, error_lines, run_bitplan
from tiny_models import write_tiny_model

DRIVER = Path(__file__).with_name("kill_driver.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory, smollm_folder):
    """The tiny model, and the plan and checkpoint an uninterrupted run makes of it."""
    root = tmp_path_factory.mktemp("interrupts")
    model = write_tiny_model(root / "model", smollm_folder)
    plan = root / "plan.json"
    done = run_bitplan(["plan", model, *TINY_PLAN, "--out", plan], root / "cache")
    assert done.returncode == 0, done.stderr
    done = run_bitplan(["emit", plan, "--out", root / "ckpt"], root / "cache")
    assert done.returncode == 0, done.stderr
    return {"root": root, "model": model, "plan": plan, "ckpt": root / "ckpt"}


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def hidden(*folders: Path) -> list[Path]:
    """Temporary names (``.<target>-<pid>-...``) left anywhere under ``folders``."""
    return [p for folder in folders if folder.exists() for p in folder.rglob(".*")]


def killed_at(point: str, nth: int, argv: list, cache: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(DRIVER), point, str(nth), *map(str, argv)], env=cli_env(cache), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr[-2000:])
    return done


PLAN_POINTS = {
    "profiling: reading the 5th weight": ("read", 5),
    "profiling: reading the 20th weight": ("read", 20),
    "profile block half-written": ("save:*/block-*.safetensors", 2),
    "profile table half-written": ("save:profiles/*.safetensors", 1),
    "profile table written, not yet renamed": ("rename:profiles/*.safetensors", 1),
    "plan.json written, not yet renamed": ("rename:*/plan.json", 1),
}


@pytest.mark.parametrize("where", [pytest.param(w, marks=[] if w == "profile table half-written" else pytest.mark.slow) for w in PLAN_POINTS])
def test_plan_killed_then_rerun_gives_the_same_plan(where, world, tmp_path):
    point, nth = PLAN_POINTS[where]
    cache, out = tmp_path / "cache", tmp_path / "plan.json"
    argv = ["plan", world["model"], *TINY_PLAN, "--out", out]
    killed_at(point, nth, argv, cache)
    assert not out.exists()
    done = run_bitplan(argv, cache)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == world["plan"].read_bytes()
    assert hidden(cache, tmp_path) == []  # what the killed run left was removed
    assert len(list((cache / "profiles").glob("*.safetensors"))) == 1


EMIT_POINTS = {
    "quantizing: reading the 3rd weight": ("read", 3),
    "quantizing: reading the 15th weight": ("read", 15),
    "checkpoint shard half-written": ("save", 1),
    "shard written, not yet renamed": ("rename", 1),
    "checkpoint complete, folder not yet renamed": ("rename", 2),
}


@pytest.mark.parametrize("where", [pytest.param(w, marks=[] if w == "checkpoint shard half-written" else pytest.mark.slow) for w in EMIT_POINTS])
def test_emit_killed_then_rerun_gives_the_same_checkpoint(where, world, tmp_path):
    point, nth = EMIT_POINTS[where]
    out = tmp_path / "ckpt"
    argv = ["emit", world["plan"], "--out", out]
    killed_at(point, nth, argv, tmp_path / "cache")
    assert not out.exists()
    assert len(hidden(tmp_path)) == 1  # the killed run's staging folder, under a temporary name
    done = run_bitplan(argv, tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert files(out) == files(world["ckpt"])
    assert hidden(tmp_path) == []


@pytest.mark.slow
def test_kill_9_from_outside_at_any_moment(world, tmp_path):
    """``kill -9`` from another process at moments spread over an uninterrupted run's length."""
    started = time.monotonic()
    assert run_bitplan(["emit", world["plan"], "--out", tmp_path / "timing"], tmp_path / "cache").returncode == 0
    length = time.monotonic() - started
    for index, fraction in enumerate((0.3, 0.6, 0.8, 0.95)):
        out = tmp_path / f"ckpt{index}"
        process = bitplan_process(["emit", world["plan"], "--out", out], tmp_path / "cache")
        time.sleep(length * fraction)
        process.kill()
        process.communicate()
        if not out.exists():  # killed before the checkpoint was renamed into place: run again
            done = run_bitplan(["emit", world["plan"], "--out", out], tmp_path / "cache")
            assert done.returncode == 0, done.stderr
        assert files(out) == files(world["ckpt"])  # whole either way: complete from the killed run, or from the rerun
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"), (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_and_sigterm_during_emit_say_so_and_leave_nothing(signum, code, word, world, tmp_path):
    # the signal arrives while the 2nd weight is read, the staging folder half-filled (a timer
    # cannot aim inside an emit this small)
    out = tmp_path / "ckpt"
    done = subprocess.run([sys.executable, str(DRIVER), "read", "2", "emit", str(world["plan"]), "--out", str(out)],
                          env={**cli_env(tmp_path / "cache"), "KILL_SIGNAL": signal.Signals(signum).name}, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == code, done.stderr
    assert error_lines(done.stderr) == [f"bitplan: {word}; nothing half-written was kept: run the same command again"]
    assert not out.exists() and hidden(tmp_path) == []


def test_two_plans_at_once_on_one_cache(world, tmp_path):
    cache = tmp_path / "cache"
    outs = [tmp_path / f"plan{i}.json" for i in range(2)]
    processes = [bitplan_process(["plan", world["model"], *TINY_PLAN, "--out", out], cache) for out in outs]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    assert outs[0].read_bytes() == outs[1].read_bytes() == world["plan"].read_bytes()
    assert len(list((cache / "profiles").glob("*.safetensors"))) == 1 and hidden(cache) == []


def test_two_emits_into_one_folder_at_once(world, tmp_path):
    """One wins; the other refuses in one line (at the start, or when it finds the folder taken at the end)."""
    out = tmp_path / "ckpt"
    processes = [bitplan_process(["emit", world["plan"], "--out", out], tmp_path / "cache") for _ in range(2)]
    stderrs = [process.communicate(timeout=300)[1] for process in processes]
    results = sorted((process.returncode, error_lines(stderr)) for process, stderr in zip(processes, stderrs))
    assert [code for code, _ in results] == [0, 2]
    [line] = results[1][1]
    assert line in (f"bitplan: error: {out} already exists and is not an empty folder: choose another --out or remove it",
                    f"bitplan: error: {out} was created by another run while this one wrote the checkpoint (this copy was dropped): "
                    f"choose another --out or remove it")
    assert files(out) == files(world["ckpt"]) and hidden(tmp_path) == []


def test_a_damaged_cached_table_is_ignored_and_replaced(world, tmp_path, monkeypatch, capsys):
    from bitplan.cli import main

    monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path / "cache"))
    argv = ["plan", str(world["model"]), *TINY_PLAN, "--out", str(tmp_path / "plan.json")]
    assert main(argv) == 0
    [table] = (tmp_path / "cache" / "profiles").glob("*.safetensors")
    table.write_bytes(table.read_bytes()[:100])  # damaged by something other than bitplan
    assert main(argv) == 0
    assert (tmp_path / "plan.json").read_bytes() == world["plan"].read_bytes()
    assert table.stat().st_size > 100


# Runs a command with a fresh one-page tmpfs mounted at $FULL (in a private mount namespace), filled up first.
FULL_DISK = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=4k tmpfs "$FULL" && head -c 4096 /dev/zero > "$FULL/filler"; exec "$@"', "sh"]


def can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not can_mount(), reason="needs user namespaces to mount a small tmpfs (unshare -rm)")


@needs_mount
@pytest.mark.parametrize("what", ["emit", "profile cache"])
def test_a_full_disk_is_one_line_and_leaves_nothing(what, world, tmp_path):
    """The checkpoint's folder, or the profile cache, on a filesystem with no space left."""
    full = tmp_path / "full"
    full.mkdir()
    if what == "emit":
        argv, cache = ["emit", world["plan"], "--out", full / "ckpt"], tmp_path / "cache"
    else:
        argv, cache = ["plan", world["model"], *TINY_PLAN, "--out", tmp_path / "plan.json"], full
    command = [*FULL_DISK, sys.executable, "-m", "bitplan", *map(str, argv)]
    done = subprocess.run(command, env={**cli_env(cache), "FULL": str(full)}, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    # the folder being written when the disk filled: the checkpoint's, or one in the profile cache (a block's rows)
    [line] = error_lines(done.stderr)
    where = re.escape(str(full)) if what == "emit" else re.escape(str(full / "profiles")) + r"(/[^:]+)?"
    assert re.fullmatch(f"bitplan: error: no space left on the device under {where}: free some space or write "
                        r"elsewhere \(nothing half-written was kept\)", line), line
    assert not (tmp_path / "plan.json").exists() and list(full.iterdir()) == []  # the tmpfs is gone; nothing reached the real folder
