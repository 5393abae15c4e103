"""Logit losses computed from hidden states in token chunks, never materialising the whole batch's logits.

A causal LM's loss normally needs ``logits = hidden @ W.T`` for every position: ``N × V`` floats (4 × 1024 × 49152
fp32 = 805 MB), plus the several same-sized tensors each loss keeps for its backward pass. Here the student's last
hidden states ``[..., D]`` and the lm-head weight ``[V, D]`` go in instead, and the rows are processed ``chunk_size``
at a time, so only ``chunk_size × V`` logits (and that chunk's loss intermediates) exist at once.

How the gradient is obtained (the choice the module is built around)
--------------------------------------------------------------------
The loss is a sum over positions, so each chunk's contribution to the gradient is independent of the others. In the
forward pass, for each chunk: compute its logits, take the loss and ``g = dL/dlogits`` for the chunk, and immediately
fold it into ``grad_hidden[chunk] = g @ W`` and ``grad_W += g.T @ hidden[chunk]`` (+ ``grad_b``). The chunk's logits
are then dropped. The backward pass only scales the stored gradients by the incoming grad_output (in place; one
backward per forward).

``g`` comes from one of two places. Most logit losses have short closed-form gradients w.r.t. the chunk's logits,
computed directly with a few buffers of ``[chunk, V]`` that the terms of a chunk share (one student log-softmax and
softmax per temperature): ``cross_entropy`` (``softmax - onehot``), ``forward_kl`` (``T·(q - p)``; dense teachers
and the "bucket"/"renormalize" sparse policies), and for dense teachers ``reverse_kl``, ``generalized_jsd`` (any β),
``skew_forward_kl``, ``skew_reverse_kl``, ``total_variation``, ``decoupled_kd`` and ``correlation_aware_kd``; each with ``standardize=True`` too (the gradient
w.r.t. the z-scored logits is chained through the z-scoring's Jacobian once per chunk). The derivations are in the
comments of each ``_fast_*`` function. Everything else — a sparse teacher for the losses after ``forward_kl``, the "uniform" policy, and unusual inputs (non-finite logits, a teacher with no mass where a formula
divides by it) — runs the unchanged function of :mod:`kdforge.losses.logits` under autograd on the chunk. The tests
check both against the unchunked losses, and check that the closed forms do not fall back on ordinary inputs.

This is the approach of Liger-Kernel's fused linear losses. The alternative, keeping only the hidden states and
recomputing each chunk's logits in backward, costs a 4th ``N×D×V`` matmul per step (forward logits twice) — about a
third more matmul work — for no memory gain worth having: the stored gradients are ``[N, D]`` and ``[V, D]``, which
the plain path allocates too (the weight's ``.grad``). Precomputing has one cost: the gradient is computed even if
backward never runs, so under ``torch.no_grad()`` (or when neither input requires grad) it is skipped.

Several terms at once
---------------------
:func:`chunked_logit_terms` evaluates a weighted sum of terms (e.g. cross-entropy + forward KL) from the SAME chunk of
logits, so a multi-term objective costs one logits matmul per chunk, not one per term. It returns the differentiable
weighted total and the detached per-term values (for logging).

Semantics equal the unchunked losses: each term gets ``reduction="mean"`` (sum over its counted positions / their
number, 0 when none) or ``"sum"``; counted positions are ``mask`` and, for losses that take labels, ``labels !=
ignore_index``, exactly as in :mod:`kdforge.losses.logits`. ``reduction="none"`` and ``return_parts`` are not
supported (the gradient is reduced inside the forward pass). Rows that no term counts are skipped entirely.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.autograd.function import once_differentiable

from ..lm_head import LogitTransform, check_logit_transform
from .logits import (LABEL_LOSSES, LOGIT_LOSSES, correlation_aware_kd, cross_entropy, decoupled_kd, forward_kl,
                     generalized_jsd, needs_labels, reverse_kl, skew_forward_kl, skew_reverse_kl, total_variation)
from .sparse import (HybridLogits, SampledLogits, SparseLogits, check_policy, check_temperature, compute_dtype,
                     hybrid_forward_kl_rows, hybrid_head_and_tail_weights, log1mexp, safe_logsumexp)



@dataclass
class HeadLogits:
    """A teacher's logits given as its last hidden states and lm head, made a chunk of rows at a time.

    hidden: ``[..., D]`` (after the final norm); weight: ``[V, D]``; bias: ``[V]`` or None; transform: what the model
    does to ``hidden @ weight.T + bias`` (soft-cap, scale; :func:`kdforge.lm_head.logit_transform`). The matmul runs
    in the weight's dtype (bf16 for a bf16 teacher, as the model's own lm head would); :meth:`rows` returns float32
    (float64 for a float64 head), so the losses do their math in float32. Never holds ``[..., V]`` logits.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    transform: LogitTransform = field(default_factory=LogitTransform)

    @property
    def shape(self) -> torch.Size:
        """The shape the dense logits would have: ``[..., V]``."""
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))

    def vocab(self, n: int) -> "HeadLogits":
        """The logits of the first ``n`` vocabulary ids only (a shared vocabulary)."""
        return HeadLogits(self.hidden, self.weight[:n], None if self.bias is None else self.bias[:n], self.transform)

    def flatten(self) -> "HeadLogits":
        """The same logits with the leading dimensions flattened to rows: hidden ``[N, D]``."""
        return HeadLogits(self.hidden.reshape(-1, self.hidden.shape[-1]), self.weight, self.bias, self.transform)

    def rows(self, idx) -> torch.Tensor:
        """Float32 (at least) logits ``[n, V]`` of the rows ``idx`` of flattened hidden states (a slice or indices)."""
        with torch.no_grad(), torch.autocast(self.hidden.device.type, enabled=False):
            h = self.hidden[idx].to(self.weight.dtype)
            z = torch.nn.functional.linear(h, self.weight, self.bias)
            return self.transform(z.to(torch.promote_types(z.dtype, torch.float32)))


Teacher = torch.Tensor | SparseLogits | SampledLogits | HybridLogits | HeadLogits

DEFAULT_CHUNK_SIZE = 256  # 256 x 49,152 fp32 logits = 48 MiB per [chunk, V] buffer


@dataclass
class ChunkedTerm:
    """One term of a chunked objective: a loss (name or function), its weight and its keyword arguments."""

    loss: str | Callable[..., torch.Tensor]
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.loss, str):
            table = {**LOGIT_LOSSES, **LABEL_LOSSES}
            if self.loss not in table:
                raise ValueError(f"unknown logit loss {self.loss!r}; valid: {', '.join(sorted(table))}")
            self.fn = table[self.loss]
        else:
            self.fn = self.loss
        params = list(inspect.signature(self.fn).parameters.values())
        # label losses are fn(student_logits, labels, *, mask, ...); logit losses fn(student_logits, teacher, *, ...)
        self.is_label_loss = len(params) > 1 and params[1].name == "labels"
        # labels=None by default (forward_kl, logit_mse): needed only with a semiparametric `correction`
        takes_labels_keyword = any(p.name == "labels" for p in params[1:])
        self.takes_labels = self.is_label_loss or needs_labels(self.fn) or (
            takes_labels_keyword and self.kwargs.get("correction") is not None)
        for bad in ("reduction", "mask", "labels", "return_parts"):
            if bad in self.kwargs:
                raise ValueError(f"{bad!r} is set by chunked_logit_terms, not in a term's kwargs")


def _flat(x: torch.Tensor, lead: torch.Size, what: str) -> torch.Tensor:
    if x.shape[: len(lead)] != lead:
        raise ValueError(f"{what} of shape {tuple(x.shape)} does not match the hidden states' leading shape {tuple(lead)}")
    return x.reshape(-1, *x.shape[len(lead):])


# --------------------------------------------------------------------------- closed-form fast paths
#
# For the logit losses the gradient w.r.t. the logits has a short closed form. The terms of one chunk share one
# log-softmax (and softmax) of the student per (temperature, standardize), and add their gradients into one buffer, so
# a CE + forward-KL objective takes ~5 buffers of [chunk, V] and ~10 passes over them, where autograd through the
# generic functions keeps ~20 (sanitising, log-softmaxes, the KL's masks). Each fast path returns the sum of its term
# over the chunk's counted rows — exactly the generic function's value — after adding coeff · d(sum)/dz to the shared
# gradient, or None (before touching the gradient) to hand the term to the generic path: unusual inputs such as
# -inf logits (a non-finite value), a teacher with no mass where a formula divides by it, the "uniform" policy.
#
# Notation (every loss): u = the logits the softmax sees before the temperature (z, or z standardized), s = u / T,
# q = softmax(s) (student), p = the teacher's softmax at T, L = T² · D(p, q). So dL/du = T · dD/ds, and for a D that
# depends on s through q only, dD/ds_j = q_j · (g_j - Σ_i q_i g_i) with g = dD/dq (the softmax's Jacobian).
#
# Every row of a chunk is counted by at least one term (the plan drops the others), so the shared softmax needs no
# sanitising; each term masks its own rows out of its value and gradient, and sanitises its own teacher rows.

_EPS_STD = 1e-7  # standardize_logits' eps


def _standardize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`kdforge.losses.sparse.standardize_logits` of rows that are all finite: (y, mean, std, var) per row.

    y = (x - mean) / (std + eps), std = sqrt(max(var, 1e-12)), var = Σ(x - mean)² / (n - 1). A non-finite row gives a
    non-finite mean; the callers then take the generic path (which z-scores over the finite entries only).
    """
    n = x.shape[-1]
    mean = x.sum(-1, keepdim=True) / n
    dev = x - mean
    var = torch.linalg.vecdot(dev, dev).unsqueeze(-1) / max(n - 1, 1)
    std = var.clamp_min(1e-12).sqrt()
    return dev.div_(std + _EPS_STD), mean, std, var


def _standardize_backward(g: torch.Tensor, y: torch.Tensor, std: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """dL/dx from g = dL/dy for y = _standardize(x) (in place on g).

    With d = x - mean (Σd = 0) and σ = std: dd_i/dx_k = δ_ik - 1/n, dσ/dx_k = d_k / ((n-1)·σ) (0 where var was clamped),
    dy_i/dσ = -d_i / (σ+ε)². So dL/dx = (g - mean(g)) / (σ+ε) - (g·y) · y / ((n-1)·σ).
    """
    n = g.shape[-1]
    gy = torch.linalg.vecdot(g, y).unsqueeze(-1)
    spread = torch.where(var > 1e-12, gy / ((n - 1) * std), 0.0) if n > 1 else torch.zeros_like(gy)
    g.sub_(g.mean(-1, keepdim=True)).div_(std + _EPS_STD)
    return g.addcmul_(y, spread, value=-1.0)


class _ChunkState:
    """The chunk's logits z, the student's (log-)softmax per (temperature, standardize), the gradient being summed.

    Gradients w.r.t. the standardized logits are summed apart (one buffer per dtype) and chained through the
    z-scoring's Jacobian once, in :meth:`gradient`.
    """

    def __init__(self, z: torch.Tensor, want_grad: bool):
        self.z = z
        self.want_grad = want_grad
        self._grads: dict[torch.dtype | None, torch.Tensor] = {}  # None: d/dz; a dtype: d/dy, y = z standardized
        self._log_q: dict[tuple, torch.Tensor] = {}
        self._q: dict[tuple, torch.Tensor] = {}
        self._std: dict[torch.dtype, tuple] = {}

    def standardized(self, dtype: torch.dtype) -> tuple | None:
        """(y, mean, std, var) of the z-scored chunk, or None if a row is not finite (the generic path's case)."""
        if dtype not in self._std:
            self._std[dtype] = _standardize(self.z.to(dtype))
        stats = self._std[dtype]
        return stats if bool(torch.isfinite(stats[1]).all()) else None

    def log_q(self, temperature: float, dtype: torch.dtype, standardize: bool = False) -> torch.Tensor:
        key = (temperature, dtype, standardize)
        if key not in self._log_q:
            s = self._std[dtype][0] if standardize else self.z.to(dtype)
            self._log_q[key] = torch.log_softmax(s / temperature if temperature != 1 else s, dim=-1)
        return self._log_q[key]

    def q(self, temperature: float, dtype: torch.dtype, standardize: bool = False) -> torch.Tensor:
        key = (temperature, dtype, standardize)
        if key not in self._q:
            self._q[key] = self.log_q(temperature, dtype, standardize).exp()
        return self._q[key]

    def add_rows(self, x: torch.Tensor, factor: torch.Tensor, std: torch.dtype | None = None) -> None:
        """grad += x · factor[:, None]  (std: the dtype of the standardized logits the gradient is w.r.t.)"""
        f = factor.unsqueeze(-1)
        grad = self._grads.get(std)
        if grad is None:
            self._grads[std] = x * f
        else:
            grad.addcmul_(x.to(grad.dtype), f.to(grad.dtype))

    def scatter_add(self, ids: torch.Tensor, values: torch.Tensor, std: torch.dtype | None = None) -> None:
        """grad[row, ids[row, j]] += values[row, j]"""
        grad = self._grads.get(std)
        if grad is None:
            grad = self._grads[std] = torch.zeros(self.z.shape, dtype=values.dtype, device=self.z.device)
        grad.scatter_add_(-1, ids, values.to(grad.dtype))

    def gradient(self) -> torch.Tensor | None:
        """d(Σ coeff·value)/dz of the fast terms (None if none added any)."""
        grad = self._grads.pop(None, None)
        for dtype, g in self._grads.items():
            y, _, std, var = self._std[dtype]
            g = _standardize_backward(g, y, std, var)
            grad = g if grad is None else grad.add_(g.to(grad.dtype))
        self._grads.clear()
        return grad


@dataclass
class _Dense:
    """What a fast path on a dense teacher starts from: log p (its own buffer) and the shared log q."""

    temperature: float
    dtype: torch.dtype
    standardize: bool
    log_p: torch.Tensor
    log_q: torch.Tensor

    @property
    def std(self) -> torch.dtype | None:  # the key of the gradient buffer these logits feed
        return self.dtype if self.standardize else None


def _dense(st: _ChunkState, teacher, valid, kwargs, allowed: set[str]) -> _Dense | None:
    """The student's and a dense teacher's log-probs at the term's temperature (z-scored first with ``standardize``),
    uncounted teacher rows made uniform; None (the generic path) for a sparse teacher, an unknown keyword, or a
    non-finite row to standardize."""
    if set(kwargs) - allowed or isinstance(teacher, (SparseLogits, SampledLogits, HybridLogits)):
        return None
    temperature = float(kwargs.get("temperature", 1.0))
    check_temperature(temperature)
    check_policy(kwargs.get("missing_mass", "bucket"))  # no effect on a dense teacher, but checked as generic does
    standardize = bool(kwargs.get("standardize", False))
    dtype = compute_dtype(st.z, teacher)
    t = teacher.to(dtype)
    if not bool(valid.all()):
        t = torch.where(valid.unsqueeze(-1), t, 0.0)
    if standardize:
        t, mean, _, _ = _standardize(t)
        if not bool(torch.isfinite(mean).all()) or st.standardized(dtype) is None:
            return None
    log_p = torch.log_softmax(t / temperature, dim=-1)
    return _Dense(temperature, dtype, standardize, log_p, st.log_q(temperature, dtype, standardize))


def _finite_sum(rows: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor | None:
    """scale · Σ rows over the counted rows; None if any row (counted or not) is not finite: its gradient would be
    NaN too, and the generic path treats 0·log 0 as 0."""
    if not bool(torch.isfinite(rows).all()):
        return None
    return torch.where(valid, rows, 0.0).sum() * scale


def _logsumexp_except(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logsumexp over each row of x without the entries ids (log(1 - mass of ids) with no 1 - x cancellation).

    x is a shared buffer: the ids are set to -inf for the reduction and restored exactly, instead of copying [chunk, V].
    """
    saved = x.gather(-1, ids)
    x.scatter_(-1, ids, -math.inf)
    out = torch.logsumexp(x, dim=-1)
    x.scatter_(-1, ids, saved)
    return out


def _xlogy_diff(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a · (log a - log b) with 0 where a = 0: one outcome of a KL."""
    return torch.where(a > 0, a * (log_a - log_b), 0.0)


def _fast_cross_entropy(st: _ChunkState, teacher, labels, valid, coeff, kwargs):
    if set(kwargs) - {"ignore_index"}:
        return None
    dtype = compute_dtype(st.z)
    target = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
    value = torch.where(valid, -st.log_q(1.0, dtype).gather(-1, target).squeeze(-1), 0.0).sum()
    if st.want_grad:  # softmax - onehot
        weight = valid.to(dtype) * coeff
        st.add_rows(st.q(1.0, dtype), weight)
        st.scatter_add(target, -weight.unsqueeze(-1))
    return value


def _fast_forward_kl(st: _ChunkState, teacher, labels, valid, coeff, kwargs):
    """KL(p || q)·T²: dL/du = T·(q - p). Dense (with or without standardize), "bucket" and "renormalize" teachers;
    sampled and hybrid caches with their estimate p̂ for p."""
    if set(kwargs) - {"temperature", "missing_mass", "standardize"}:
        return None
    if isinstance(teacher, (SampledLogits, HybridLogits)):
        return _fast_hybrid_forward_kl(st, teacher, valid, coeff, kwargs)
    if not isinstance(teacher, SparseLogits):
        d = _dense(st, teacher, valid, kwargs, {"temperature", "missing_mass", "standardize"})
        if d is None:
            return None
        p = d.log_p.exp()
        value = _finite_sum(torch.linalg.vecdot(p, d.log_p.sub_(d.log_q)), valid, d.temperature**2)
        if value is not None and st.want_grad:
            weight = valid.to(d.dtype) * (coeff * d.temperature)
            st.add_rows(st.q(d.temperature, d.dtype, d.standardize), weight, d.std)
            st.add_rows(p, -weight, d.std)
        return value
    if kwargs.get("standardize"):
        return None  # the generic path refuses it with its message
    temperature = float(kwargs.get("temperature", 1.0))
    policy = kwargs.get("missing_mass", "bucket")
    check_temperature(temperature)
    check_policy(policy)
    dtype = compute_dtype(st.z, teacher.logits)
    keep = valid.unsqueeze(-1)
    if policy == "renormalize":
        return _fast_forward_kl_renormalize(st, teacher, valid, coeff, temperature, dtype)
    if (policy != "bucket" or teacher.logsumexp is None or teacher.k >= st.z.shape[-1]
            or not math.isclose(teacher.lse_temperature, temperature, rel_tol=1e-6)):
        return None  # uniform / no tail / errors: the generic path (and its messages)
    log_q = st.log_q(temperature, dtype)

    # bucket: support = the k ids + "everything else"
    ids = torch.where(keep, teacher.ids.long(), torch.arange(teacher.k, device=st.z.device))
    t_top = torch.where(keep, teacher.logits.to(dtype), 0.0) / temperature
    t_lse = torch.where(valid, teacher.logsumexp.to(dtype), math.log(st.z.shape[-1]))
    lp_top = t_top - t_lse.unsqueeze(-1)
    lp_rest = log1mexp(torch.logsumexp(lp_top, dim=-1))
    q = st.q(temperature, dtype)
    lq_top = log_q.gather(-1, ids)
    q_rest = q.scatter(-1, ids, 0.0).sum(-1)  # a sum of the other probabilities: no 1 - x cancellation
    lq_rest = q_rest.log()
    p_top, p_rest = lp_top.exp(), lp_rest.exp()
    rows = torch.where(p_top > 0, p_top * (lp_top - lq_top), 0.0).sum(-1)
    rows = rows + torch.where(p_rest > 0, p_rest * (lp_rest - lq_rest), 0.0)
    value = torch.where(valid, rows, 0.0).sum() * temperature**2
    if not bool(torch.isfinite(value)):
        return None
    if st.want_grad:  # T·(q_j - p_j) on the top ids, T·q_j·(1 - p_rest/q_rest) on the others
        weight = valid.to(dtype) * (coeff * temperature)
        tail = torch.where(p_rest > 0, 1.0 - p_rest / q_rest, 1.0)
        st.add_rows(q, weight * tail)
        q_top = lq_top.exp()
        st.scatter_add(ids, weight.unsqueeze(-1) * (q_top - p_top - q_top * tail.unsqueeze(-1)))
    return value


def _fast_hybrid_forward_kl(st: _ChunkState, teacher: HybridLogits | SampledLogits, valid, coeff, kwargs):
    """forward_kl on a hybrid teacher: T²·(-H - Σ_head p_i·log q_T[i] - (m/N)·Σ_j log q_T[tail_j]);
    dL/dz = T·(q - p̂), p̂ = p on the head ids + (m/N)·counts on the tail draws (Σ p̂ = 1). A sampled teacher is the
    hybrid one with no head (m = 1): p̂ = counts / N."""
    temperature = float(kwargs.get("temperature", 1.0))
    if kwargs.get("standardize") or not math.isclose(temperature, teacher.temperature, rel_tol=1e-6):
        return None  # the generic path refuses it with its message
    if isinstance(teacher, SampledLogits):
        teacher = teacher.as_hybrid()
    dtype = compute_dtype(st.z)
    clean = teacher.sanitized(valid)
    rows = hybrid_forward_kl_rows(st.log_q(temperature, dtype), clean)
    value = torch.where(valid, rows, 0.0).sum() * temperature**2
    if not bool(torch.isfinite(value)):
        return None
    if st.want_grad:
        weight = valid.to(dtype) * (coeff * temperature)
        p_head, w_tail = hybrid_head_and_tail_weights(clean, dtype)
        st.add_rows(st.q(temperature, dtype), weight)
        st.scatter_add(clean.ids, -weight.unsqueeze(-1) * p_head)
        st.scatter_add(clean.tail_ids, (-weight * w_tail).unsqueeze(-1).expand(clean.tail_ids.shape))
    return value


def _fast_forward_kl_renormalize(st: _ChunkState, teacher, valid, coeff, temperature, dtype):
    keep = valid.unsqueeze(-1)
    ids = torch.where(keep, teacher.ids.long(), torch.arange(teacher.k, device=st.z.device))
    s_top = torch.where(keep, st.z.gather(-1, ids).to(dtype), 0.0) / temperature
    t_top = torch.where(keep, teacher.logits.to(dtype), 0.0) / temperature
    lq, lp = torch.log_softmax(s_top, dim=-1), torch.log_softmax(t_top, dim=-1)
    p = lp.exp()
    value = torch.where(valid, (torch.where(p > 0, p * (lp - lq), 0.0)).sum(-1), 0.0).sum() * temperature**2
    if not bool(torch.isfinite(value)):
        return None
    if st.want_grad:  # T·(q - p) on the k ids only
        weight = valid.to(dtype) * (coeff * temperature)
        st.scatter_add(ids, weight.unsqueeze(-1) * (lq.exp() - p))
    return value


_POINTWISE = {"temperature", "missing_mass", "standardize"}


def _fast_generalized_jsd(st: _ChunkState, teacher, labels, valid, coeff, kwargs):
    """JSD_β·T² for dense teachers (sparse: the generic path). β = 0 is forward KL, β = 1 reverse KL, as generic.

    m = βp + (1-β)q, JSD_β = β·KL(p||m) + (1-β)·KL(q||m). With dm_j/dq_j = 1-β:
      dJSD/dq_j = -β(1-β)·p_j/m_j + (1-β)·(log(q_j/m_j) + 1 - (1-β)·q_j/m_j) = (1-β)·log(q_j/m_j)
    (the p_j and q_j terms add to (1-β)·m_j/m_j, cancelling the +1), so with ℓ = log q - log m:
      dJSD/ds_j = (1-β)·q_j·(ℓ_j - Σ_i q_i ℓ_i) = (1-β)·q_j·(ℓ_j - KL(q||m)),  dL/du = T·dJSD/ds.
    Reverse KL (β = 1) is the same form with m = p and weight 1: dKL(q||p)/ds_j = q_j·(ℓ_j - KL(q||p)).
    """
    beta = float(kwargs.get("beta", 0.5))
    rest = {k: v for k, v in kwargs.items() if k != "beta"}
    if not 0.0 <= beta <= 1.0:
        return None  # the generic path raises
    if beta == 0:
        return _fast_forward_kl(st, teacher, labels, valid, coeff, rest)
    d = _dense(st, teacher, valid, rest, _POINTWISE)
    if d is None:
        return None
    q = st.q(d.temperature, d.dtype, d.standardize)
    if beta == 1:
        ell = d.log_p.neg_().add_(d.log_q)  # log q - log p, in the teacher's buffer
        rows = kl_qm = torch.linalg.vecdot(q, ell)  # NaN where q = 0 and p = 0 (both -inf): the generic path
        weight_q = 1.0
    else:
        p = d.log_p.exp()
        log_m = (p * beta).add_(q, alpha=1.0 - beta).log_()
        kl_pm = torch.linalg.vecdot(p, d.log_p.sub_(log_m))
        del p
        ell = log_m.neg_().add_(d.log_q)
        kl_qm = torch.linalg.vecdot(q, ell)
        rows = beta * kl_pm + (1.0 - beta) * kl_qm
        weight_q = 1.0 - beta
    value = _finite_sum(rows, valid, d.temperature**2)
    if value is not None and st.want_grad:
        st.add_rows(ell.sub_(kl_qm.unsqueeze(-1)).mul_(q), valid.to(d.dtype) * (coeff * d.temperature * weight_q), d.std)
    return value


def _fast_reverse_kl(st: _ChunkState, teacher, labels, valid, coeff, kwargs):
    """KL(q || p)·T²: dL/du_j = T·q_j·(log q_j - log p_j - KL(q||p)) (see _fast_generalized_jsd). Dense teachers."""
    if "beta" in kwargs:
        return None
    return _fast_generalized_jsd(st, teacher, labels, valid, coeff, {**kwargs, "beta": 1.0})


def _fast_skew_forward_kl(st: _ChunkState, teacher, labels, valid, coeff, kwargs):
    """Skew KL(p || m)·T², m = αp + (1-α)q, for dense teachers (sparse: the generic path); α = 0 is forward KL.

    dD/dq_j = -(1-α)·p_j/m_j =: -(1-α)·r_j, so dD/ds_j = -(1-α)·q_j·(r_j - Σ_i q_i r_i).
    α = 1 (m = p: the loss is 0) is 0 with no gradient.
    """
    alpha = float(kwargs.get("alpha", 0.1))
    rest = {k: v for k, v in kwargs.items() if k != "alpha"}
    if alpha == 0:
        return _fast_forward_kl(st, teacher, labels, valid, coeff, rest)
    if alpha == 1 and _dense(st, teacher, valid, rest, _POINTWISE) is not None:
        return torch.zeros((), dtype=compute_dtype(st.z, teacher), device=st.z.device)
    if not 0.0 < alpha < 1.0:
        return None
    d = _dense(st, teacher, valid, rest, _POINTWISE)
    if d is None:
        return None
    q = st.q(d.temperature, d.dtype, d.standardize)
    p = d.log_p.exp()
    m = (p * alpha).add_(q, alpha=1.0 - alpha)
    value = _finite_sum(torch.linalg.vecdot(p, d.log_p.sub_(m.log())), valid, d.temperature**2)
    if value is not None and st.want_grad:
        r = p.div_(m)  # p / m, in the teacher's buffer
        del m
        r.sub_(torch.linalg.vecdot(q, r).unsqueeze(-1)).mul_(q)
        st.add_rows(r, valid.to(d.dtype) * (-coeff * d.temperature * (1.0 - alpha)), d.std)
    return value


def _fast_skew_reverse_kl(st: _ChunkState, teacher, labels, valid, coeff, kwargs):
    """Skew reverse KL(q || m)·T², m = αq + (1-α)p, for dense teachers (sparse: the generic path); α = 0 is reverse KL.

    dD/dq_j = log(q_j/m_j) + 1 - α·q_j/m_j; the constant drops through the softmax, so with
    h = log q - log m - α·q/m: dD/ds_j = q_j·(h_j - Σ_i q_i h_i). α = 1 (m = q: the loss is 0) is 0 with no gradient.
    """
    alpha = float(kwargs.get("alpha", 0.1))
    rest = {k: v for k, v in kwargs.items() if k != "alpha"}
    if alpha == 0:
        return _fast_reverse_kl(st, teacher, labels, valid, coeff, rest)
    if alpha == 1 and _dense(st, teacher, valid, rest, _POINTWISE) is not None:
        return torch.zeros((), dtype=compute_dtype(st.z, teacher), device=st.z.device)
    if not 0.0 < alpha < 1.0:
        return None
    d = _dense(st, teacher, valid, rest, _POINTWISE)
    if d is None:
        return None
    q = st.q(d.temperature, d.dtype, d.standardize)
    m = d.log_p.exp_().mul_(1.0 - alpha).add_(q, alpha=alpha)  # in the teacher's buffer
    ell = torch.sub(d.log_q, m.log())
    value = _finite_sum(torch.linalg.vecdot(q, ell), valid, d.temperature**2)  # NaN where q = m = 0: generic path
    if value is not None and st.want_grad:
        h = ell.sub_(torch.div(q, m, out=m).mul_(alpha))
        del m
        h.sub_(torch.linalg.vecdot(q, h).unsqueeze(-1)).mul_(q)
        st.add_rows(h, valid.to(d.dtype) * (coeff * d.temperature), d.std)
    return value


def _fast_total_variation(st: _ChunkState, teacher, labels, valid, coeff, kwargs):
    """½Σ|p - q|·T² for dense teachers (sparse: the generic path).

    g_j = dTV/dq_j = ½·sign(q_j - p_j) (sign(0) = 0, like autograd's abs); dTV/ds_j = q_j·(g_j - Σ_i q_i g_i).
    """
    d = _dense(st, teacher, valid, kwargs, _POINTWISE)
    if d is None:
        return None
    q = st.q(d.temperature, d.dtype, d.standardize)
    diff = d.log_p.exp_().sub_(q).neg_()  # q - p, in the teacher's buffer
    value = _finite_sum(0.5 * torch.linalg.vector_norm(diff, ord=1, dim=-1), valid, d.temperature**2)
    if value is not None and st.want_grad:
        g = diff.sign_().mul_(0.5)
        g.sub_(torch.linalg.vecdot(q, g).unsqueeze(-1)).mul_(q)
        st.add_rows(g, valid.to(d.dtype) * (coeff * d.temperature), d.std)
    return value


def _fast_decoupled_kd(st: _ChunkState, teacher, labels, valid, coeff, kwargs):
    """DKD, warmup·(α·TCKD + β·NCKD)·T², for dense teachers (a sparse one is densified by the generic path).

    y = the label; b = [p_y, 1-p_y], c = [q_y, 1-q_y]; p̂, q̂ = the distributions over the classes j ≠ y.
      TCKD = KL(b||c), a function of q_y: dTCKD/dq_y = (q_y - p_y) / (q_y·(1-q_y)), dq_y/ds_j = q_y·(δ_jy - q_j), so
        dTCKD/ds_y = q_y - p_y and dTCKD/ds_j = -(q_y - p_y)·q̂_j (j ≠ y);
      NCKD = KL(p̂||q̂), q̂ = softmax of s over j ≠ y (s_y drops out): dNCKD/ds_j = q̂_j - p̂_j (j ≠ y), 0 at y.
      dL/du = warmup·T·(α·dTCKD/ds + β·dNCKD/ds).
    1 - p_y and 1 - q_y are logsumexps over j ≠ y (no cancellation when p_y → 1); a teacher or student with no mass
    off the label (NCKD undefined; generic: 0) gives a non-finite row and the generic path.
    """
    allowed = _POINTWISE | {"alpha", "beta", "warmup", "ignore_index"}
    d = _dense(st, teacher, valid, kwargs, allowed)
    if d is None:
        return None
    alpha, beta = float(kwargs.get("alpha", 1.0)), float(kwargs.get("beta", 8.0))
    warmup = float(kwargs.get("warmup", 1.0))
    target = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
    lp, lq = d.log_p, d.log_q
    lp_y, lq_y = lp.gather(-1, target).squeeze(-1), lq.gather(-1, target).squeeze(-1)
    lp_rest, lq_rest = _logsumexp_except(lp, target), _logsumexp_except(lq, target)
    gap = (lp - lq).scatter_(-1, target, 0.0)  # log p_j - log q_j off the label
    p_hat = lp.sub_(lp_rest.unsqueeze(-1)).exp_().scatter_(-1, target, 0.0)  # in the teacher's buffer
    nckd = torch.linalg.vecdot(p_hat, gap) - lp_rest + lq_rest  # Σ p̂·(log p - log q) - log(1-p_y) + log(1-q_y)
    p_y, q_y = lp_y.exp(), lq_y.exp()
    tckd = _xlogy_diff(p_y, lp_y, lq_y) + _xlogy_diff(lp_rest.exp(), lp_rest, lq_rest)
    value = _finite_sum(warmup * (alpha * tckd + beta * nckd), valid, d.temperature**2)
    if value is not None and st.want_grad:
        w = valid.to(d.dtype) * (coeff * warmup * d.temperature)
        q_hat = torch.sub(lq, lq_rest.unsqueeze(-1), out=gap).exp_().scatter_(-1, target, 0.0)
        st.add_rows(q_hat, w * (beta - alpha * (q_y - p_y)), d.std)
        st.add_rows(p_hat, -w * beta, d.std)
        st.scatter_add(target, (w * alpha * (q_y - p_y)).unsqueeze(-1), d.std)
    return value


def _fast_correlation_aware_kd(st: _ChunkState, teacher, labels, valid, coeff, kwargs):
    """CAKD, (w_b·BCD + w_s·c_S·SCD + w_w·c_W·WCD)·T², for dense teachers (sparse: the generic path).

    S = the teacher's top-k classes, W = the others; P_G, Q_G = the teacher's/student's mass on group G, p̂_G, q̂_G the
    distributions within G, c_G = P_G (scale_by_teacher_mass) or 1 — teacher constants.
      BCD = KL([P_S, P_W] || [Q_S, Q_W]); dQ_S/ds_j = q_j·(1[j∈S] - Q_S), so for j ∈ G:
        dBCD/ds_j = q_j·(1 - P_G/Q_G) (the coarse forward KL);
      SCD, WCD = KL(p̂_G || q̂_G), q̂_G = softmax of s over G: d/ds_j = q̂_G,j - p̂_G,j for j ∈ G, 0 elsewhere.
    Together, for j ∈ G: dLoss/ds_j = q_j·a_G - w_G·c_G·p̂_G,j with a_G = w_b + (w_G·c_G - w_b·P_G)/Q_G; dL/du = T·that.
    A teacher with no mass on W (WCD undefined; generic: 0), strong_k >= V, or a -inf logit: the generic path.
    """
    allowed = _POINTWISE | {"strong_k", "w_binary", "w_strong", "w_weak", "scale_by_teacher_mass"}
    strong_k = int(kwargs.get("strong_k", 10))
    if strong_k < 1 or strong_k >= st.z.shape[-1]:
        return None
    d = _dense(st, teacher, valid, kwargs, allowed)
    if d is None:
        return None
    w_b, w_s, w_w = (float(kwargs.get(k, 1.0)) for k in ("w_binary", "w_strong", "w_weak"))
    lp, lq = d.log_p, d.log_q
    top = lp.topk(strong_k, dim=-1).indices
    lp_s, lq_s = lp.gather(-1, top), lq.gather(-1, top)
    lP_S, lQ_S = torch.logsumexp(lp_s, -1), torch.logsumexp(lq_s, -1)
    lP_W, lQ_W = _logsumexp_except(lp, top), _logsumexp_except(lq, top)
    gap = (lp - lq).scatter_(-1, top, 0.0)  # log p_j - log q_j on W
    p_hat_w = lp.sub_(lP_W.unsqueeze(-1)).exp_().scatter_(-1, top, 0.0)  # in the teacher's buffer
    wcd = torch.linalg.vecdot(p_hat_w, gap) - lP_W + lQ_W
    del gap
    lp_hat_s, lq_hat_s = torch.log_softmax(lp_s, -1), torch.log_softmax(lq_s, -1)
    p_hat_s = lp_hat_s.exp()
    scd = _xlogy_diff(p_hat_s, lp_hat_s, lq_hat_s).sum(-1)
    P_S, P_W, Q_S, Q_W = lP_S.exp(), lP_W.exp(), lQ_S.exp(), lQ_W.exp()
    bcd = _xlogy_diff(P_S, lP_S, lQ_S) + _xlogy_diff(P_W, lP_W, lQ_W)
    if kwargs.get("scale_by_teacher_mass", True):
        c_s, c_w = P_S, P_W
    else:
        c_s, c_w = torch.ones_like(P_S), torch.ones_like(P_W)
    value = _finite_sum(w_b * bcd + w_s * c_s * scd + w_w * c_w * wcd, valid, d.temperature**2)
    if value is None or not st.want_grad:
        return value
    a_s, a_w = w_b + (w_s * c_s - w_b * P_S) / Q_S, w_b + (w_w * c_w - w_b * P_W) / Q_W
    if not bool(torch.isfinite(a_s).all() and torch.isfinite(a_w).all()):
        return None  # a group the student gives no mass: the generic path
    f = valid.to(d.dtype) * (coeff * d.temperature)
    st.add_rows(st.q(d.temperature, d.dtype, d.standardize), f * a_w, d.std)
    st.add_rows(p_hat_w, -f * w_w * c_w, d.std)
    on_s = lq_s.exp() * (a_s - a_w).unsqueeze(-1) - (w_s * c_s).unsqueeze(-1) * p_hat_s
    st.scatter_add(top, f.unsqueeze(-1) * on_s, d.std)
    return value


_FAST: dict[Callable, Callable] = {
    cross_entropy: _fast_cross_entropy,
    forward_kl: _fast_forward_kl,
    reverse_kl: _fast_reverse_kl,
    generalized_jsd: _fast_generalized_jsd,
    skew_forward_kl: _fast_skew_forward_kl,
    skew_reverse_kl: _fast_skew_reverse_kl,
    total_variation: _fast_total_variation,
    decoupled_kd: _fast_decoupled_kd,
    correlation_aware_kd: _fast_correlation_aware_kd,
}


class _Plan:
    """Everything the autograd function needs besides the differentiable tensors (flattened to rows)."""

    def __init__(self, terms, teacher, labels, valid, rows, chunk_size, reduction, fast, transform):
        self.terms = terms
        self.transform = transform  # the model's own logit transform (soft-cap, scale), applied to every chunk
        self.teacher = teacher
        self.labels = labels
        self.valid = valid  # [n_terms, N] bool
        self.rows = rows  # None = all rows, else the row indices some term counts
        self.chunk_size = chunk_size
        self.divisors = [1.0 if reduction == "sum" else float(v.sum().clamp_min(1)) for v in valid]
        self.fast = fast

    def teacher_rows(self, idx):
        t = self.teacher
        if t is None:
            return None
        if isinstance(t, (SampledLogits, HybridLogits)):
            return t.select(idx)
        if isinstance(t, HeadLogits):
            return t.rows(idx)
        if isinstance(t, SparseLogits):
            return SparseLogits(ids=t.ids[idx], logits=t.logits[idx],
                                logsumexp=None if t.logsumexp is None else t.logsumexp[idx],
                                lse_temperature=t.lse_temperature)
        return t[idx]

    def chunk(self, z: torch.Tensor, idx, coeffs, want_grad: bool):
        """(per-term sums over the chunk, d(sum coeff·value)/dz or None) for the chunk's logits z."""
        teacher = self.teacher_rows(idx)
        labels = None if self.labels is None else self.labels[idx]
        values: list[torch.Tensor | None] = [None] * len(self.terms)
        state = _ChunkState(z, want_grad)
        generic = []
        for i, (term, valid) in enumerate(zip(self.terms, self.valid)):
            fast = _FAST.get(term.fn) if self.fast else None
            if fast is not None:
                values[i] = fast(state, teacher, labels, valid[idx], coeffs[i], term.kwargs)
            if values[i] is None:
                generic.append(i)
        grad = state.gradient()
        del state  # the shared softmaxes
        if generic:
            leaf = z.detach().requires_grad_(want_grad)
            with torch.set_grad_enabled(want_grad):
                for i in generic:
                    values[i] = self._generic(i, leaf, idx, teacher, labels)
                total = sum(coeffs[i] * values[i] for i in generic)
                if want_grad and total.requires_grad:  # not when no term depends on the logits (skew KL, alpha=1)
                    (g,) = torch.autograd.grad(total, leaf)
                    grad = g if grad is None else grad.add_(g.to(grad.dtype))
        return [v.detach() for v in values], grad

    def _generic(self, i, logits, idx, teacher, labels):
        term, valid = self.terms[i], self.valid[i][idx]
        kwargs = dict(term.kwargs)
        if term.is_label_loss:
            return term.fn(logits, labels, mask=valid, reduction="sum", **kwargs)
        if term.takes_labels:
            kwargs["labels"] = labels
        return term.fn(logits, teacher, mask=valid, reduction="sum", **kwargs)


class _ChunkedLogitLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: _Plan):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        need_grad = need_h or need_w or need_b
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        values = torch.zeros(len(plan.terms), dtype=torch.float64, device=hidden.device)
        coeffs = [term.weight / d for term, d in zip(plan.terms, plan.divisors)]
        total_rows = hidden.shape[0] if plan.rows is None else plan.rows.numel()
        w_acc = weight.to(acc)

        for start in range(0, total_rows, plan.chunk_size):
            stop = min(start + plan.chunk_size, total_rows)
            idx = slice(start, stop) if plan.rows is None else plan.rows[start:stop]
            h = hidden[idx]
            z = torch.nn.functional.linear(h, weight, bias)  # under the caller's autocast, like an lm_head
            with torch.autocast(hidden.device.type, enabled=False):
                if plan.transform.is_identity:
                    parts, g = plan.chunk(z, idx, coeffs, need_grad)
                else:  # the loss sees the model's logits; its gradient is chained back to lm_head's output
                    parts, g = plan.chunk(plan.transform(z.float()), idx, coeffs, need_grad)
                    if g is not None:
                        g = plan.transform.chain(z, g)
                del z
                if g is not None:
                    g = g.to(acc)
                    if need_h:
                        grad_h[idx] = (g @ w_acc).to(grad_h.dtype)
                    if need_w:
                        grad_w.addmm_(g.T, h.to(acc))
                    if need_b:
                        grad_b += g.sum(0)
                    del g
            values += torch.stack([p.to(torch.float64) for p in parts])

        values = values / torch.tensor(plan.divisors, dtype=torch.float64, device=values.device)
        total = sum(term.weight * values[i] for i, term in enumerate(plan.terms))
        out_dtype = torch.promote_types(hidden.dtype, torch.float32)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.has = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        values = values.to(out_dtype)
        ctx.mark_non_differentiable(values)
        return torch.as_tensor(total, dtype=out_dtype, device=hidden.device), values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_values):
        if getattr(ctx, "used", False):
            raise RuntimeError("a chunked logit loss supports one backward pass (its gradients were precomputed and "
                               "are scaled in place); recompute the loss instead of retain_graph=True")
        ctx.used = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        need_h, need_w, need_b = ctx.has
        dh, dw, db = ctx.dtypes
        # in place: these buffers belong to this call alone, and a [V, D] copy would raise the peak by its size
        out = [None, None, None, None]
        if need_h:
            out[0] = grad_h.mul_(grad_total).to(dh)
        if need_w:
            out[1] = grad_w.mul_(grad_total).to(dw)
        if need_b:
            out[2] = grad_b.mul_(grad_total).to(db)
        return tuple(out)


def chunked_logit_terms(
    terms: Sequence[ChunkedTerm],
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher: Teacher | None = None,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reduction: str = "mean",
    ignore_index: int = -100,
    fast: bool = True,
    logit_transform: LogitTransform | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of logit/label losses on ``hidden @ lm_head_weight.T (+ bias)``, chunk by chunk.

    hidden: ``[..., D]``; lm_head_weight: ``[V, D]``; teacher: dense ``[..., V]``, :class:`SparseLogits`, or
    :class:`HeadLogits` (the teacher's own hidden states and head: its logits are made chunk by chunk too) with the
    same leading shape (a view like ``t[..., :V]`` is fine; ``t[:, :-1]`` is copied, so mask the last position instead
    of slicing it off); mask, labels: the leading shape. Returns ``(total, values)``: the differentiable
    ``sum(weight_i · loss_i)`` and a detached ``[len(terms)]`` tensor of the unweighted ``loss_i``.
    ``fast=False`` sends every term through the generic (autograd) path, for testing the closed forms.
    ``logit_transform``: what the model does to ``lm_head(h)`` before returning logits (Gemma's soft-cap, Cohere's or
    Granite's scale; :func:`kdforge.lm_head.logit_transform`), applied to every chunk so the losses see the model's
    own logits.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f'chunked losses support reduction "mean" or "sum", got {reduction!r}')
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    terms = [t if isinstance(t, ChunkedTerm) else ChunkedTerm(*t) for t in terms]
    if not terms:
        raise ValueError("chunked_logit_terms needs at least one term")
    if lm_head_weight.ndim != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight {tuple(lm_head_weight.shape)} must be [V, {hidden.shape[-1]}] for hidden "
                         f"states of shape {tuple(hidden.shape)}")
    lead = hidden.shape[:-1]
    device = hidden.device
    h = hidden.reshape(-1, hidden.shape[-1])
    n = h.shape[0]

    base = torch.ones(n, dtype=torch.bool, device=device)
    if mask is not None:
        base = torch.broadcast_to(torch.as_tensor(mask, device=device).bool(), lead).reshape(-1)
    flat_labels = None
    if labels is not None:
        flat_labels = _flat(torch.as_tensor(labels, device=device).long(), lead, "labels")
    valid = []
    for t in terms:
        if t.takes_labels:
            if flat_labels is None:
                raise ValueError(f"loss {t.loss!r} needs labels=")
            ignore = t.kwargs.get("ignore_index", ignore_index)
            valid.append(base & (flat_labels != ignore))
        else:
            valid.append(base)
    valid = torch.stack(valid)

    flat_teacher = None
    if any(not t.is_label_loss for t in terms):
        if teacher is None:
            raise ValueError("logit losses need a teacher")
        if isinstance(teacher, HeadLogits):
            if teacher.shape[:-1] != lead or teacher.shape[-1] != lm_head_weight.shape[0]:
                raise ValueError(f"teacher logits {tuple(teacher.shape)} (hidden states and head) do not match the "
                                 f"student's {(*lead, lm_head_weight.shape[0])}")
            flat_teacher = teacher.flatten()
        elif isinstance(teacher, (SampledLogits, HybridLogits)):
            if teacher.ids.shape[:-1] != lead:
                kind = "hybrid" if isinstance(teacher, HybridLogits) else "sampled"
                raise ValueError(f"{kind} teacher positions {tuple(teacher.ids.shape[:-1])} do not match the "
                                 f"student's {tuple(lead)}")
            flat_teacher = teacher.flatten()
        elif isinstance(teacher, SparseLogits):
            flat_teacher = SparseLogits(
                ids=_flat(teacher.ids, lead, "SparseLogits.ids"), logits=_flat(teacher.logits, lead, "SparseLogits.logits"),
                logsumexp=None if teacher.logsumexp is None else _flat(teacher.logsumexp, lead, "SparseLogits.logsumexp"),
                lse_temperature=teacher.lse_temperature)
        else:
            if teacher.shape[:-1] != lead or teacher.shape[-1] != lm_head_weight.shape[0]:
                raise ValueError(f"teacher logits {tuple(teacher.shape)} do not match the student's "
                                 f"{(*lead, lm_head_weight.shape[0])}")
            flat_teacher = teacher.reshape(-1, teacher.shape[-1]).detach()

    counted = valid.any(0)
    rows = None if bool(counted.all()) else counted.nonzero().squeeze(1)
    plan = _Plan(terms, flat_teacher, flat_labels, valid, rows, chunk_size, reduction, fast,
                 logit_transform or LogitTransform())
    return _ChunkedLogitLoss.apply(h, lm_head_weight, bias, plan)


def chunked_logit_loss(
    loss: str | Callable[..., torch.Tensor],
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher: Teacher | None = None,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reduction: str = "mean",
    fast: bool = True,
    logit_transform: LogitTransform | None = None,
    **loss_kwargs,
) -> torch.Tensor:
    """One loss (a name of LOGIT_LOSSES/LABEL_LOSSES, or such a function) on ``hidden @ W.T``, chunked.

    Equals ``loss(hidden @ W.T + bias, teacher_or_labels, mask=mask, reduction=reduction, **loss_kwargs)`` in value
    and gradient. For a label loss (``cross_entropy``) pass ``labels=`` and no teacher.
    """
    total, _ = chunked_logit_terms(
        [ChunkedTerm(loss, 1.0, loss_kwargs)], hidden, lm_head_weight, teacher, bias=bias, mask=mask, labels=labels,
        chunk_size=chunk_size, reduction=reduction, fast=fast, logit_transform=logit_transform,
    )
    return total


# --------------------------------------------------------------------------- causal-LM integration


def causal_lm_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """(base model, lm head) of a Hugging Face causal LM, for computing its logits chunk by chunk.

    The base model returns ``last_hidden_state``; the head is the ``nn.Linear`` of ``get_output_embeddings()``. Use
    :func:`check_head_of_hidden` once to get the transform the model applies to ``head(last_hidden_state)``.
    """
    from ..errors import KDForgeError

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    base = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or base is None or base is model:
        raise KDForgeError(f"train.logit_chunk_size needs a Hugging Face causal LM with a linear lm head; "
                           f"{type(model).__name__} is not one: set logit_chunk_size to null")
    if head.weight.ndim != 2:
        raise KDForgeError("train.logit_chunk_size: the lm head weight is sharded (FSDP?); set logit_chunk_size to null")
    return base, head


def check_head_of_hidden(model: torch.nn.Module, length: int = 8) -> LogitTransform:
    """The transform from ``lm_head(last_hidden_state)`` to ``model``'s logits (soft-cap, scale), verified on the model
    at a magnitude where a soft-cap shows; KDForgeError for a model whose logits are computed some other way."""
    base, head = causal_lm_head(model)
    return check_logit_transform(model, base, head, length)
