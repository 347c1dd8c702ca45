"""Atomic writes: everything bitplan writes goes to a temporary name beside its target, then is
renamed into place, so an interrupted run leaves either the old state or the new one.

Temporary names carry the writer's process id (``.<target>-<pid>-<random>``). A run killed
outright (``kill -9``, a power cut) cannot remove its own; the next write beside the same
target removes those whose process is gone, and readers never look at them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_prefix(target: Path) -> str:
    return f".{target.name}-{os.getpid()}-"


TEMPORARY_NAME = re.compile(r"^\..+-(\d+)-[a-z0-9_]{8}(\.tmp)?$")  # .<target>-<pid>-<tempfile's 8 random characters>


def visible_path(path: Path) -> Path:
    """``path`` up to its first temporary component: what a user knows (a temporary name is gone by the time they read it)."""
    parts = Path(path).parts
    for index, part in enumerate(parts):
        if TEMPORARY_NAME.match(part):
            return Path(*parts[:index]) if index else Path(".")
    return Path(path)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_abandoned(target: Path) -> list[Path]:
    """Remove the temporary files and folders that dead processes left beside ``target``; returns them."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}-(\d+)-[a-z0-9_]{{8}}(\.tmp)?$")  # tempfile's 8 random characters
    removed = []
    for item in target.parent.glob(f".{glob_escape(target.name)}-*"):
        match = pattern.match(item.name)
        if match and not process_alive(int(match[1])):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
            removed.append(item)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary_path)``, then rename the result onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, whose I/O failures (a full disk) surface as the ``OSError``
    they are, with their errno and file name, rather than as the library's own error type."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from exc


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda temporary: temporary.write_text(text))


SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
                      "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file whose bytes depend only on its contents: header keys sorted, tensors in
    name order (the ``safetensors`` writer orders the metadata by a hash map, so two runs differ)."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    chunks, offset = [], 0
    for name in sorted(tensors):
        data, header[name] = tensor_entry(tensors[name], offset)
        chunks.append(data.tobytes())
        offset += data.nbytes
    return safetensors_header(header) + b"".join(chunks)


def tensor_entry(tensor, offset: int):
    """A tensor's bytes (a uint8 view of its own memory, contiguous on the CPU) and its safetensors header
    entry when its data starts at ``offset``."""
    import torch

    tensor = tensor.detach().contiguous().cpu()
    data = tensor.reshape(-1).view(torch.uint8).numpy()
    dtype = SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix("torch.")]
    return data, {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + data.nbytes]}


def safetensors_header(header: dict) -> bytes:
    """The 8-byte length and JSON header (keys sorted, padded with spaces to 8 bytes) that open a safetensors file."""
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


class SafetensorsStream:
    """A safetensors file written a tensor at a time, for files larger than what should sit in memory
    (an emitted shard of a large model): each tensor's bytes go to a side file as they arrive, and
    :meth:`close` writes the header (keys sorted; data in the order added) and appends the data. Memory
    holds one tensor, never the file; the disk briefly holds the data twice. The bytes depend only on
    the tensors and their order."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.data_path = self.path.with_name(f"{self.path.name}.partial")  # beside it, in the writer's staging folder
        self.data = open(self.data_path, "wb")  # noqa: SIM115 (closed by close() or abandon())
        self.header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self.bytes = 0

    @property
    def names(self) -> list[str]:
        return sorted(name for name in self.header if name != "__metadata__")

    def add(self, name: str, tensor) -> None:
        if name in self.header:
            raise ValueError(f"{name} was already written to {self.path.name}")
        data, entry = tensor_entry(tensor, self.bytes)  # the tensor's own memory, not a copy
        self.guarded(lambda: self.data.write(data))
        self.header[name] = entry
        self.bytes += data.nbytes

    def close(self) -> None:
        self.data.close()

        def write() -> None:
            with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
                out.write(safetensors_header(self.header))
                shutil.copyfileobj(data, out, 64 << 20)
        self.guarded(write)
        self.data_path.unlink()

    def abandon(self) -> None:
        self.data.close()
        self.data_path.unlink(missing_ok=True)

    def guarded(self, write: Callable[[], object]) -> None:
        try:
            write()
        except OSError as exc:  # a full disk: name the file
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
            raise


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write :func:`safetensors_bytes` to ``path`` atomically."""
    write_atomic(path, lambda temporary: write_bytes(temporary, safetensors_bytes(tensors, metadata)))


def write_bytes(path: Path, data: bytes) -> None:
    """``path.write_bytes(data)``, whose failure names the file (a write that fails on a full disk does not)."""
    try:
        path.write_bytes(data)
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


@contextmanager
def staging_folder(target: Path, keep_existing: bool = False) -> Iterator[Path]:
    """A private folder beside ``target`` to fill; renamed onto ``target`` (which must be absent
    or an empty folder) when the block ends without an error, removed otherwise. With
    ``keep_existing``, a ``target`` that another process completed meanwhile is kept and the
    staged copy dropped."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(target)
    staging = Path(tempfile.mkdtemp(prefix=temporary_prefix(target), dir=target.parent))
    try:
        yield staging
        staging.chmod(0o755)
        for item in staging.iterdir():
            item.chmod(0o644)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if keep_existing and target.exists():
            shutil.rmtree(staging)
            return
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def json_digest(body: dict) -> str:
    """sha256 of ``body``'s canonical JSON (sorted keys): the ``integrity`` that plan.json and
    scorecards carry, so a file edited by hand is refused."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def sealed_json(body: dict) -> str:
    """Deterministic JSON text of ``body`` with its ``integrity`` digest beside it."""
    return json.dumps({**body, "integrity": json_digest(body)}, indent=2, sort_keys=True) + "\n"
