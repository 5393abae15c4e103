"""Logit-distillation losses as pure functions.

Conventions shared by every loss here:

* ``student_logits`` is dense ``[..., V]``; ``teacher_logits`` is dense
  ``[..., V]`` or a :class:`~kdforge.losses.sparse.SparseLogits` top-k cache.
  How a sparse teacher's missing tail is treated is set by ``missing_mass``
  ("bucket" | "renormalize" | "uniform"); see :mod:`kdforge.losses.sparse`.
* Both sides are softened with the same ``temperature`` T, and every loss
  returns its per-position divergence multiplied by **T²** (Hinton et al.,
  2015) so gradient magnitudes stay comparable across temperatures. This holds
  for total variation and the DKD/CAKD parts too, for uniformity.
* ``standardize=True`` z-scores each logit vector before dividing by T
  (logit standardization, Sun et al., CVPR 2024); dense teachers only.
* ``mask`` is a bool tensor of the leading shape ``[...]``, True where a position
  counts (None = all count). Positions that do not count are replaced by
  harmless values *before* any arithmetic and dropped with ``torch.where``, so
  NaN/inf garbage there cannot leak into the value or the gradient.
* ``reduction``: "mean" = sum over counted positions / number of counted
  positions (0 when there are none), "sum" = sum over counted positions,
  "none" = per-position tensor of the leading shape with 0 where not counted.
* Arithmetic runs in at least float32 (float64 inputs stay float64); terms with
  zero probability contribute 0, so -inf vocabulary slots are fine.

``LOGIT_LOSSES`` maps stable names to the teacher-vs-student losses (note that
"decoupled_kd" also requires ``labels=``, and that ``forward_kl`` and
``logit_mse`` take optional ``labels=`` for their semiparametric
``correction`` options, Dao et al. 2021, which need them). The label-only ``cross_entropy`` has
a different signature, so it lives in ``LABEL_LOSSES``.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F

from kdforge.losses.sparse import (
    HybridLogits,
    SampledLogits,
    SparseLogits,
    hybrid_forward_kl_rows,
    no_hybrid_estimator,
    no_sampled_estimator,
    aligned_log_probs,
    check_policy,
    check_temperature,
    compute_dtype,
    full_vocab_log_probs,
    safe_log_softmax,
    safe_logsumexp,
    standardize_logits,
)

Teacher = torch.Tensor | SparseLogits | SampledLogits | HybridLogits

REDUCTIONS = ("mean", "sum", "none")
_NEG_INF = float("-inf")


# --------------------------------------------------------------------------- helpers


def needs_labels(fn: Callable) -> bool:
    """Whether a logit loss cannot run without labels: a `labels` keyword with no default (decoupled_kd). A default
    of None (forward_kl, logit_mse) means labels are used only with a `correction`."""
    param = inspect.signature(fn).parameters.get("labels")
    return param is not None and param.default is inspect.Parameter.empty


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _valid_positions(mask: torch.Tensor | None, lead: torch.Size, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(lead, dtype=torch.bool, device=device)
    mask = torch.as_tensor(mask, device=device).bool()
    try:
        return torch.broadcast_to(mask, lead)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the leading shape {tuple(lead)}") from None


def _sanitize(student: torch.Tensor, teacher: Teacher, valid: torch.Tensor) -> tuple[torch.Tensor, Teacher]:
    """Replace uncounted positions by uniform logits so garbage there cannot make NaN gradients."""
    if isinstance(teacher, SampledLogits):
        raise no_sampled_estimator("this loss")
    if isinstance(teacher, HybridLogits):
        raise no_hybrid_estimator("this loss")
    keep = valid.unsqueeze(-1)
    student = torch.where(keep, student, torch.zeros_like(student))
    if isinstance(teacher, SparseLogits):
        if teacher.ids.shape[:-1] != student.shape[:-1]:
            raise ValueError(
                f"SparseLogits leading shape {tuple(teacher.ids.shape[:-1])} does not match the student's "
                f"{tuple(student.shape[:-1])}"
            )
        vocab_size, k = student.shape[-1], teacher.k
        filler = (torch.arange(k, device=student.device) % vocab_size).expand(teacher.ids.shape)
        lse = teacher.logsumexp
        if lse is not None:  # logits 0 and lse log(V): a valid uniform teacher at any temperature
            lse = torch.where(valid, lse, torch.full_like(lse, math.log(vocab_size)))
        return student, SparseLogits(
            ids=torch.where(keep, teacher.ids.long(), filler),
            logits=torch.where(keep, teacher.logits, torch.zeros_like(teacher.logits)),
            logsumexp=lse,
            lse_temperature=teacher.lse_temperature,
        )
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher.shape)} and student logits {tuple(student.shape)} differ in shape"
        )
    return student, torch.where(keep, teacher, torch.zeros_like(teacher))


def _reduce(per_position: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    per_position = torch.where(valid, per_position, torch.zeros_like(per_position))
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(total.dtype)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim from log-probs, with 0·log(0/q) = 0.

    The double ``where`` keeps -inf slots (p = 0) out of the gradient.
    """
    p = log_p.exp()
    present = p > 0
    diff = torch.where(present, log_p - log_q, torch.zeros_like(log_p))
    return (p * diff).sum(dim=-1)


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1-w)·b), safe where both are -inf."""
    if weight_a == 0:
        return log_b
    if weight_a == 1:
        return log_a
    both_empty = torch.isneginf(log_a) & torch.isneginf(log_b)
    zero = torch.zeros_like(log_a)
    mixed = torch.logaddexp(
        torch.where(both_empty, zero, log_a) + math.log(weight_a),
        torch.where(both_empty, zero, log_b) + math.log1p(-weight_a),
    )
    return torch.where(both_empty, torch.full_like(mixed, _NEG_INF), mixed)


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _pointwise_loss(
    divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    mask,
    temperature: float,
    reduction: str,
    standardize: bool,
    missing_mass: str,
) -> torch.Tensor:
    _check_reduction(reduction)
    check_temperature(temperature)
    check_policy(missing_mass)
    valid = _valid_positions(mask, student_logits.shape[:-1], student_logits.device)
    student, teacher = _sanitize(student_logits, teacher_logits, valid)
    log_ps, log_pt = aligned_log_probs(
        student, teacher, temperature=temperature, standardize=standardize, missing_mass=missing_mass
    )
    return _reduce(divergence(log_ps, log_pt) * temperature**2, valid, reduction)


# --------------------------------------------------------------------------- divergences


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    standardize: bool = False,
    missing_mass: str = "bucket",
    correction: str | None = None,
    eps: float = 1e-2,
    smoothing: float = 0.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """KL(p_teacher || p_student) · T², Hinton KD: mass-covering.

    ``correction="orthogonal"``: the orthogonal (Neyman) correction of
    semiparametric KD (Dao, Kamath, Syrgkanis, Mackey, ICLR 2021,
    arXiv 2104.09732), as in the authors' ``KDOrthoLoss`` (kd.py of
    microsoft/semiparametric-distillation). Per position, with the teacher's
    class-probability estimate p̂ = softmax(teacher) at temperature 1 (shrunk
    toward uniform: (1 - smoothing)·p̂ + smoothing/C), w = softmax(teacher/T),
    log q = log_softmax(student/T), y the one-hot label and the residual
    r = y / max(p̂, eps) - 1 (per class), the value is

        (KL(w || q) + (1/T)·[(Σ r·w)(Σ w·log q) - Σ r·w·log q]) · T².

    The bracket is the first-order term <∂/∂p̂ (-Σ w·log q), y - p̂>, so the
    loss is insensitive to first-order errors in p̂; it is linear in r, whose
    expectation under y ~ p̂ is 0 where p̂ >= eps (p̂/eps - 1 on a class below
    eps: the clamp's bias), and it vanishes when p̂ is the one-hot label.
    ``eps`` (in (0, 1)) only bounds the division; the authors' default is 1e-2.

    Shapes: student and teacher logits ``[..., C]``, ``labels`` ``[...]``
    class ids (needed by the correction, ignored without it; positions whose
    label is ``ignore_index`` are dropped like ``mask=False``). The correction
    needs a dense teacher and ``standardize=False``. Raises ``ValueError`` (one
    line) for an unknown correction, a missing label, a label outside [0, C)
    at a counted position, a top-k teacher with a correction, ``eps`` outside
    (0, 1) or ``smoothing`` outside [0, 1].
    """
    _check_correction("forward_kl", correction, ("orthogonal",), eps, smoothing)
    if isinstance(teacher_logits, (SampledLogits, HybridLogits)):
        return _sampled_forward_kl(student_logits, teacher_logits, mask, temperature, reduction, standardize,
                                   correction)
    if correction is None:
        return _pointwise_loss(
            lambda ls, lt: kl_divergence(lt, ls),
            student_logits, teacher_logits, mask, temperature, reduction, standardize, missing_mass,
        )
    _check_reduction(reduction)
    check_temperature(temperature)
    check_policy(missing_mass)
    valid, y, teacher = _corrected_setup("forward_kl", correction, student_logits, teacher_logits, labels, mask,
                                         standardize, ignore_index)
    student, teacher = _sanitize(student_logits, teacher, valid)
    dtype = compute_dtype(student, teacher)
    s, t = student.to(dtype), teacher.to(dtype)
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_w = F.log_softmax(t / temperature, dim=-1)
    w = log_w.exp()
    r = y.to(dtype) / _teacher_probs(t, smoothing).clamp_min(eps) - 1.0
    # w·log q with 0·log q = 0 where the teacher gives a class no mass (log q may be -inf there)
    w_log_q = torch.where(w > 0, w * log_q, torch.zeros_like(log_q))
    rw = r * w
    first_order = (rw.sum(-1) * w_log_q.sum(-1) - (r * w_log_q).sum(-1)) / temperature
    per_position = (kl_divergence(log_w, log_q) + first_order) * temperature**2
    return _reduce(per_position, valid, reduction)


def _sampled_forward_kl(student_logits, teacher: SampledLogits | HybridLogits, mask, temperature, reduction,
                        standardize, correction) -> torch.Tensor:
    """forward_kl on a sampled teacher, T²·(-H(p_T) - (1/N)·Σ_j log q_T[ids_j]) per position, or on a hybrid one,
    T²·(-H(p_T) - Σ_head p_i·log q_T[i] - m·(1/N)·Σ_j log q_T[tail_ids_j]): unbiased estimates of the dense value
    (see :class:`SampledLogits`, :class:`HybridLogits`). The samples were drawn at the cache's temperature, so another
    ``temperature`` is refused, as are ``standardize`` and ``correction`` (no estimator)."""
    _check_reduction(reduction)
    check_temperature(temperature)
    kind = "hybrid" if isinstance(teacher, HybridLogits) else "sampled"
    if standardize or correction is not None:
        raise ValueError(f"forward_kl with standardize or a correction has no estimator for a {kind} teacher cache; "
                         "use a top-k cache or a live teacher")
    if not math.isclose(temperature, teacher.temperature, rel_tol=1e-6):
        raise ValueError(f"forward_kl at temperature {temperature} on a teacher sampled at {teacher.temperature}: "
                         f"rebuild the cache with --temperature {temperature}")
    lead = (teacher.ids if kind == "sampled" else teacher.tail_ids).shape[:-1]
    if lead != student_logits.shape[:-1]:
        raise ValueError(f"{kind} teacher positions {tuple(lead)} do not match the student's "
                         f"{tuple(student_logits.shape[:-1])}")
    valid = _valid_positions(mask, student_logits.shape[:-1], student_logits.device)
    student = torch.where(valid.unsqueeze(-1), student_logits, torch.zeros_like(student_logits))
    log_q = F.log_softmax(student.to(compute_dtype(student)) / temperature, dim=-1)
    hybrid = teacher.as_hybrid() if isinstance(teacher, SampledLogits) else teacher  # sampled: no head, tail mass 1
    rows = hybrid_forward_kl_rows(log_q, hybrid.sanitized(valid))
    return _reduce(rows * temperature**2, valid, reduction)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    standardize: bool = False,
    missing_mass: str = "bucket",
) -> torch.Tensor:
    """KL(p_student || p_teacher) · T²: mode-seeking (MiniLLM-style)."""
    return _pointwise_loss(
        lambda ls, lt: kl_divergence(ls, lt),
        student_logits, teacher_logits, mask, temperature, reduction, standardize, missing_mass,
    )


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    standardize: bool = False,
    missing_mass: str = "bucket",
) -> torch.Tensor:
    """Generalized JSD of GKD (Agarwal et al., 2024, Eq. 1), TRL's convention, · T².

    m = beta·p_t + (1-beta)·p_s;  JSD_beta = beta·KL(p_t||m) + (1-beta)·KL(p_s||m),
    not divided by anything (as TRL's ``generalized_jsd_loss``). Like TRL,
    beta == 0 returns forward KL(p_t||p_s) and beta == 1 reverse KL(p_s||p_t).
    These endpoints are a jump, not a limit: JSD_beta -> 0 as beta -> 0 or 1;
    it is JSD_beta/beta -> forward KL and JSD_beta/(1-beta) -> reverse KL.
    """
    _check_unit_interval("beta", beta)

    def divergence(ls, lt):
        if beta == 0:
            return kl_divergence(lt, ls)
        if beta == 1:
            return kl_divergence(ls, lt)
        lm = _log_mixture(lt, ls, beta)
        return beta * kl_divergence(lt, lm) + (1 - beta) * kl_divergence(ls, lm)

    return _pointwise_loss(
        divergence, student_logits, teacher_logits, mask, temperature, reduction, standardize, missing_mass
    )


def skew_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    alpha: float = 0.1,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    standardize: bool = False,
    missing_mass: str = "bucket",
) -> torch.Tensor:
    """Skew KL of DistiLLM (Ko et al., ICML 2024): KL(p_t || alpha·p_t + (1-alpha)·p_s) · T².

    Mixing some teacher into the student keeps the log bounded when the student
    assigns ~0 where the teacher does not. Same convention as the authors'
    ``skewed_forward_kl`` (their default alpha = 0.1), except that we return the
    true KL: theirs drops the teacher-entropy constant, which has no gradient.
    alpha = 0 is plain forward KL.
    """
    _check_unit_interval("alpha", alpha)
    return _pointwise_loss(
        lambda ls, lt: kl_divergence(lt, _log_mixture(lt, ls, alpha)),
        student_logits, teacher_logits, mask, temperature, reduction, standardize, missing_mass,
    )


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    alpha: float = 0.1,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    standardize: bool = False,
    missing_mass: str = "bucket",
) -> torch.Tensor:
    """Skew reverse KL of DistiLLM: KL(p_s || alpha·p_s + (1-alpha)·p_t) · T².

    Matches the authors' ``skewed_reverse_kl`` (mixture (1-alpha)·p_t + alpha·p_s).
    alpha = 0 is plain reverse KL.
    """
    _check_unit_interval("alpha", alpha)
    return _pointwise_loss(
        lambda ls, lt: kl_divergence(ls, _log_mixture(ls, lt, alpha)),
        student_logits, teacher_logits, mask, temperature, reduction, standardize, missing_mass,
    )


def total_variation(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    standardize: bool = False,
    missing_mass: str = "bucket",
) -> torch.Tensor:
    """0.5·Σ|p_t - p_s| · T² (the T² only for consistency with the family; TV itself is in [0, 1])."""
    return _pointwise_loss(
        lambda ls, lt: 0.5 * (lt.exp() - ls.exp()).abs().sum(dim=-1),
        student_logits, teacher_logits, mask, temperature, reduction, standardize, missing_mass,
    )


MSE_CORRECTIONS = ("orthogonal", "gamma_one", "gamma_one_minus_p")


def logit_mse(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    standardize: bool = False,
    missing_mass: str = "bucket",
    correction: str | None = None,
    eps: float = 1e-2,
    smoothing: float = 0.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Squared error between raw logits, mean over classes: mean_c (z_s - target)².

    target = teacher logits, or with ``correction`` the teacher logits plus a
    label residual (Dao et al., ICLR 2021, arXiv 2104.09732; the authors'
    kd.py in microsoft/semiparametric-distillation, "logp" scale), with p̂ =
    softmax(teacher) at temperature 1, shrunk toward uniform by ``smoothing``,
    and y the one-hot label:

    * "orthogonal": target = teacher + (y / max(p̂, eps) - 1)   (``KDMSEOrthoLoss``)
    * "gamma_one": target = teacher + (y - p̂)                  (``KDMSEGamma1Loss``, γ = 1)
    * "gamma_one_minus_p": target = teacher + (1 - p̂)·(y - p̂)  (``KDMSEGammaVarLoss``, γ = 1 - p̂)

    Squared error to the corrected target equals the squared error to the
    teacher plus the first-order correction, up to a constant in the student.
    The residual's expectation under y ~ p̂ is 0 (for "orthogonal" where
    p̂ >= eps); the γ residuals vanish when p̂ is the one-hot label, the
    "orthogonal" one is -1 off the label for every p̂ (it is y/p̂ - 1, exactly).

    Per position the value is the mean over the C classes, so ``reduction="mean"``
    over a ``[N, C]`` batch is the authors' ``F.mse_loss`` (mean over N·C
    entries). ``temperature`` follows the module's convention (both sides / T,
    then · T²), which cancels: the value does not depend on T. ``standardize``
    z-scores both logit vectors first (no correction then). A top-k teacher is
    compared on its k cached ids only (the tail has no logits, so
    ``missing_mass`` is only validated); -inf logits give an infinite value.

    Shapes: student ``[..., C]``; teacher ``[..., C]`` or SparseLogits;
    ``labels`` ``[...]`` (needed by a correction, ignored without one).
    Raises ``ValueError`` (one line) for an unknown correction, missing or
    out-of-range labels, a correction with a top-k teacher or with
    ``standardize``, ``eps`` outside (0, 1), ``smoothing`` outside [0, 1].
    """
    _check_correction("logit_mse", correction, MSE_CORRECTIONS, eps, smoothing)
    _check_reduction(reduction)
    check_temperature(temperature)
    check_policy(missing_mass)
    if correction is None:
        valid = _valid_positions(mask, student_logits.shape[:-1], student_logits.device)
        y = None
    else:
        valid, y, _ = _corrected_setup("logit_mse", correction, student_logits, teacher_logits, labels, mask,
                                       standardize, ignore_index)
    student, teacher = _sanitize(student_logits, teacher_logits, valid)
    if isinstance(teacher, SparseLogits):
        if standardize:
            raise ValueError(
                "standardize=True needs the full teacher logits (z-scoring uses all V entries); "
                "pass dense teacher logits or set standardize=False"
            )
        dtype = compute_dtype(student, teacher.logits)
        s = torch.gather(student.to(dtype), -1, teacher.ids.long())
        target = teacher.logits.to(dtype)
    else:
        dtype = compute_dtype(student, teacher)
        s, target = student.to(dtype), teacher.to(dtype)
        if standardize:
            s, target = standardize_logits(s), standardize_logits(target)
    if y is not None:
        p = _teacher_probs(target, smoothing)
        y = y.to(dtype)
        if correction == "orthogonal":
            target = target + (y / p.clamp_min(eps) - 1.0)
        elif correction == "gamma_one":
            target = target + (y - p)
        else:
            target = target + (1.0 - p) * (y - p)
    # (s/T - target/T)² · T² = (s - target)²: computed directly, no rounding through T
    return _reduce((s - target).square().mean(-1), valid, reduction)


# --------------------------------------------------------------------------- semiparametric corrections


def _check_correction(loss: str, correction, valid: tuple[str, ...], eps: float, smoothing: float) -> None:
    if correction is not None and correction not in valid:
        raise ValueError(f"{loss}: unknown correction {correction!r}; valid: {', '.join(valid)} (or None)")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    _check_unit_interval("smoothing", smoothing)


def _corrected_setup(loss, correction, student_logits, teacher_logits, labels, mask, standardize, ignore_index):
    """(counted positions, one-hot labels [..., C], dense teacher) for a corrected loss, or a one-line ValueError."""
    if isinstance(teacher_logits, SparseLogits):
        raise ValueError(f"{loss}: correction={correction!r} needs dense teacher logits (p̂ of every class), "
                         "not a top-k SparseLogits teacher")
    if standardize:
        raise ValueError(f"{loss}: correction={correction!r} needs standardize=False (p̂ is the teacher's own softmax)")
    if labels is None:
        raise ValueError(f"{loss}: correction={correction!r} needs labels= (class ids of the leading shape)")
    valid, safe = _label_positions(labels, mask, student_logits, ignore_index)
    n_classes = student_logits.shape[-1]
    bad = valid & ((safe < 0) | (safe >= n_classes))
    if bool(bad.any()):
        raise ValueError(f"{loss}: labels must be class ids in [0, {n_classes}) at counted positions, "
                         f"got {int(safe[bad][0])}")
    safe = torch.where(valid, safe, torch.zeros_like(safe))
    return valid, F.one_hot(safe, n_classes), teacher_logits


def _teacher_probs(teacher: torch.Tensor, smoothing: float) -> torch.Tensor:
    """p̂ = softmax(teacher) at temperature 1, shrunk toward uniform by ``smoothing``."""
    p = F.softmax(teacher, dim=-1)
    if smoothing > 0:
        p = (1.0 - smoothing) * p + smoothing / teacher.shape[-1]
    return p


# --------------------------------------------------------------------------- decoupled losses


def _binary_kl(log_t_a, log_t_b, log_s_a, log_s_b) -> torch.Tensor:
    return kl_divergence(torch.stack([log_t_a, log_t_b], dim=-1), torch.stack([log_s_a, log_s_b], dim=-1))


def _setup(student_logits, teacher_logits, valid, temperature, reduction, standardize, missing_mass, full_vocab):
    _check_reduction(reduction)
    check_temperature(temperature)
    check_policy(missing_mass)
    student, teacher = _sanitize(student_logits, teacher_logits, valid)
    align = full_vocab_log_probs if full_vocab else aligned_log_probs
    return align(student, teacher, temperature=temperature, standardize=standardize, missing_mass=missing_mass)


def _label_positions(labels, mask, student_logits: torch.Tensor, ignore_index: int):
    """(counted positions, labels made safe to gather at every position)."""
    valid = _valid_positions(mask, student_logits.shape[:-1], student_logits.device)
    labels = torch.as_tensor(labels, device=student_logits.device).long()
    if labels.shape != valid.shape:
        raise ValueError(f"labels of shape {tuple(labels.shape)} must match the leading shape {tuple(valid.shape)}")
    valid = valid & (labels != ignore_index)
    return valid, torch.where(valid, labels, torch.zeros_like(labels))


def decoupled_kd(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    labels: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    warmup: float = 1.0,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    standardize: bool = False,
    missing_mass: str = "bucket",
    ignore_index: int = -100,
    return_parts: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Decoupled KD (Zhao et al., CVPR 2022): warmup·(alpha·TCKD + beta·NCKD)·T².

    TCKD = KL over the binary [p_target, 1 - p_target]; NCKD = KL between the
    teacher's and student's distributions over the non-target classes
    (renormalised). Classic KD is TCKD + (1 - p_target^teacher)·NCKD; DKD frees
    NCKD from that suppressing factor. alpha=1, beta=8 are the paper's CIFAR-100
    values; temperature defaults to 1.0 like the rest of this module (the paper
    used T=4). ``warmup`` is the trainer's min(step / warmup_steps, 1).
    Positions with ``labels == ignore_index`` are dropped on top of ``mask``.

    The label may lie outside a sparse teacher's top-k, where a bucket has no
    per-class probability, so a sparse teacher is densified (see
    ``full_vocab_log_probs``): "bucket" and "uniform" spread the exact tail
    mass evenly over the other ids, "renormalize" gives the tail zero mass.
    With the former, an id the student rules out (-inf) makes the loss
    infinite; use "renormalize" there.

    ``return_parts=True`` returns a dict with "loss", "tckd", "nckd" (both ·T²,
    unweighted) and "teacher_target_prob", each reduced like the loss.
    """
    valid, labels = _label_positions(labels, mask, student_logits, ignore_index)
    log_ps, log_pt = _setup(
        student_logits, teacher_logits, valid, temperature, reduction, standardize, missing_mass, full_vocab=True
    )
    target = labels.unsqueeze(-1)

    log_ps_target = torch.gather(log_ps, -1, target).squeeze(-1)
    log_pt_target = torch.gather(log_pt, -1, target).squeeze(-1)
    log_ps_others = log_ps.scatter(-1, target, _NEG_INF)
    log_pt_others = log_pt.scatter(-1, target, _NEG_INF)

    tckd = _binary_kl(log_pt_target, safe_logsumexp(log_pt_others), log_ps_target, safe_logsumexp(log_ps_others))
    nckd = kl_divergence(safe_log_softmax(log_pt_others), safe_log_softmax(log_ps_others))
    scale = temperature**2
    loss = warmup * (alpha * tckd + beta * nckd) * scale
    if not return_parts:
        return _reduce(loss, valid, reduction)
    return {
        "loss": _reduce(loss, valid, reduction),
        "tckd": _reduce(tckd * scale, valid, reduction),
        "nckd": _reduce(nckd * scale, valid, reduction),
        "teacher_target_prob": _reduce(log_pt_target.exp(), valid, reduction),
    }


def correlation_aware_kd(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    strong_k: int = 10,
    w_binary: float = 1.0,
    w_strong: float = 1.0,
    w_weak: float = 1.0,
    scale_by_teacher_mass: bool = True,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    standardize: bool = False,
    missing_mass: str = "bucket",
    return_parts: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """CAKD (Zhang et al., arXiv 2410.14741): forward KL split by teacher correlation.

    Strong group S = the teacher's top-``strong_k`` classes per position
    (default 10; clamped to V), weak group W = the rest. By the chain rule of KL

        KL(p_t||p_s) = BCD + P_t(S)·SCD + P_t(W)·WCD,

    BCD = KL of the binary [P(S), P(W)] masses, SCD/WCD = KL within each group,
    renormalised. The loss is

        (w_binary·BCD + w_strong·c_S·SCD + w_weak·c_W·WCD)·T²,

    with c = P_t(group) when ``scale_by_teacher_mass`` (unit weights = forward
    KL exactly) and c = 1 otherwise. The paper's point is that P_t(S), P_t(W)
    suppress SCD and WCD, and it re-weights them with its own alpha (SCD) and
    beta (WCD); as we read it those replace the teacher masses as in DKD, i.e.
    ``scale_by_teacher_mass=False, w_strong=alpha, w_weak=beta``.

    Runs on the same support as the other losses (see ``missing_mass``); with
    "bucket" the "everything else" outcome always sits in the weak group, so at
    unit weights this equals ``forward_kl`` under every policy.
    ``return_parts=True`` returns "loss", "bcd", "scd", "wcd" (·T², unweighted)
    and "teacher_strong_mass", each reduced like the loss.
    """
    if strong_k < 1:
        raise ValueError(f"strong_k must be >= 1, got {strong_k}")
    valid = _valid_positions(mask, student_logits.shape[:-1], student_logits.device)
    log_ps, log_pt = _setup(
        student_logits, teacher_logits, valid, temperature, reduction, standardize, missing_mass, full_vocab=False
    )
    rank_by = log_pt
    has_bucket = isinstance(teacher_logits, SparseLogits) and log_pt.shape[-1] == teacher_logits.k + 1
    if has_bucket:  # "everything else" is never a strong class
        rank_by = torch.cat([log_pt[..., :-1], torch.full_like(log_pt[..., -1:], _NEG_INF)], dim=-1)
    top = rank_by.topk(min(strong_k, log_pt.shape[-1] - has_bucket), dim=-1).indices
    # The strong group is k classes: gather it. The weak group is the rest of the vocabulary: mask it once per side
    # and write WCD with the teacher's weak-normalised probabilities, so no vocabulary-sized log_softmax is needed.
    t_s, s_s = log_pt.gather(-1, top), log_ps.gather(-1, top)
    strong = torch.zeros_like(log_pt, dtype=torch.bool).scatter(-1, top, True)
    t_w, s_w = log_pt.masked_fill(strong, _NEG_INF), log_ps.masked_fill(strong, _NEG_INF)
    t_mass_s, s_mass_s = safe_logsumexp(t_s), safe_logsumexp(s_s)
    t_mass_w, s_mass_w = safe_logsumexp(t_w), safe_logsumexp(s_w)
    bcd = _binary_kl(t_mass_s, t_mass_w, s_mass_s, s_mass_w)
    scd = kl_divergence(safe_log_softmax(t_s), safe_log_softmax(s_s))
    weak_empty = torch.isneginf(t_mass_w)  # the teacher puts no mass outside S: WCD is 0
    q_t = (t_w - torch.where(weak_empty, torch.zeros_like(t_mass_w), t_mass_w).unsqueeze(-1)).exp()
    gap = torch.where(q_t > 0, log_pt - log_ps, torch.zeros_like(log_pt))
    wcd = (q_t * gap).sum(-1) - (t_mass_w - s_mass_w)
    wcd = torch.where(weak_empty, torch.zeros_like(wcd), wcd)
    if scale_by_teacher_mass:
        c_s, c_w = t_mass_s.exp(), t_mass_w.exp()
    else:
        c_s = c_w = 1.0
    scale = temperature**2
    loss = (w_binary * bcd + w_strong * c_s * scd + w_weak * c_w * wcd) * scale
    if not return_parts:
        return _reduce(loss, valid, reduction)
    return {
        "loss": _reduce(loss, valid, reduction),
        "bcd": _reduce(bcd * scale, valid, reduction),
        "scd": _reduce(scd * scale, valid, reduction),
        "wcd": _reduce(wcd * scale, valid, reduction),
        "teacher_strong_mass": _reduce(t_mass_s.exp(), valid, reduction),
    }


# --------------------------------------------------------------------------- labels


def cross_entropy(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Token cross-entropy with the same mask/reduction semantics (mean over counted tokens)."""
    _check_reduction(reduction)
    valid, labels = _label_positions(labels, mask, student_logits, ignore_index)
    logits = torch.where(valid.unsqueeze(-1), student_logits, torch.zeros_like(student_logits))
    log_p = F.log_softmax(logits.to(compute_dtype(logits)), dim=-1)
    return _reduce(-torch.gather(log_p, -1, labels.unsqueeze(-1)).squeeze(-1), valid, reduction)


LOGIT_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "total_variation": total_variation,
    "logit_mse": logit_mse,
    "decoupled_kd": decoupled_kd,
    "correlation_aware_kd": correlation_aware_kd,
}

LABEL_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"cross_entropy": cross_entropy}
