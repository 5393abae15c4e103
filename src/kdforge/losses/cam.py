"""Class-activation-map (CAM) distillation and per-class binary KD, for image classifiers and multi-label heads.

A class activation map (Zhou et al., CVPR 2016) is what a CNN's classifier says about each position of its last
feature map: for features ``F`` ``[B, C, H, W]`` and the classifier's weight ``W`` ``[K, C]``, class ``k``'s map is
``A_k = sum_c W[k, c] * F[:, c]`` -- the classifier applied as a 1x1 convolution before the global average pool.
For a GAP + linear head, the spatial mean of ``A_k`` plus the bias is exactly class ``k``'s logit.
:func:`class_activation_maps` computes them; a model whose head is already a 1x1 convolution (CAT-KD's authors
convert the FC layer into one) gives them to a tap directly.

Losses here (all pure functions; the teacher side is detached here; maths runs in float32):

* :func:`cat_kd` -- CAT-KD (Guo et al., CVPR 2023): pooled, normalised CAMs compared with squared error.
* :func:`classwise_cam_kd` -- multi-label class-wise CAM distillation: each class's normalised map of the teacher
  guides the student's, over all classes or only the present ones.
* :func:`binary_kd` -- multi-label logit KD: one Bernoulli KL per class at temperature T.

Bad input raises :class:`kdforge.errors.KDForgeError` with one line naming the cause and the fix.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import KDForgeError
from .logits import _reduce  # masked mean / sum / none over counted positions, as every logit loss

__all__ = ["class_activation_maps", "cat_kd", "classwise_cam_kd", "binary_kd"]

log = logging.getLogger("kdforge")

REDUCTIONS = ("mean", "sum", "none")
CONVENTIONS = ("kdforge", "authors")
RESIZE_MODES = ("none", "bilinear", "nearest", "area")
CLASS_SELECTIONS = ("all", "present")

# (loss name, student H x W, teacher H x W) pairs already logged, so a resize is said once, not every step.
_logged_resizes: set[tuple[str, tuple[int, int], tuple[int, int], str]] = set()


# --------------------------------------------------------------------------- helpers


def _check_choice(name: str, what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise KDForgeError(f"{name}: {what} must be one of {list(allowed)}, got {value!r}")


def _check_cam_pair(name: str, student: Tensor, teacher: Tensor) -> None:
    """Both ``[B, K, H, W]`` with the same batch size and class count, else one line naming both shapes."""
    if student.dim() != 4 or teacher.dim() != 4:
        raise KDForgeError(
            f"{name}: expected class activation maps [B, K, H, W], got student {tuple(student.shape)} and teacher "
            f"{tuple(teacher.shape)}; tap the output of the 1x1-conv classifier (or use class_activation_maps)"
        )
    if student.shape[0] != teacher.shape[0]:
        raise KDForgeError(
            f"{name}: batch sizes differ, student {student.shape[0]} vs teacher {teacher.shape[0]}; "
            "feed both models the same batch"
        )
    if student.shape[1] != teacher.shape[1]:
        raise KDForgeError(
            f"{name}: class counts differ, student {student.shape[1]} vs teacher {teacher.shape[1]} maps; "
            "both heads must predict the same classes in the same order"
        )


def _log_resize_once(name: str, student: Tensor, teacher: Tensor, how: str) -> None:
    key = (name, tuple(student.shape[-2:]), tuple(teacher.shape[-2:]), how)
    if key not in _logged_resizes:
        _logged_resizes.add(key)
        log.info("%s: student maps %sx%s and teacher maps %sx%s differ in size; %s", name,
                 *student.shape[-2:], *teacher.shape[-2:], how)


def _unit_maps(x: Tensor, eps: float) -> Tensor:
    """Each ``[b, k]`` map of ``[B, K, H, W]`` divided by its L2 norm over the H*W positions."""
    flat = x.flatten(2)
    return (flat / flat.norm(dim=2, keepdim=True).clamp_min(eps)).view_as(x)


def _reduce_samples(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


# --------------------------------------------------------------------------- CAMs


def class_activation_maps(features: Tensor, weight: Tensor) -> Tensor:
    """Class activation maps ``[B, K, H, W]`` of a GAP + linear classifier.

    ``features``: the last feature map ``[B, C, H, W]`` (what the global average pool receives);
    ``weight``: the linear classifier's weight ``[K, C]`` or a 1x1 convolution's ``[K, C, 1, 1]``.
    Returns ``A[b, k] = sum_c weight[k, c] * features[b, c]``, the classifier applied at every position; the bias
    is left out, as in CAT-KD's converted head (its spatial mean plus the bias is the logit). Gradients flow to
    both inputs.

    A flatten + linear head (no pooling: one weight per channel *and position*) is given as its weight reshaped to
    ``[K, C, H, W]`` (the feature map's H x W): ``A[b, k, h, w] = sum_c weight[k, c, h, w] * features[b, c, h, w]``,
    each position's contribution to the logit, whose spatial *sum* plus the bias is the logit (the same
    decomposition, with weights that vary by position; not from the CAT-KD paper, whose heads all pool).

    Raises ``KDForgeError`` when ``features`` is not 4-D, ``weight`` is not ``[K, C]`` / ``[K, C, 1, 1]`` /
    ``[K, C, H, W]`` of the features' size, or the channel counts differ (both named).
    """
    if features.dim() != 4:
        raise KDForgeError(f"class_activation_maps: features must be [B, C, H, W], got {tuple(features.shape)}")
    if weight.dim() == 4 and weight.shape[-2:] == (1, 1):
        weight = weight.flatten(1)
    if weight.dim() == 4 and weight.shape[1:] == features.shape[1:]:
        return torch.einsum("kchw,bchw->bkhw", weight.to(features.dtype), features)
    if weight.dim() != 2:
        raise KDForgeError(
            f"class_activation_maps: weight must be a linear [K, C], 1x1-conv [K, C, 1, 1] or position-wise "
            f"[K, {features.shape[1]}, {features.shape[2]}, {features.shape[3]}] weight, got {tuple(weight.shape)}"
        )
    if weight.shape[1] != features.shape[1]:
        raise KDForgeError(
            f"class_activation_maps: the classifier expects {weight.shape[1]} channels but the features have "
            f"{features.shape[1]}; pass the feature map that feeds this classifier's global average pool"
        )
    return torch.einsum("kc,bchw->bkhw", weight.to(features.dtype), features)


# --------------------------------------------------------------------------- CAT-KD


def cat_kd(
    student_cams: Tensor,
    teacher_cams: Tensor,
    *,
    reduction: str = "mean",
    pool_size: int = 2,
    normalize: bool = True,
    binarize: bool = False,
    convention: str = "kdforge",
    eps: float = 1e-12,
) -> Tensor:
    """CAT-KD: class attention transfer (Guo et al., "Class Attention Transfer Based Knowledge Distillation",
    CVPR 2023; authors' code GzyAftermath/CAT-KD, ``mdistiller/distillers/CAT_KD.py``).

    ``student_cams`` ``[B, K, Hs, Ws]`` and ``teacher_cams`` ``[B, K, Ht, Wt]`` are the class activation maps of the
    two models (:func:`class_activation_maps`, or the output of a 1x1-conv classifier; the authors turn each
    model's FC layer into a bias-free 1x1 convolution and take its output before the average pool). Both are
    average-pooled to a ``pool_size x pool_size`` grid (``adaptive_avg_pool2d``; so spatial sizes may differ -- the
    pooling to a common grid is the method's own resize, logged once per size pair), then with ``normalize=True``
    each class's pooled map is divided by its L2 norm over the grid cells, and the maps are compared with squared
    error. Channel counts of the underlying features may differ (the maps have K channels on both sides).

    ``binarize=True`` (the authors' ``IF_BINARIZE``, their "CAT_Binarization" ablation): before pooling, each of the
    *teacher's* full-resolution maps becomes 1 where it exceeds its own mean absolute value (its L1 norm over the
    H*W positions / H*W) and 0 elsewhere, so only where the teacher attends is transferred, not how strongly; the
    student's maps are left as they are.

    The authors' defaults (``mdistiller/engine/cfg.py``): ``CAM_RESOLUTION = 2`` (``pool_size``),
    ``IF_NORMALIZE = True``, ``CAT_loss_weight = 400`` (β: the term's ``weight``), ``CE_WEIGHT = 1``,
    ``onlyCAT = False`` (CAT-KD keeps the cross-entropy term and adds no logit KD; ``onlyCAT`` drops the
    cross-entropy), ``IF_BINARIZE = False`` (``binarize``).
    Their per-pair configs (``configs/cifar100/CAT_KD/*.yaml``) tune β from 0.7 to 600, ``CAM_RESOLUTION`` 2 or 4
    and ``IF_NORMALIZE`` per pair (e.g. ResNet32x4 -> ResNet8x4: β = 15, 2x2, no normalisation; ImageNet
    ResNet34 -> ResNet18: β = 0.5, 4x4, no normalisation). Their README asks to tune β so the loss sits roughly in
    1..50 after the first epoch.

    Conventions (keyword ``convention``):

    * ``"kdforge"`` (default): per sample, the squared L2 distance between each class's pooled maps summed over
      the ``pool_size**2`` grid cells, averaged over the K classes; with ``normalize=True`` each class's term lies
      in [0, 4] whatever the grid size;
    * ``"authors"``: the authors' ``F.mse_loss`` -- also averaged over the grid cells (their ``"mean"`` is the
      mean over all ``B * K * pool_size**2`` elements), so their published β carries over.

    Factor: ``kdforge = pool_size**2 * authors`` exactly (e.g. 4x at the default 2x2 grid): a published β is
    ``β / pool_size**2`` here, or use ``convention="authors"``. Reduction over samples: ``"mean"`` (default),
    ``"sum"``, ``"none"`` -> ``[B]``. Deliberate departures: the scale above; a ``pool_size`` larger than either
    map is refused (adaptive pooling would duplicate cells); the authors' optional top-n class selection
    (``IF_OnlyTransferPartialCAMs``) is not offered here.

    Properties: 0 when the pooled maps agree; with ``normalize=True`` invariant to a positive rescaling of any
    class's map on either side (only where a class attends counts, not how strongly).

    Raises ``KDForgeError`` for maps that are not ``[B, K, H, W]``, differing batch sizes or class counts (both
    named), ``pool_size < 1`` or larger than a map, and a bad ``reduction`` or ``convention``.
    """
    name = "cat_kd"
    _check_choice(name, "reduction", reduction, REDUCTIONS)
    _check_choice(name, "convention", convention, CONVENTIONS)
    _check_cam_pair(name, student_cams, teacher_cams)
    smallest = min(*student_cams.shape[-2:], *teacher_cams.shape[-2:])
    if not isinstance(pool_size, int) or pool_size < 1 or pool_size > smallest:
        raise KDForgeError(
            f"{name}: pool_size must be an integer from 1 to {smallest} (the smallest map side: student "
            f"{tuple(student_cams.shape[-2:])}, teacher {tuple(teacher_cams.shape[-2:])}), got {pool_size!r}"
        )
    if student_cams.shape[-2:] != teacher_cams.shape[-2:]:
        _log_resize_once(name, student_cams, teacher_cams,
                         f"both are adaptive-average-pooled to {pool_size}x{pool_size} (the method's own pooling)")
    s = F.adaptive_avg_pool2d(student_cams.float(), pool_size)
    t = teacher_cams.detach().float()
    if binarize:  # 1 where the teacher's map exceeds its mean absolute value, else 0 (before pooling)
        t = (t > t.abs().mean(dim=(2, 3), keepdim=True)).float()
    t = F.adaptive_avg_pool2d(t, pool_size)
    if normalize:
        s, t = _unit_maps(s, eps), _unit_maps(t, eps)
    per_map = (s - t).pow(2).flatten(2).sum(dim=2)  # [B, K]
    if convention == "authors":
        per_map = per_map / (pool_size * pool_size)
    return _reduce_samples(per_map.mean(dim=1), reduction)


# --------------------------------------------------------------------------- multi-label class-wise CAM KD


def classwise_cam_kd(
    student_cams: Tensor,
    teacher_cams: Tensor,
    *,
    labels: Tensor | None = None,
    reduction: str = "mean",
    classes: str = "all",
    pool_size: int | None = None,
    resize: str = "none",
    eps: float = 1e-12,
) -> Tensor:
    """Multi-label class-wise CAM distillation: each class's map of the teacher guides the student's.

    ``student_cams`` ``[B, K, Hs, Ws]``, ``teacher_cams`` ``[B, K, Ht, Wt]``: per-class activation maps
    (:func:`class_activation_maps`). Each ``[b, k]`` map is divided by its L2 norm over its positions, and the loss
    of one map is the squared L2 distance between the student's and the teacher's unit maps summed over the
    positions (equal to ``2 - 2 cos`` between the two maps, so it lies in [0, 4]; the per-position MSE is this over
    H*W). No softmax across classes: in a multi-label image several classes are present at once, so each class's
    map is normalised on its own.

    Which maps count (``classes``):

    * ``"all"`` (default): every class of every sample -- the teacher's maps of absent classes also say where
      there is *no* evidence for them, which is what a multi-label student must learn too;
    * ``"present"``: only the classes in ``labels`` (multi-hot ``[B, K]``, bool or 0/1), the ground-truth digits
      of the canvas; samples with none contribute nothing.

    Spatial sizes: with ``pool_size`` both sides are first average-pooled to that grid (as CAT-KD). Otherwise
    differing sizes are refused naming both, unless ``resize`` is ``"bilinear"``, ``"nearest"`` or ``"area"``: then
    the student's maps are interpolated to the teacher's size with that mode (logged once per size pair).

    Reduction: ``"mean"`` averages over the counted (sample, class) maps (0 when none counts), ``"sum"`` adds them,
    ``"none"`` returns ``[B, K]`` with 0 for maps that do not count.

    Follows no single paper's code: the class-wise map transfer of CAT-KD (Guo et al., CVPR 2023) kept at full
    resolution and per class, applied to multi-label heads. Raises ``KDForgeError`` for maps that are not
    ``[B, K, H, W]``, differing batch sizes or class counts (both named), differing spatial sizes without
    ``pool_size``/``resize`` (both named), ``classes="present"`` without ``labels`` or with ``labels`` not
    ``[B, K]``, and a bad ``reduction``, ``classes``, ``resize`` or ``pool_size``.
    """
    name = "classwise_cam_kd"
    _check_choice(name, "reduction", reduction, REDUCTIONS)
    _check_choice(name, "classes", classes, CLASS_SELECTIONS)
    _check_choice(name, "resize", resize, RESIZE_MODES)
    _check_cam_pair(name, student_cams, teacher_cams)
    s = student_cams.float()
    t = teacher_cams.detach().float()
    if pool_size is not None:
        smallest = min(*s.shape[-2:], *t.shape[-2:])
        if not isinstance(pool_size, int) or pool_size < 1 or pool_size > smallest:
            raise KDForgeError(f"{name}: pool_size must be an integer from 1 to {smallest} (the smallest map side), "
                               f"got {pool_size!r}")
        s, t = F.adaptive_avg_pool2d(s, pool_size), F.adaptive_avg_pool2d(t, pool_size)
    elif s.shape[-2:] != t.shape[-2:]:
        if resize == "none":
            raise KDForgeError(
                f"{name}: spatial sizes differ, student {tuple(s.shape[-2:])} vs teacher {tuple(t.shape[-2:])}; "
                "pass resize='bilinear' (or 'nearest'/'area') to interpolate the student's maps, or pool_size=N"
            )
        _log_resize_once(name, s, t, f"the student's are resized to the teacher's with mode '{resize}'")
        extra = {"align_corners": False} if resize == "bilinear" else {}
        s = F.interpolate(s, size=t.shape[-2:], mode=resize, **extra)
    per_map = (_unit_maps(s, eps) - _unit_maps(t, eps)).pow(2).flatten(2).sum(dim=2)  # [B, K]
    if classes == "all":
        counted = torch.ones_like(per_map, dtype=torch.bool)
    else:
        if labels is None:
            raise KDForgeError(f"{name}: classes='present' needs labels= (multi-hot [B, K]); or use classes='all'")
        if tuple(labels.shape) != tuple(per_map.shape):
            raise KDForgeError(
                f"{name}: labels shape {tuple(labels.shape)} does not match the maps' [B, K] = "
                f"{tuple(per_map.shape)}; pass one multi-hot row per sample"
            )
        counted = labels.to(device=per_map.device).bool()
    return _reduce(per_map, counted, reduction)


# --------------------------------------------------------------------------- binary KD (multi-label logits)


def binary_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Multi-label logit KD: one binary (Bernoulli) KL per class, summed over classes, times T².

    ``student_logits`` and ``teacher_logits`` ``[..., K]`` are independent per-class logits of a multi-label head
    (sigmoid, not softmax). With ``p = sigmoid(z_t / T)`` and ``q = sigmoid(z_s / T)`` per class,
    ``KL(Bern(p) || Bern(q)) = p log(p/q) + (1-p) log((1-p)/(1-q))``, summed over the K classes and multiplied by
    T² (Hinton et al., 2015, as every kdforge logit loss). Computed from ``logsigmoid`` so saturated logits stay
    finite.

    ``mask``: bool of the leading shape ``[...]``, True where a position counts. Reduction as the other logit
    losses (``kdforge.losses.logits``): ``"mean"`` over counted positions (0 when none), ``"sum"``, ``"none"`` ->
    the leading shape with 0 where not counted. Dense teachers only (a top-k cache cannot give each class's
    probability).

    Raises ``KDForgeError`` for a sparse (top-k) teacher, differing shapes or class counts (both named), a mask of
    another leading shape, ``temperature <= 0`` and a bad ``reduction``.
    """
    name = "binary_kd"
    _check_choice(name, "reduction", reduction, REDUCTIONS)
    if not isinstance(teacher_logits, Tensor):
        raise KDForgeError(f"{name}: needs the teacher's dense per-class logits, got {type(teacher_logits).__name__}; "
                           "build the teacher cache without top-k or use a live teacher")
    if student_logits.shape != teacher_logits.shape:
        raise KDForgeError(
            f"{name}: student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ; both heads must predict the same K classes"
        )
    if not temperature > 0:
        raise KDForgeError(f"{name}: temperature must be > 0, got {temperature!r}")
    lead = student_logits.shape[:-1]
    if mask is None:
        valid = torch.ones(lead, dtype=torch.bool, device=student_logits.device)
    else:
        if tuple(mask.shape) != tuple(lead):
            raise KDForgeError(f"{name}: mask shape {tuple(mask.shape)} does not match the logits' leading shape "
                               f"{tuple(lead)}")
        valid = mask.to(device=student_logits.device).bool()
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    keep = valid.unsqueeze(-1)
    zs = torch.where(keep, student_logits.to(dtype), torch.zeros((), dtype=dtype, device=student_logits.device))
    zt = torch.where(keep, teacher_logits.detach().to(dtype), torch.zeros((), dtype=dtype, device=zs.device))
    zs, zt = zs / temperature, zt / temperature
    log_p, log_1mp = F.logsigmoid(zt), F.logsigmoid(-zt)
    log_q, log_1mq = F.logsigmoid(zs), F.logsigmoid(-zs)
    per_class = log_p.exp() * (log_p - log_q) + log_1mp.exp() * (log_1mp - log_1mq)
    return _reduce(per_class.sum(dim=-1) * temperature**2, valid, reduction)
