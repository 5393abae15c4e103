"""What `auto` precision means on this machine: bf16 autocast only where the hardware runs bf16 natively.

bf16 autocast on a CPU without native bf16 instructions is emulated and several times slower than fp32 (a
1024x576 @ 576x1536 linear took ~240 ms under bf16 autocast vs ~32 ms in fp32 on an AVX2-only EPYC). So:

- CUDA (when torch sees a GPU): bf16 if `torch.cuda.is_bf16_supported()`, else fp32.
- CPU: bf16 only with AVX512_BF16 or AMX (what torch's oneDNN kernels use for bf16), else fp32.

`teacher.dtype: auto` and `train.bf16: auto` (recipe.py) resolve through `auto_precision()`, which logs its choice
and the reason once per process. The environment variable KDFORGE_AUTO_PRECISION (`float32` or `bfloat16`) pins what
auto means, whatever the hardware: for a test suite or CI whose results must not depend on the CPU it lands on.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

from .errors import KDForgeError

log = logging.getLogger("kdforge")


@dataclass(frozen=True)
class Precision:
    dtype: str
    """float32 or bfloat16."""
    reason: str

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"


def cpu_capability() -> str:
    """torch's name for the CPU's vector extension level: AVX2, AVX512, ... (DEFAULT on others)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def native_cpu_bf16() -> list[str]:
    """The native bf16 features this CPU has (empty: bf16 would be emulated)."""
    import torch

    found = []
    for name, probe in (("AVX512_BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported")):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            found.append(name)
    return found


def detect() -> Precision:
    """The precision `auto` picks here, and why (not cached, not logged; see auto_precision)."""
    import torch  # imported here: a recipe with explicit precisions validates without loading torch

    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        if torch.cuda.is_bf16_supported():
            return Precision("bfloat16", f"CUDA device {gpu} supports bf16")
        return Precision("float32", f"CUDA device {gpu} has no bf16 support")
    cap, native = cpu_capability(), native_cpu_bf16()
    if native:
        return Precision("bfloat16", f"CPU capability {cap} with native bf16 ({', '.join(native)})")
    return Precision("float32", f"CPU capability {cap} without native bf16 (no AVX512_BF16/AMX): "
                                "bf16 autocast would be emulated, several times slower than fp32")


def what_auto_means() -> Precision:
    """What KDFORGE_AUTO_PRECISION pins, else `detect()` (not cached, not logged)."""
    pinned = os.environ.get("KDFORGE_AUTO_PRECISION")
    if not pinned:
        return detect()
    if pinned not in ("float32", "bfloat16"):
        raise KDForgeError(f"KDFORGE_AUTO_PRECISION={pinned!r}: use float32 or bfloat16, or unset it")
    return Precision(pinned, "pinned by KDFORGE_AUTO_PRECISION")


@functools.cache
def auto_precision() -> Precision:
    """`what_auto_means()`, logged as one line the first time a process asks."""
    p = what_auto_means()
    log.info("precision auto -> %s: %s", p.dtype, p.reason)
    return p


def resolve(dtype: str) -> str:
    """A precision setting (`auto`, `float32`, `bfloat16`) as the dtype it means on this machine."""
    return auto_precision().dtype if dtype == "auto" else dtype


def manifest_entry(recipe) -> dict:
    """What a run's manifest records: the precisions the run uses (auto already resolved) and what auto means here."""
    p = what_auto_means()  # not logged: with explicit precisions the run never asked for auto
    return {"teacher_dtype": recipe.teacher.dtype if recipe.teacher is not None else None,
            "student_bf16": recipe.train.bf16, "auto": p.dtype, "auto_reason": p.reason}
