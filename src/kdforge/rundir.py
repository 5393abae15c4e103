"""The run folder: one run at a time (an exclusive lock), which recipe it belongs to, and its leftovers.

`RunLock` holds an OS lock (``filelock``) on ``<out>/.kdforge.lock`` for the whole run; ``.kdforge.holder.json``
beside it says who holds it (pid, host, start time), so a refusal can name the other run. The OS drops the lock
when its process dies, so a lock file left by a killed run does not block the next one. Under a multi-process launch
only the main process takes it.

`check_manifest` decides whether this recipe may run in the folder: a manifest.json of another recipe is refused,
unless that run stopped before its first checkpoint (then nothing is lost, and the manifest is replaced); a manifest
that does not parse is rebuilt when there is no checkpoint, and refused in one line otherwise.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

from .errors import KDForgeError
from .io import atomic_write_json

log = logging.getLogger("kdforge")

LOCK_NAME = ".kdforge.lock"
HOLDER_NAME = ".kdforge.holder.json"


class RunLock:
    """An exclusive lock on a run folder, taken without waiting: a second run in the folder is refused."""

    def __init__(self, out: Path):
        from filelock import FileLock

        self.out = Path(out)
        self._lock = FileLock(str(self.out / LOCK_NAME))

    def acquire(self) -> None:
        from filelock import Timeout

        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise KDForgeError(f"output dir '{self.out}' is in use by another kdforge run ({self._holder()}); wait "
                               "for it to finish or stop it, or use another --out") from None
        atomic_write_json(self.out / HOLDER_NAME, {"pid": os.getpid(), "host": socket.gethostname(),
                                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def _holder(self) -> str:
        try:
            h = json.loads((self.out / HOLDER_NAME).read_text())
            return f"pid {h['pid']} on {h['host']}, started {h['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self._lock.is_locked:
            (self.out / HOLDER_NAME).unlink(missing_ok=True)
            self._lock.release()


def read_manifest(out: Path) -> dict | None:
    """The run's manifest.json; None when absent. Raises ValueError when it does not parse as a JSON object."""
    path = Path(out) / "manifest.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def make_output_dir(out: Path) -> None:
    """Create the folder and check that files can be written in it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write_test.tmp-")  # unique: runs may start side by side
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise KDForgeError(f"cannot write to output dir '{out}' ({err.strerror}); choose another with --out") from None


def _same_recipe_today(manifest: dict, recipe_hash: str) -> bool:
    """A manifest from an older kdforge hashed its recipe under another schema: read its recipe under today's."""
    from .recipe import parse_recipe

    try:
        return parse_recipe(manifest["recipe"]).hash() == recipe_hash
    except (KDForgeError, KeyError, TypeError):
        return False


def check_manifest(out: Path, recipe_hash: str, has_checkpoint: bool) -> bool:
    """Check that the folder may hold a run of this recipe. Returns True when the manifest.json there must be
    (re)written by this run (none yet, unreadable, or of a run that never reached a checkpoint)."""
    finished = (out / "final.json").is_file() or (out / "student").is_dir()
    try:
        manifest = read_manifest(out)
    except (ValueError, UnicodeDecodeError) as err:
        if has_checkpoint or finished:
            raise KDForgeError(
                f"{out / 'manifest.json'} is empty or corrupt ({err}), so it cannot tell which recipe this run is; if "
                "the folder holds a run of this same recipe, delete manifest.json and rerun to rebuild it, otherwise "
                "use another --out") from None
        log.warning("%s was empty or corrupt (%s); the run has no checkpoint yet, so it is rebuilt",
                    out / "manifest.json", err)
        return True
    if manifest is None:
        return True
    old = manifest.get("recipe_hash")
    if old == recipe_hash or _same_recipe_today(manifest, recipe_hash):
        return False
    if has_checkpoint or finished:
        raise KDForgeError(f"output dir '{out}' holds a run of a different recipe (hash {old}, this one "
                           f"{recipe_hash}); use another --out or delete that folder")
    log.info("output dir %s holds the manifest of a run of another recipe (hash %s) that stopped before its first "
             "checkpoint; starting this recipe there instead", out, old)
    return True


def set_aside(out: Path, paths: list[Path]) -> Path | None:
    """Move what a run wrote (files or folders) into `out/superseded/<time>/`, keeping their names: a rewound or
    extended run replaces them, and nothing a user may still want is deleted. Returns that folder (None: nothing
    to move)."""
    present = [p for p in paths if p.exists()]
    if not present:
        return None
    folder = Path(out) / "superseded" / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    for p in present:
        os.replace(p, folder / p.name)
    log.info("moved %s to %s", ", ".join(p.name for p in present), folder)
    return folder
