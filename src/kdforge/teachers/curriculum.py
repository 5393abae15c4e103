"""A curriculum of teachers: Partial-to-Whole Knowledge Distillation (PWKD; Zhang, Zhang & Sun, arXiv 2109.12507).

PWKD decomposes the teacher into sub-networks of increasing capacity and lets the student learn from them in stages,
partial knowledge first and the whole teacher last, with a cyclic learning rate: the schedule restarts at every stage
boundary (kdforge restarts its linear warm-up + cosine decay per stage; see kdforge.train.lr_lambda). The paper
builds weight-sharing sub-networks of the same depth and increasing *width*, trained jointly beforehand. kdforge does
exactly that where it trains the teacher itself (task image_classification: a slimmable teacher CNN and `width`
stages, kdforge.tasks.image_classification.WidthCurriculum); a pretrained LLM has no such sub-networks, so this
module's stages (causal_lm) are

  * depth-truncated sub-networks of the teacher: its first `layers` blocks followed by the shared final norm and
    head (e.g. 10, 20, then all 30 layers); only those blocks run, nothing is computed and discarded; and/or
  * other models, e.g. checkpoints of the teacher or smaller members of its family (`model:` per stage), loaded when
    their stage begins and released when it ends.

A stage may combine both (a truncated other model). Recipe form::

    teacher:
      model: smollm2-135m
      curriculum:
        stages: [{layers: 10, steps: 80}, {layers: 20, steps: 80}, {steps: 80}]   # a stage without steps fills the rest
        cyclic_lr: true

The call interface is LiveTeacher's plus the training step: `teacher(batch, taps, step=step) -> TeacherOutput`.
Teacher taps (feature terms) work with module-path taps on the recipe's teacher; HF-output taps (`hidden_states`)
only at full depth, and no taps at all for stages that use another model.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..errors import KDForgeError
from ..models import vocab_size
from .live import LiveTeacher, TeacherOutput
from .stepping_stones import DecoderBlocks, blocks_of

log = logging.getLogger("kdforge")


def stage_spans(spec, total_steps: int) -> list[tuple[int, int, Any]]:
    """[(start, stop, stage)] of a recipe's `teacher.curriculum` (kdforge.recipe.CurriculumSpec) over `total_steps`
    training steps: each stage (a CurriculumStage) with its steps [start, stop), contiguous and in order, the lengths
    from CurriculumSpec.stage_steps (which raises for steps that do not add up)."""
    spans, start = [], 0
    for stage, n in zip(spec.stages, spec.stage_steps(total_steps)):
        spans.append((start, start + n, stage))
        start += n
    return spans


class StagedTeacher:
    """What every teacher curriculum shares (CurriculumTeacher here; the image task's WidthCurriculum): `_starts`,
    the first step of each stage in order (set by the subclass), gives the stage of a step and the boundaries."""

    _starts: list[int]

    @property
    def boundaries(self) -> list[int]:
        """Steps at which a new stage begins (the first stage's start excluded)."""
        return self._starts[1:]

    def stage_index(self, step: int) -> int:
        """The stage that holds training step `step` (0 before the first stage's start)."""
        return max(0, bisect.bisect_right(self._starts, step) - 1)


@dataclass
class TeacherStage:
    """One stage: steps [start, stop) learn from `model` (None: the main teacher; a name is loaded by `load`) cut to
    its first `layers` blocks (None: all of them)."""

    start: int
    stop: int
    layers: int | None = None
    model: nn.Module | str | None = None

    def describe(self, main_depth: int | None) -> str:
        who = "the teacher" if self.model is None else (self.model if isinstance(self.model, str) else "a model")
        depth = "all" if self.layers is None else str(self.layers)
        of = f" of {main_depth}" if self.model is None and main_depth else ""
        return f"{who}, depth {depth}{of} layers"


class CurriculumTeacher(StagedTeacher):
    """Teacher view for step s from the stage that contains s. `model` is the main (whole) teacher."""

    def __init__(self, model: nn.Module, stages: list[TeacherStage], *, dtype: str = "float32",
                 load: Callable[[str], nn.Module] | None = None):
        if not stages:
            raise KDForgeError("the teacher curriculum has no stages")
        for a, b in zip(stages, stages[1:]):
            if b.start != a.stop:
                raise KDForgeError(f"curriculum stages must be contiguous; one ends at step {a.stop}, "
                                   f"the next starts at {b.start}")
        self.model, self.dtype, self.load = model, dtype, load
        self.stages = stages
        self._starts = [s.start for s in stages]
        self._live: dict[int, LiveTeacher] = {id(model): LiveTeacher(model, dtype)}
        self._loaded: dict[str, nn.Module] = {}
        self._current: int | None = None
        for k, stage in enumerate(stages):
            if isinstance(stage.model, str) and load is None:
                raise KDForgeError(f"curriculum stage {k + 1} names model '{stage.model}' but no loader was given")
            if not isinstance(stage.model, str):
                self._check_depth(k, stage, self.model if stage.model is None else stage.model)
        log.info("teacher curriculum: %s", "; ".join(
            f"steps {s.start}-{s.stop - 1}: {s.describe(self._depth(model))}" for s in stages))

    @classmethod
    def from_spec(cls, model: nn.Module, spec, total_steps: int, *, dtype: str = "float32",
                  load: Callable[[str], nn.Module] | None = None) -> "CurriculumTeacher":
        """From a recipe's `teacher.curriculum` (kdforge.recipe.CurriculumSpec)."""
        stages = [TeacherStage(start, stop, s.layers, s.model) for start, stop, s in stage_spans(spec, total_steps)]
        return cls(model, stages, dtype=dtype, load=load)

    @staticmethod
    def _depth(model: nn.Module) -> int | None:
        try:
            return len(blocks_of(model))
        except KDForgeError:
            return None

    def _check_depth(self, k: int, stage: TeacherStage, model: nn.Module) -> None:
        if stage.layers is None:
            return
        blocks = blocks_of(model, f"teacher of curriculum stage {k + 1}")
        if not isinstance(blocks, DecoderBlocks):
            raise KDForgeError(f"curriculum stage {k + 1}: `layers` truncates decoder LMs only")
        depth = len(blocks)
        if not 1 <= stage.layers <= depth:
            raise KDForgeError(f"curriculum stage {k + 1} asks for {stage.layers} teacher layers but the teacher "
                               f"has {depth}")

    def _stage_model(self, k: int) -> nn.Module:
        stage = self.stages[k]
        if stage.model is None:
            return self.model
        if not isinstance(stage.model, str):
            return stage.model
        if stage.model not in self._loaded:
            self._loaded.clear()  # release the previous stage's model before loading the next
            self._live = {id(self.model): self._live[id(self.model)]}
            model = self.load(stage.model)
            model.to(next(self.model.parameters()).device)
            if hasattr(model, "get_output_embeddings") and vocab_size(model) != vocab_size(self.model):
                raise KDForgeError(f"curriculum stage {k + 1}: model '{stage.model}' has {vocab_size(model)} "
                                   f"vocabulary entries but the teacher has {vocab_size(self.model)}")
            self._check_depth(k, stage, model)
            self._loaded[stage.model] = model
        return self._loaded[stage.model]

    def __call__(self, batch: dict[str, torch.Tensor], taps=None, *, step: int = 0) -> TeacherOutput:
        k = self.stage_index(step)
        stage = self.stages[k]
        model = self._stage_model(k)
        if k != self._current:
            log.info("teacher curriculum: stage %d/%d from step %d: %s", k + 1, len(self.stages), step,
                     stage.describe(self._depth(self.model)))
            self._current = k
        if model is not self.model and taps is not None and taps.names():
            raise KDForgeError(f"curriculum stage {k + 1} uses another model; teacher feature taps need the "
                               "recipe's teacher")
        live = self._live.setdefault(id(model), LiveTeacher(model, self.dtype))
        if stage.layers is None or stage.layers == len(blocks_of(model)):
            return live(batch, taps)
        return self._truncated(live, stage.layers, batch, taps)

    @torch.no_grad()
    def _truncated(self, live: LiveTeacher, depth: int, batch: dict[str, torch.Tensor], taps) -> TeacherOutput:
        """The first `depth` blocks, then the shared final norm and head; the rest of the stack never runs."""
        if taps is not None and any(taps.needs_hf_outputs().values()):
            raise KDForgeError(f"a depth-{depth} curriculum teacher cannot give HF-output taps (hidden_states, "
                               "attentions); tap module paths such as model.layers.* instead")
        live.model.eval()
        blocks = DecoderBlocks(live.model)
        features: dict[str, Any] = {}
        with live.autocast():
            if taps is None:
                logits = _run_first(blocks, depth, batch)
            else:
                with taps.capture() as features:
                    logits = _run_first(blocks, depth, batch)
        return TeacherOutput(logits, features)


def _run_first(blocks: DecoderBlocks, depth: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = blocks.embed(batch["input_ids"])
    hidden = blocks.run(hidden, 0, depth, blocks.context(batch, hidden))
    return blocks.head(hidden)
