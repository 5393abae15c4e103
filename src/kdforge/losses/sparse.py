"""Putting student and teacher distributions on a common support.

Every logit loss compares two log-probability tensors over the same outcomes.
With a dense teacher that support is the vocabulary. With a cached top-k teacher
(:class:`SparseLogits`) the teacher's tail is unknown, and ``missing_mass``
decides what to do with it:

``"bucket"`` (default)
    Support = the k cached ids plus one "everything else" outcome. Teacher
    top-k log-probs are ``logits / T - logsumexp`` (exact, so the cached
    logsumexp must have been taken at the loss temperature); the teacher bucket
    is ``log(1 - sum(top-k probs))``, clamped at zero mass. The student's
    bucket is the logsumexp of its own non-top-k log-probs (no ``1 - x``
    cancellation). Both sides are the exact coarsening of the full
    distributions, so any divergence computed here is <= the dense one
    (data-processing inequality). With k >= V there is no tail: the bucket is
    dropped.
``"renormalize"``
    Support = the k ids only; both sides are softmaxes over those k ids. Needs
    no logsumexp, but ignores how much mass lies outside the top-k.
``"uniform"``
    Densify: the top-k keep their exact probabilities and the remaining mass
    is spread evenly over the other V - k ids. Support = the vocabulary. The
    invented tail puts mass on every id, so a student that rules an id out
    (-inf logit) gets an infinite forward KL; prefer "bucket" then.

``ids`` must be distinct and lie in ``[0, V)`` at every position that counts.

``standardize=True`` (Sun et al., CVPR 2024) z-scores each logit vector before
the temperature; it needs the full teacher vector, so it refuses a sparse one.
Everything is computed in at least float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MISSING_MASS_POLICIES = ("bucket", "renormalize", "uniform")

_NEG_INF = float("-inf")


@dataclass
class SparseLogits:
    """A top-k teacher, typically read from an offline cache.

    ``logsumexp`` is the logsumexp of the FULL teacher logit vector divided by
    ``lse_temperature``; it is what turns the k raw logits into exact
    probabilities (needed by the "bucket" and "uniform" policies).
    """

    ids: torch.Tensor
    logits: torch.Tensor
    logsumexp: torch.Tensor | None = None
    lse_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.ids.shape != self.logits.shape:
            raise ValueError(
                f"SparseLogits.ids {tuple(self.ids.shape)} and .logits {tuple(self.logits.shape)} "
                "must have the same shape"
            )
        if self.logsumexp is not None and self.logsumexp.shape != self.ids.shape[:-1]:
            raise ValueError(
                f"SparseLogits.logsumexp must have shape {tuple(self.ids.shape[:-1])}, "
                f"got {tuple(self.logsumexp.shape)}"
            )

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    @classmethod
    def from_dense(cls, logits: torch.Tensor, k: int, *, lse_temperature: float = 1.0) -> "SparseLogits":
        """Keep the top-k of a dense teacher, with the logsumexp the exact policies need."""
        values, ids = logits.topk(min(k, logits.shape[-1]), dim=-1)
        lse = torch.logsumexp(logits.to(compute_dtype(logits)) / lse_temperature, dim=-1)
        return cls(ids=ids, logits=values, logsumexp=lse, lse_temperature=lse_temperature)


@dataclass
class SampledLogits:
    """A teacher given as N token ids drawn per position from its distribution at ``temperature``, read from a
    sampled offline cache (Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs",
    ACL 2025: unlike the top-k of a distribution, samples of it give unbiased estimates).

    ``ids`` ``[..., N]`` int64 (with repeats: an id drawn c times appears c times; the empirical distribution
    p̂ = counts / N has E[p̂] = p_T); ``entropy`` ``[...]`` the teacher's entropy H(p_T) in nats, so that the
    forward KL's value, not only its gradient, is estimated without bias.

    Only :func:`sampled_forward_kl` has an estimator for it: forward KL is linear in p (KL(p‖q) = -H(p) - Σ p·log q),
    so replacing p by p̂ is unbiased for its value and its gradient. Reverse KL, JSD, total variation, DKD, CAKD and
    logit standardisation need p at ids that were not drawn (or nonlinearly) and have none: they refuse it.
    """

    ids: torch.Tensor
    entropy: torch.Tensor
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.entropy.shape != self.ids.shape[:-1]:
            raise ValueError(f"SampledLogits.entropy must have shape {tuple(self.ids.shape[:-1])}, "
                             f"got {tuple(self.entropy.shape)}")

    @property
    def n_samples(self) -> int:
        return self.ids.shape[-1]

    def select(self, index) -> "SampledLogits":
        """The same teacher at ``tensor[index]`` of every per-position tensor (e.g. ``(slice(None), slice(0, -1))``
        or row indices of flattened positions)."""
        return SampledLogits(ids=self.ids[index], entropy=self.entropy[index], temperature=self.temperature)

    def flatten(self) -> "SampledLogits":
        """Positions flattened to rows: ids ``[M, N]``, entropy ``[M]``."""
        return SampledLogits(ids=self.ids.reshape(-1, self.n_samples), entropy=self.entropy.reshape(-1),
                             temperature=self.temperature)

    def as_hybrid(self) -> "HybridLogits":
        """The same estimator as a hybrid teacher with an empty head (K = 0, tail mass 1): the draws are the tail's,
        so one forward-KL path serves both caches."""
        lead = self.ids.shape[:-1]
        return HybridLogits(ids=self.ids.new_zeros((*lead, 0)),
                            log_probs=self.entropy.new_zeros((*lead, 0)),
                            tail_log_mass=torch.zeros_like(self.entropy), tail_ids=self.ids, entropy=self.entropy,
                            temperature=self.temperature)


@dataclass
class HybridLogits:
    """A teacher given as its exact top-K head plus N draws from its tail, read from a hybrid offline cache
    (``kdforge cache-teacher --mode hybrid --top-k K --samples N``).

    Per position, at the cache ``temperature`` T: ``ids`` ``[..., K]`` int64, the teacher's K most probable ids;
    ``log_probs`` ``[..., K]`` their log-probabilities log p_T (nats; summing in probability to 1 - tail mass);
    ``tail_log_mass`` ``[...]`` the log of the exact mass m outside the head (-inf when the head holds everything);
    ``tail_ids`` ``[..., N]`` int64, N ids drawn from the TAIL distribution p_T restricted to the ids outside the
    head and renormalised (with repeats); ``entropy`` ``[...]`` H(p_T) of the whole distribution, in nats.

    Forward KL is linear in p, KL(p‖q) = -H(p) - Σ_i p_i·log q_i, and the hybrid replaces p by
    p̂ = p on the head + m·counts/N on the tail, so the estimate

        -H(p) - Σ_head p_i·log q_i - m·(1/N)·Σ_j log q(tail_ids_j)

    is unbiased in value and in gradient (the head term is exact; the tail term is a Monte-Carlo estimate of
    Σ_tail p_i·log q_i, and E[counts_i/N] = p_i/m for the tail draws). Its variance is the sampled estimator's
    restricted to the tail and scaled by m², so it is never larger than drawing all N ids from p_T and is zero when
    the head holds all the mass. Sampling the teacher for KD is Anshumann et al., "Sparse Logit Sampling:
    Accelerating Knowledge Distillation in LLMs", ACL 2025 (:class:`SampledLogits`); the exact head plus sampled
    tail is kdforge's combination of that with the top-k cache. K = 0 (m = 1) is the sampled estimator; m = 0 is
    the exact top-K forward KL. Only :func:`hybrid_forward_kl_rows` (forward KL) has an estimator; every other
    logit loss refuses it.
    """

    ids: torch.Tensor
    log_probs: torch.Tensor
    tail_log_mass: torch.Tensor
    tail_ids: torch.Tensor
    entropy: torch.Tensor
    temperature: float = 1.0

    def __post_init__(self) -> None:
        lead = tuple(self.ids.shape[:-1])
        if self.log_probs.shape != self.ids.shape:
            raise ValueError(f"HybridLogits.log_probs {tuple(self.log_probs.shape)} and .ids "
                             f"{tuple(self.ids.shape)} must have the same shape")
        for name in ("tail_log_mass", "entropy"):
            if tuple(getattr(self, name).shape) != lead:
                raise ValueError(f"HybridLogits.{name} must have shape {lead}, got {tuple(getattr(self, name).shape)}")
        if tuple(self.tail_ids.shape[:-1]) != lead:
            raise ValueError(f"HybridLogits.tail_ids {tuple(self.tail_ids.shape)} must have the leading shape {lead}")

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    @property
    def n_samples(self) -> int:
        return self.tail_ids.shape[-1]

    def select(self, index) -> "HybridLogits":
        """The same teacher at ``tensor[index]`` of every per-position tensor (as :meth:`SampledLogits.select`)."""
        return HybridLogits(ids=self.ids[index], log_probs=self.log_probs[index],
                            tail_log_mass=self.tail_log_mass[index], tail_ids=self.tail_ids[index],
                            entropy=self.entropy[index], temperature=self.temperature)

    def flatten(self) -> "HybridLogits":
        """Positions flattened to rows: ids and log_probs ``[M, K]``, tail_ids ``[M, N]``, the rest ``[M]``."""
        return HybridLogits(ids=self.ids.reshape(-1, self.k), log_probs=self.log_probs.reshape(-1, self.k),
                            tail_log_mass=self.tail_log_mass.reshape(-1),
                            tail_ids=self.tail_ids.reshape(-1, self.n_samples), entropy=self.entropy.reshape(-1),
                            temperature=self.temperature)

    def sanitized(self, valid: torch.Tensor) -> "HybridLogits":
        """Positions where ``valid`` ``[...]`` is False made harmless (ids 0, no head mass, no tail mass, entropy 0),
        so garbage there cannot reach a value or a gradient."""
        keep = valid.unsqueeze(-1)
        return HybridLogits(ids=torch.where(keep, self.ids.long(), 0),
                            log_probs=torch.where(keep, self.log_probs, _NEG_INF),
                            tail_log_mass=torch.where(valid, self.tail_log_mass, _NEG_INF),
                            tail_ids=torch.where(keep, self.tail_ids.long(), 0),
                            entropy=torch.where(valid, self.entropy, 0.0), temperature=self.temperature)


def hybrid_head_and_tail_weights(teacher: HybridLogits, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(p on the head ``[..., K]``, the weight m/N of each tail draw ``[...]``) in ``dtype``: p̂'s nonzero entries."""
    return teacher.log_probs.to(dtype).exp(), teacher.tail_log_mass.to(dtype).exp() / max(teacher.n_samples, 1)


def hybrid_forward_kl_rows(log_q: torch.Tensor, teacher: HybridLogits) -> torch.Tensor:
    """Per-position unbiased estimate of KL(p_T ‖ q) from student log-probs ``log_q`` ``[..., V]`` at the teacher's
    temperature: ``-H(p_T) - Σ_head p_i·log q_i - m·(1/N)·Σ_j log q[tail_ids_j]``, shape ``[...]`` (not yet scaled by
    T²). A head id of probability 0, or a tail of mass 0, adds 0 even where log q is -inf."""
    p_head, w_tail = hybrid_head_and_tail_weights(teacher, log_q.dtype)
    head = log_q.gather(-1, teacher.ids.long())
    head = torch.where(p_head > 0, p_head * head, 0.0).sum(-1)
    tail = log_q.gather(-1, teacher.tail_ids.long()).sum(-1)
    tail = torch.where(w_tail > 0, w_tail * tail, 0.0)
    return -teacher.entropy.to(log_q.dtype) - head - tail


def no_hybrid_estimator(loss: str) -> ValueError:
    return ValueError(f"{loss} has no estimator for a hybrid teacher cache (top-k head plus sampled tail); "
                      "use forward_kl on it, or build a top-k cache (kdforge cache-teacher --mode top_k)")


def no_sampled_estimator(loss: str) -> ValueError:
    return ValueError(f"{loss} has no estimator for a sampled teacher cache (draws of the teacher's distribution); "
                      "use forward_kl on it, or build a top-k cache (kdforge cache-teacher --mode top_k)")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 if an input already is: bf16/fp16 losses are too lossy."""
    dtype = torch.float32
    for t in tensors:
        if t is not None and t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_policy(missing_mass: str) -> None:
    if missing_mass not in MISSING_MASS_POLICIES:
        raise ValueError(f"missing_mass must be one of {MISSING_MASS_POLICIES}, got {missing_mass!r}")


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each logit vector: (z - mean) / (std + eps), Sun et al. (CVPR 2024).

    Uses the unbiased std like the authors' reference. Statistics are taken over
    the finite entries only, so a vocabulary slot masked with -inf stays -inf
    instead of turning the whole row into NaN.
    """
    finite = torch.isfinite(logits)
    x = torch.where(finite, logits, torch.zeros_like(logits))
    n = finite.sum(dim=-1, keepdim=True)
    mean = x.sum(dim=-1, keepdim=True) / n.clamp_min(1)
    dev = torch.where(finite, x - mean, torch.zeros_like(x))
    var = dev.pow(2).sum(dim=-1, keepdim=True) / (n - 1).clamp_min(1)
    # clamp keeps sqrt's gradient finite for constant rows (e.g. masked padding)
    std = var.clamp_min(1e-12).sqrt()
    return torch.where(finite, dev / (std + eps), logits)


def safe_logsumexp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """logsumexp that returns -inf for an all -inf row without a NaN gradient."""
    empty = torch.isneginf(x).all(dim=dim, keepdim=True)
    out = torch.logsumexp(torch.where(empty, torch.zeros_like(x), x), dim=dim, keepdim=True)
    return torch.where(empty, torch.full_like(out, _NEG_INF), out).squeeze(dim)


def safe_log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log_softmax that maps an all -inf row to all -inf (zero mass) instead of NaN."""
    empty = torch.isneginf(x).all(dim=dim, keepdim=True)
    out = F.log_softmax(torch.where(empty, torch.zeros_like(x), x), dim=dim)
    return torch.where(empty, torch.full_like(out, _NEG_INF), out)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near both ends; x > 0 (rounding) gives -inf."""
    x = x.clamp_max(0.0)
    near_zero = x > -math.log(2.0)
    a = torch.where(near_zero, x, torch.full_like(x, -1.0))
    b = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


def _exact_top_log_probs(teacher: SparseLogits, temperature: float, missing_mass: str, dtype) -> torch.Tensor:
    if teacher.logsumexp is None:
        raise ValueError(
            f'missing_mass="{missing_mass}" needs SparseLogits.logsumexp of the full teacher logits; '
            'cache it, or use missing_mass="renormalize"'
        )
    if not math.isclose(teacher.lse_temperature, temperature, rel_tol=1e-6):
        raise ValueError(
            f"SparseLogits.logsumexp was cached at temperature {teacher.lse_temperature} but the loss uses "
            f'{temperature}; cache the logsumexp at temperature {temperature} or use missing_mass="renormalize"'
        )
    return teacher.logits.to(dtype) / temperature - teacher.logsumexp.to(dtype).unsqueeze(-1)


def _check_sparse_shapes(student_logits: torch.Tensor, teacher: SparseLogits) -> None:
    if teacher.ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"SparseLogits leading shape {tuple(teacher.ids.shape[:-1])} does not match the student's "
            f"{tuple(student_logits.shape[:-1])}"
        )


def _densify(top_log_probs: torch.Tensor, ids: torch.Tensor, vocab_size: int, tail: str) -> torch.Tensor:
    k = ids.shape[-1]
    if tail == "uniform" and vocab_size > k:
        rest = log1mexp(torch.logsumexp(top_log_probs, dim=-1)) - math.log(vocab_size - k)
    else:
        rest = torch.full(top_log_probs.shape[:-1], _NEG_INF, dtype=top_log_probs.dtype, device=top_log_probs.device)
    dense = rest.unsqueeze(-1).expand(*rest.shape, vocab_size).clone()
    return dense.scatter(-1, ids, top_log_probs)


def densify_teacher(
    teacher: SparseLogits, vocab_size: int, *, temperature: float = 1.0, tail: str = "uniform"
) -> torch.Tensor:
    """Full-vocabulary teacher log-probs [..., V] from a top-k cache.

    ``tail="uniform"``: exact top-k probabilities, remaining mass spread evenly
    (needs ``logsumexp``). ``tail="zero"``: softmax over the k ids, zero elsewhere.
    """
    check_temperature(temperature)
    dtype = compute_dtype(teacher.logits)
    ids = teacher.ids.long()
    if tail == "uniform":
        top = _exact_top_log_probs(teacher, temperature, "uniform", dtype)
    elif tail == "zero":
        top = F.log_softmax(teacher.logits.to(dtype) / temperature, dim=-1)
    else:
        raise ValueError(f'tail must be "uniform" or "zero", got {tail!r}')
    return _densify(top, ids, vocab_size, tail)


def aligned_log_probs(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | SparseLogits,
    *,
    temperature: float = 1.0,
    standardize: bool = False,
    missing_mass: str = "bucket",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_p_student, log_p_teacher) at ``temperature`` over a common support.

    The last dimension is the support: V for a dense teacher or "uniform", k for
    "renormalize", k + 1 (bucket last) for "bucket" when k < V.
    """
    check_policy(missing_mass)
    check_temperature(temperature)
    dtype = compute_dtype(student_logits, teacher.logits if isinstance(teacher, SparseLogits) else teacher)
    s = student_logits.to(dtype)

    if not isinstance(teacher, SparseLogits):
        t = teacher.to(dtype)
        if t.shape != s.shape:
            raise ValueError(f"teacher logits {tuple(t.shape)} and student logits {tuple(s.shape)} differ in shape")
        if standardize:
            s, t = standardize_logits(s), standardize_logits(t)
        return F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1)

    if standardize:
        raise ValueError(
            "standardize=True needs the full teacher logits (z-scoring uses all V entries); "
            "pass dense teacher logits or set standardize=False"
        )
    _check_sparse_shapes(s, teacher)
    ids = teacher.ids.long()
    vocab_size, k = s.shape[-1], ids.shape[-1]

    if missing_mass == "renormalize":
        s_top = torch.gather(s / temperature, -1, ids)
        return F.log_softmax(s_top, dim=-1), F.log_softmax(teacher.logits.to(dtype) / temperature, dim=-1)

    t_top = _exact_top_log_probs(teacher, temperature, missing_mass, dtype)
    s_full = F.log_softmax(s / temperature, dim=-1)
    if missing_mass == "uniform":
        return s_full, _densify(t_top, ids, vocab_size, "uniform")

    s_top = torch.gather(s_full, -1, ids)
    if k >= vocab_size:  # the ids cover the vocabulary: there is no tail to bucket
        return s_top, t_top
    s_rest = safe_logsumexp(s_full.scatter(-1, ids, _NEG_INF))
    t_rest = log1mexp(torch.logsumexp(t_top, dim=-1))
    return torch.cat([s_top, s_rest.unsqueeze(-1)], dim=-1), torch.cat([t_top, t_rest.unsqueeze(-1)], dim=-1)


def full_vocab_log_probs(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | SparseLogits,
    *,
    temperature: float = 1.0,
    standardize: bool = False,
    missing_mass: str = "bucket",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`aligned_log_probs` but always over the whole vocabulary.

    For losses that need a per-class teacher probability everywhere (DKD's
    label may fall outside the cached top-k; CAKD's within-group KLs are
    per-class). A coarse bucket cannot give that, so a sparse teacher is
    densified: "bucket" and "uniform" spread the exact tail mass evenly,
    "renormalize" gives the tail zero mass.
    """
    check_policy(missing_mass)
    if not isinstance(teacher, SparseLogits) or missing_mass != "renormalize":
        policy = "uniform" if isinstance(teacher, SparseLogits) else missing_mass
        return aligned_log_probs(
            student_logits, teacher, temperature=temperature, standardize=standardize, missing_mass=policy
        )
    if standardize:  # same refusal as aligned_log_probs
        aligned_log_probs(student_logits, teacher, temperature=temperature, standardize=True)
    check_temperature(temperature)
    _check_sparse_shapes(student_logits, teacher)
    dtype = compute_dtype(student_logits, teacher.logits)
    s_full = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    t_top = F.log_softmax(teacher.logits.to(dtype) / temperature, dim=-1)
    return s_full, _densify(t_top, teacher.ids.long(), student_logits.shape[-1], "zero")
