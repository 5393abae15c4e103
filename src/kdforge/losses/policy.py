"""MiniLLM's reverse-KL policy gradient (Gu, Dong, Wei, Huang, "MiniLLM: Knowledge Distillation of Large Language
Models", ICLR 2024; the authors' code: microsoft/LMOps, minillm/minillm/{losses,sampler,reward}.py).

MiniLLM minimises the sequence-level reverse KL, KL(q_θ(y|x) ‖ p(y|x)), over responses y the student q_θ samples. Its
gradient is a policy gradient whose per-token reward is r_t = log p(y_t | y_<t, x) - log q_θ(y_t | y_<t, x). The
paper splits it (its Eq. 5, the *single-step decomposition*) into

* a single-step part, Σ_t ∇ KL(q_θ(·|y_<t, x) ‖ p(·|y_<t, x)), computed exactly over the vocabulary (no sampling
  noise: it is the term that dominates the variance otherwise), and
* a long-term part, -Σ_t R_{t+1} ∇ log q_θ(y_t | y_<t, x), the REINFORCE estimate with the return of the *future*
  rewards R_{t+1} = Σ_{t' > t} γ^{t'-t-1} r_{t'};

with *length normalisation* (Eq. 7: R_{t+1} divided by the number of tokens it sums, so long responses are not
favoured) and *teacher-mixed sampling* (Eq. 6: responses are drawn from p̃ = α·p + (1-α)·q_θ, α = 0.2, and each
token's term is re-weighted by the per-token importance weight w_t = q_θ(y_t) / p̃(y_t)).

The function here is a pure logit loss: it takes the student's and the teacher's logits on a batch whose response
tokens were *sampled* (kdforge.onpolicy, ``onpolicy: {lambda: 1, teacher_mix: 0.2}``), the sampled tokens as
``labels`` and the response mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .logits import kl_divergence

__all__ = ["minillm_policy"]


def _returns(rewards: torch.Tensor, valid: torch.Tensor, gamma: float, include_current: bool):
    """(discounted returns, number of tokens each sums) [B, L], summed right to left over valid positions."""
    ret = torch.zeros_like(rewards)
    count = torch.zeros_like(rewards)
    running = rewards.new_zeros(rewards.shape[0])
    n = rewards.new_zeros(rewards.shape[0])
    v = valid.to(rewards.dtype)
    for t in range(rewards.shape[1] - 1, -1, -1):
        if include_current:
            running = rewards[:, t] * v[:, t] + gamma * running
            n = n + v[:, t]
            ret[:, t], count[:, t] = running, n
        else:
            ret[:, t], count[:, t] = running, n
            running = rewards[:, t] * v[:, t] + gamma * running
            n = n + v[:, t]
    return ret, count


def minillm_policy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    alpha: float = 0.2,
    gamma: float = 0.95,
    length_norm: bool = True,
    whiten: bool = True,
    reward_scaling: float = 0.5,
    reward_clip: float = 100.0,
    single_step: bool = True,
    long_term_from: str = "next",
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """MiniLLM's loss on sampled responses: per token, ``-A_t · w_t · ρ_t + KL(q_t ‖ p_t)``.

    Shapes: ``student_logits`` / ``teacher_logits`` [B, L, V] (position t predicts token t+1, as kdforge's Distiller
    hands them over), ``labels`` [B, L] the sampled next tokens, ``mask`` [B, L] bool, true on response tokens (the
    positions whose next token the student sampled). Returns the mean over masked positions (``reduction="mean"``),
    their sum (``"sum"``) or the per-position values [B, L] (``"none"``, 0 where masked out).

    Per valid position t, with q = softmax(student / T), p = softmax(teacher / T):

    * reward r_t = clip((log p(y_t) - log q(y_t)) / reward_scaling, ±reward_clip), no gradient;
    * long-term return: ``long_term_from="next"`` (the paper's Eq. 5) R = Σ_{t'>t} γ^{t'-t-1} r_{t'}; ``"current"``
      (the authors' code, ``_get_advantages_and_returns``) R = Σ_{t'≥t} γ^{t'-t} r_{t'}; divided by the number of
      tokens summed (``length_norm``, Eq. 7; 0 when none); then whitened (``whiten``: zero mean, unit variance over
      the batch's valid positions) into the advantage A_t;
    * importance weight w_t = q(y_t) / (α·p(y_t) + (1-α)·q(y_t)) for teacher-mixed sampling (α = 0: w = 1), no
      gradient;
    * ρ_t = exp(log q(y_t) - sg(log q(y_t))), value 1 and gradient ∇ log q(y_t): the PPO ratio of the first update
      on fresh samples;
    * the single-step term KL(q_t ‖ p_t) = Σ_v q_v (log q_v - log p_v) over the vocabulary (``single_step``).

    Authors' defaults (minillm/arguments.py and scripts/gpt2/minillm/train_*.sh of microsoft/LMOps): teacher-mixed
    α 0.2, γ 0.95, length normalisation and single-step regularisation on, reward scaling 0.5, reward clip 100,
    whitened advantages, temperature 1. Deliberate departures: one update per sampled batch (the authors run 4 PPO
    epochs over a rollout store, whose clipped ratio is then active); the return starts at t+1 as in the paper
    (``long_term_from="current"`` gives the code's); whitening counts only valid positions (the code also counts the
    padding's zeros); no pre-training LM term (add another objective term for it).

    Raises ValueError (one line) for α outside [0, 1), a non-positive temperature / reward scaling / clip, γ outside
    [0, 1], an unknown ``long_term_from`` or reduction, or shapes that disagree.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1) (the teacher's share of the sampling mixture), got {alpha}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if temperature <= 0 or reward_scaling <= 0 or reward_clip <= 0:
        raise ValueError("temperature, reward_scaling and reward_clip must be positive")
    if long_term_from not in ("next", "current"):
        raise ValueError(f"long_term_from must be 'next' (the paper) or 'current' (the authors' code), got "
                         f"{long_term_from!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    if not isinstance(teacher_logits, torch.Tensor) or teacher_logits.shape != student_logits.shape:
        raise ValueError("minillm_policy needs the teacher's dense logits of the student's shape "
                         f"{tuple(student_logits.shape)} (a live teacher)")
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[:2]:
        raise ValueError(f"minillm_policy takes logits [B, L, V] and labels [B, L]; got {tuple(student_logits.shape)} "
                         f"and {tuple(labels.shape)}")
    valid = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()
    ls = F.log_softmax(student_logits.float() / temperature, dim=-1)
    lt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    ids = labels.long().clamp(0, ls.shape[-1] - 1).unsqueeze(-1)
    log_q = ls.gather(-1, ids).squeeze(-1)
    with torch.no_grad():
        log_p = lt.gather(-1, ids).squeeze(-1)
        lq = log_q.detach()
        rewards = ((log_p - lq) / reward_scaling).clamp(-reward_clip, reward_clip) * valid
        ret, count = _returns(rewards, valid, gamma, include_current=long_term_from == "current")
        adv = ret / count.clamp_min(1.0) if length_norm else ret
        n = int(valid.sum())
        if whiten and n > 1:
            var, mean = torch.var_mean(adv[valid])
            adv = (adv - mean) * torch.rsqrt(var + 1e-8)
        if alpha > 0:
            log_mix = torch.logaddexp(torch.log(torch.tensor(alpha)) + log_p, torch.log(torch.tensor(1 - alpha)) + lq)
            w = torch.exp(lq - log_mix)
        else:
            w = torch.ones_like(lq)
        adv, w = adv * valid, w * valid
    per_position = -adv * w * torch.exp(log_q - log_q.detach())
    if single_step:
        per_position = per_position + kl_divergence(ls, lt)
    per_position = torch.where(valid, per_position, torch.zeros_like(per_position))
    if reduction == "none":
        return per_position
    if reduction == "sum":
        return per_position.sum()
    return per_position.sum() / valid.sum().clamp_min(1)


# its return at a token sums the rewards of the later tokens, so it cannot be computed a chunk of rows at a time:
# train.logit_chunk_size auto leaves an objective with it unchunked (kdforge.distiller)
minillm_policy.whole_sequences = True
