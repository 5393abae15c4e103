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
    fn = lib.kdforge_topk_logsumexp
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, i64, i64, ctypes.c_float, ptr, ptr, ptr, ptr, ptr, ptr]
    fn.restype = None
    return lib


def available() -> bool:
    """Whether the native kernel is built and loaded (building it on first call)."""
    return _library() is not None


_local = threading.local()


def _scratch(k: int, vocab: int) -> torch.Tensor:
    """This thread's scratch for the kernel: a buffer of 4k entries, then vocab / 16 floats."""
    need = 4 * k * _ENTRY_BYTES + 4 * (vocab // 16)
    buf = getattr(_local, "scratch", None)
    if buf is None or buf.numel() < need:
        buf = _local.scratch = torch.empty(need, dtype=torch.uint8)
    return buf


def top_k_logsumexp(x: torch.Tensor, k: int, temperature: float, log_p: torch.Tensor, ids: torch.Tensor,
                    lse: torch.Tensor, log_rest: torch.Tensor) -> None:
    """Fill ``log_p`` [r, k] float32 (rank order), ``ids`` [r, k] int64, ``lse`` [r] and ``log_rest`` [r] (float32,
    contiguous) from float32 logits ``x`` [r, V] (unit stride along V) at ``temperature``: the values of
    :func:`kdforge.teachers.cache.top_k_log_probs`. Rows are split over ``torch.get_num_threads()`` threads (the
    kernel runs without the GIL). Raises RuntimeError if the kernel is not available; rows with non-finite logits
    give non-finite outputs (the caller recomputes them)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the native top-k kernel is not available")
    rows, vocab = x.shape
    assert x.dtype == torch.float32 and x.stride(1) == 1 and 1 <= k <= vocab
    assert all(t.is_contiguous() for t in (log_p, ids, lse, log_rest))

    def run(r0: int, r1: int) -> None:
        scratch = _scratch(k, vocab)
        lib.kdforge_topk_logsumexp(
            x[r0].data_ptr(), r1 - r0, vocab, x.stride(0), k, float(temperature), log_p[r0].data_ptr(),
            ids[r0].data_ptr(), lse[r0:].data_ptr(), log_rest[r0:].data_ptr(), scratch.data_ptr(),
            scratch.data_ptr() + 4 * k * _ENTRY_BYTES)

    threads = min(torch.get_num_threads(), rows)
    if threads <= 1:
        run(0, rows)
        return
    bounds = [rows * i // threads for i in range(threads + 1)]
    list(_pool(threads).map(run, bounds[:-1], bounds[1:]))


@lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="kdforge-topk")
