"""A live teacher: a frozen model run forward for each batch (eval mode, no autograd, bf16 where asked).

Precision: with ``dtype="bfloat16"`` a teacher whose weights are already bf16 (what ``kdforge.models.load_teacher``
loads for ``teacher.dtype: bfloat16``, or ``auto`` resolving to it) runs plainly in bf16: half the weight memory of
fp32 and no autocast casts. A teacher handed in with fp32 weights (a user's model, e.g. through
``DistillationTrainer``) is not converted; it runs under bf16 autocast, as before. Either way the logits come out in
bf16 and the losses do their math in float32 (``kdforge.losses.sparse.compute_dtype``).

Autograd: the forward runs under ``torch.inference_mode()`` when nothing is tapped, so no autograd bookkeeping at
all; with taps it runs under ``torch.no_grad()``, because tapped features feed feature terms whose backward may save
them, which inference tensors cannot be.
"""
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
    """What terms may read from the teacher for one batch: logits and tapped tensors.

    logits: dense ``[B, T, V]`` (a live teacher: bf16 or float32, as the model makes them), top-k
    ``kdforge.losses.sparse.SparseLogits`` / sampled ``SampledLogits`` (an offline cache), or
    ``kdforge.losses.chunked.HeadLogits`` (a live teacher's last hidden states and head, for the chunked losses).
    """

    logits: Any
    features: dict[str, Any] = field(default_factory=dict)


class LiveTeacher:
    def __init__(self, model: nn.Module, dtype: str = "float32"):
        """dtype: float32, bfloat16 (bf16 weights run as they are; fp32 weights run under bf16 autocast) or auto
        (kdforge.precision: bf16 only where the hardware runs it natively). KDForgeError for another value."""
        if dtype == "auto":
            dtype = auto_precision().dtype
        if dtype not in ("float32", "bfloat16"):
            raise KDForgeError(f"teacher dtype must be auto, float32 or bfloat16, not {dtype!r}")
        self.model = model
        self.dtype = dtype
        model.eval()
        model.requires_grad_(False)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the teacher's floating-point weights (float32 if it has none)."""
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def autocast(self):
        """bf16 autocast for dtype bfloat16 (also what a caller that runs teacher blocks on its own fp32 tensors
        needs with bf16 weights, e.g. Block-KD's stepping stones), else a no-op context."""
        if self.dtype == "bfloat16":
            device = next(self.model.parameters()).device
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _forward_precision(self):
        # a bf16 model fed token ids needs no autocast; fp32 weights asked to run in bf16 do
        if self.dtype == "bfloat16" and self.weight_dtype != torch.bfloat16:
            return self.autocast()
        return nullcontext()

    def __call__(self, batch: dict[str, torch.Tensor], taps=None, *, hidden_only: bool = False) -> TeacherOutput:
        """The teacher's output for ``batch`` (the model's keyword inputs: input_ids [B, T], attention_mask, ...).

        hidden_only: run the base model only and return ``HeadLogits`` (last hidden states [B, T, D] and the lm head)
        instead of ``[B, T, V]`` logits, for the chunked losses; needs a causal LM with a linear head
        (``kdforge.losses.chunked.causal_lm_head``, KDForgeError otherwise). Tensors returned never require grad.
        """
        self.model.eval()  # a wrapper's .train() must never put the teacher in train mode
        args, kwargs = model_inputs(batch)
        features: dict[str, Any] = {}
        model = self.model
        if hidden_only:
            from ..losses.chunked import causal_lm_head

            model, head = causal_lm_head(self.model)
        grad_off = torch.inference_mode() if taps is None else torch.no_grad()
        with grad_off, self._forward_precision():
            if taps is None:
                out = model(*args, **kwargs)
            else:
                with taps.capture() as features:
                    out = model(*args, **kwargs, **taps.needs_hf_outputs())
                taps.collect_outputs(features, out)
        if hidden_only:
            from ..lm_head import logit_transform
            from ..losses.chunked import HeadLogits

            return TeacherOutput(HeadLogits(out.last_hidden_state, head.weight, head.bias,
                                            logit_transform(self.model)), features)
        return TeacherOutput(output_logits(out), features)
