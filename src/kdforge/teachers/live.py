"""A live teacher: a frozen model run forward for each batch (eval mode, no grad, optional bf16 autocast)."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..batches import model_inputs, output_logits
from ..errors import KDForgeError
from ..precision import auto_precision


@dataclass
class TeacherOutput:
    """What terms may read from the teacher for one batch: logits (dense or top-k) and tapped tensors."""

    logits: Any  # torch.Tensor [B, T, V] or kdforge.losses.sparse.SparseLogits
    features: dict[str, Any] = field(default_factory=dict)


class LiveTeacher:
    def __init__(self, model: nn.Module, dtype: str = "float32"):
        """dtype: float32, bfloat16 (forward under bf16 autocast) or auto (kdforge.precision: bf16 only where the
        hardware runs it natively)."""
        if dtype == "auto":
            dtype = auto_precision().dtype
        if dtype not in ("float32", "bfloat16"):
            raise KDForgeError(f"teacher dtype must be auto, float32 or bfloat16, not {dtype!r}")
        self.model = model
        self.dtype = dtype
        model.eval()
        model.requires_grad_(False)

    def autocast(self):
        if self.dtype == "bfloat16":
            device = next(self.model.parameters()).device.type
            return torch.autocast(device, dtype=torch.bfloat16)
        return nullcontext()

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], taps=None) -> TeacherOutput:
        self.model.eval()  # a wrapper's .train() must never put the teacher in train mode
        args, kwargs = model_inputs(batch)
        features: dict[str, Any] = {}
        with self.autocast():
            if taps is None:
                out = self.model(*args, **kwargs)
            else:
                with taps.capture() as features:
                    out = self.model(*args, **kwargs, **taps.needs_hf_outputs())
                taps.collect_outputs(features, out)
        return TeacherOutput(output_logits(out), features)
