"""What a batch is: how models are called on it and which targets count.

Language models get `input_ids` (+ `attention_mask`, `labels`) and predict the next token; other models (CNNs, ViTs,
classifiers) get `inputs` and `labels` [B]; an encoder's padded token ids come as `inputs` with an `attention_mask`
[B, T], passed on as the model's keyword.
"""
from __future__ import annotations

import torch


def shifted_targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and the mask of positions that count.

    Language models (`input_ids`): next-token labels [B, T-1]. Classifiers (`inputs`, e.g. images): `labels` [B];
    multi-label and detection batches: multi-hot `labels` [B, K], one target (and mask entry [B]) per example.
    """
    if "input_ids" not in batch:
        labels = batch["labels"]
        if labels.dim() == 2:
            return labels, torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
        return labels.clamp_min(0), labels != -100
    labels = batch.get("labels", batch["input_ids"])[:, 1:]
    mask = labels != -100
    if batch.get("attention_mask") is not None:
        mask = mask & batch["attention_mask"][:, 1:].bool()
    return labels.clamp_min(0), mask


def model_inputs(batch: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
    """(args, kwargs) to call a model on a batch: HF language models by keyword, other models on `inputs`."""
    if "input_ids" in batch:
        return (), {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}
    if batch.get("attention_mask") is not None:  # an encoder's padded token ids in `inputs` (text classifiers)
        return (batch["inputs"],), {"attention_mask": batch["attention_mask"]}
    return (batch["inputs"],), {}


def output_logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits
