"""Label Assignment Distillation (LAD) for a small single-stage, anchor-based detector.

Nguyen et al., "Improving Object Detection by Label Assignment Distillation", WACV 2022 (arXiv 2108.10520);
authors' code cybercore-co-ltd/CoLAD (``ccdet/models/detectors/lad.py``, ``ccdet/models/dense_heads/
paa_lad_head.py``, on mmdetection's ``PAAHead``). In LAD the teacher does not hand the student soft targets: it
decides *which anchors are positive or negative* for each ground-truth box -- with PAA's probabilistic anchor
assignment (Kim & Lee, ECCV 2020) run on the teacher's own predictions -- and the student trains on those labels
with its ordinary detection losses, instead of on its own IoU matcher's labels.

This module gives the pieces, per image, as pure functions of tensors (no model, no mmdet):

* :func:`make_anchors` -- anchors of a small multi-level head, and :func:`flatten_head_outputs` to lay the head's
  ``[B, a*K, H, W]`` maps out in the same anchor order;
* :func:`encode_boxes` / :func:`decode_boxes` -- the delta box coder (mmdet's ``DeltaXYWHBBoxCoder``,
  stds (0.1, 0.1, 0.2, 0.2) as in the PAA/LAD configs); :func:`box_iou`, :func:`generalized_iou`;
* :func:`iou_assign` -- the student's own baseline: max-IoU matching (RetinaNet style);
* :func:`lad_assign` -- the teacher-based assignment (PAA on the teacher's predictions);
* :func:`detection_loss` -- sigmoid focal loss for classes + GIoU (or L1) for boxes, given any assignment.

Soft-label KD on the same head (the third comparison of issue 12) needs no new loss: apply
:func:`kdforge.losses.cam.binary_kd` to the flattened ``[B, A, K]`` class logits.

Boxes are ``(x0, y0, x1, y1)`` in pixels (x1 exclusive edge, width ``x1 - x0``). Errors raise
:class:`kdforge.errors.KDForgeError` with one line naming the cause and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import KDForgeError

__all__ = [
    "Assignment", "make_anchors", "flatten_head_outputs", "encode_boxes", "decode_boxes", "box_iou",
    "generalized_iou", "sigmoid_focal_loss", "iou_assign", "teacher_candidate_costs", "paa_split", "lad_assign",
    "detection_loss",
]

BOX_STDS = (0.1, 0.1, 0.2, 0.2)
_MAX_LOG_RATIO = abs(math.log(16 / 1000))  # mmdet's wh_ratio_clip: dw, dh clamped to +-log(1000/16)


@dataclass(frozen=True)
class Assignment:
    """Which anchors of one image are positive, negative or ignored.

    ``labels`` ``[A]`` int64: the class id ``0..K-1`` of a positive anchor, ``K`` (``num_classes``) for a negative
    (background) one, ``-1`` for an ignored one (left out of the class loss). ``gt_index`` ``[A]`` int64: the
    matched ground-truth row of a positive anchor, ``-1`` elsewhere. ``cost`` ``[A]`` float (LAD only): the
    teacher's loss on each candidate anchor (``NaN`` for anchors that were not candidates).
    """

    labels: Tensor
    gt_index: Tensor
    num_classes: int
    cost: Tensor | None = None

    @property
    def positive(self) -> Tensor:
        return (self.labels >= 0) & (self.labels < self.num_classes)

    @property
    def num_positive(self) -> int:
        return int(self.positive.sum())


# --------------------------------------------------------------------------- anchors and boxes


def make_anchors(
    image_size: int | tuple[int, int],
    strides: Sequence[int] = (4, 8),
    sizes: Sequence[float] = (8.0, 16.0),
    ratios: Sequence[float] = (1.0,),
) -> tuple[Tensor, Tensor]:
    """Anchors of a multi-level head over an image of ``image_size`` (side, or ``(height, width)``) pixels.

    Level ``l`` has a ``ceil(H / stride) x ceil(W / stride)`` grid; each cell carries ``len(ratios)`` anchors of
    area ``sizes[l]**2`` and height/width ratio ``r`` (``w = size / sqrt(r)``, ``h = size * sqrt(r)``), centred on
    the cell centre ``((x + 0.5) * stride, (y + 0.5) * stride)`` (mmdet's generator uses the cell corner; the
    centre keeps a one-cell grid symmetric). Order: level, then row y, column x, then ratio -- the order of
    :func:`flatten_head_outputs`. Returns ``(anchors [A, 4] float32 xyxy pixels, level [A] int64)``. The default
    suits 32x32 digit canvases with 8x8 and 16x16 digits (stride 4 / size 8 and stride 8 / size 16).

    Raises ``KDForgeError`` when strides and sizes differ in length or any stride, size or ratio is not positive.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if len(strides) != len(sizes) or not strides:
        raise KDForgeError(f"make_anchors: one size per stride, got strides {list(strides)} and sizes {list(sizes)}")
    if min(strides) <= 0 or min(sizes) <= 0 or not ratios or min(ratios) <= 0:
        raise KDForgeError("make_anchors: strides, sizes and ratios must be positive")
    boxes, levels = [], []
    for level, (stride, size) in enumerate(zip(strides, sizes)):
        ny, nx = math.ceil(height / stride), math.ceil(width / stride)
        cy, cx = torch.meshgrid((torch.arange(ny) + 0.5) * stride, (torch.arange(nx) + 0.5) * stride, indexing="ij")
        r = torch.tensor(ratios, dtype=torch.float32)
        half_w, half_h = size / r.sqrt() / 2, size * r.sqrt() / 2
        cx, cy = cx.reshape(-1, 1), cy.reshape(-1, 1)
        level_boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1).reshape(-1, 4)
        boxes.append(level_boxes)
        levels.append(torch.full((len(level_boxes),), level, dtype=torch.int64))
    return torch.cat(boxes).float(), torch.cat(levels)


def flatten_head_outputs(per_level: Sequence[Tensor], channels: int) -> Tensor:
    """Concatenate a head's per-level maps ``[B, a * channels, H_l, W_l]`` into ``[B, A, channels]`` in
    :func:`make_anchors`' order (level, y, x, anchor). ``channels`` is K for class logits, 4 for box deltas.
    Raises ``KDForgeError`` when a map's channel count is not a multiple of ``channels``."""
    out = []
    for x in per_level:
        b, c, h, w = x.shape
        if c % channels:
            raise KDForgeError(f"flatten_head_outputs: a map with {c} channels is not anchors x {channels}")
        out.append(x.permute(0, 2, 3, 1).reshape(b, h * w * (c // channels), channels))
    return torch.cat(out, dim=1)


def encode_boxes(anchors: Tensor, boxes: Tensor, stds: Sequence[float] = BOX_STDS) -> Tensor:
    """Deltas ``[N, 4]`` = ((gx - ax) / aw, (gy - ay) / ah, log(gw / aw), log(gh / ah)) / stds, centres and sizes
    of ``anchors`` and ``boxes`` (both ``[N, 4]`` xyxy)."""
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + aw / 2, anchors[:, 1] + ah / 2
    gw, gh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    gx, gy = boxes[:, 0] + gw / 2, boxes[:, 1] + gh / 2
    deltas = torch.stack([(gx - ax) / aw, (gy - ay) / ah, torch.log(gw / aw), torch.log(gh / ah)], dim=-1)
    return deltas / deltas.new_tensor(stds)


def decode_boxes(anchors: Tensor, deltas: Tensor, stds: Sequence[float] = BOX_STDS) -> Tensor:
    """Inverse of :func:`encode_boxes`: boxes ``[..., 4]`` xyxy from anchors ``[..., 4]`` and deltas ``[..., 4]``
    (dw, dh clamped to +-log(1000/16) as mmdet does, so an untrained head cannot overflow)."""
    d = deltas * deltas.new_tensor(stds)
    aw, ah = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    ax, ay = anchors[..., 0] + aw / 2, anchors[..., 1] + ah / 2
    cx, cy = ax + d[..., 0] * aw, ay + d[..., 1] * ah
    w = aw * d[..., 2].clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    h = ah * d[..., 3].clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU ``[N, M]`` of boxes ``a`` ``[N, 4]`` and ``b`` ``[M, 4]`` (xyxy; empty boxes give 0)."""
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(dim=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def generalized_iou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """Element-wise GIoU ``[N]`` of aligned boxes ``a``, ``b`` ``[N, 4]`` (Rezatofighi et al., CVPR 2019):
    ``IoU - (C - U) / C`` with C the smallest enclosing box's area; in [-1, 1], 1 only for identical boxes."""
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    inter = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp_min(0).prod(dim=-1)
    union = area_a + area_b - inter
    enclose = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp_min(0).prod(dim=-1)
    return inter / (union + eps) - (enclose - union) / (enclose + eps)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss (Lin et al., ICCV 2017), same shape as ``logits``: with ``p = sigmoid(z)`` and
    ``p_t = p`` where ``targets`` is 1 else ``1 - p``, ``-alpha_t (1 - p_t)^gamma log p_t``, ``alpha_t = alpha``
    for targets 1 and ``1 - alpha`` for 0 (mmdet's sigmoid ``FocalLoss``; its defaults alpha 0.25, gamma 2)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t).pow(gamma) * ce


# --------------------------------------------------------------------------- assignment


def _check_gt(name: str, gt_boxes: Tensor, gt_classes: Tensor, num_classes: int) -> None:
    if gt_boxes.dim() != 2 or gt_boxes.shape[-1] != 4:
        raise KDForgeError(f"{name}: ground-truth boxes must be [n, 4] xyxy, got {tuple(gt_boxes.shape)}")
    if gt_classes.shape != gt_boxes.shape[:1]:
        raise KDForgeError(f"{name}: {len(gt_boxes)} ground-truth boxes but class ids of shape "
                           f"{tuple(gt_classes.shape)}; give one class id per box")
    if len(gt_classes) and (int(gt_classes.min()) < 0 or int(gt_classes.max()) >= num_classes):
        bad = int(gt_classes[(gt_classes < 0) | (gt_classes >= num_classes)][0])
        raise KDForgeError(f"{name}: class id {bad} is outside the head's 0..{num_classes - 1}; fix the label or "
                           "the head's class count")


def iou_assign(
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_classes: Tensor,
    num_classes: int,
    *,
    pos_iou: float = 0.5,
    neg_iou: float = 0.4,
    low_quality_matches: bool = True,
) -> Assignment:
    """The student's own assignment: max-IoU matching (RetinaNet; mmdet's ``MaxIoUAssigner``).

    ``anchors`` ``[A, 4]``, ``gt_boxes`` ``[n, 4]`` (xyxy pixels), ``gt_classes`` ``[n]`` int. Each anchor takes the
    ground truth it overlaps most: positive when that IoU is ``>= pos_iou``, negative when ``< neg_iou``, ignored
    in between. With ``low_quality_matches`` every ground truth also claims the anchor(s) of its own highest IoU
    (ties included; later boxes win a shared anchor), so no box is left without a positive -- provided that IoU is
    above 0 (mmdet's ``min_pos_iou = 0`` would also claim anchors that do not touch the box; kdforge does not).
    No ground truth: every anchor is negative.

    Raises ``KDForgeError`` for boxes that are not ``[n, 4]``, a class count that differs from the boxes', a class
    id outside ``0..num_classes-1``, or ``neg_iou > pos_iou``.
    """
    _check_gt("iou_assign", gt_boxes, gt_classes, num_classes)
    if neg_iou > pos_iou:
        raise KDForgeError(f"iou_assign: neg_iou {neg_iou} must not exceed pos_iou {pos_iou}")
    n_anchors = anchors.shape[0]
    labels = torch.full((n_anchors,), -1, dtype=torch.int64, device=anchors.device)
    gt_index = torch.full((n_anchors,), -1, dtype=torch.int64, device=anchors.device)
    if len(gt_boxes) == 0:
        return Assignment(labels.fill_(num_classes), gt_index, num_classes)
    iou = box_iou(anchors.float(), gt_boxes.float())  # [A, n]
    best_iou, best_gt = iou.max(dim=1)
    labels[best_iou < neg_iou] = num_classes
    positive = best_iou >= pos_iou
    gt_index[positive] = best_gt[positive]
    if low_quality_matches:
        gt_best = iou.max(dim=0).values
        for j in range(len(gt_boxes)):
            if gt_best[j] > 0:
                claim = iou[:, j] == gt_best[j]
                gt_index[claim] = j
                positive |= claim
    labels[positive] = gt_classes.to(labels.device)[gt_index[positive]]
    return Assignment(labels, gt_index, num_classes)


def teacher_candidate_costs(
    anchors: Tensor,
    teacher_cls_logits: Tensor,
    teacher_deltas: Tensor,
    gt_boxes: Tensor,
    gt_classes: Tensor,
    candidate_gt: Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    box_weight: float = 1.3,
) -> Tensor:
    """PAA's score of each candidate anchor, as a loss: ``[A]``, ``NaN`` where ``candidate_gt`` is -1.

    For anchor ``i`` matched to ground truth ``g``: the teacher's focal loss on its class logits against the one-hot
    class of ``g`` (summed over the K classes) plus ``box_weight`` x the GIoU loss ``1 - GIoU`` of the teacher's
    decoded box against ``g``. ``exp(-cost)`` is PAA's anchor score ``S_cls x S_loc^lambda`` (lambda =
    ``box_weight``; 1.3 is the GIoU loss weight of the PAA/LAD configs): high where the teacher both classifies
    and localises ``g`` well from that anchor. Shapes: ``teacher_cls_logits`` ``[A, K]``, ``teacher_deltas``
    ``[A, 4]``.
    """
    cost = torch.full((anchors.shape[0],), float("nan"), dtype=torch.float32, device=anchors.device)
    idx = torch.nonzero(candidate_gt >= 0).flatten()
    if len(idx) == 0:
        return cost
    g = candidate_gt[idx]
    logits = teacher_cls_logits[idx].detach().float()
    target = F.one_hot(gt_classes.to(idx.device)[g].long(), logits.shape[-1]).float()
    cls = sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma).sum(dim=-1)
    boxes = decode_boxes(anchors[idx].float(), teacher_deltas[idx].detach().float())
    loc = 1.0 - generalized_iou(boxes, gt_boxes[g].float())
    cost[idx] = cls + box_weight * loc
    return cost


def _gmm_two_components(x: np.ndarray, *, tol: float = 1e-3, max_iter: int = 100, reg_covar: float = 1e-6
                        ) -> tuple[np.ndarray, np.ndarray]:
    """A 1-D two-component Gaussian mixture fitted by EM, started as PAA starts scikit-learn's
    ``GaussianMixture`` (means at the smallest and largest value, variances 1, weights 1/2; ``diag`` covariance,
    tol 1e-3, at most 100 iterations, reg_covar 1e-6). ``x``: ``[n]`` float64. Returns (component of each value,
    log-likelihood of each value under the mixture), both ``[n]``, from the final parameters. NumPy, not torch:
    on a handful of values the per-call overhead is what costs."""
    x = np.asarray(x, dtype=np.float64)[:, None]
    mean = np.array([x.min(), x.max()])
    var = np.ones(2)
    weight = np.full(2, 0.5)
    tiny = 10 * np.finfo(np.float64).eps

    def weighted_log_prob() -> np.ndarray:  # [n, 2]
        return -0.5 * (math.log(2 * math.pi) + np.log(var) + (x - mean) ** 2 / var) + np.log(weight)

    def logsumexp(a: np.ndarray) -> np.ndarray:
        top = a.max(axis=1, keepdims=True)
        return (top + np.log(np.exp(a - top).sum(axis=1, keepdims=True)))[:, 0]

    lower = -math.inf
    for _ in range(max_iter):
        wlp = weighted_log_prob()
        norm = logsumexp(wlp)
        resp = np.exp(wlp - norm[:, None])
        nk = resp.sum(axis=0) + tiny
        mean = (resp * x).sum(axis=0) / nk
        var = (resp * (x - mean) ** 2).sum(axis=0) / nk + reg_covar
        weight = nk / nk.sum()
        new_lower = float(norm.mean())
        converged = abs(new_lower - lower) < tol
        lower = new_lower
        if converged:
            break
    wlp = weighted_log_prob()
    return wlp.argmax(axis=1), logsumexp(wlp)


def paa_split(costs: Tensor) -> Tensor:
    """PAA's positive/negative split of one ground truth's candidate costs ``[n]`` -> bool ``[n]`` (True =
    positive).

    Sorted by cost, the costs are fitted with a two-component 1-D Gaussian mixture (:func:`_gmm_two_components`);
    positives are the candidates of the low-cost component up to, in cost order, the one where the mixture's
    density peaks (mmdet's ``gmm_separation_scheme``, scheme (c) of the PAA paper's Fig. 3); the others are
    negatives. Departure from PAA's code: a ground truth with a single candidate keeps it as positive (PAA's code
    skips ground truths with fewer than two candidates, leaving them without any positive anchor; with the few
    anchors of a small head that happens, and a box with no positive cannot be learned).
    """
    n = costs.numel()
    positive = torch.zeros(n, dtype=torch.bool, device=costs.device)
    if n == 0:
        return positive
    if n == 1:
        positive[0] = True
        return positive
    order = torch.argsort(costs, stable=True)
    component, log_density = _gmm_two_components(costs[order].detach().double().cpu().numpy())
    foreground = np.flatnonzero(component == 0)
    if len(foreground) == 0:
        return positive
    peak = int(np.argmax(log_density[foreground]))
    keep = torch.from_numpy(foreground[: peak + 1]).to(costs.device)
    positive[order[keep]] = True
    return positive


def lad_assign(
    anchors: Tensor,
    levels: Tensor,
    teacher_cls_logits: Tensor,
    teacher_deltas: Tensor,
    gt_boxes: Tensor,
    gt_classes: Tensor,
    *,
    topk: int = 9,
    candidate_iou: float = 0.1,
    alpha: float = 0.25,
    gamma: float = 2.0,
    box_weight: float = 1.3,
) -> Assignment:
    """LAD: the teacher's predictions decide the student's positive and negative anchors (PAA assignment).

    Inputs for one image: ``anchors`` ``[A, 4]`` and their ``levels`` ``[A]`` (:func:`make_anchors`), the teacher's
    class logits ``[A, K]`` and box deltas ``[A, 4]`` on the same anchors (:func:`flatten_head_outputs`), and the
    ground truth ``gt_boxes`` ``[n, 4]`` / ``gt_classes`` ``[n]``. Steps, as the authors' ``PAA_LAD_Head`` on
    mmdet's ``PAAHead`` with the LAD config (``configs/_base_/models/_paa_distil_fpn.py``):

    1. candidates: max-IoU matching with ``pos_iou = neg_iou = candidate_iou`` (0.1) and low-quality matches --
       every anchor overlapping some box by >= 0.1 is a candidate of the box it overlaps most; the rest are
       negatives;
    2. each candidate's cost from the *teacher's* predictions (:func:`teacher_candidate_costs`: focal loss of the
       box's class + ``box_weight`` x GIoU loss; ``exp(-cost)`` = cls score x IoU-quality^1.3);
    3. per ground truth and per pyramid level, the ``topk`` (9) cheapest candidates; over all levels, a
       two-component Gaussian mixture on their costs separates positives from negatives (:func:`paa_split`);
    4. every other candidate becomes a negative (background). Nothing is ignored.

    The authors' defaults (CoLAD ``_paa_distil_fpn.py``): ``topk=9``, MaxIoU candidates at 0.1, ``FocalLoss``
    (gamma 2, alpha 0.25), ``GIoULoss`` weight 1.3, ``covariance_type='diag'``. Simplifications, stated: the GMM is
    kdforge's own EM started exactly as PAA starts scikit-learn's (so scikit-learn is not a runtime need; a test
    checks both give the same split); a ground truth with a single candidate keeps it (see :func:`paa_split`); the
    teacher's IoU-prediction branch is not used (PAA's assignment never reads it). Returns an
    :class:`Assignment` whose ``cost`` holds the candidates' teacher costs.

    Raises ``KDForgeError`` for teacher outputs whose anchor count differs from the anchors' (both named), levels
    of another length, and the ground-truth errors of :func:`iou_assign`.
    """
    num_classes = teacher_cls_logits.shape[-1]
    _check_gt("lad_assign", gt_boxes, gt_classes, num_classes)
    n_anchors = anchors.shape[0]
    for what, t in (("class logits", teacher_cls_logits), ("box deltas", teacher_deltas), ("levels", levels)):
        if t.shape[0] != n_anchors:
            raise KDForgeError(f"lad_assign: teacher {what} cover {t.shape[0]} anchors but there are {n_anchors} "
                               "anchors; flatten the head's maps with flatten_head_outputs in make_anchors' order")
    if teacher_deltas.shape[-1] != 4:
        raise KDForgeError(f"lad_assign: teacher box deltas must be [A, 4], got {tuple(teacher_deltas.shape)}")
    candidates = iou_assign(anchors, gt_boxes, gt_classes, num_classes, pos_iou=candidate_iou,
                            neg_iou=candidate_iou)
    cost = teacher_candidate_costs(anchors, teacher_cls_logits, teacher_deltas, gt_boxes, gt_classes,
                                   candidates.gt_index, alpha=alpha, gamma=gamma, box_weight=box_weight)
    labels = torch.full((n_anchors,), num_classes, dtype=torch.int64, device=anchors.device)
    gt_index = torch.full((n_anchors,), -1, dtype=torch.int64, device=anchors.device)
    for g in range(len(gt_boxes)):
        chosen = []
        for level in torch.unique(levels).tolist():
            idx = torch.nonzero((candidates.gt_index == g) & (levels == level)).flatten()
            if len(idx):
                k = min(topk, len(idx))
                chosen.append(idx[torch.topk(cost[idx], k, largest=False).indices])
        if not chosen:
            continue
        idx = torch.cat(chosen)
        keep = idx[paa_split(cost[idx])]
        gt_index[keep] = g
        labels[keep] = int(gt_classes[g])
    return Assignment(labels, gt_index, num_classes, cost)


# --------------------------------------------------------------------------- loss


def detection_loss(
    cls_logits: Tensor,
    box_deltas: Tensor,
    anchors: Tensor,
    assignments: Sequence[Assignment],
    gt_boxes: Sequence[Tensor],
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    box_loss: str = "giou",
    box_weight: float = 1.3,
    return_parts: bool = False,
) -> Tensor | dict[str, Tensor]:
    """The student's detection loss on a batch, given one :class:`Assignment` per image (IoU or LAD).

    ``cls_logits`` ``[B, A, K]``, ``box_deltas`` ``[B, A, 4]`` (the head's outputs, :func:`flatten_head_outputs`),
    ``anchors`` ``[A, 4]``, ``gt_boxes[b]`` ``[n_b, 4]``. Terms (N = positives in the batch, at least 1):

    * class: sigmoid focal loss (:func:`sigmoid_focal_loss`) summed over the K classes and every non-ignored
      anchor, target one-hot for positives and all-zero for negatives, divided by N;
    * box (positives only, divided by N): ``"giou"`` -- ``1 - GIoU`` of the decoded box against its ground truth
      (PAA/LAD's ``GIoULoss``); ``"l1"`` -- L1 between predicted and encoded target deltas, summed over the 4.

    Returns ``class + box_weight * box`` (``box_weight`` 1.3 is the PAA/LAD GIoU weight), or with
    ``return_parts`` a dict ``{"total", "cls", "box", "num_pos"}``. Departures from PAA's head loss: no IoU
    branch and its loss, and the box loss is averaged over positives (PAA weights each by its IoU).

    Raises ``KDForgeError`` for shapes that disagree (named), an assignment count other than B, and a bad
    ``box_loss``.
    """
    if box_loss not in ("giou", "l1"):
        raise KDForgeError(f"detection_loss: box_loss must be 'giou' or 'l1', got {box_loss!r}")
    if cls_logits.dim() != 3 or box_deltas.shape != (*cls_logits.shape[:2], 4) or anchors.shape != (
            cls_logits.shape[1], 4):
        raise KDForgeError(f"detection_loss: expected class logits [B, A, K], deltas [B, A, 4] and anchors [A, 4]; "
                           f"got {tuple(cls_logits.shape)}, {tuple(box_deltas.shape)} and {tuple(anchors.shape)}")
    if len(assignments) != cls_logits.shape[0] or len(gt_boxes) != cls_logits.shape[0]:
        raise KDForgeError(f"detection_loss: {cls_logits.shape[0]} images but {len(assignments)} assignments and "
                           f"{len(gt_boxes)} ground-truth lists; give one of each per image")
    num_classes = cls_logits.shape[-1]
    labels = torch.stack([a.labels.to(cls_logits.device) for a in assignments])  # [B, A]
    counted = labels >= 0
    positive = counted & (labels < num_classes)
    n_pos = positive.sum()
    denom = n_pos.clamp_min(1).to(torch.float32)
    target = F.one_hot(labels.clamp(0, num_classes), num_classes + 1)[..., :num_classes].float()
    focal = sigmoid_focal_loss(cls_logits.float(), target, alpha=alpha, gamma=gamma).sum(dim=-1)
    cls = torch.where(counted, focal, torch.zeros_like(focal)).sum() / denom
    b_idx, a_idx = torch.nonzero(positive, as_tuple=True)
    if len(b_idx):
        g_idx = torch.stack([a.gt_index.to(cls_logits.device) for a in assignments])[b_idx, a_idx]
        targets = torch.stack([gt_boxes[int(b)][int(g)] for b, g in zip(b_idx, g_idx)]).float()
        pos_anchors, pos_deltas = anchors[a_idx].float(), box_deltas[b_idx, a_idx].float()
        if box_loss == "giou":
            per = 1.0 - generalized_iou(decode_boxes(pos_anchors, pos_deltas), targets)
        else:
            per = (pos_deltas - encode_boxes(pos_anchors, targets)).abs().sum(dim=-1)
        box = per.sum() / denom
    else:
        box = box_deltas.sum() * 0.0
    total = cls + box_weight * box
    if return_parts:
        return {"total": total, "cls": cls, "box": box, "num_pos": n_pos}
    return total
