"""Relational losses: match the *structure* of a batch rather than each vector.

RKD, similarity-preserving and CKA-like losses compare how examples relate to
one another, so the student and teacher widths may differ (CRD is the
exception: it compares vectors directly and needs a projector).

Inputs are embeddings ``[N, D]``; token features ``[B, T, D]`` (+ optional bool
``mask`` ``[B, T]``) are first mean-pooled per sequence over valid tokens, so
one sequence = one example. Maths in float32; the teacher is detached.
Batch-structure losses are a single number for the whole batch: their
``reduction`` accepts "mean"/"sum" (identical) and rejects "none".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.losses.features import _check_reduction, _masked_mean_pool, _prepare_pair

__all__ = [
    "rkd_distance",
    "rkd_angle",
    "rkd_loss",
    "similarity_preserving",
    "contrastive_representation",
]

_SET_LEVEL = ("mean", "sum")


def _embeddings(name: str, student: Tensor, teacher: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Return float32 ``[N, Ds]``, ``[N, Dt]`` (teacher detached), pooling tokens if needed."""
    if student.dim() == 3:
        s, t, mask = _prepare_pair(name, student, teacher, mask, same_width=False)
        return _masked_mean_pool(s, mask), _masked_mean_pool(t, mask)
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(f"{name}: expected embeddings [N, D] or token features [B, T, D], got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if mask is not None:
        raise ValueError(f"{name}: a mask needs token features [B, T, D], got embeddings {tuple(student.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{name}: student has {student.shape[0]} examples but teacher has {teacher.shape[0]}")
    return student.float(), teacher.detach().float()


def _centered_gram(x: Tensor) -> Tensor:
    """Gram matrix of the centred rows: distances/angles are translation invariant,
    and centring keeps the ``|a|^2 + |b|^2 - 2ab`` expansion accurate."""
    x = x - x.mean(dim=0, keepdim=True)
    return x @ x.T


def _pairwise_distances(gram: Tensor, eps: float) -> Tensor:
    """Euclidean distances from a Gram matrix, exactly 0 on the diagonal, safe gradient."""
    sq = gram.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min(eps)
    eye = torch.eye(gram.shape[0], dtype=torch.bool, device=gram.device)
    return d2.sqrt().masked_fill(eye, 0.0)


def _normalised_distances(x: Tensor, eps: float) -> Tensor:
    d = _pairwise_distances(_centered_gram(x), eps)
    n = d.shape[0]
    mean_offdiag = d.sum() / (n * (n - 1))
    return d / mean_offdiag.clamp_min(eps)


def _triplet_cosines(x: Tensor, eps: float) -> Tensor:
    """``cos[i, j, k]`` = cosine of the angle at vertex i between x_j - x_i and x_k - x_i.

    Computed from the Gram matrix (``<x_j-x_i, x_k-x_i> = G_jk - G_ij - G_ik + G_ii``),
    so memory is O(N^3) with no N x N x D difference tensor. Degenerate triplets
    (j == i or k == i) are 0, as F.normalize of a zero vector gives in the
    reference implementation.
    """
    g = _centered_gram(x)
    d = _pairwise_distances(g, eps)
    diag = g.diagonal()
    inner = g[None, :, :] - g[:, :, None] - g[:, None, :] + diag[:, None, None]
    denom = (d[:, :, None] * d[:, None, :]).clamp_min(eps)
    n = g.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=g.device)
    degenerate = eye[:, :, None] | eye[:, None, :]
    return torch.where(degenerate, torch.zeros_like(inner), inner / denom)


def _zero_loss(*tensors: Tensor) -> Tensor:
    """A graph-connected 0 for batches too small to have any relation."""
    return sum(t.sum() * 0.0 for t in tensors)


def rkd_distance(
    student: Tensor,
    teacher: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    eps: float = 1e-12,
) -> Tensor:
    """RKD distance-wise loss (Park et al., CVPR 2019).

    Pairwise Euclidean distances on each side are divided by their mean over
    the off-diagonal pairs (scale invariance), then compared with smooth-L1
    (Huber, delta = 1). As in the authors' code the Huber terms are averaged
    over all N x N entries (the diagonal contributes 0), so the published
    weight 25 carries over. Needs N >= 2 (returns 0 otherwise).
    """
    _check_reduction(reduction, _SET_LEVEL, name="rkd_distance")
    s, t = _embeddings("rkd_distance", student, teacher, mask)
    if s.shape[0] < 2:
        return _zero_loss(s)
    return F.smooth_l1_loss(_normalised_distances(s, eps), _normalised_distances(t, eps), beta=1.0)


def rkd_angle(
    student: Tensor,
    teacher: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    eps: float = 1e-12,
) -> Tensor:
    """RKD angle-wise loss (Park et al., CVPR 2019).

    Cosines of the angles formed by every triplet (vertex i, arms j and k),
    compared with smooth-L1 and averaged over all N^3 entries (degenerate
    ones contribute 0), as in the authors' code, so the published weight 50
    carries over. Needs N >= 3 (returns 0 otherwise).
    """
    _check_reduction(reduction, _SET_LEVEL, name="rkd_angle")
    s, t = _embeddings("rkd_angle", student, teacher, mask)
    if s.shape[0] < 3:
        return _zero_loss(s)
    return F.smooth_l1_loss(_triplet_cosines(s, eps), _triplet_cosines(t, eps), beta=1.0)


def rkd_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    w_distance: float = 25.0,
    w_angle: float = 50.0,
) -> Tensor:
    """``w_distance * rkd_distance + w_angle * rkd_angle`` with the paper's weights 25 / 50."""
    loss = _zero_loss(student.float())
    if w_distance:
        loss = loss + w_distance * rkd_distance(student, teacher, mask=mask, reduction=reduction)
    if w_angle:
        loss = loss + w_angle * rkd_angle(student, teacher, mask=mask, reduction=reduction)
    return loss


def similarity_preserving(
    student: Tensor,
    teacher: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    eps: float = 1e-12,
) -> Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019).

    Flattens each example to ``F [B, -1]`` (any trailing shape: feature maps
    ``[B, C, H, W]`` or token features ``[B, T, D]``, whose padded tokens are
    zeroed when ``mask`` is given), builds ``G = row_normalise(F F^T)`` and
    returns ``||G_s - G_t||_F^2 / B^2``. Only the batch size must match.
    """
    _check_reduction(reduction, _SET_LEVEL, name="similarity_preserving")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"similarity_preserving: batch sizes differ, student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}"
        )
    if mask is not None:
        if student.dim() != 3:
            raise ValueError(f"similarity_preserving: a mask needs token features [B, T, D], got {tuple(student.shape)}")
        s, t, _ = _prepare_pair("similarity_preserving", student, teacher, mask, same_width=False)
    else:
        s, t = student.float(), teacher.detach().float()
    b = s.shape[0]
    fs, ft = s.reshape(b, -1), t.reshape(b, -1)
    gs = F.normalize(fs @ fs.T, dim=1, eps=eps)
    gt = F.normalize(ft @ ft.T, dim=1, eps=eps)
    return (gs - gt).pow(2).sum() / (b * b)


def contrastive_representation(
    student: Tensor,
    teacher: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    temperature: float = 0.07,
    symmetric: bool = False,
) -> Tensor:
    """CRD-style InfoNCE (Tian et al., ICLR 2020) with in-batch negatives.

    Both sides are L2-normalised (equal widths required -- project the student
    first), ``logits = s t^T / temperature`` and the diagonal is the positive:
    each student embedding must pick out its own teacher embedding among the
    batch. CRD proper uses a memory bank of 16384 negatives; in-batch negatives
    keep this a pure function. ``symmetric=True`` averages in the
    teacher->student direction. "none" returns the per-example loss ``[N]``.
    """
    _check_reduction(reduction, name="contrastive_representation")
    if temperature <= 0:
        raise ValueError(f"contrastive_representation: temperature must be > 0, got {temperature}")
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"contrastive_representation: student shape {tuple(student.shape)} and teacher shape "
            f"{tuple(teacher.shape)} differ in width; put a projector in front of the student "
            "(kdforge.align.projectors.build_projector)"
        )
    s, t = _embeddings("contrastive_representation", student, teacher, mask)
    s = F.normalize(s, dim=-1)
    t = F.normalize(t, dim=-1)
    logits = s @ t.T / temperature
    target = torch.arange(s.shape[0], device=s.device)
    per_example = F.cross_entropy(logits, target, reduction="none")
    if symmetric:
        per_example = 0.5 * (per_example + F.cross_entropy(logits.T, target, reduction="none"))
    if reduction == "none":
        return per_example
    return per_example.sum() if reduction == "sum" else per_example.mean()
