"""The teacher cache's native top-k/logsumexp kernel (``topk_logsumexp.c``): compiled once per machine, loaded with
ctypes, and used by :func:`kdforge.teachers.cache.chunked_top_k_log_probs` when available.

Why native: per token the cache needs the top k logits, the logsumexp and the tail mass over the whole vocabulary.
In eager torch that is a top-k search and five or six passes over the logits, which cost more than the teacher's own
lm head on small teachers (benchmarks/cache_build.py); the kernel reads each row twice.

The library is built with the system C compiler (``$CC``, else ``cc``) into ``<kdforge cache>/native/<hash>/`` (the
hash covers the source, the flags, the compiler and the CPU's feature flags, since it is built for this CPU with
``-march=native``), atomically, so concurrent first uses are safe. Without a compiler, or with
``KDFORGE_NATIVE=0``, :func:`kernel` returns None and the cache uses the torch path (same values to float32
rounding; slower).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("kdforge")

SOURCE = Path(__file__).with_name("topk_logsumexp.c")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fPIC", "-shared"]
_ENTRY_BYTES = 16  # the kernel's heap entry: float value + int64 id, padded


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str) -> Path:
    from ..models import cache_dir

    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(),
                                     _cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:16]
    target = cache_dir() / "native" / key / "topk_logsumexp.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".kdforge-tmp-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], check=True, capture_output=True,
                       text=True, timeout=300)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("KDFORGE_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("teacher cache: no C compiler found; using the slower torch path for top-k and logsumexp")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", None) or err
        log.info("teacher cache: could not build the native top-k kernel (%s); using the torch path",
                 str(detail).strip().splitlines()[-1] if str(detail).strip() else type(err).__name__)
        return None
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.kdforge_topk_update.argtypes = [ptr, i64, i64, i64, i64, i64, f32, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.kdforge_topk_finish.argtypes = [i64, i64, f32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.kdforge_topk_update.restype = lib.kdforge_topk_finish.restype = None
    return lib


def available() -> bool:
    """Whether the native kernel is built and loaded (building it on first call)."""
    return _library() is not None


_local = threading.local()


def _group_max(width: int) -> torch.Tensor:
    """This thread's scratch for a tile's group maxima."""
    buf = getattr(_local, "group_max", None)
    if buf is None or buf.numel() < width // 16:
        buf = _local.group_max = torch.empty(max(1, width // 16))
    return buf


def _split(rows: int, fn) -> None:
    """fn(r0, r1) over the rows, split over ``torch.get_num_threads()`` threads (the kernel runs without the GIL)."""
    threads = min(torch.get_num_threads(), rows)
    if threads <= 1:
        fn(0, rows)
        return
    bounds = [rows * i // threads for i in range(threads + 1)]
    list(_pool(threads).map(fn, bounds[:-1], bounds[1:]))


@lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="kdforge-topk")


class TopKStream:
    """The per-row state of the streaming top-k/logsumexp reduction of ``rows`` rows of logits over a vocabulary
    given a tile of columns at a time (see ``topk_logsumexp.c``): :meth:`update` with each tile [rows, width]
    (float32, unit column stride; the tiles cover every column once, in increasing column order, so that ties
    keep the smaller id), then :meth:`finish`.

    Raises RuntimeError if the kernel is not available (check :func:`available` first).
    """

    def __init__(self, rows: int, k: int, temperature: float):
        self.lib = _library()
        if self.lib is None:
            raise RuntimeError("the native top-k kernel is not available")
        self.rows, self.k, self.temperature = rows, k, float(temperature)
        self.mx = torch.full((rows,), float("-inf"))
        self.total = torch.zeros(rows, dtype=torch.float64)
        self.tail = torch.zeros(rows, dtype=torch.float64)
        self.bar = torch.full((rows,), float("-inf"))
        self.count = torch.zeros(rows, dtype=torch.int64)
        self.buf = torch.empty(rows * 4 * k * _ENTRY_BYTES, dtype=torch.uint8)

    def _at(self, t: torch.Tensor, r0: int) -> int:
        return t.data_ptr() + r0 * t.element_size()

    def update(self, tile: torch.Tensor, col0: int) -> None:
        """Reduce ``tile`` [rows, width] (columns ``col0 .. col0 + width`` of each row) into the state."""
        rows, width = tile.shape
        assert rows == self.rows and tile.dtype == torch.float32 and tile.stride(1) == 1

        def run(r0: int, r1: int) -> None:
            self.lib.kdforge_topk_update(
                self._at(tile, r0 * tile.stride(0)), r1 - r0, width, tile.stride(0), col0, self.k, self.temperature,
                self._at(self.mx, r0), self._at(self.total, r0), self._at(self.tail, r0), self._at(self.bar, r0),
                self._at(self.count, r0), self.buf.data_ptr() + r0 * 4 * self.k * _ENTRY_BYTES,
                _group_max(width).data_ptr())

        _split(rows, run)

    def finish(self, log_p: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, log_rest: torch.Tensor) -> None:
        """Write ``log_p`` [rows, k] float32 (rank order), ``ids`` [rows, k] int64, ``lse`` [rows] and ``log_rest``
        [rows] (contiguous): the values of :func:`kdforge.teachers.cache.top_k_log_probs`, except that a row whose
        logits were not all finite, or whose tail mass may have underflowed, gets a non-finite ``lse`` or a NaN
        ``log_rest``: the caller recomputes those rows."""
        assert all(t.is_contiguous() for t in (log_p, ids, lse, log_rest))
        short = self.count < self.k  # only with non-finite logits
        if short.any():
            self.count.clamp_(min=self.k)
            self.total[short] = float("nan")

        def run(r0: int, r1: int) -> None:
            self.lib.kdforge_topk_finish(
                r1 - r0, self.k, self.temperature, self._at(self.mx, r0), self._at(self.total, r0),
                self._at(self.tail, r0), self._at(self.count, r0),
                self.buf.data_ptr() + r0 * 4 * self.k * _ENTRY_BYTES, self._at(log_p, r0 * self.k),
                self._at(ids, r0 * self.k), self._at(lse, r0), self._at(log_rest, r0))

        _split(self.rows, run)


def top_k_logsumexp(x: torch.Tensor, k: int, temperature: float, log_p: torch.Tensor, ids: torch.Tensor,
                    lse: torch.Tensor, log_rest: torch.Tensor) -> None:
    """:class:`TopKStream` of float32 logits ``x`` [r, V] (unit column stride) given whole: fills ``log_p``, ``ids``,
    ``lse`` and ``log_rest`` as :meth:`TopKStream.finish` does."""
    stream = TopKStream(x.shape[0], k, temperature)
    stream.update(x, 0)
    stream.finish(log_p, ids, lse, log_rest)
