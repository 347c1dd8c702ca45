"""Temporary names left by a killed writer are removed by the next write beside the same target;
those of a live writer, and other targets' files, are left alone."""

from __future__ import annotations

import os
import subprocess
import sys

from bitplan.atomic import staging_folder, visible_path, write_text_atomic


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead, live = dead_pid(), os.getppid()
    left = [tmp_path / f".plan.json-{dead}-abcd1234.tmp", tmp_path / f".ckpt-{dead}-x_y0z9ab"]
    left[1].mkdir()
    (left[1] / "model-00001.safetensors").write_bytes(b"half")
    left[0].write_text("{half")
    kept = [tmp_path / f".plan.json-{live}-abcd1234.tmp", tmp_path / f".plan.json-5-{dead}-abcd1234.tmp", tmp_path / "plan.json.bak"]
    for path in kept:
        path.write_text("someone else's")
    write_text_atomic(tmp_path / "plan.json", "{}")
    with staging_folder(tmp_path / "ckpt") as staging:
        (staging / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["plan.json", "ckpt", *(p.name for p in kept)])
    assert (tmp_path / "plan.json").read_text() == "{}" and os.listdir(tmp_path / "ckpt") == ["config.json"]


def test_messages_name_the_folder_a_user_knows_not_a_temporary_name(tmp_path):
    assert visible_path(tmp_path / ".ckpt-123-abcd1234" / "model-00001.safetensors") == tmp_path
    assert visible_path(tmp_path / "cache" / "profiles" / ".k.safetensors-9-abcd1234.tmp") == tmp_path / "cache" / "profiles"
    assert visible_path(tmp_path / ".cache" / "x") == tmp_path / ".cache" / "x"
