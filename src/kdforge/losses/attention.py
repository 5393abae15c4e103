"""Attention-based losses: TinyBERT attention MSE, MiniLM relation KL, AT maps.

Token-level losses follow the kdforge convention (see ``losses.features``):
bool ``mask`` ``[B, T]``, reduction over valid *query* tokens, float32 maths,
teacher detached. Padded *key* positions are excluded as well, so garbage in
padding never reaches a valid row. Where the authors' code scales the loss
differently, ``convention="authors"`` reproduces it exactly (each docstring
states the factor between the two).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.losses.features import _check_convention, _check_mask, _check_reduction, _reduce_tokens

__all__ = [
    "tinybert_attention_mse",
    "self_attention_relation_kl",
    "minilm_relation_kl",
    "minilm_loss",
    "minilm_v1_loss",
    "attention_transfer",
]

#: TinyBERT's reference code zeroes scores ``<= -1e2`` (masked keys: BERT adds exactly -10000,
#: HF models finfo.min or -inf); real scaled dot-product scores stay far above it.
_MASKED_SCORE = -1e2


def _key_mask(mask: Tensor | None, t: int, *, causal: bool, device: torch.device) -> Tensor | None:
    """Bool ``[B or 1, 1, T_query, T_key]``: True where query may look at key."""
    keep = None
    if mask is not None:
        keep = mask[:, None, None, :]
    if causal:
        tri = torch.ones(t, t, dtype=torch.bool, device=device).tril()[None, None]
        keep = tri if keep is None else keep & tri
    return keep


def _check_attention_pair(name: str, s_att: Tensor, t_att: Tensor) -> None:
    if s_att.dim() != 4 or t_att.dim() != 4:
        raise ValueError(f"{name}: expected attention maps [B, H, T, T], got {tuple(s_att.shape)} and {tuple(t_att.shape)}")
    if s_att.shape[1] != t_att.shape[1]:
        raise ValueError(
            f"{name}: student has {s_att.shape[1]} heads but teacher has {t_att.shape[1]} "
            f"(shapes {tuple(s_att.shape)} vs {tuple(t_att.shape)}); this loss compares heads one to one, "
            "use minilm_relation_kl (any head count / width) instead"
        )
    if s_att.shape != t_att.shape:
        raise ValueError(f"{name}: student attention {tuple(s_att.shape)} and teacher {tuple(t_att.shape)} differ")
    if s_att.shape[-1] != s_att.shape[-2]:
        raise ValueError(f"{name}: expected square self-attention [B, H, T, T], got {tuple(s_att.shape)}")


# --------------------------------------------------------------------------- TinyBERT


def tinybert_attention_mse(
    s_att: Tensor,
    t_att: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    kind: str = "scores",
    convention: str = "kdforge",
) -> Tensor:
    """TinyBERT attention loss (Jiao et al., 2020): MSE between attention matrices.

    ``s_att``, ``t_att``: ``[B, H, T, T]`` with equal head counts; ``mask``: bool
    ``[B, T]``. ``kind="scores"`` (the paper: unnormalised ``QK^T/sqrt(d)``,
    with the additive mask already applied) zeroes entries that are not finite
    or ``<= -1e2``, exactly as the authors' code
    (huawei-noah/Pretrained-Language-Model, TinyBERT/general_distill.py and
    task_distill.py: ``torch.where(att <= -1e2, 0, att)``), so masked scores
    agree on both sides whatever the mask value (BERT's -10000, finfo.min,
    -inf). ``kind="probs"`` compares softmax outputs.

    Conventions (keyword ``convention``):

    * ``"kdforge"`` (default): per valid query row, mean over heads and valid
      keys; then the usual token reduction over valid query rows (``"none"``:
      ``[B, T]``, zero at padded rows);
    * ``"authors"``: the authors' ``nn.MSELoss`` over the whole
      ``[B, H, T, T]`` tensor: padded keys contribute 0 (their masked scores are
      zeroed) but still count in the denominator, and padded *query* rows count
      with their valid-key entries. Per query row this is the squared error
      summed over heads and keys divided by ``H * T``; ``"mean"`` averages all
      ``B * T`` rows (the authors' value), ``"sum"`` adds them, ``"none"``
      returns them ``[B, T]``.

    Factor: identical without padding (factor 1). With padding there is no
    constant factor; when every sequence has n valid tokens and the padded
    query rows agree, ``authors = kdforge * n^2 / T^2``. The authors also sum
    (not average) the per-layer losses: for a layer-mapped term multiply the
    weight by the number of pairs.

    Raises ``ValueError`` for non-square or mismatched maps, head-count
    mismatch, a bad mask, kind, reduction or convention.
    """
    _check_reduction(reduction, name="tinybert_attention_mse")
    _check_convention(convention, name="tinybert_attention_mse")
    if kind not in ("scores", "probs"):
        raise ValueError(f"tinybert_attention_mse: kind must be 'scores' or 'probs', got {kind!r}")
    _check_attention_pair("tinybert_attention_mse", s_att, t_att)
    b, h, t, _ = s_att.shape
    mask = _check_mask("tinybert_attention_mse", mask, torch.Size((b, t)))
    authors = convention == "authors"

    def clean(a: Tensor) -> Tensor:
        a = a.float()
        bad = ~torch.isfinite(a) | (a <= _MASKED_SCORE)
        if mask is not None:
            bad = bad | ~mask[:, None, None, :]  # padded keys
            if not authors:
                bad = bad | ~mask[:, None, :, None]  # padded query rows
        return a.masked_fill(bad, 0.0)

    s = clean(s_att)
    tt = clean(t_att.detach())
    sq = (s - tt).pow(2).sum(dim=(1, 3))  # [B, T_query]
    if authors:
        return _reduce_tokens(sq / (h * t), None, reduction)
    if mask is None:
        per_token = sq / (h * t)
    else:
        n_keys = mask.sum(dim=1, keepdim=True).clamp_min(1).to(sq.dtype)
        per_token = sq / (h * n_keys)
    return _reduce_tokens(per_token, mask, reduction)


# --------------------------------------------------------------------------- MiniLM


def _split_heads(name: str, x: Tensor, n_heads: int, who: str) -> Tensor:
    """``[B, T, D]`` -> ``[B, n_heads, T, D / n_heads]``."""
    b, t, d = x.shape
    if d % n_heads != 0:
        raise ValueError(
            f"{name}: {who} width {d} is not divisible by num_relation_heads={n_heads}; "
            "pick a head count that divides both widths"
        )
    return x.reshape(b, t, n_heads, d // n_heads).transpose(1, 2)


def _relation_log_probs(a: Tensor, b: Tensor, keep: Tensor | None) -> Tensor:
    """log softmax(a b^T / sqrt(d_r)) over keys; masked keys get log-prob 0 (their prob is 0)."""
    scores = a @ b.transpose(-1, -2) / math.sqrt(a.shape[-1])
    if keep is not None:
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    logp = scores.log_softmax(dim=-1)
    if keep is not None:
        logp = logp.masked_fill(~keep, 0.0)
    return logp


def _kl_rows(t_logp: Tensor, s_logp: Tensor, keep: Tensor | None) -> Tensor:
    """KL(teacher || student) per row ``[..., T_query]`` from log-probs."""
    t_p = t_logp.exp()
    if keep is not None:
        t_p = t_p.masked_fill(~keep, 0.0)
    return (t_p * (t_logp - s_logp)).sum(dim=-1)


def _relation_kl(
    name: str,
    s_a: Tensor,
    s_b: Tensor,
    t_a: Tensor,
    t_b: Tensor,
    *,
    mask: Tensor | None,
    num_relation_heads: int,
    causal: bool,
) -> tuple[Tensor, Tensor | None]:
    """Per-token relation KL ``[B, T]`` for relation softmax(A B^T / sqrt(d_r))."""
    for x in (s_a, s_b, t_a, t_b):
        if x.dim() != 3:
            raise ValueError(f"{name}: expected per-layer vectors [B, T, D], got {tuple(x.shape)}")
    if s_a.shape[:2] != t_a.shape[:2] or s_b.shape[:2] != t_b.shape[:2] or s_a.shape[:2] != s_b.shape[:2]:
        raise ValueError(
            f"{name}: student {tuple(s_a.shape)} and teacher {tuple(t_a.shape)} must share batch and token dims"
        )
    if s_a.shape[-1] != s_b.shape[-1] or t_a.shape[-1] != t_b.shape[-1]:
        raise ValueError(f"{name}: the two vectors of one relation must have the same width on each side")
    if not isinstance(num_relation_heads, int) or num_relation_heads < 1:
        raise ValueError(f"{name}: num_relation_heads must be a positive int, got {num_relation_heads!r}")
    b, t, _ = s_a.shape
    mask = _check_mask(name, mask, torch.Size((b, t)))

    def prep(x: Tensor, who: str) -> Tensor:
        x = x.float()
        if mask is not None:
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        return _split_heads(name, x, num_relation_heads, who)

    keep = _key_mask(mask, t, causal=causal, device=s_a.device)
    s_logp = _relation_log_probs(prep(s_a, "student"), prep(s_b, "student"), keep)
    t_logp = _relation_log_probs(prep(t_a.detach(), "teacher"), prep(t_b.detach(), "teacher"), keep)
    per_token = _kl_rows(t_logp, s_logp, keep).mean(dim=1)  # average over relation heads
    return per_token, mask


def _reduce_relation(per_token: Tensor, mask: Tensor | None, reduction: str, convention: str) -> Tensor:
    """Token reduction ("kdforge") or the MiniLMv2 paper's per-sequence one ("authors")."""
    if convention == "kdforge" or reduction == "none":
        return _reduce_tokens(per_token, mask, reduction)
    if mask is None:
        per_seq = per_token.mean(dim=1)
        nonempty = None
    else:
        per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
        n = mask.sum(dim=1)
        per_seq = per_token.sum(dim=1) / n.clamp_min(1).to(per_token.dtype)
        nonempty = (n > 0).sum().clamp_min(1).to(per_token.dtype)
    if reduction == "sum":
        return per_seq.sum()
    return per_seq.mean() if nonempty is None else per_seq.sum() / nonempty


def self_attention_relation_kl(
    s_vecs: Tensor,
    t_vecs: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_relation_heads: int,
    causal: bool = False,
    convention: str = "kdforge",
) -> Tensor:
    """MiniLM v2 relation loss for one vector type (Q-Q, K-K or V-V).

    Each of ``s_vecs`` ``[B, T, Ds]`` and ``t_vecs`` ``[B, T, Dt]`` is split into
    ``num_relation_heads`` heads (widths may differ; each must be divisible).
    The relation ``softmax(A A^T / sqrt(d_r))`` over key positions (padded keys,
    and future keys when ``causal=True``, are masked) is compared as
    ``KL(teacher || student)``, averaged over relation heads, then reduced over
    valid query tokens (``mask``: bool ``[B, T]``).

    ``convention`` (``"kdforge"`` or ``"authors"``): see :func:`minilm_loss`.

    Raises ``ValueError`` for shapes that are not ``[B, T, D]`` or differ in
    batch/tokens, widths not divisible by ``num_relation_heads``, a bad mask,
    reduction or convention.
    """
    _check_reduction(reduction, name="self_attention_relation_kl")
    _check_convention(convention, name="self_attention_relation_kl")
    per_token, mask = _relation_kl(
        "self_attention_relation_kl", s_vecs, s_vecs, t_vecs, t_vecs,
        mask=mask, num_relation_heads=num_relation_heads, causal=causal,
    )
    return _reduce_relation(per_token, mask, reduction, convention)


_VEC_NAMES = {"q": "query", "k": "key", "v": "value"}


def minilm_loss(
    s_qkv: Mapping[str, Tensor],
    t_qkv: Mapping[str, Tensor],
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_relation_heads: int,
    relations: Sequence[str] = ("qq", "kk", "vv"),
    causal: bool = False,
    convention: str = "kdforge",
) -> Tensor:
    """MiniLM v2 (Wang et al., 2021): sum of self-attention relation KLs.

    ``s_qkv`` / ``t_qkv`` map ``"q"``, ``"k"``, ``"v"`` to one layer's query /
    key / value vectors ``[B, T, D]`` (before head split; student and teacher
    widths may differ). ``relations`` are two-letter names: the paper's default
    is Q-Q, K-K, V-V; cross relations such as ``"qk"`` (softmax(Q K^T)) work too.
    Each relation is :func:`self_attention_relation_kl`'s KL; the result is
    their (unweighted) sum, as in the paper.

    Conventions (keyword ``convention``):

    * ``"kdforge"`` (default): the usual token reduction -- every valid query
      token of the batch weighs the same;
    * ``"authors"``: the MiniLMv2 paper's relation loss
      ``L_ij = 1/(A_r |x|) sum_a sum_t KL(R^T || R^S)`` per sequence: the mean over its
      valid query tokens (``|x|`` = its own length) and relation heads, then
      ``"mean"`` averages the sequences (``"sum"`` adds them; ``"none"`` is the
      per-token ``[B, T]`` as for kdforge). Microsoft released no MiniLMv2
      distillation code (microsoft/unilm/minilm has models and fine-tuning
      only), so this follows the paper's formula.

    Factor: identical without padding or when all sequences have the same
    number n_b of valid tokens (factor 1); otherwise, with L_b the per-sequence
    loss, ``kdforge = sum_b n_b L_b / sum_b n_b`` and ``authors = mean_b L_b``
    (long sequences weigh more in kdforge's).

    Raises ``ValueError`` for an empty or malformed ``relations``, a missing
    q/k/v entry, and the shape/mask/reduction/convention errors of
    :func:`self_attention_relation_kl`.
    """
    _check_reduction(reduction, name="minilm_loss")
    _check_convention(convention, name="minilm_loss")
    if len(relations) == 0:
        raise ValueError("minilm_loss: relations is empty; use e.g. ('qq', 'kk', 'vv')")
    total = None
    for rel in relations:
        if len(rel) != 2 or any(c not in _VEC_NAMES for c in rel):
            raise ValueError(f"minilm_loss: relation {rel!r} must be two letters from 'q', 'k', 'v' (e.g. 'qq')")
        for c in rel:
            for side, d in (("student", s_qkv), ("teacher", t_qkv)):
                if c not in d:
                    raise ValueError(
                        f"minilm_loss: relation {rel!r} needs the {side}'s {_VEC_NAMES[c]} vectors under key {c!r}; "
                        f"got keys {sorted(d)}"
                    )
        a, b = rel
        per_token, m = _relation_kl(
            "minilm_loss", s_qkv[a], s_qkv[b], t_qkv[a], t_qkv[b],
            mask=mask, num_relation_heads=num_relation_heads, causal=causal,
        )
        term = _reduce_relation(per_token, m, reduction, convention)
        total = term if total is None else total + term
    return total


def minilm_relation_kl(
    s_states: Tensor | Mapping[str, Tensor],
    t_states: Tensor | Mapping[str, Tensor],
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_relation_heads: int,
    relations: Sequence[str] = ("qq", "kk", "vv"),
    causal: bool = False,
    convention: str = "kdforge",
) -> Tensor:
    """MiniLM v2 relation KL for either one vector type or a ``{"q","k","v"}`` dict.

    Tensors ``[B, T, D]`` go to :func:`self_attention_relation_kl`, dicts to
    :func:`minilm_loss` (see there for ``convention`` and the errors raised);
    anything else raises ``TypeError``.
    """
    if isinstance(s_states, Mapping) and isinstance(t_states, Mapping):
        return minilm_loss(
            s_states, t_states, mask=mask, reduction=reduction,
            num_relation_heads=num_relation_heads, relations=relations, causal=causal, convention=convention,
        )
    if isinstance(s_states, Tensor) and isinstance(t_states, Tensor):
        return self_attention_relation_kl(
            s_states, t_states, mask=mask, reduction=reduction,
            num_relation_heads=num_relation_heads, causal=causal, convention=convention,
        )
    raise TypeError("minilm_relation_kl: pass two tensors [B, T, D] or two dicts of 'q'/'k'/'v' tensors")


def minilm_v1_loss(
    s_probs: Tensor,
    t_probs: Tensor,
    s_values: Tensor,
    t_values: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_heads: int | None = None,
    causal: bool = False,
    eps: float = 1e-12,
) -> Tensor:
    """MiniLM v1 (Wang et al., 2020): attention-distribution KL + value-relation KL.

    ``s_probs`` / ``t_probs``: last-layer attention probabilities ``[B, H, T, T]``
    (head counts must match). ``s_values`` / ``t_values``: value vectors
    ``[B, T, D]`` split into ``num_heads`` heads (default ``H``) for the value
    relation ``softmax(V V^T / sqrt(d_k))``. Both terms are KL(teacher ||
    student) averaged over heads and valid query tokens; the result is their
    sum. Student probabilities are clamped at ``eps`` before the log.
    """
    _check_reduction(reduction, name="minilm_v1_loss")
    _check_attention_pair("minilm_v1_loss", s_probs, t_probs)
    b, h, t, _ = s_probs.shape
    mask = _check_mask("minilm_v1_loss", mask, torch.Size((b, t)))
    keep = _key_mask(mask, t, causal=causal, device=s_probs.device)

    sp = s_probs.float()
    tp = t_probs.detach().float()
    if keep is not None:
        sp = sp.masked_fill(~keep, 0.0)
        tp = tp.masked_fill(~keep, 0.0)
    # xlogy-style: teacher zeros contribute 0; student zeros are clamped.
    att_kl = (torch.xlogy(tp, tp) - tp * sp.clamp_min(eps).log()).sum(dim=-1).mean(dim=1)

    vr_kl, _ = _relation_kl(
        "minilm_v1_loss", s_values, s_values, t_values, t_values,
        mask=mask, num_relation_heads=h if num_heads is None else num_heads, causal=causal,
    )
    return _reduce_tokens(att_kl, mask, reduction) + _reduce_tokens(vr_kl, mask, reduction)


# --------------------------------------------------------------------------- AT


def _at_map(x: Tensor, p: float) -> Tensor:
    """Spatial attention map ``mean_c |A|^p`` -> ``[B, 1, H, W]`` (not yet normalised)."""
    return x.float().abs().pow(p).mean(dim=1, keepdim=True)


def attention_transfer(
    s_map: Tensor,
    t_map: Tensor,
    *,
    reduction: str = "mean",
    p: float = 2.0,
    resize: bool = False,
    convention: str = "kdforge",
    squared: bool = False,
    eps: float = 1e-12,
) -> Tensor:
    """Activation-based attention transfer (Zagoruyko & Komodakis, ICLR 2017).

    For feature maps ``[B, C, H, W]`` (channel counts may differ -- no projector
    needed): ``a = normalize(flatten(mean_c |A|^p))``, one vector of ``H * W``
    positions per sample. Reduced over the batch ("none" -> ``[B]``).

    Conventions (keyword ``convention``):

    * ``"kdforge"`` (default): the paper's ``||a_s - a_t||_2`` per sample (the
      norm, not squared); the paper's ``beta/2`` weight is the caller's;
    * ``"authors"``: the authors' code (szagoruyko/attention-transfer,
      ``at_loss = (at(x) - at(y)).pow(2).mean()`` with
      ``at(x) = F.normalize(x.pow(2).mean(1).view(B, -1))``): the mean over
      positions of ``(a_s - a_t)^2`` per sample (then the batch mean, as their
      ``.mean()``). Their beta = 1000 belongs to this form.
      ``squared=True`` is the older spelling of the same choice.

    Factor: not constant -- per sample ``authors = kdforge^2 / (H * W)``
    (teacher's ``H * W``), so beta = 1000 cannot be rescaled onto the default;
    use ``convention="authors"`` to reuse it.

    Spatial sizes must match unless ``resize=True``, which bilinearly resizes
    the student's (single-channel) attention map to the teacher's size.

    Raises ``ValueError`` for inputs that are not ``[B, C, H, W]``, differing
    batch sizes, differing spatial sizes without ``resize``, a bad reduction
    or convention.
    """
    _check_reduction(reduction, name="attention_transfer")
    _check_convention(convention, name="attention_transfer")
    if s_map.dim() != 4 or t_map.dim() != 4:
        raise ValueError(f"attention_transfer: expected feature maps [B, C, H, W], got {tuple(s_map.shape)} and {tuple(t_map.shape)}")
    if s_map.shape[0] != t_map.shape[0]:
        raise ValueError(f"attention_transfer: batch sizes differ: {tuple(s_map.shape)} vs {tuple(t_map.shape)}")
    a_s = _at_map(s_map, p)
    a_t = _at_map(t_map.detach(), p)
    if a_s.shape[-2:] != a_t.shape[-2:]:
        if not resize:
            raise ValueError(
                f"attention_transfer: spatial sizes differ, student {tuple(s_map.shape[-2:])} vs teacher "
                f"{tuple(t_map.shape[-2:])}; pass resize=True to interpolate the student's attention map"
            )
        a_s = F.interpolate(a_s, size=a_t.shape[-2:], mode="bilinear", align_corners=False)
    a_s = F.normalize(a_s.flatten(1), dim=1, eps=eps)
    a_t = F.normalize(a_t.flatten(1), dim=1, eps=eps)
    diff = a_s - a_t
    authors = squared or convention == "authors"
    per_sample = diff.pow(2).mean(dim=1) if authors else diff.norm(dim=1)
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def minilm_v1_dict_loss(
    student: dict[str, Tensor],
    teacher: dict[str, Tensor],
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_heads: int | None = None,
    causal: bool = False,
) -> Tensor:
    """:func:`minilm_v1_loss` for recipe terms, whose taps arrive as dicts ``{"probs": ..., "values": ...}``."""
    return minilm_v1_loss(student["probs"], teacher["probs"], student["values"], teacher["values"], mask=mask,
                          reduction=reduction, num_heads=num_heads, causal=causal)
