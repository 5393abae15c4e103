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

``g`` comes from one of two places. ``forward_kl`` (dense teachers and the "bucket"/"renormalize" sparse policies)
and ``cross_entropy`` have short closed-form gradients (``T·(q - p)``, ``softmax - onehot``), computed directly with
2-4 buffers of ``[chunk, V]``; every other loss (and these in unusual cases: ``standardize``, the "uniform" policy,
non-finite logits) runs the unchanged function of :mod:`kdforge.losses.logits` under autograd on the chunk, so no
hand-written gradient exists for it to get wrong. The tests check both against the unchunked losses.

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
from .logits import LABEL_LOSSES, LOGIT_LOSSES, cross_entropy, forward_kl
from .sparse import SparseLogits, check_policy, check_temperature, compute_dtype, log1mexp, safe_logsumexp

Teacher = torch.Tensor | SparseLogits

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
        labels_param = next((p for p in params[1:] if p.name == "labels"), None)
        self.takes_labels = self.is_label_loss or labels_param is not None and (
            labels_param.default is inspect.Parameter.empty or self.kwargs.get("correction") is not None)
        for bad in ("reduction", "mask", "labels", "return_parts"):
            if bad in self.kwargs:
                raise ValueError(f"{bad!r} is set by chunked_logit_terms, not in a term's kwargs")


def _flat(x: torch.Tensor, lead: torch.Size, what: str) -> torch.Tensor:
    if x.shape[: len(lead)] != lead:
        raise ValueError(f"{what} of shape {tuple(x.shape)} does not match the hidden states' leading shape {tuple(lead)}")
    return x.reshape(-1, *x.shape[len(lead):])


# --------------------------------------------------------------------------- closed-form fast paths
#
# For the most used terms the gradient w.r.t. the logits has a short closed form. The terms of one chunk share one
# log-softmax (and softmax) of the student per temperature, and add their gradients into one buffer, so a CE +
# forward-KL objective takes ~5 buffers of [chunk, V] and ~10 passes over them, where autograd through the generic
# functions keeps ~20 (sanitising, log-softmaxes, the KL's masks). Each fast path returns the sum of its term over
# the chunk's counted rows — exactly the generic function's value — after adding coeff · d(sum)/dz to the shared
# gradient, or None (before touching the gradient) to hand the term to the generic path: unusual inputs such as
# -inf logits (a non-finite value), standardize, the "uniform" policy.
#
# Every row of a chunk is counted by at least one term (the plan drops the others), so the shared softmax needs no
# sanitising; each term masks its own rows out of its value and gradient, and sanitises its own teacher rows.


class _ChunkState:
    """The chunk's logits z, the student's (log-)softmax per temperature, and the gradient being accumulated."""

    def __init__(self, z: torch.Tensor, want_grad: bool):
        self.z = z
        self.want_grad = want_grad
        self.grad: torch.Tensor | None = None
        self._log_q: dict[tuple, torch.Tensor] = {}
        self._q: dict[tuple, torch.Tensor] = {}

    def log_q(self, temperature: float, dtype: torch.dtype) -> torch.Tensor:
        key = (temperature, dtype)
        if key not in self._log_q:
            s = self.z.to(dtype)
            self._log_q[key] = torch.log_softmax(s / temperature if temperature != 1 else s, dim=-1)
        return self._log_q[key]

    def q(self, temperature: float, dtype: torch.dtype) -> torch.Tensor:
        key = (temperature, dtype)
        if key not in self._q:
            self._q[key] = self.log_q(temperature, dtype).exp()
        return self._q[key]

    def add_rows(self, x: torch.Tensor, factor: torch.Tensor) -> None:
        """grad += x · factor[:, None]"""
        f = factor.unsqueeze(-1)
        if self.grad is None:
            self.grad = x * f
        else:
            self.grad.addcmul_(x.to(self.grad.dtype), f.to(self.grad.dtype))

    def scatter_add(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """grad[row, ids[row, j]] += values[row, j]"""
        if self.grad is None:
            self.grad = torch.zeros(self.z.shape, dtype=values.dtype, device=self.z.device)
        self.grad.scatter_add_(-1, ids, values.to(self.grad.dtype))


def _fast_cross_entropy(st: _ChunkState, labels, valid, coeff, kwargs):
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


def _fast_forward_kl(st: _ChunkState, teacher, valid, coeff, kwargs):
    if set(kwargs) - {"temperature", "missing_mass", "standardize"} or kwargs.get("standardize"):
        return None
    temperature = float(kwargs.get("temperature", 1.0))
    policy = kwargs.get("missing_mass", "bucket")
    check_temperature(temperature)
    check_policy(policy)
    sparse = isinstance(teacher, SparseLogits)
    dtype = compute_dtype(st.z, teacher.logits if sparse else teacher)
    keep = valid.unsqueeze(-1)
    if sparse and policy == "renormalize":
        return _fast_forward_kl_renormalize(st, teacher, valid, coeff, temperature, dtype)
    if sparse and (policy != "bucket" or teacher.logsumexp is None or teacher.k >= st.z.shape[-1]
                   or not math.isclose(teacher.lse_temperature, temperature, rel_tol=1e-6)):
        return None  # uniform / no tail / errors: the generic path (and its messages)
    log_q = st.log_q(temperature, dtype)
    if not sparse:
        t = teacher.to(dtype)
        log_p = (t / temperature) if bool(valid.all()) else torch.where(keep, t, 0.0) / temperature
        log_p -= torch.logsumexp(log_p, dim=-1, keepdim=True)
        p = log_p.exp()
        rows = torch.linalg.vecdot(p, log_p.sub_(log_q))
        del log_p
        value = torch.where(valid, rows, 0.0).sum() * temperature**2
        if not bool(torch.isfinite(value)):  # -inf slots (0·inf): the generic path treats 0·log 0 as 0
            return None
        if st.want_grad:  # T·(q - p)
            weight = valid.to(dtype) * (coeff * temperature)
            st.add_rows(st.q(temperature, dtype), weight)
            st.add_rows(p, -weight)
        return value

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


_FAST: dict[Callable, Callable] = {cross_entropy: _fast_cross_entropy, forward_kl: _fast_forward_kl}


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
                values[i] = fast(state, labels if term.is_label_loss else teacher, valid[idx], coeffs[i], term.kwargs)
            if values[i] is None:
                generic.append(i)
        grad = state.grad
        del state  # the shared softmaxes
        if generic:
            leaf = z.detach().requires_grad_(want_grad)
            with torch.set_grad_enabled(want_grad):
                for i in generic:
                    values[i] = self._generic(i, leaf, idx, teacher, labels)
                if want_grad:
                    (g,) = torch.autograd.grad(sum(coeffs[i] * values[i] for i in generic), leaf)
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

    hidden: ``[..., D]``; lm_head_weight: ``[V, D]``; teacher: dense ``[..., V]`` or :class:`SparseLogits` with the
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
        if isinstance(teacher, SparseLogits):
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
