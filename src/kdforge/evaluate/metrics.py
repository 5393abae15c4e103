"""Held-out metrics: perplexity, bits per character, teacher-student agreement and KL, speed, size."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ..data.packing import TokenBlocks
from ..models import count_parameters


def _autocast(model: nn.Module, bf16: bool):
    if not bf16:
        return nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate_models(models: dict[str, nn.Module], blocks: TokenBlocks, *, reference: str | None = None,
                    batch_size: int = 8, bf16: dict[str, bool] | None = None) -> dict[str, dict[str, float]]:
    """Evaluate several causal LMs on the same blocks in one pass.

    Per model: perplexity and bits per character (character counts come from tokenizer offsets, so bpc compares
    models with different tokenizers), tokens/s of the forward, parameter count. Against `reference` (the teacher):
    top-1 agreement and mean KL(reference || model) over the same positions.
    """
    bf16 = bf16 or {}
    stats = {name: {"nll": 0.0, "tokens": 0, "seconds": 0.0, "agree": 0, "kl": 0.0} for name in models}
    chars = int(blocks.chars.sum())
    for m in models.values():
        m.eval()
    for start in range(0, len(blocks.ids), batch_size):
        ids = blocks.ids[start : start + batch_size]
        targets = ids[:, 1:]
        logprobs = {}
        for name, model in models.items():
            device = next(model.parameters()).device
            t0 = time.perf_counter()
            with _autocast(model, bf16.get(name, False)):
                logits = model(input_ids=ids.to(device), use_cache=False).logits[:, :-1]
            stats[name]["seconds"] += time.perf_counter() - t0
            lp = F.log_softmax(logits.float().cpu(), dim=-1)
            nll = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            stats[name]["nll"] += float(nll.sum())
            stats[name]["tokens"] += targets.numel()
            logprobs[name] = lp
        if reference is not None:
            ref = logprobs[reference]
            ref_top = ref.argmax(-1)
            for name, lp in logprobs.items():
                if name == reference:
                    continue
                v = min(lp.shape[-1], ref.shape[-1])
                stats[name]["agree"] += int((lp[..., :v].argmax(-1) == ref_top).sum())
                stats[name]["kl"] += float((ref.exp() * (ref - lp[..., :v])).sum())
    results = {}
    for name, s in stats.items():
        r = {
            "perplexity": math.exp(s["nll"] / s["tokens"]),
            "bits_per_char": s["nll"] / math.log(2) / max(chars, 1),
            "tokens_per_s": s["tokens"] / max(s["seconds"], 1e-9),
            "parameters": count_parameters(models[name]),
            "eval_tokens": s["tokens"],
        }
        if reference is not None and name != reference:
            r["top1_agreement"] = s["agree"] / s["tokens"]
            r["kl_teacher_student"] = s["kl"] / s["tokens"]
        results[name] = r
    return results
