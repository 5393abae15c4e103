"""Logit losses computed from hidden states in token chunks, never materialising the whole batch's logits.

A causal LM's loss normally needs ``logits = hidden @ W.T`` for every position: ``N × V`` floats (4 × 1024 × 49152
fp32 = 805 MB), plus the several same-sized tensors each loss keeps for its backward pass. Here the student's last
hidden states ``[..., D]`` and the lm-head weight ``[V, D]`` go in instead, and the rows are processed ``chunk_size``
at a time, so only ``chunk_size × V`` logits (and that chunk's loss intermediates) exist at once.

How the gradient is obtained (the choice the module is built around)
--------------------------------------------------------------------
The loss is a sum over positions, so each chunk's contribution to the gradient is independent of the others. In the
forward pass, for each chunk: compute its logits, evaluate the loss on them with autograd on (any loss of
:mod:`kdforge.losses.logits` works unchanged; no hand-written gradients to get wrong), take ``dL/dlogits`` for the chunk,
and immediately fold it into ``grad_hidden[chunk] = g @ W`` and ``grad_W += g.T @ hidden[chunk]`` (+ ``grad_b``). The
chunk's logits are then dropped. The backward pass only scales the stored gradients by the incoming grad_output.

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
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .logits import LABEL_LOSSES, LOGIT_LOSSES
from .sparse import SparseLogits

Teacher = torch.Tensor | SparseLogits

DEFAULT_CHUNK_SIZE = 1024


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
        self.takes_labels = self.is_label_loss or "labels" in {p.name for p in params}
        for bad in ("reduction", "mask", "labels", "return_parts"):
            if bad in self.kwargs:
                raise ValueError(f"{bad!r} is set by chunked_logit_terms, not in a term's kwargs")


def _flat(x: torch.Tensor, lead: torch.Size, what: str) -> torch.Tensor:
    if x.shape[: len(lead)] != lead:
        raise ValueError(f"{what} of shape {tuple(x.shape)} does not match the hidden states' leading shape {tuple(lead)}")
    return x.reshape(-1, *x.shape[len(lead):])


class _Plan:
    """Everything the autograd function needs besides the differentiable tensors (flattened to rows)."""

    def __init__(self, terms, teacher, labels, valid, rows, chunk_size, reduction):
        self.terms = terms
        self.teacher = teacher
        self.labels = labels
        self.valid = valid  # [n_terms, N] bool
        self.rows = rows  # None = all rows, else the row indices some term counts
        self.chunk_size = chunk_size
        self.divisors = [1.0 if reduction == "sum" else float(v.sum().clamp_min(1)) for v in valid]

    def teacher_rows(self, idx):
        t = self.teacher
        if t is None:
            return None
        if isinstance(t, SparseLogits):
            return SparseLogits(ids=t.ids[idx], logits=t.logits[idx],
                                logsumexp=None if t.logsumexp is None else t.logsumexp[idx],
                                lse_temperature=t.lse_temperature)
        return t[idx]

    def chunk_values(self, logits: torch.Tensor, idx) -> list[torch.Tensor]:
        teacher = self.teacher_rows(idx)
        labels = None if self.labels is None else self.labels[idx]
        out = []
        for term, valid in zip(self.terms, self.valid):
            kwargs = dict(term.kwargs)
            if term.is_label_loss:
                out.append(term.fn(logits, labels, mask=valid[idx], reduction="sum", **kwargs))
                continue
            if term.takes_labels:
                kwargs["labels"] = labels
            out.append(term.fn(logits, teacher, mask=valid[idx], reduction="sum", **kwargs))
        return out


class _ChunkedLogitLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: _Plan):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        need_grad = need_h or need_w or need_b
        n_rows = hidden.shape[0]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.promote_types(bias.dtype, torch.float32)) if need_b else None
        values = torch.zeros(len(plan.terms), dtype=torch.float64, device=hidden.device)
        coeffs = [term.weight / d for term, d in zip(plan.terms, plan.divisors)]
        total_rows = n_rows if plan.rows is None else plan.rows.numel()

        for start in range(0, total_rows, plan.chunk_size):
            stop = min(start + plan.chunk_size, total_rows)
            idx = slice(start, stop) if plan.rows is None else plan.rows[start:stop]
            h = hidden[idx]
            logits = h @ weight.T
            if bias is not None:
                logits = logits + bias
            if not need_grad:
                parts = plan.chunk_values(logits, idx)
            else:
                logits = logits.detach().requires_grad_()
                with torch.enable_grad():
                    parts = plan.chunk_values(logits, idx)
                    combined = sum(c * p for c, p in zip(coeffs, parts))
                (g,) = torch.autograd.grad(combined, logits)
                g = g.to(h.dtype)
                if need_h:
                    grad_h[idx] = g @ weight.to(g.dtype)
                if need_w:
                    grad_w.addmm_(g.T.to(grad_w.dtype), h.to(grad_w.dtype))
                if need_b:
                    grad_b += g.sum(0).to(grad_b.dtype)
                del g, logits, combined
            values += torch.stack([p.detach().to(torch.float64) for p in parts])

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
    def backward(ctx, grad_total, _grad_values):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        need_h, need_w, need_b = ctx.has
        dh, dw, db = ctx.dtypes
        out = [None, None, None, None]
        if need_h:
            out[0] = (grad_h * grad_total).to(dh)
        if need_w:
            out[1] = (grad_w * grad_total).to(dw)
        if need_b:
            out[2] = (grad_b * grad_total).to(db)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of logit/label losses on ``hidden @ lm_head_weight.T (+ bias)``, chunk by chunk.

    hidden: ``[..., D]``; lm_head_weight: ``[V, D]``; teacher: dense ``[..., V]`` or :class:`SparseLogits` with the
    same leading shape (a view like ``t[..., :V]`` is fine; ``t[:, :-1]`` is copied, so mask the last position instead
    of slicing it off); mask, labels: the leading shape. Returns ``(total, values)``: the differentiable
    ``sum(weight_i · loss_i)`` and a detached ``[len(terms)]`` tensor of the unweighted ``loss_i``.
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
    plan = _Plan(terms, flat_teacher, flat_labels, valid, rows, chunk_size, reduction)
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
    **loss_kwargs,
) -> torch.Tensor:
    """One loss (a name of LOGIT_LOSSES/LABEL_LOSSES, or such a function) on ``hidden @ W.T``, chunked.

    Equals ``loss(hidden @ W.T + bias, teacher_or_labels, mask=mask, reduction=reduction, **loss_kwargs)`` in value
    and gradient. For a label loss (``cross_entropy``) pass ``labels=`` and no teacher.
    """
    total, _ = chunked_logit_terms(
        [ChunkedTerm(loss, 1.0, loss_kwargs)], hidden, lm_head_weight, teacher, bias=bias, mask=mask, labels=labels,
        chunk_size=chunk_size, reduction=reduction,
    )
    return total
