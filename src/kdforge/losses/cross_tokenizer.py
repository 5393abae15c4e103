"""Logit distillation between a teacher and a student whose tokenizers differ (pure functions of paired positions).

Both losses take the two models' logits at positions already paired by kdforge.cross_tokenizer (which student
position is compared with which teacher position); neither needs the vocabularies to have the same size or order.

``uld``: Universal Logit Distillation (Boizard, Haddad, Hudelot, Colombo, "Towards Cross-Tokenizer Distillation: the
Universal Logit Distillation Loss for LLMs", 2024; authors' code: github.com/Nicolas-BZRD/llm-recipes,
``models/distillation_model.py``, ``DistillationLoss``). At each pair, both softmax distributions (student at
``student_temperature``, teacher at ``teacher_temperature``; both 1 in the authors' ``configs/distillation.py``) are
sorted in decreasing order, the shorter one is padded with zeros to the larger vocabulary, and the L1 distance of
the sorted vectors is taken -- the closed form of the Wasserstein-1 distance between the two distributions when the
ground cost between any two distinct tokens is 1 and tokens are matched by rank. Positions are paired by index from
the first response token (the k-th response token of one sequence with the k-th of the other, up to the shorter
response); the loss is the mean over an example's pairs, then the mean over the examples (the authors' reduction).
The authors add it to the student's cross-entropy with weight ``distil_factor`` 1.5 (cross-entropy factor 1).

``span_kl``: at student and teacher positions that predict tokens covering exactly the same characters after the
same text, KL(teacher ‖ student) of the two next-token distributions restricted to the vocabulary strings both
tokenizers share (kdforge.align.tokenizers.shared_vocabulary) and renormalised over them, times T^2 (Hinton et
al.'s gradient scale), averaged over the pairs. Not a published method with reference code: kdforge's span-aligned
token-level term; its alignment and vocabulary mapping are described in kdforge.align.tokenizers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import KDForgeError


def _pair_shapes(name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None):
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise KDForgeError(f"{name}: student logits {tuple(student_logits.shape)} and teacher logits "
                           f"{tuple(teacher_logits.shape)} must hold the same paired positions; pair positions with "
                           "kdforge.cross_tokenizer first")
    if mask is not None and mask.shape != student_logits.shape[:-1]:
        raise KDForgeError(f"{name}: mask {tuple(mask.shape)} must be the paired positions' shape "
                           f"{tuple(student_logits.shape[:-1])}")


def sorted_probability_distance(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """L1 distance of the decreasingly sorted probability vectors, the shorter one zero-padded: [...] from
    student_probs [..., Vs] and teacher_probs [..., Vt] (any Vs, Vt). Zero when the sorted values are equal, whatever
    the token order; unchanged by permuting either vocabulary.

    Computed without sorting the longer vector whole: past rank k = min(Vs, Vt) the padded side is 0, so those ranks
    add the longer vector's mass outside its top k, its sum minus its top-k sum (the same value; torch.topk of k
    entries is ~6x faster than a full sort of SmolLM2's 49,152 here)."""
    k = min(student_probs.shape[-1], teacher_probs.shape[-1])

    def top(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if p.shape[-1] == k:
            return p.sort(dim=-1, descending=True).values, p.new_zeros(p.shape[:-1])
        values = p.topk(k, dim=-1, sorted=True).values
        return values, p.sum(-1) - values.sum(-1)

    s, s_tail = top(student_probs)
    t, t_tail = top(teacher_probs)
    return (s - t).abs().sum(-1) + s_tail + t_tail


def uld(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, mask: torch.Tensor | None = None,
        student_temperature: float = 1.0, teacher_temperature: float = 1.0) -> torch.Tensor:
    """Universal Logit Distillation loss (Boizard et al. 2024) of paired positions.

    student_logits [B, K, Vs], teacher_logits [B, K, Vt]: the logits at the K pairs of each example (pair k: the
    positions predicting the k-th response token of each sequence); mask [B, K] bool: which pairs exist (an example
    has min(its student, its teacher response length) of them). Returns a scalar in [0, 2]: per example, the mean
    over its pairs of ``sorted_probability_distance(softmax(s/Ts), softmax(t/Tt))``, then the mean over the examples
    that have a pair (0 when none has). Gradients flow to student_logits only. KDForgeError on mismatched shapes.
    """
    _pair_shapes("uld", student_logits, teacher_logits, mask)
    p_s = F.softmax(student_logits.float() / student_temperature, dim=-1)
    with torch.no_grad():
        p_t = F.softmax(teacher_logits.float() / teacher_temperature, dim=-1)
    dist = sorted_probability_distance(p_s, p_t)  # [B, K]
    if mask is None:
        return dist.mean(-1).mean()
    m = mask.to(dist.dtype)
    count = m.sum(-1)
    has = count > 0
    if not bool(has.any()):
        return dist.sum() * 0.0
    per_example = (dist * m).sum(-1)[has] / count[has]
    return per_example.mean()


def span_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_ids: torch.Tensor,
            teacher_ids: torch.Tensor, *, mask: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) over the shared vocabulary strings at span-aligned pairs.

    student_logits [N, Vs], teacher_logits [N, Vt] (or any matching leading shape): the logits at aligned pairs;
    student_ids [S], teacher_ids [S]: the ids of the S shared strings in each vocabulary (pair s is one string);
    mask (leading shape, bool): which pairs count. Both distributions are softmax(logits[..., ids] / T): restricted
    to the shared strings and renormalised. Returns T^2 times the mean KL over the counted pairs (0 when none).
    KDForgeError on mismatched shapes or an empty / unequal id mapping.

    In a recipe (student.tokenizer set), the term may also set ``min_shared_fraction`` (default 0.5: the share of
    the student's vocabulary strings the teacher must have) and ``min_aligned_fraction`` (default 0.3: the share of
    the student's training response tokens that must align with a teacher token); a pair below either is refused
    with its figures before training (kdforge.align.tokenizers.check_alignment).
    """
    _pair_shapes("span_kl", student_logits, teacher_logits, mask)
    if student_ids.numel() == 0 or student_ids.shape != teacher_ids.shape:
        raise KDForgeError(f"span_kl: {student_ids.numel()} student and {teacher_ids.numel()} teacher shared ids; the "
                           "shared-vocabulary mapping must pair each shared string with one id on each side")
    log_q = F.log_softmax(student_logits.float().index_select(-1, student_ids.to(student_logits.device))
                          / temperature, dim=-1)
    with torch.no_grad():
        log_p = F.log_softmax(teacher_logits.float().index_select(-1, teacher_ids.to(teacher_logits.device))
                              / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if mask is None:
        return kl.mean() * temperature ** 2
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1.0) * temperature ** 2


CROSS_TOKENIZER_LOSSES = {"uld": uld, "span_kl": span_kl}
