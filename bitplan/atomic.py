"""Atomic writes: everything bitplan writes goes to a temporary name beside its target, then is
renamed into place, so an interrupted run leaves either the old state or the new one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary_path)``, then rename the result onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda temporary: temporary.write_text(text))


@contextmanager
def staging_folder(target: Path, keep_existing: bool = False) -> Iterator[Path]:
    """A private folder beside ``target`` to fill; renamed onto ``target`` (which must be absent
    or an empty folder) when the block ends without an error, removed otherwise. With
    ``keep_existing``, a ``target`` that another process completed meanwhile is kept and the
    staged copy dropped."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
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
