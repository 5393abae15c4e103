"""Speed, size and memory figures: prefill tokens/s, safetensors bytes on disk, peak resident memory."""
from __future__ import annotations

import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from ..data.packing import TokenBlocks

PEAK_MEMORY_METHOD = ("the process's resident-set high-water mark (Linux: VmHWM; elsewhere ru_maxrss) since it started "
                      "or since its last reset (kdforge bench resets it when each cell starts, where the OS allows); "
                      "everything resident counts, the teacher included: not a per-model figure")


@torch.no_grad()
def prefill_tokens_per_s(model: nn.Module, blocks: TokenBlocks, batch_size: int = 8, repeats: int = 2,
                         bf16: bool = False) -> float:
    """Tokens per second of a full-sequence forward without a cache (the prompt-processing phase of generation):
    one warm-up batch, then the best of `repeats` timed batches of `batch_size` blocks."""
    ids = blocks.ids[:batch_size].to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    ctx = (lambda: torch.autocast(ids.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    try:
        with ctx():
            model(input_ids=ids, use_cache=False)
            best = float("inf")
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                best = min(best, time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return ids.numel() / max(best, 1e-9)


def safetensors_bytes(folder: str | Path | None) -> int | None:
    """Bytes of the *.safetensors weight files in a saved model folder (None when there is no such folder)."""
    if folder is None or not Path(folder).is_dir():
        return None
    files = list(Path(folder).glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def parameter_bytes(model: nn.Module) -> int:
    """Bytes the unique parameters take in memory at their current dtype."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def rss_kib(field: str = "VmHWM") -> int | None:
    """A resident-memory field of /proc/self/status in KiB (VmRSS: now, VmHWM: high-water mark); None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Restart the high-water mark at the current RSS (Linux >= 4.0: "5" to /proc/self/clear_refs).
    False where the OS has no such reset; the peak then stays the one since the process started."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """See PEAK_MEMORY_METHOD. ru_maxrss (the fallback) is in KiB on Linux and in bytes on macOS."""
    hwm = rss_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
