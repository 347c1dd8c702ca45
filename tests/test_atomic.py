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


def test_a_streamed_safetensors_file_reads_back_as_written(tmp_path):
    """What emit writes its shards with: tensors of every dtype emit writes, added in any order (data in
    that order, header keys sorted), read back by safetensors itself; the same additions give the same
    bytes; no side file is left; a name added twice is refused."""
    import pytest
    import torch
    from safetensors import safe_open

    from bitplan.atomic import SafetensorsStream

    tensors = {"model.layers.1.mlp.weight_packed": torch.randint(-2**31, 2**31 - 1, (6, 4), dtype=torch.int32),
               "model.embed_tokens.weight": torch.randn(5, 3).to(torch.bfloat16),
               "model.layers.0.weight_scale": torch.randn(4, 2).to(torch.float16),
               "a.fp8": torch.randn(3, 3).to(torch.float8_e4m3fn), "b.int8": torch.randint(-128, 127, (9,), dtype=torch.int8),
               "c.shape": torch.tensor([4096, 14336]), "d.scalar": torch.tensor(0.5), "e.empty": torch.zeros(0, 4),
               "f.strided": torch.randn(4, 6)[:, ::2]}

    def write(path):
        stream = SafetensorsStream(path, metadata={"format": "pt"})
        for name, tensor in tensors.items():
            stream.add(name, tensor)
        assert stream.bytes == sum(t.numel() * t.element_size() for t in tensors.values())
        stream.close()
        return path.read_bytes()

    first = write(tmp_path / "one.safetensors")
    assert write(tmp_path / "two.safetensors") == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "two.safetensors"]
    with safe_open(str(tmp_path / "one.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert sorted(handle.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            back = handle.get_tensor(name)
            assert back.dtype == tensor.dtype and back.shape == tensor.shape
            assert torch.equal(back.reshape(-1).view(torch.uint8), tensor.contiguous().reshape(-1).view(torch.uint8))
    stream = SafetensorsStream(tmp_path / "three.safetensors")
    stream.add("x", torch.ones(2))
    with pytest.raises(ValueError, match="already written"):
        stream.add("x", torch.ones(2))
    stream.abandon()
    assert not (tmp_path / "three.safetensors.partial").exists()
