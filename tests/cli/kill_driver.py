"""Run the ``bitplan`` command and die by SIGKILL (as ``kill -9`` does) at a chosen point.

    python kill_driver.py POINT[:PATTERN] N ARGV...

POINT is where the process dies, the ``N``-th time it gets there (counting only files whose
``parent/name`` matches the glob PATTERN, when given, e.g. ``profiles/*.safetensors`` for the
profile table and not the per-block files beneath it):

- ``read``: reading a weight tensor (profiling or quantizing is under way);
- ``save``: writing a safetensors file (a profile table, a profile block, a checkpoint shard):
  the temporary file is left half-written;
- ``rename``: just before an atomic rename (a complete temporary file or folder is left).

A timer cannot aim at these points on a model this small; dying here is exactly what a
``kill -9`` arriving at that moment does, since SIGKILL cannot be caught or cleaned up after.
"""

import os
import signal
import sys
from fnmatch import fnmatch
from pathlib import Path

import bitplan.atomic
import bitplan.models.source
import bitplan.profiles.resume
import bitplan.profiles.tables
from bitplan.cli import main

(point, _, pattern), nth, argv = sys.argv[1].partition(":"), int(sys.argv[2]), sys.argv[3:]
calls = 0


def arrived(path: str | os.PathLike = "") -> bool:
    global calls
    if pattern and not fnmatch(f"{Path(path).parent.name}/{Path(path).name}", pattern):
        return False
    calls += 1
    return calls == nth


SIGNAL = signal.Signals[os.environ.get("KILL_SIGNAL", "SIGKILL")]  # SIGINT/SIGTERM: as if Ctrl-C or kill came right here


if SIGNAL == signal.SIGINT:  # Ctrl-C as in a terminal, even when the tests run as a background job (SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def die() -> None:
    os.kill(os.getpid(), SIGNAL)


if point == "read":
    real_tensor = bitplan.models.source.WeightReader.tensor

    def tensor(self, *args, **kwargs):
        if arrived():
            die()
        return real_tensor(self, *args, **kwargs)

    bitplan.models.source.WeightReader.tensor = tensor
elif point == "save":
    real_close, real_write = bitplan.atomic.SafetensorsStream.close, bitplan.atomic.write_safetensors

    def close(self):  # checkpoint shards, streamed inside emit's staging folder
        real_close(self)
        if arrived(self.path):
            os.truncate(self.path, self.path.stat().st_size // 2)
            die()

    def write(path, tensors, metadata=None):  # profile tables and blocks, written atomically
        if arrived(path):
            data = bitplan.atomic.safetensors_bytes(tensors, metadata)

            def half(temporary):
                temporary.write_bytes(data[: len(data) // 2])
                die()

            bitplan.atomic.write_atomic(Path(path), half)
        real_write(path, tensors, metadata)

    bitplan.atomic.SafetensorsStream.close = close
    bitplan.profiles.tables.write_safetensors = write
    bitplan.profiles.resume.write_safetensors = write
elif point == "rename":
    real_replace = os.replace

    def replace(source, target):
        if arrived(target):
            die()
        return real_replace(source, target)

    os.replace = replace
else:
    raise SystemExit(f"unknown point {point}")

sys.exit(main(argv))
