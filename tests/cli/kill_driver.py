"""Run the ``bitplan`` command and die by SIGKILL (as ``kill -9`` does) at a chosen point.

    python kill_driver.py POINT N ARGV...

POINT is where the process dies, the ``N``-th time it gets there:

- ``read``: reading a weight tensor (profiling or quantizing is under way);
- ``save``: writing a safetensors file (a profile table or a checkpoint shard): the file is
  left half-written;
- ``rename``: just before an atomic rename (a complete temporary file or folder is left).

A timer cannot aim at these points on a model this small; dying here is exactly what a
``kill -9`` arriving at that moment does, since SIGKILL cannot be caught or cleaned up after.
"""

import os
import signal
import sys
from pathlib import Path

import bitplan.atomic
import bitplan.checkpoints.emit
import bitplan.models.source
import bitplan.profiles.tables
from bitplan.cli import main

point, nth, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = 0


def arrived() -> bool:
    global calls
    calls += 1
    return calls == nth


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if point == "read":
    real_tensor = bitplan.models.source.WeightReader.tensor

    def tensor(self, *args, **kwargs):
        if arrived():
            die()
        return real_tensor(self, *args, **kwargs)

    bitplan.models.source.WeightReader.tensor = tensor
elif point == "save":
    real_save = bitplan.atomic.save_safetensors

    def save(tensors, path, metadata=None):
        real_save(tensors, path, metadata)
        if arrived():
            os.truncate(path, Path(path).stat().st_size // 2)
            die()

    bitplan.profiles.tables.save_safetensors = save
    bitplan.checkpoints.emit.save_safetensors = save
elif point == "rename":
    real_replace = os.replace

    def replace(source, target):
        if arrived():
            die()
        return real_replace(source, target)

    os.replace = replace
else:
    raise SystemExit(f"unknown point {point}")

sys.exit(main(argv))
