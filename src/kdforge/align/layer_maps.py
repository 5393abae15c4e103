"""Which student layer learns from which teacher layer.

A layer map is a list of ``(student_layer, teacher_layer)`` pairs of 0-based
transformer-block indices (``0 .. n - 1``). Hugging Face ``hidden_states``
put the embedding output at index 0, so add 1 when indexing that tuple.

Fixed maps come from :func:`build_layer_map`; :class:`LearnedLayerMap` learns a
soft assignment instead (Align-to-Distill style).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["build_layer_map", "format_layer_map", "LearnedLayerMap", "LAYER_MAP_STRATEGIES"]

LAYER_MAP_STRATEGIES = ("uniform", "skip", "last", "last_k", "explicit")


def _range_error(side: str, index: int, depth: int) -> ValueError:
    return ValueError(f"layer map asks for {side} layer {index} but the {side} has {depth} layers (0..{depth - 1})")


def _resolve(side: str, index: int, depth: int) -> int:
    """Python-style index (negatives count from the end) -> checked 0-based index."""
    if not isinstance(index, int) or isinstance(index, bool):
        raise ValueError(f"layer map: {side} layer index must be an int, got {index!r}")
    resolved = index + depth if index < 0 else index
    if not 0 <= resolved < depth:
        raise _range_error(side, index, depth)
    return resolved


def build_layer_map(
    strategy: str,
    n_student: int,
    n_teacher: int,
    *,
    k: int | None = None,
    pairs: Iterable[tuple[int, int]] | None = None,
) -> list[tuple[int, int]]:
    """Return ``[(student_layer, teacher_layer), ...]`` for a named strategy.

    * ``uniform``: student ``i`` <- teacher ``round((i + 1) * n_t / n_s) - 1``
      (halves round up; clamped at 0): evenly spread, the last student layer
      always meets the last teacher layer. 4 <- 30 gives teacher 7, 14, 22, 29.
    * ``skip``: every k-th teacher layer (BERT-PKD "skip"): student ``i`` <-
      teacher ``(i + 1) * k - 1``; ``k`` defaults to ``n_t // n_s``.
    * ``last``: only the last layer of each.
    * ``last_k``: the last ``k`` layers of each, aligned from the end (PKD "last").
    * ``explicit``: ``pairs`` as given; negative indices count from the end.

    Any index outside a model's depth raises ``ValueError`` naming both depths.
    """
    if strategy not in LAYER_MAP_STRATEGIES:
        raise ValueError(f"build_layer_map: unknown strategy {strategy!r}; valid: {', '.join(LAYER_MAP_STRATEGIES)}")
    for side, n in (("student", n_student), ("teacher", n_teacher)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"build_layer_map: n_{side} must be a positive int, got {n!r}")

    if strategy == "uniform":
        # round-half-up in integers: floor(x + 0.5) with x = (i+1) * n_t / n_s
        out = [(i, max(0, ((i + 1) * n_teacher * 2 + n_student) // (2 * n_student) - 1)) for i in range(n_student)]
    elif strategy == "skip":
        step = n_teacher // n_student if k is None else k
        if not isinstance(step, int) or step < 1:
            raise ValueError(
                f"build_layer_map('skip'): k must be a positive int, got {step!r} "
                f"(student has {n_student} layers, teacher {n_teacher})"
            )
        out = [(i, (i + 1) * step - 1) for i in range(n_student)]
    elif strategy == "last":
        out = [(n_student - 1, n_teacher - 1)]
    elif strategy == "last_k":
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"build_layer_map('last_k'): k must be a positive int, got {k!r}")
        if k > n_student or k > n_teacher:
            raise ValueError(
                f"build_layer_map('last_k'): k={k} but the student has {n_student} layers "
                f"and the teacher has {n_teacher}"
            )
        out = [(n_student - k + j, n_teacher - k + j) for j in range(k)]
    else:  # explicit
        if pairs is None:
            raise ValueError("build_layer_map('explicit'): pass pairs=[(student_layer, teacher_layer), ...]")
        out = []
        for pair in pairs:
            if len(pair) != 2:
                raise ValueError(f"build_layer_map('explicit'): each pair must be (student, teacher), got {pair!r}")
            out.append((pair[0], pair[1]))
        if not out:
            raise ValueError("build_layer_map('explicit'): pairs is empty")

    return [(_resolve("student", s, n_student), _resolve("teacher", t, n_teacher)) for s, t in out]


def format_layer_map(pairs: Sequence[tuple[int, int]]) -> str:
    """One line for the run log, e.g. ``layer map (4 pairs): s0->t7, s1->t14, s2->t22, s3->t29``."""
    body = ", ".join(f"s{s}->t{t}" for s, t in pairs)
    return f"layer map ({len(pairs)} pair{'s' if len(pairs) != 1 else ''}): {body}"


class LearnedLayerMap(nn.Module):
    """Soft, learned student<-teacher layer assignment (Align-to-Distill style).

    Each student layer ``i`` owns a distribution ``softmax(logits[i] / temperature)``
    over the teacher layers and receives the weighted mix of teacher features.
    Logits start at 0 (uniform: no prior on which layer matters) and are
    trained by the distillation loss itself. This is the simple
    feature-independent form; ``dim`` is the teacher width, checked in forward.
    """

    def __init__(self, n_student: int, n_teacher: int, dim: int, *, temperature: float = 1.0) -> None:
        super().__init__()
        if n_student < 1 or n_teacher < 1 or dim < 1:
            raise ValueError(f"LearnedLayerMap: sizes must be >= 1, got {n_student=}, {n_teacher=}, {dim=}")
        if temperature <= 0:
            raise ValueError(f"LearnedLayerMap: temperature must be > 0, got {temperature}")
        self.n_student, self.n_teacher, self.dim, self.temperature = n_student, n_teacher, dim, temperature
        self.logits = nn.Parameter(torch.zeros(n_student, n_teacher))

    def weights(self) -> Tensor:
        """``[n_student, n_teacher]`` mixing weights; each row sums to 1."""
        return torch.softmax(self.logits.float() / self.temperature, dim=-1)

    def forward(self, teacher_layers: Sequence[Tensor]) -> list[Tensor]:
        """Mix ``n_teacher`` features ``[..., dim]`` into ``n_student`` targets (float32)."""
        if len(teacher_layers) != self.n_teacher:
            raise ValueError(f"LearnedLayerMap: expected {self.n_teacher} teacher layers, got {len(teacher_layers)}")
        shapes = {tuple(t.shape) for t in teacher_layers}
        if len(shapes) != 1:
            raise ValueError(f"LearnedLayerMap: teacher layers must share one shape, got {sorted(shapes)}")
        stacked = torch.stack([t.detach().float() for t in teacher_layers])  # [n_t, ..., dim]
        if stacked.shape[-1] != self.dim:
            raise ValueError(f"LearnedLayerMap: teacher width {stacked.shape[-1]} != dim={self.dim}")
        mixed = torch.tensordot(self.weights(), stacked, dims=([1], [0]))  # [n_s, ..., dim]
        return list(mixed.unbind(0))

    def hard_map(self) -> list[tuple[int, int]]:
        """Current arg-max pairs, for :func:`format_layer_map`."""
        best = self.weights().argmax(dim=-1).tolist()
        return [(i, j) for i, j in enumerate(best)]

    def describe(self, top: int = 3) -> str:
        """Printable map: per student layer, its ``top`` teacher layers and weights."""
        w = self.weights().detach().cpu()
        lines = [f"learned layer map ({self.n_student} student <- {self.n_teacher} teacher layers):"]
        for i in range(self.n_student):
            vals, idx = w[i].topk(min(top, self.n_teacher))
            parts = ", ".join(f"t{j}:{v:.2f}" for v, j in zip(vals.tolist(), idx.tolist()))
            lines.append(f"  s{i} <- {parts}")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return f"n_student={self.n_student}, n_teacher={self.n_teacher}, dim={self.dim}, temperature={self.temperature}"
