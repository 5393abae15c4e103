"""Atomic file writes: a crash never leaves a half-written output behind.

Every write goes to a temporary sibling named ``.<name>.tmp-XXXXXXXX`` (older kdforge: ``.<name>.XXXXXXXX``), fsync'd
and renamed into place; a directory being replaced is moved aside as ``.<name>.old`` first. A kill in between leaves
such a temporary behind: `remove_temporaries` deletes them when the next run in that folder starts. A disk that fills
up while writing raises `DiskFullError`, one line naming the file and the filesystem.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import KDForgeError

log = logging.getLogger("kdforge")

TMP_TAG = ".tmp-"
# .<name>.tmp-XXXXXXXX (this kdforge); the older mkstemp/mkdtemp form .<name>.XXXXXXXX (8 random [a-z0-9_]) and an
# interrupted swap's .<name>.old only for names kdforge itself writes, so a user's `.env.template` is never touched
_OWN_NAMES = (r"(manifest\.json|final\.json|eval\.json|metrics\.jsonl|metrics\.json|student|report\.html|report\.md|"
              r"step_\d{8}|index\.json|shard_\d{5}\.safetensors)")
_TEMPORARY = re.compile(rf"^\.(?:.+\.(tmp-[a-z0-9_]{{8}})|{_OWN_NAMES}\.([a-z0-9_]{{8}}|old))$")


class DiskFullError(KDForgeError):
    """No space left (or quota exceeded) while writing an output; the previous version of it is intact."""


def mount_point(path: str | Path) -> Path:
    """The mount point of the filesystem that holds `path` (or would hold it)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT, also as torch's writer (`file write failed`, `basic_ios::clear: iostream error`) and
    safetensors (`os error 28`) report it."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return any(s in text for s in ("No space left on device", "Disk quota exceeded", "os error 28", "code: 28",
                                   "iostream error", "file write failed"))


@contextmanager
def disk_full_as_error(path: str | Path, hint: str = "") -> Iterator[None]:
    """Turn a disk-full failure inside the block into one line naming `path`, its filesystem and the fix."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if not is_disk_full(err):
            raise
        raise DiskFullError(f"disk full while writing {path}; free space on {mount_point(path)}"
                            f"{' or ' + hint if hint else ''}, then rerun the same command") from None


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: setting it (the only way to read it) races with other threads


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_TAG}")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # what open() would give, not mkstemp's owner-only 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_dir(path: str | Path, fill: Callable[[Path], None]) -> None:
    """Build a directory in a temporary sibling, then swap it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{TMP_TAG}"))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # what mkdir would give, not mkdtemp's owner-only 0700
        fill(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries that killed atomic writes left directly in `folder` (see the module docstring); log
    and return what was removed. Call it only where no other process is writing (under the run lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        match = _TEMPORARY.match(entry.name)
        if not match:
            continue
        if match.group(3) == "old":  # a kill between the two renames of atomic_write_dir: put the old one back
            target = entry.with_name(entry.name[1:-len(".old")])
            if not target.exists():
                os.replace(entry, target)
                log.info("restored %s from %s (a replacement of it was interrupted)", target, entry.name)
                continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted write in %s: %s", len(removed), folder,
                 ", ".join(p.name for p in removed))
    return removed
