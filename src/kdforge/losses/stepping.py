"""Block-KD's objective (Block-wise Knowledge Distillation with stepping stones): a pure function of the stepping
stones' logits, the teacher's logits and the stones' weights. The stones themselves (student blocks + connector + the
teacher's remaining blocks) are built in kdforge.teachers.stepping_stones; this module holds only the loss, so the
registry (kdforge.losses.registry) names it without importing the teachers layer."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..errors import KDForgeError
from .logits import LOGIT_LOSSES


def block_kd(stone_logits: Sequence[Tensor], teacher_logits: Tensor, stone_weights: Sequence[float], *,
             mask: Tensor | None = None, kd_loss: str = "forward_kl", temperature: float = 1.0) -> Tensor:
    """sum_i w_i * kd_loss(stone_logits_i, teacher_logits): the Block-KD objective of the stepping stones.

    stone_logits: one [B, T, V] (or [B, K]) tensor per stone; teacher_logits: the same shape; stone_weights: one
    float per stone. Each kd_loss value is its mean over counted positions (see kdforge.losses.logits). Raises
    KDForgeError for an unknown kd_loss, ValueError when the stones and weights differ in number."""
    if kd_loss not in LOGIT_LOSSES:
        raise KDForgeError(f"block_kd: unknown kd_loss '{kd_loss}'; valid: {', '.join(sorted(LOGIT_LOSSES))}")
    fn = LOGIT_LOSSES[kd_loss]
    total = teacher_logits.new_zeros((), dtype=torch.float32)
    for logits, w in zip(stone_logits, stone_weights, strict=True):
        total = total + w * fn(logits, teacher_logits, mask=mask, temperature=temperature)
    return total
