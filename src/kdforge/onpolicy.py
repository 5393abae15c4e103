"""On-policy distillation: train on responses the student generates itself, scored by the teacher token by token.

Distilling only on fixed (ground-truth or teacher) responses trains the student on prefixes it would never produce
itself (exposure bias). Three methods replace some of a batch's responses by the student's own:

* **GKD** (Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes", ICLR
  2024; TRL's ``GKDTrainer``): with probability λ (``onpolicy.lambda``, TRL's ``lmbda``) a micro-batch's responses are
  sampled from the current student (from the batch's prompts, at ``onpolicy.temperature``, at most
  ``max_new_tokens``); otherwise the data's responses are kept (or, with ``seq_kd``, the teacher's own samples). Any
  objective term then runs on the batch, the teacher scoring the student's tokens; the default divergence of
  ``recipes/gkd.yaml`` is ``generalized_jsd`` with β (TRL's convention).
* **DistiLLM** (Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models", ICML 2024; the
  authors' ``finetune.py`` and ``distillm/buffer.py`` of jongwooko/distillm): ``onpolicy.adaptive`` replaces λ by a
  threshold θ that rises by 0.1 whenever the validation loss rises by loss_eps (``AdaptiveSchedule``), and keeps the
  student's responses in a first-in-first-out replay buffer of ``capacity`` responses that later batches are drawn
  from (``ReplayBuffer``); skew KL / skew reverse KL are the recipe's terms.
* **MiniLLM** (Gu et al., ICLR 2024; microsoft/LMOps minillm): λ = 1 and ``teacher_mix`` α: each token is drawn from
  α·p_teacher + (1-α)·q_student (``mixed_sample``), and the ``minillm_policy`` loss (kdforge.losses.policy) turns the
  teacher's scores into its policy gradient.

Prompts are the batch's own: a block of ``data.prompts`` is ``prompt + response`` right-padded with labels -100 on the
prompt, so the prompt is everything before the first label. A generated block is ``prompt + response (+ EOS when
the response ended there)`` right-padded to the same length, labels on the response only, so every term and the
token count see exactly the generated tokens.

Randomness: each coin flip, generation and replay draw is seeded by (``onpolicy.seed`` or the recipe's seed, step,
micro-batch, rank), never by a running generator, so a run resumed from a checkpoint makes the same choices and, with
the same weights, the same generations as an uninterrupted one; the global torch RNG is left untouched. What does
carry state (DistiLLM's θ, the loss it was raised at, the replay buffer, counters) is saved in each checkpoint's
trainer state (``OnPolicy.state_dict``).

Every generated id must be a teacher id: a student whose vocabulary exceeds the teacher's is refused before training.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import math
from collections import deque
from contextlib import nullcontext
from typing import Any, Callable

import torch

from .errors import KDForgeError
from .recipe import GenerateSpec, OnPolicySpec, Recipe

log = logging.getLogger("kdforge")

__all__ = ["OnPolicy", "AdaptiveSchedule", "ReplayBuffer", "mixed_sample", "prompts_of", "response_batch",
           "onpolicy_for", "derived_seed"]


def derived_seed(*parts: Any) -> int:
    """A 56-bit seed from any parts (the run's seed, a purpose, step, micro-batch, rank)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:7], "big")


def _uniform(seed: int) -> float:
    return float(torch.rand((), generator=torch.Generator().manual_seed(seed)))


# ---------------------------------------------------------------------------------------------------------------
# prompts in, generated blocks out


def prompts_of(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each row's prompt ids: the tokens before its first label (labels -100 mask the prompt), padding excluded.

    Shapes: ``input_ids``, ``labels``, ``attention_mask`` [B, T]. Raises KDForgeError for a batch without labels."""
    if "labels" not in batch:
        raise KDForgeError("on-policy KD needs prompt–response blocks (labels -100 on the prompt); set data.prompts")
    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.cpu()
    prompts = []
    for row, lab, m in zip(ids.tolist(), labels.tolist(), mask.tolist()):
        valid = sum(m)
        start = next((j for j, x in enumerate(lab) if x != -100), valid)
        prompts.append(row[:max(1, min(start, valid))])
    return prompts


def response_batch(batch: dict[str, torch.Tensor], prompts: list[list[int]], responses: list[list[int]],
                   pad: int) -> dict[str, torch.Tensor]:
    """``batch`` with its responses replaced: row i is ``prompts[i] + responses[i]`` cut at the batch's width T and
    right-padded with ``pad``; labels (-100 on prompt and padding) and attention_mask follow. Other keys
    (``block_index``) are kept. Tensors [B, T] on the batch's device."""
    ids = batch["input_ids"]
    width = ids.shape[1]
    new_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    labels = torch.full_like(new_ids, -100)
    mask = torch.zeros_like(new_ids)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = (list(p) + list(r))[:width]
        new_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, :len(seq)] = 1
        labels[i, len(p):len(seq)] = new_ids[i, len(p):len(seq)]
    out = dict(batch)
    out.update(input_ids=new_ids.to(ids.device), labels=labels.to(ids.device), attention_mask=mask.to(ids.device))
    return out


@torch.no_grad()
def mixed_sample(student, teacher, prompt_ids: list[list[int]], *, alpha: float, temperature: float,
                 max_new_tokens: int, eos: int | None, pad: int, seed: int, stop_at_eos: bool = True,
                 student_autocast: Callable = nullcontext, teacher_autocast: Callable = nullcontext
                 ) -> list[dict[str, Any]]:
    """MiniLLM's teacher-mixed sampling (its Eq. 6; ``teacher_mixed_sample`` in microsoft/LMOps minillm): each new
    token is drawn from ``alpha·softmax(teacher/T) + (1-alpha)·softmax(student/T)`` over the student's vocabulary
    (the teacher's first V_student logits), both models advancing with their KV caches on the left-padded prompts.

    Returns ``[{"ids": [...], "finish": "eos" | "length"}]`` per prompt (the EOS itself not in ``ids``). ``seed``
    seeds a private generator (the global RNG is not touched). alpha = 1 samples the teacher alone, 0 the student.
    """
    device = next(student.parameters()).device
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    position = (mask.cumsum(-1) - 1).clamp_min(0)
    generator = torch.Generator(device=device).manual_seed(seed)

    def advance(model, autocast, inputs, attention, positions, cache):
        # transformers >= 5.2x names the KV cache `cache` (before: past_key_values)
        key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with autocast():
            out = model(input_ids=inputs, attention_mask=attention, position_ids=positions, use_cache=True,
                        **({key: cache} if cache is not None else {}))
        new_cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        return out.logits[:, -1].float(), new_cache

    s_logits, s_cache = advance(student, student_autocast, ids, mask, position, None)
    t_logits, t_cache = advance(teacher, teacher_autocast, ids, mask, position, None)
    vocab = s_logits.shape[-1]
    log_a = math.log(alpha) if alpha > 0 else -math.inf
    log_b = math.log1p(-alpha) if alpha < 1 else -math.inf
    done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
    tokens, last = [], position[:, -1:]
    for _ in range(max_new_tokens):
        log_s = torch.log_softmax(s_logits / temperature, dim=-1)
        log_t = torch.log_softmax(t_logits[:, :vocab] / temperature, dim=-1)
        log_mix = torch.logaddexp(log_a + log_t, log_b + log_s)
        tok = torch.multinomial(log_mix.exp(), 1, generator=generator).squeeze(-1)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        tokens.append(tok)
        if stop_at_eos and eos is not None:
            done = done | (tok == eos)
        if bool(done.all()) or len(tokens) == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last = last + 1
        s_logits, s_cache = advance(student, student_autocast, tok[:, None], mask, last, s_cache)
        t_logits, t_cache = advance(teacher, teacher_autocast, tok[:, None], mask, last, t_cache)
    results = []
    for row in torch.stack(tokens, dim=1).tolist():
        finish = "length"
        if stop_at_eos and eos is not None and eos in row:
            row, finish = row[: row.index(eos)], "eos"
        results.append({"ids": row, "finish": finish})
    return results


# ---------------------------------------------------------------------------------------------------------------
# DistiLLM: the adaptive schedule and the replay buffer


class AdaptiveSchedule:
    """DistiLLM's adaptive student-generation probability (the authors' finetune.py).

    ``threshold`` θ starts at ``init_threshold``; ``observe(validation_loss)`` raises it by ``step`` (capped at 1)
    when the loss is at least ``loss_eps`` above ``reference`` (the first loss observed, then the loss at the last
    rise), and then moves ``reference`` to that loss; a falling or flat loss changes nothing. ``fresh_threshold``
    is the part of θ spent on fresh generations at a given step (``replay_ratio``)."""

    def __init__(self, init_threshold: float = 0.0, step: float = 0.1, loss_eps: float = 0.1,
                 replay_ratio: str = "decreasing"):
        self.threshold = float(init_threshold)
        self.step, self.loss_eps, self.replay_ratio = float(step), float(loss_eps), replay_ratio
        self.reference: float | None = None

    def observe(self, validation_loss: float) -> bool:
        """Take a validation loss (nats per token); True when θ rose."""
        if self.reference is None:
            self.reference = float(validation_loss)
            return False
        if validation_loss >= self.reference + self.loss_eps:
            self.threshold = min(1.0, self.threshold + self.step)
            self.reference = float(validation_loss)
            return True
        return False

    def fresh_threshold(self, step: int, steps: int) -> float:
        """θ·ratio: 1 - (step+1)/steps (decreasing), 0.5 (constant) or (step+1)/steps (increasing); step 0-based."""
        frac = min(1.0, (step + 1) / steps)
        ratio = {"decreasing": 1.0 - frac, "constant": 0.5, "increasing": frac}[self.replay_ratio]
        return self.threshold * ratio


class ReplayBuffer:
    """The student's responses as whole blocks (``input_ids``, ``attention_mask``, ``labels`` rows [T], on the CPU),
    at most ``capacity`` of them; the oldest is dropped first (DistiLLM's ``deque(maxlen=capacity)``)."""

    KEYS = ("input_ids", "attention_mask", "labels")

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.rows: deque[tuple[torch.Tensor, ...]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.rows)

    def push(self, batch: dict[str, torch.Tensor]) -> None:
        cols = [batch[k].detach().cpu() for k in self.KEYS]
        for i in range(cols[0].shape[0]):
            self.rows.append(tuple(c[i] for c in cols))

    def sample(self, n: int, seed: int, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``n`` rows drawn uniformly without replacement, as a batch on ``like``'s device (its other keys kept)."""
        if n > len(self.rows):
            raise KDForgeError(f"the replay buffer holds {len(self.rows)} responses, fewer than the {n} a batch needs; "
                               f"raise onpolicy.adaptive.capacity to at least train.batch_size")
        pick = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(seed))[:n].tolist()
        out = dict(like)
        device = like["input_ids"].device
        for j, key in enumerate(self.KEYS):
            out[key] = torch.stack([self.rows[i][j] for i in pick]).to(device)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.rows:
            return {}
        return {k: torch.stack([r[j] for r in self.rows]) for j, k in enumerate(self.KEYS)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.rows.clear()
        if state:
            for i in range(state["input_ids"].shape[0]):
                self.rows.append(tuple(state[k][i] for k in self.KEYS))


# ---------------------------------------------------------------------------------------------------------------
# the controller the training loop calls


class OnPolicy:
    """Replaces micro-batches by generated ones as ``onpolicy`` says; kdforge.train calls ``batches`` at the start of
    each step, ``after_step`` at its end and ``state_dict`` when it checkpoints.

    ``student`` / ``teacher``: the models (the student's train/eval mode is restored after generating);
    ``tokenizer``: the teacher's (EOS and padding ids); ``validation_loss``: a callable returning the student's
    held-out loss in nats per token (DistiLLM's schedule); ``bf16``: the student runs under bf16 autocast;
    ``teacher_autocast``: the teacher's precision context."""

    def __init__(self, spec: OnPolicySpec, *, seed: int, steps: int, student, teacher, tokenizer,
                 validation_loss: Callable[[], float] | None = None, bf16: bool = False,
                 teacher_autocast: Callable = nullcontext, teacher_bf16: bool = False):
        self.spec, self.steps = spec, steps
        self.seed = spec.seed if spec.seed is not None else seed
        self.student, self.teacher, self.tokenizer = student, teacher, tokenizer
        self.validation_loss = validation_loss
        self.bf16, self.teacher_autocast, self.teacher_bf16 = bf16, teacher_autocast, teacher_bf16
        eos = tokenizer.eos_token_id
        self.eos = eos if spec.stop_at_eos else None
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
        self.teacher_vocab = _vocab(teacher)
        student_vocab = _vocab(student)
        if student_vocab > self.teacher_vocab:
            raise KDForgeError(f"onpolicy: the student's vocabulary has {student_vocab} ids but the teacher's "
                               f"{self.teacher_vocab}, so a generated id could have no teacher probability; use a "
                               "student with the teacher's tokenizer and at most its vocabulary")
        self.adaptive = None
        self.buffer = None
        if spec.adaptive is not None:
            a = spec.adaptive
            self.adaptive = AdaptiveSchedule(a.init_threshold, a.step, a.loss_eps, a.replay_ratio)
            self.buffer = ReplayBuffer(a.capacity)
        self.counts = {"micro_batches": 0, "generated": 0, "replayed": 0, "teacher_generated": 0}
        self.last_validation_loss: float | None = None
        self._committed: dict[str, Any] | None = None

    # -- the three things the training loop calls

    def start(self, state: dict[str, Any] | None) -> None:
        """Resume from a checkpoint's ``state`` (``state_dict``), or begin: DistiLLM measures the validation loss
        before the first step (its reference)."""
        if state:
            self.load_state_dict(state)
        elif self.adaptive is not None:
            self._observe_validation()
        self.commit()

    def batches(self, micro: list[dict[str, torch.Tensor]], step: int, rank: int = 0) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of ``step`` after the on-policy choice; each is replaced or kept."""
        return [self._choose(mb, step, j, rank) for j, mb in enumerate(micro)]

    def after_step(self, done: int) -> dict[str, float]:
        """End of a step (``done`` steps finished): DistiLLM's validation loss when due; the step's state becomes
        what a checkpoint saves. Returns the figures to log (``onpolicy/...``)."""
        if self.adaptive is not None and done % self.spec.adaptive.eval_every == 0 and done < self.steps:
            self._observe_validation()
        self.commit()
        return self.log_fields()

    def log_fields(self) -> dict[str, float]:
        n = max(1, self.counts["micro_batches"])
        row = {"onpolicy/generated": self.counts["generated"] / n}
        if self.adaptive is not None:
            row.update({"onpolicy/replayed": self.counts["replayed"] / n, "onpolicy/threshold": self.adaptive.threshold})
            if self.last_validation_loss is not None:
                row["onpolicy/validation_loss"] = self.last_validation_loss
        if self.spec.seq_kd:
            row["onpolicy/teacher_generated"] = self.counts["teacher_generated"] / n
        return row

    # -- state

    def commit(self) -> None:
        self._committed = {
            "counts": dict(self.counts), "last_validation_loss": self.last_validation_loss,
            "threshold": None if self.adaptive is None else self.adaptive.threshold,
            "reference": None if self.adaptive is None else self.adaptive.reference,
            "buffer": None if self.buffer is None else list(self.buffer.rows)}

    def state_dict(self) -> dict[str, Any]:
        """The state at the end of the last finished step: counters, DistiLLM's θ and reference loss, the replay
        buffer (tensors [N, T]); plain values and tensors only (checkpoints load with weights_only)."""
        c = self._committed or {}
        state: dict[str, Any] = {"counts": dict(c.get("counts", self.counts)),
                                 "last_validation_loss": c.get("last_validation_loss")}
        if self.adaptive is not None:
            state["threshold"], state["reference"] = c.get("threshold"), c.get("reference")
            rows = c.get("buffer") or []
            state["buffer"] = ({k: torch.stack([r[j] for r in rows]) for j, k in enumerate(ReplayBuffer.KEYS)}
                               if rows else {})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts.update(state.get("counts", {}))
        self.last_validation_loss = state.get("last_validation_loss")
        if self.adaptive is not None:
            if state.get("threshold") is not None:
                self.adaptive.threshold = float(state["threshold"])
            self.adaptive.reference = state.get("reference")
            self.buffer.load_state_dict(state.get("buffer") or {})

    # -- internals

    def _observe_validation(self) -> None:
        if self.validation_loss is None:
            raise KDForgeError("onpolicy.adaptive needs held-out prompts for its validation loss; set data.validation")
        self.last_validation_loss = float(self.validation_loss())
        if self.adaptive.observe(self.last_validation_loss):
            log.info("DistiLLM: the validation loss rose to %.4f, so the student-generation threshold is now %.1f",
                     self.last_validation_loss, self.adaptive.threshold)

    def _choose(self, batch, step: int, j: int, rank: int):
        self.counts["micro_batches"] += 1
        r = _uniform(derived_seed(self.seed, "coin", step, j, rank))
        gen_seed = derived_seed(self.seed, "generate", step, j, rank)
        if self.adaptive is not None:
            theta = self.adaptive.threshold
            if r < self.adaptive.fresh_threshold(step, self.steps) or (r < theta and len(self.buffer) < self.buffer.capacity):
                out = self.generate(batch, gen_seed)
                self.buffer.push(out)
                self.counts["generated"] += 1
                return out
            if r < theta:
                self.counts["replayed"] += 1
                return self.buffer.sample(batch["input_ids"].shape[0], derived_seed(self.seed, "replay", step, j, rank),
                                          batch)
            return batch
        if r < self.spec.lmbda:
            self.counts["generated"] += 1
            return self.generate(batch, gen_seed)
        if self.spec.seq_kd:
            self.counts["teacher_generated"] += 1
            return self.generate(batch, gen_seed, by_teacher=True)
        return batch

    def generate(self, batch: dict[str, torch.Tensor], seed: int, by_teacher: bool = False) -> dict[str, torch.Tensor]:
        """``batch`` with its responses generated by the student (or the teacher, for seq_kd) from its prompts, at
        the spec's temperature / top_p / teacher_mix, each at most max_new_tokens and what the block leaves."""
        from .generate import generate_batch

        prompts = prompts_of(batch)
        width = batch["input_ids"].shape[1]
        room = width - min(len(p) for p in prompts)
        max_new = max(1, min(self.spec.max_new_tokens, room))
        model = self.teacher if by_teacher else self.student
        was_training = model.training
        model.eval()
        try:
            if self.spec.teacher_mix > 0 and not by_teacher:
                answers = mixed_sample(
                    self.student, self.teacher, prompts, alpha=self.spec.teacher_mix,
                    temperature=self.spec.temperature, max_new_tokens=max_new, eos=self.eos, pad=self.pad, seed=seed,
                    stop_at_eos=self.spec.stop_at_eos, teacher_autocast=self.teacher_autocast,
                    student_autocast=(lambda: torch.autocast(_device(model).type, dtype=torch.bfloat16))
                    if self.bf16 else nullcontext)
            else:
                gen = GenerateSpec(max_new_tokens=max_new, stop_at_eos=self.spec.stop_at_eos, do_sample=True,
                                   temperature=self.spec.temperature, top_p=self.spec.top_p)
                device = _device(model)
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    answers = generate_batch(model, self.tokenizer, prompts, gen, seed=seed,
                                             bf16=self.teacher_bf16 if by_teacher else self.bf16)
        finally:
            model.train(was_training)
        responses = []
        for p, a in zip(prompts, answers):
            ids = list(a["ids"]) + ([self.eos] if a["finish"] == "eos" and self.eos is not None else [])
            responses.append(ids[: width - len(p)])
        top = max((max(r) for r in responses if r), default=-1)
        if top >= self.teacher_vocab:
            raise KDForgeError(f"the student generated id {top}, beyond the teacher's vocabulary of "
                               f"{self.teacher_vocab}; use a student with the teacher's tokenizer")
        return response_batch(batch, prompts, responses, self.pad)


def _vocab(model) -> int:
    from .models import vocab_size

    return int(vocab_size(model))


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------------------------
# from a recipe


def check_objective(recipe: Recipe, logit_chunk_size) -> None:
    """Refuse, in one line each, what cannot work: minillm_policy off samples drawn as it assumes (onpolicy with
    lambda 1, no adaptive schedule or seq_kd, teacher_mix = its alpha, the same temperature) or chunked."""
    policy_terms = [t for t in recipe.objective if t.loss == "minillm_policy"]
    spec = recipe.onpolicy
    for term in policy_terms:
        params = term.params
        if spec is None or spec.lmbda < 1 or spec.adaptive is not None or spec.seq_kd:
            raise KDForgeError("minillm_policy is a policy gradient on responses the student sampled; set onpolicy: "
                               "{lambda: 1, teacher_mix: 0.2} (no adaptive, no seq_kd)")
        alpha = float(params.get("alpha", 0.2))
        if not math.isclose(alpha, spec.teacher_mix):
            raise KDForgeError(f"minillm_policy weights tokens for sampling with teacher_mix {alpha} but "
                               f"onpolicy.teacher_mix is {spec.teacher_mix}; set them equal")
        if not math.isclose(float(params.get("temperature", 1.0)), spec.temperature):
            raise KDForgeError("minillm_policy's temperature must be onpolicy.temperature (its importance weights "
                               "are those of the sampling distribution); set them equal")
        if logit_chunk_size is not None:
            raise KDForgeError("minillm_policy needs whole responses (returns over later tokens), not vocabulary "
                               "chunks of tokens; set train.logit_chunk_size: null")


def onpolicy_for(setup, state: dict[str, Any] | None = None) -> OnPolicy | None:
    """The controller of a Setup's recipe (kdforge.tasks.base.Setup), started (resumed from ``state``: a
    checkpoint's ``onpolicy`` entry), or None without ``onpolicy``. Raises KDForgeError for what the recipe cannot
    do (check_objective; a student vocabulary larger than the teacher's)."""
    recipe = setup.recipe
    distiller = setup.distiller
    check_objective(recipe, getattr(distiller, "logit_chunk_size", None))
    spec = recipe.onpolicy
    if spec is None:
        return None
    source = distiller.teacher_source
    teacher = getattr(source, "model", None)
    if teacher is None:
        raise KDForgeError("onpolicy scores the student's responses with a live teacher model; use teacher.kind: live "
                           "and a logit term in the objective")
    labels = [t.loss for t in recipe.objective if t.loss == "cross_entropy"]
    if labels and (spec.lmbda > 0 or spec.adaptive is not None):
        log.warning("onpolicy: cross_entropy on a student-generated batch trains the student on its own samples; "
                    "GKD and DistiLLM use only the distillation terms there")

    def validation_loss() -> float:
        value = math.log(setup.task.periodic_metrics(setup)["eval/perplexity"])
        setup.student.train()
        return value

    if spec.adaptive is not None and spec.adaptive.capacity < recipe.train.batch_size:
        raise KDForgeError(f"onpolicy.adaptive.capacity {spec.adaptive.capacity} is smaller than one batch "
                           f"({recipe.train.batch_size}); raise it")
    teacher_bf16 = getattr(source, "dtype", "float32") == "bfloat16"
    policy = OnPolicy(spec, seed=recipe.seed, steps=recipe.train.steps, student=setup.student, teacher=teacher,
                      tokenizer=setup.tokenizer, validation_loss=validation_loss, bf16=bool(recipe.train.bf16),
                      teacher_autocast=getattr(source, "autocast", nullcontext), teacher_bf16=teacher_bf16)
    policy.start(state)
    return policy
