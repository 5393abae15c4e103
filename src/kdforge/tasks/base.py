"""What a task is: the few things that differ between distilling a causal LM, an image classifier, ...

A task (one module per task in kdforge.tasks) owns reading its data into batches, building or loading its models,
mapping model outputs to what the losses compare, and its evaluation metrics. Everything else (Distiller, losses,
taps, projectors, layer maps, the training loop, checkpoints, bench, report, reproduce) is shared and calls a task
only through the methods below. The Distiller sees a task only through the batch it is given (kdforge.batches: a
batch with `input_ids` is a causal LM's, one with `inputs` a classifier's).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sized

import torch
from torch import nn

from ..distiller import Distiller
from ..io import atomic_write_dir, disk_full_as_error
from ..recipe import Recipe


@dataclass
class Setup:
    """Everything one run trains with. `train_blocks` / `val_blocks` are the task's training and held-out data (token
    blocks for causal_lm, an ImageSet for image_classification): anything with a length that the task's
    `make_batch` indexes."""

    recipe: Recipe
    tokenizer: Any
    teacher: nn.Module | None
    student: nn.Module
    distiller: Distiller
    train_blocks: Sized
    val_blocks: Sized
    task: "Task | None" = None


class Task(Protocol):
    """The interface the shared layers call (kdforge.tasks.causal_lm.CausalLM, image_classification.ImageClassification
    implement it)."""

    name: str = ""
    """The recipe's `task:` value."""

    def prepare(self, recipe: Recipe, *, teacher: nn.Module | None = None, tokenizer=None,
                blocks: tuple[Sized, Sized] | None = None) -> Setup:
        """Load or build the teacher and student, read the data, and make the Distiller."""
        ...

    def make_batch(self, data: Sized, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of the examples `index` [B] of `data`, as the Distiller and the models take it."""
        ...

    def fingerprint(self, train: Sized, val: Sized) -> str:
        """A short hash of the data a run trains and evaluates on: a resume on other data is refused by it."""
        ...

    def final_metrics(self, setup: Setup, *, progress: bool = True) -> dict[str, Any]:
        """final.json's figures of the trained student (and the teacher) on the held-out data:
        {"step", "student": {...}, "teacher": {...} | None, "student_parameters", ...}."""
        ...

    def periodic_metrics(self, setup: Setup) -> dict[str, float]:
        """The held-out figures a periodic evaluation (train.eval_every) logs, keyed `eval/...`."""
        ...

    def export(self, setup: Setup, out: Path, final: dict[str, Any]) -> None:
        """Write the final student under `out` (out/student, atomically), loadable without kdforge's run folder."""
        ...

    def run_eval(self, run_dir: Path, recipe: Recipe, *, out_dir: Path | None = None) -> dict[str, Any]:
        """`kdforge eval` of a finished run of this task: the held-out figures, written to eval.json."""
        ...


def write_student_folder(out: Path, save: Callable[[Path], None], card: str) -> None:
    """``out/student``, written atomically: what ``save(folder)`` writes there (the model's files) and ``card`` as
    README.md. A full disk is one line naming the fix (KDForgeError)."""
    def fill(tmp: Path) -> None:
        save(tmp)
        (tmp / "README.md").write_text(card)

    with disk_full_as_error(out / "student", "use an --out on a larger disk"):
        atomic_write_dir(out / "student", fill)
