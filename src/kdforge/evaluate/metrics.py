"""Held-out metrics: perplexity, bits per character, teacher-student fidelity (top-1 agreement, forward and reverse
KL), expected calibration error, forward speed and size."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ..data.packing import TokenBlocks
from ..models import count_parameters

ECE_BINS = 15


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """Standard ECE: top-1 confidences in `n_bins` equal-width bins (lo, hi]; sum over bins of
    (bin count / N) * |accuracy(bin) - mean confidence(bin)|."""
    counts, conf_sum, correct_sum = calibration_bins(confidence, correct, n_bins)
    return ece_from_bins(counts, conf_sum, correct_sum)


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor,
                     n_bins: int = ECE_BINS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin count, sum of confidence and number correct (float64), so batches can be summed before the ECE."""
    conf = confidence.detach().reshape(-1).double()
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    counts = torch.bincount(bins, minlength=n_bins).double()
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)
    correct_sum = torch.bincount(bins, weights=correct.detach().reshape(-1).double(), minlength=n_bins)
    return counts, conf_sum, correct_sum


def reliability_bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = ECE_BINS) -> dict[str, list]:
    """The data of a reliability diagram, as JSON: the top-1 confidences [N] (probabilities in [0, 1]) and whether
    each prediction was right [N] in `n_bins` equal-width bins (lo, hi] (the ECE's bins), with per bin `count`
    (examples), `confidence_sum` and `correct` (sums, so the bins of several runs add up before dividing). A bin's
    mean confidence is confidence_sum / count, its accuracy correct / count; ece_from_bins of the three is the ECE."""
    counts, conf_sum, correct_sum = calibration_bins(confidence, correct, n_bins)
    return {"n_bins": n_bins, "count": [int(c) for c in counts.tolist()], "confidence_sum": conf_sum.tolist(),
            "correct": [int(c) for c in correct_sum.tolist()]}


def ece_from_bins(counts: torch.Tensor, conf_sum: torch.Tensor, correct_sum: torch.Tensor) -> float:
    total = float(counts.sum())
    if total == 0:
        return float("nan")
    return float((conf_sum - correct_sum).abs().sum() / total)  # n_b/N * |acc_b - conf_b| = |Σcorrect - Σconf|/N


def _autocast(model: nn.Module, bf16: bool):
    if not bf16:
        return nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)


def _add_fidelity(acc: dict, lp: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor | None = None) -> None:
    """Add top-1 agreement and both KLs of log-probabilities ``lp`` against ``ref`` ``[B, T, V]`` to ``acc``, over the
    positions where ``valid`` [B, T] is True (all when None).
    One block at a time (the temporaries are [T, V], not [B, T, V]: hundreds of MB at a 49k vocabulary), summed in
    float64, so the figures do not depend on the evaluation batch size."""
    for b, (lp_b, ref_b) in enumerate(zip(lp, ref)):
        if valid is not None:
            lp_b, ref_b = lp_b[valid[b]], ref_b[valid[b]]
        v = min(lp_b.shape[-1], ref_b.shape[-1])
        if lp_b.shape[-1] != v or ref_b.shape[-1] != v:  # the shared ids, renormalised: the training losses' way
            lp_b, ref_b = lp_b[..., :v].log_softmax(-1), ref_b[..., :v].log_softmax(-1)
        acc["agree"] += int((lp_b.argmax(-1) == ref_b.argmax(-1)).sum())
        diff = lp_b - ref_b  # log p_model - log p_ref, shared by both directions
        # summed in float64: one float32 sum over ~6M terms per block drifts in the 3rd digit (it did over a batch)
        acc["kl"] -= float((ref_b.exp() * diff).sum(dtype=torch.float64))
        acc["rkl"] += float((lp_b.exp() * diff).sum(dtype=torch.float64))


@torch.no_grad()
def evaluate_models(models: dict[str, nn.Module], blocks: TokenBlocks, *, reference: str | None = None,
                    batch_size: int = 8, bf16: dict[str, bool] | None = None,
                    progress: str | None = None) -> dict[str, dict[str, float]]:
    """Evaluate several causal LMs on the same blocks in one pass.

    Per model: perplexity and bits per character (character counts come from tokenizer offsets, so bpc compares
    models with different tokenizers), expected calibration error of the top-1 prediction against the next token
    (`ece`, 15 equal-width confidence bins), tokens/s of the forward, parameter count. Against `reference` (the
    teacher), over the same positions: top-1 agreement, mean forward KL(reference || model) as `kl_teacher_student`
    and mean reverse KL(model || reference) as `kl_student_teacher` (nats per token, temperature 1). Where the
    vocabularies differ (a student trained with `truncate_to_shared_vocab`), both distributions are restricted to the
    shared ids and renormalised before the agreement and both KLs, as the training losses define them.
    Prompt–response blocks (with `labels`, kdforge.data.prompts) count only their response positions.
    With `progress` (a title), batches done, elapsed time and an ETA are shown (kdforge.progress).
    """
    from ..progress import Progress

    bf16 = bf16 or {}
    stats = {name: {"nll": 0.0, "tokens": 0, "seconds": 0.0, "agree": 0, "kl": 0.0, "rkl": 0.0,
                    "bins": [torch.zeros(ECE_BINS, dtype=torch.float64) for _ in range(3)]} for name in models}
    chars = int(blocks.chars.sum())
    for m in models.values():
        m.eval()
    n_batches = -(-len(blocks.ids) // batch_size)
    with Progress(progress or "", n_batches, unit="batch", enabled=progress is not None) as bar:
        for start in range(0, len(blocks.ids), batch_size):
            ids = blocks.ids[start : start + batch_size]
            targets = ids[:, 1:]
            valid = None  # packed text: every position counts
            attention = None
            if blocks.labels is not None:
                targets = blocks.labels[start : start + batch_size, 1:].clamp_min(0)
                valid = blocks.labels[start : start + batch_size, 1:] != -100
                attention = blocks.attention_mask[start : start + batch_size]
            logprobs = {}
            for name, model in models.items():
                device = next(model.parameters()).device
                t0 = time.perf_counter()
                with _autocast(model, bf16.get(name, False)):
                    logits = model(input_ids=ids.to(device), use_cache=False,
                                   **({} if attention is None else {"attention_mask": attention.to(device)})
                                   ).logits[:, :-1]
                stats[name]["seconds"] += time.perf_counter() - t0
                lp = F.log_softmax(logits.float().cpu(), dim=-1)
                del logits  # a view of the model's whole [B, T, V] logits: freed before the next model runs
                nll = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                top_lp, top_id = lp.max(-1)
                correct = top_id == targets
                if valid is not None:
                    nll, top_lp, correct = nll[valid], top_lp[valid], correct[valid]
                stats[name]["nll"] += float(nll.sum())
                stats[name]["tokens"] += nll.numel()
                for acc, part in zip(stats[name]["bins"], calibration_bins(top_lp.exp(), correct)):
                    acc += part
                logprobs[name] = lp
            if reference is not None:
                ref = logprobs[reference]
                for name, lp in logprobs.items():
                    if name != reference:
                        _add_fidelity(stats[name], lp, ref, valid)
            bar.update(start // batch_size + 1)
    results = {}
    for name, s in stats.items():
        r = {
            "perplexity": math.exp(s["nll"] / s["tokens"]),
            "bits_per_char": s["nll"] / math.log(2) / max(chars, 1),
            "ece": ece_from_bins(*s["bins"]),
            "tokens_per_s": s["tokens"] / max(s["seconds"], 1e-9),
            "parameters": count_parameters(models[name]),
            "eval_tokens": s["tokens"],
        }
        if reference is not None and name != reference:
            r["top1_agreement"] = s["agree"] / s["tokens"]
            r["kl_teacher_student"] = s["kl"] / s["tokens"]
            r["kl_student_teacher"] = s["rkl"] / s["tokens"]
        results[name] = r
    return results
