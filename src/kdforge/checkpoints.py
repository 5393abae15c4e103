"""Checkpoints: written atomically and only with finite weights; read back safely, past damaged ones.

A checkpoint is a folder ``checkpoints/step_XXXXXXXX/`` with

* ``student/``: the student (``save_pretrained``, safetensors); with ``student.lora``, the adapter alone (a peft
  ``save_pretrained`` folder: the frozen base is rebuilt from the recipe on resume),
* ``extras.safetensors``: the trainable distillation extras (projectors ...), when there are any,
* ``trainer_state.pt``: optimizer, scheduler, step, torch RNG state, batch layout and the run log's counters. It holds
  tensors and plain Python values only and is read with ``torch.load(weights_only=True)``: a file that holds anything
  else (a planted pickle whose loading would run code) is refused, never unpickled.

On resume the newest checkpoint that reads back whole is used: a truncated, empty or missing file, or non-finite
weights (written by an older kdforge), makes kdforge say which file is bad and fall back to the one before.
"""
from __future__ import annotations

import logging
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import KDForgeError
from .io import atomic_write_dir, disk_full_as_error
from .rundir import set_aside

log = logging.getLogger("kdforge")

_STEP_DIR = re.compile(r"^step_(\d{8})$")


class UnsafeCheckpointError(KDForgeError):
    """A checkpoint file holds objects the safe loader refuses to build (it is never unpickled)."""


class DamagedCheckpoint(Exception):
    """A checkpoint file is missing, truncated or unreadable, or its weights are not finite."""

    def __init__(self, file: Path, why: str):
        super().__init__(f"{file} {why}")
        self.file = file


@dataclass
class Checkpoint:
    path: Path
    step: int
    student: dict[str, torch.Tensor]
    extras: dict[str, torch.Tensor]
    trainer_state: dict[str, Any]


def checkpoint_dirs(out: Path) -> list[Path]:
    """The checkpoint folders of a run, oldest first."""
    folder = Path(out) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _STEP_DIR.match(p.name) and p.is_dir())


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint folder (not checked; `newest_intact` reads it)."""
    dirs = checkpoint_dirs(out)
    return dirs[-1] if dirs else None


def nonfinite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors in `state` that hold a NaN or an infinity."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not file.is_file():
        raise DamagedCheckpoint(file, "is missing")
    try:
        return load_file(str(file))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for any bad header or size
        raise DamagedCheckpoint(file, f"is truncated or corrupt ({_first_line(err)})") from None


def read_trainer_state(file: Path) -> dict[str, Any]:
    """trainer_state.pt through torch's safe loader (tensors and plain values only)."""
    if not file.is_file():
        raise DamagedCheckpoint(file, "is missing")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UnsafeCheckpointError(
            f"refusing to load {file}: it holds objects other than tensors and plain values (kdforge never writes "
            f"such a file, and loading it could run code); delete {file.parent} to resume from the checkpoint "
            "before it, or use another --out") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise DamagedCheckpoint(file, f"is truncated or corrupt ({_first_line(err) or type(err).__name__})") from None
    if not isinstance(state, dict) or not {"step", "optimizer", "scheduler", "rng"} <= set(state):
        raise DamagedCheckpoint(file, "is not a kdforge trainer state")
    return state


def read_checkpoint(path: Path) -> Checkpoint:
    """Read a whole checkpoint into memory. Raises DamagedCheckpoint or UnsafeCheckpointError."""
    path = Path(path)
    trainer_state = read_trainer_state(path / "trainer_state.pt")
    adapter = path / "student" / "adapter_model.safetensors"
    student = _load_safetensors(adapter if adapter.is_file() else path / "student" / "model.safetensors")
    extras = _load_safetensors(path / "extras.safetensors") if (path / "extras.safetensors").is_file() else {}
    bad = nonfinite(student) + nonfinite(extras)
    if bad:
        raise DamagedCheckpoint(path, f"holds non-finite weights ({', '.join(bad[:3])})")
    return Checkpoint(path, int(trainer_state["step"]), student, extras, trainer_state)


def newest_intact(out: Path, announce: bool = True) -> Checkpoint | None:
    """The newest checkpoint that reads back whole; each damaged one newer than it is named in one line."""
    dirs = checkpoint_dirs(out)
    for i in range(len(dirs) - 1, -1, -1):
        try:
            return read_checkpoint(dirs[i])
        except DamagedCheckpoint as err:
            if announce:
                fallback = dirs[i - 1].name if i > 0 else "the start (no intact checkpoint left)"
                log.warning("checkpoint %s is unusable: %s; resuming from %s instead", dirs[i].name, err, fallback)
    return None


def apply_checkpoint(ckpt: Checkpoint, distiller, scheduler) -> dict[str, Any]:
    """Load the checkpoint's weights, scheduler and RNG; returns the trainer state (the optimizer state is loaded
    by the caller, after accelerate has prepared the optimizer)."""
    from .models import is_peft

    peft = is_peft(distiller.student)
    if peft != (ckpt.path / "student" / "adapter_model.safetensors").is_file():
        raise KDForgeError(f"checkpoint {ckpt.path} does not match the student of this recipe (one has a LoRA "
                           "adapter, the other not); use another --out")
    if peft:  # the adapter only; the frozen base was rebuilt from the recipe
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(distiller.student, ckpt.student)
        missing = [k for k in result.missing_keys if ".lora_" in k]  # the base's keys are missing by design
        unexpected = list(result.unexpected_keys)
    else:
        missing, unexpected = distiller.student.load_state_dict(ckpt.student, strict=False)
    # Tied weights are stored once; anything else missing means a different model.
    if unexpected or any("lm_head" not in k for k in missing):
        raise KDForgeError(f"checkpoint {ckpt.path} does not match the student of this recipe; use another --out")
    if ckpt.extras:
        distiller.load_state_dict(ckpt.extras, strict=False)
    scheduler.load_state_dict(ckpt.trainer_state["scheduler"])
    torch.set_rng_state(ckpt.trainer_state["rng"])
    return ckpt.trainer_state


def save_checkpoint(out: Path, step: int, distiller, optimizer, scheduler, keep: int, *,
                    state: dict[str, torch.Tensor] | None = None, optimizer_state: dict | None = None,
                    progress: dict[str, Any] | None = None, rng: torch.Tensor | None = None) -> Path:
    """Write a checkpoint (main process only). Distributed runs pass the gathered full `state` (distiller state dict)
    and `optimizer_state` (keyed by parameter name), see kdforge.distributed. `progress` (the batch layout and the
    run log's cumulative counters) goes into trainer_state.pt with the step; `rng` is the torch RNG state to resume
    with (default: the current one). Refuses non-finite weights; a full disk raises one line and leaves the
    previous checkpoints as they were."""
    from safetensors.torch import save_file

    if state is None:
        state = distiller.state_dict()
    bad = nonfinite(state)
    if bad:
        raise KDForgeError(f"weights became non-finite by step {step} ({', '.join(bad[:3])}); not saved as a "
                           "checkpoint; lower train.lr, enable train.clip_grad_norm, or check the data")
    path = Path(out) / "checkpoints" / f"step_{step:08d}"

    def fill(tmp: Path) -> None:
        distiller.student.save_pretrained(tmp / "student", state_dict={
            k[len("student."):]: v for k, v in state.items() if k.startswith("student.")})
        extras = {k: v.detach().contiguous() for k, v in state.items() if not k.startswith("student.")}
        if extras:
            save_file(extras, str(tmp / "extras.safetensors"))
        torch.save({"optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
                    "scheduler": scheduler.state_dict(), "step": step,
                    "rng": torch.get_rng_state() if rng is None else rng, **(progress or {})},
                   tmp / "trainer_state.pt")

    with disk_full_as_error(path, f"lower train.keep_checkpoints (now {keep}) or use an --out on a larger disk "
                                  "(the earlier checkpoints are intact)"):
        atomic_write_dir(path, fill)
    prune(out, step, keep)
    return path


def prune(out: Path, step: int, keep: int) -> None:
    """Keep the `keep` newest checkpoints up to `step`. Any after it were passed over as damaged on resume."""
    dirs = checkpoint_dirs(out)
    upto = [p for p in dirs if step_of(p) <= step]
    for old in upto[:-keep] + [p for p in dirs if step_of(p) > step]:
        shutil.rmtree(old, ignore_errors=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else ""


def rewind(out: Path, name: str) -> Path:
    """Make checkpoint `name` (a folder name such as `step_00000040`, or its path) the run's newest: the later
    checkpoints and the finished run's outputs (final.json, eval.json, student/) are set aside, not deleted."""
    wanted = Path(name)
    matches = [p for p in checkpoint_dirs(out) if p.name == wanted.name]
    if not matches:
        have = ", ".join(p.name for p in checkpoint_dirs(out)) or "none"
        raise KDForgeError(f"--resume-from {name}: {out / 'checkpoints'} has no such checkpoint (it has: {have})")
    chosen = matches[0]
    try:
        read_checkpoint(chosen)  # before anything moves
    except DamagedCheckpoint as err:
        raise KDForgeError(f"--resume-from {name}: {err}; choose another checkpoint") from None
    later = [p for p in checkpoint_dirs(out) if step_of(p) > step_of(chosen)]
    set_aside(out, later + [Path(out) / n for n in ("final.json", "eval.json", "student", "student_adapter")])
    log.info("rewound %s to %s", out, chosen.name)
    return chosen
