"""What a batch is: how models are called on it and which targets count.

Language models get `input_ids` (+ `attention_mask`, `labels`) and predict the next token; other models (CNNs, ViTs,
classifiers) get `inputs` and `labels` [B].
"""
from __future__ import annotations

import torch


def shifted_targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and the mask of positions that count.

    Language models (`input_ids`): next-token labels [B, T-1]. Classifiers (`inputs`, e.g. images): `labels` [B].
    """
    if "input_ids" not in batch:
        labels = batch["labels"]
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
    return (batch["inputs"],), {}


def output_logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits
