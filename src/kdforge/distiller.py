"""Distiller: one training step's loss for a student against a teacher, as a sum of named, weighted terms.

`Distiller(teacher, student, objective)(batch)` returns `(total_loss, {term: detached value})`, so kdforge drops into
any training loop. Causal-LM convention: position t predicts token t+1, so logits and masks are shifted here once.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import nn

from .errors import KDForgeError
from .batches import model_inputs, output_logits, shifted_targets
from .feature_terms import FeatureTerm, gather, tap_specs
from .losses.registry import check_arguments, lookup
from .losses.sparse import HybridLogits, SampledLogits
from .models import plain_model, vocab_size
from .recipe import Term
from .teachers.live import LiveTeacher, TeacherOutput

log = logging.getLogger("kdforge")


@dataclass
class BoundTerm:
    term: Term
    kind: str  # "label" | "logit" | "feature" | "stepping_stone"
    fn: Callable
    kwargs: dict[str, Any]
    warmup_steps: int = 0
    feature: nn.Module | None = None  # the FeatureTerm of a feature term
    stones: nn.Module | None = None  # the SteppingStones (connectors) of a stepping-stone term


def bind_term(term: Term) -> BoundTerm:
    kind, fn = lookup(term.loss)
    kwargs = term.params
    warmup_steps = int(kwargs.pop("warmup_steps", 0))
    if warmup_steps and "warmup" not in kwargs:
        check_arguments(term.loss, fn, {"warmup": 1.0})
    check_arguments(term.loss, fn, kwargs)
    return BoundTerm(term, kind, fn, kwargs, warmup_steps)


class Distiller(nn.Module):
    """Student + teacher source + objective terms. Trainable extras (projectors) live in this module too."""

    def __init__(self, teacher, student: nn.Module, objective: list[Term | dict], *,
                 truncate_to_shared_vocab: bool = False, teacher_dtype: str = "float32", seq_len: int = 128,
                 example_batch: dict[str, torch.Tensor] | None = None,
                 logit_chunk_size: int | Literal["auto"] | None = None):
        """logit_chunk_size: compute the logit and label terms this many tokens at a time from the student's last
        hidden states and lm head (kdforge.losses.chunked); "auto": kdforge.recipe.auto_logit_chunk_size tokens for a
        causal LM whose logits are lm_head(last hidden state), silently unchunked (a debug log) for any other model;
        an explicit size refuses such a model (KDForgeError). None: unchunked."""
        super().__init__()
        self.student = student
        self.terms = [bind_term(t if isinstance(t, Term) else Term.model_validate(t)) for t in objective]
        labels = {b.term.label for b in self.terms}
        if len(labels) != len(self.terms):
            raise KDForgeError("two objective terms share a name; give each a distinct `name:`")
        needs_teacher = any(b.kind != "label" for b in self.terms)
        if teacher is None and needs_teacher:
            raise KDForgeError("the objective has distillation terms but no teacher; set `teacher:` in the recipe")
        if isinstance(teacher, nn.Module):
            teacher = LiveTeacher(teacher, teacher_dtype)
        self.teacher_source = teacher if needs_teacher else None
        self.shared_vocab: int | None = None
        teacher_model = getattr(self.teacher_source, "model", None)
        if teacher_model is not None and _has_vocabulary(teacher_model):  # not a classifier's head (no vocabulary)
            vt, vs = vocab_size(teacher_model), vocab_size(student)
            if vt != vs:
                if not truncate_to_shared_vocab:
                    raise KDForgeError(
                        f"teacher vocabulary has {vt} entries but the student's has {vs}; use a student with the "
                        "teacher's tokenizer, or set truncate_to_shared_vocab: true if they differ only by padding"
                    )
                self.shared_vocab = min(vt, vs)
        # a source whose __call__ takes `step` (a teacher curriculum) is told the training step
        self.teacher_takes_step = self.teacher_source is not None and "step" in _keyword_names(self.teacher_source)
        self.feature_terms = nn.ModuleDict()
        self.stepping_stones = nn.ModuleDict()
        self.student_taps = self.teacher_taps = None
        if any(b.kind in ("feature", "stepping_stone") for b in self.terms):
            self._bind_feature_terms(seq_len, example_batch)
        # logit/label terms from hidden states, chunk by chunk (kdforge.losses.chunked): no [tokens x V] logits
        self.logit_chunk_size = logit_chunk_size
        if logit_chunk_size == "auto":
            self.logit_chunk_size = self._auto_chunk_size(student)
        elif logit_chunk_size is not None:
            from .losses.chunked import check_head_of_hidden

            self.student_logit_transform = check_head_of_hidden(plain_model(student))  # soft-cap / scale, applied per chunk
        # a live teacher's logits made chunk by chunk too, from its last hidden states and head: no [B, T, V] logits
        self.teacher_head_chunked = self.logit_chunk_size is not None and self._teacher_head_chunks()

    def _auto_chunk_size(self, student: nn.Module) -> int | None:
        """auto_logit_chunk_size of the student's vocabulary when its logits can be chunked, else None (logged at
        debug level)."""
        from .losses.chunked import check_head_of_hidden
        from .recipe import auto_logit_chunk_size

        whole = [b.term.loss for b in self.terms if getattr(b.fn, "whole_sequences", False)]
        if whole:
            log.debug("logit_chunk_size auto: unchunked logit losses, %s needs whole sequences", whole[0])
            return None
        try:
            self.student_logit_transform = check_head_of_hidden(plain_model(student))
        except (KDForgeError, AttributeError, TypeError, ValueError, RuntimeError) as err:
            log.debug("logit_chunk_size auto: unchunked logit losses for %s (%s)", type(student).__name__, err)
            return None
        return auto_logit_chunk_size(vocab_size(plain_model(student)))

    def _teacher_head_chunks(self) -> bool:
        """Whether a live teacher can hand the chunked losses its hidden states and head instead of its logits: a plain
        LiveTeacher with nothing tapped (no feature or stepping-stone terms) whose logits are transform(head(h))."""
        from .losses.chunked import check_head_of_hidden

        source = self.teacher_source
        if type(source) is not LiveTeacher or self.teacher_taps is not None or self.stepping_stones:
            return False
        try:
            check_head_of_hidden(source.model)
        except (KDForgeError, AttributeError, TypeError, ValueError, RuntimeError) as err:
            log.debug("the teacher's logits are not chunked (%s): its [B, T, V] logits are made whole", err)
            return False
        return True

    def _bind_feature_terms(self, seq_len: int, example_batch: dict[str, torch.Tensor] | None) -> None:
        """Create taps on both models, then probe them once so projectors and connectors know their sizes."""
        from .taps import Taps
        from .teachers.stepping_stones import SteppingStones, student_block_tap

        features = [b for b in self.terms if b.kind == "feature"]
        stones = [b for b in self.terms if b.kind == "stepping_stone"]
        s_specs, t_specs = {}, {}
        for b in features:
            s, t = tap_specs(b.term)
            s_specs.update(s)
            t_specs.update(t)
        for b in stones:
            s_specs[f"{b.term.label}.s"] = student_block_tap(plain_model(self.student))  # every student block's output
        teacher_model = getattr(self.teacher_source, "model", None)
        if stones and teacher_model is None:
            raise KDForgeError("block_kd runs the teacher's blocks, so it needs a live teacher model")
        # module paths are those of the plain model, also under a LoRA adapter; the PeftModel's own paths (with its
        # `base_model.model.` prefix, as print(model) shows them) are accepted too
        if plain_model(self.student) is not self.student:
            s_specs = {k: v.removeprefix("base_model.model.") for k, v in s_specs.items()}
        self.student_taps = Taps(plain_model(self.student), s_specs)
        # a teacher without a model (an offline cache) is asked for its stored features by spec
        self.teacher_taps = Taps(teacher_model, t_specs) if teacher_model is not None else t_specs
        if example_batch is None:
            vocab = vocab_size(self.student)
            ids = torch.arange(2 * min(seq_len, 16)).remainder(vocab).view(2, -1)
            example_batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            s_store = self._student_forward(example_batch)[1]
            t_store = self.teacher_source(example_batch, self.teacher_taps).features
        for b in features:
            ft = FeatureTerm(b.term, b.fn, b.kwargs, gather(b.term, "s", s_store), gather(b.term, "t", t_store),
                             seq_len, getattr(self.student, "kdforge_teacher_layers", None))
            self.feature_terms[str(len(self.feature_terms))] = ft
            b.feature = ft
            mask = example_batch.get("attention_mask")
            ft(gather(b.term, "s", s_store), gather(b.term, "t", t_store),
               None if mask is None else mask.bool())  # fail now on shape errors, not at step 1
        for b in stones:
            b.stones = SteppingStones(b.term, b.fn, b.kwargs, plain_model(self.student), teacher_model,
                                      s_store[f"{b.term.label}.s"], example_batch,
                                      getattr(self.teacher_source, "autocast", nullcontext))
            self.stepping_stones[str(len(self.stepping_stones))] = b.stones

    def _student_forward(self, batch: dict[str, torch.Tensor], hidden_only: bool = False):
        """The student's output and tap store; hidden_only: its base model (last_hidden_state, no logits)."""
        args, kwargs = model_inputs(batch)
        model = plain_model(self.student).base_model if hidden_only else self.student
        if self.student_taps is None:
            return model(*args, **kwargs), {}
        with self.student_taps.capture() as store:
            out = model(*args, **kwargs, **self.student_taps.needs_hf_outputs())
        self.student_taps.collect_outputs(store, out)
        return out, store

    @property
    def _no_split_modules(self) -> set[str] | list[str] | None:
        """The student's block classes, so FSDP's transformer_based_wrap shards the student layer by layer."""
        return getattr(self.student, "_no_split_modules", None)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher_source is not None and hasattr(self.teacher_source, "model"):
            self.teacher_source.model.eval()
        return self

    def forward(self, batch: dict[str, torch.Tensor], *, num_tokens: float | None = None,
                step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and detached per-term values.

        num_tokens: the global count of valid target tokens in the whole optimizer step (all micro-batches, all
        ranks). Each term's mean over this micro-batch is scaled by local/global count, so accumulated gradients equal
        those of one big batch. None means this batch alone.
        """
        labels, mask = shifted_targets(batch)
        is_lm = "input_ids" in batch
        chunked = self.logit_chunk_size is not None and is_lm
        out, s_store = self._student_forward(batch, hidden_only=chunked)
        student_logits = None if chunked else output_logits(out)[:, :-1] if is_lm else output_logits(out)
        teacher: TeacherOutput | None = None
        if self.teacher_source is not None:
            step_kw = {"step": step} if self.teacher_takes_step else {}
            if chunked and self.teacher_head_chunked:
                step_kw["hidden_only"] = True
            teacher = self.teacher_source(batch, self.teacher_taps, **step_kw)
        n_local = mask.sum()
        scale = 1.0 if num_tokens is None else n_local.float() / num_tokens
        total = mask.new_zeros((), dtype=torch.float32)
        values: dict[str, torch.Tensor] = {}
        if chunked:  # every active logit/label term at once, from the hidden states
            chunk_total, chunk_values = self._chunked_logit_terms(out.last_hidden_state, labels, mask, teacher, step)
        token_mask = None
        if is_lm:
            # Feature terms count the positions that have a next-token target, the same positions as the logit
            # terms, so the local/global scaling above is exact for them too (padding uneven across micro-batches).
            token_mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
            token_mask[:, :-1] = mask
        elif batch.get("attention_mask") is not None:  # an encoder's padded texts: feature terms skip the padding
            token_mask = batch["attention_mask"].bool()
        for b in self.terms:
            if step < b.term.start_step or (b.term.end_step is not None and step >= b.term.end_step):
                continue
            if b.kind == "feature":
                value = b.feature(gather(b.term, "s", s_store), gather(b.term, "t", teacher.features), token_mask)
            elif b.kind == "stepping_stone":
                value = b.stones(s_store[f"{b.term.label}.s"], batch, teacher.logits, mask)
            elif chunked:
                values[b.term.label] = chunk_values[b.term.label]
                continue  # its gradient comes with chunk_total
            else:
                value = self._logit_term(b, student_logits, labels, mask, teacher, step)
            values[b.term.label] = value.detach()
            total = total + b.term.weight * value * scale
        if chunked:
            total = total + chunk_total * scale
        return total, values

    def _chunked_logit_terms(self, hidden, labels, mask, teacher: TeacherOutput | None, step: int):
        """(sum of weight · value, {term: detached value}) of the active logit and label terms, computed
        from hidden states [B, T, D] and the lm head. The last position is masked instead of sliced off, so no
        teacher tensor is copied."""
        from .losses.chunked import ChunkedTerm, HeadLogits, chunked_logit_terms

        active = [b for b in self.terms if b.kind in ("label", "logit")
                  and b.term.start_step <= step and (b.term.end_step is None or step < b.term.end_step)]
        if not active:
            return mask.new_zeros((), dtype=torch.float32), {}
        head = plain_model(self.student).get_output_embeddings()
        weight, bias = head.weight, head.bias
        t_logits = None if teacher is None else teacher.logits
        if self.shared_vocab is not None:
            weight, bias = weight[: self.shared_vocab], None if bias is None else bias[: self.shared_vocab]
            if isinstance(t_logits, torch.Tensor):
                t_logits = self._vocab(t_logits)
            elif isinstance(t_logits, HeadLogits):
                t_logits = t_logits.vocab(self.shared_vocab)
        terms = []
        for b in active:
            kwargs = dict(b.kwargs)
            if b.warmup_steps:
                kwargs["warmup"] = min(1.0, (step + 1) / b.warmup_steps)
            terms.append(ChunkedTerm(b.fn, b.term.weight, kwargs))
        pad = mask.new_zeros((mask.shape[0], 1))
        total, values = chunked_logit_terms(
            terms, hidden, weight, t_logits, bias=bias, mask=torch.cat([mask, pad], dim=1),
            labels=torch.cat([labels, pad.long()], dim=1), chunk_size=self.logit_chunk_size,
            logit_transform=self.student_logit_transform)
        return total, {b.term.label: values[i] for i, b in enumerate(active)}

    def _logit_term(self, b: BoundTerm, student_logits, labels, mask, teacher: TeacherOutput | None, step: int):
        if b.kind == "label":
            return b.fn(self._vocab(student_logits), labels, mask=mask, **b.kwargs)
        if b.kind == "logit":
            kwargs = dict(b.kwargs)
            if "labels" in _keyword_names(b.fn):
                kwargs["labels"] = labels
            if b.warmup_steps:
                kwargs["warmup"] = min(1.0, (step + 1) / b.warmup_steps)
            t_logits = teacher.logits
            if student_logits.dim() == 2:
                pass  # a classifier: one distribution per example, nothing to shift
            elif isinstance(t_logits, torch.Tensor):
                t_logits = self._vocab(t_logits[:, :-1])
            elif isinstance(t_logits, (SampledLogits, HybridLogits)):
                t_logits = t_logits.select((slice(None), slice(0, -1)))
            else:  # a top-k teacher: drop the last position like the dense logits
                t_logits = dataclasses.replace(
                    t_logits, ids=t_logits.ids[:, :-1], logits=t_logits.logits[:, :-1],
                    logsumexp=None if t_logits.logsumexp is None else t_logits.logsumexp[:, :-1],
                )
            return b.fn(self._vocab(student_logits), t_logits, mask=mask, **kwargs)
        raise KDForgeError(f"loss '{b.term.loss}' of kind {b.kind} is not supported by this distiller")

    def _vocab(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.shared_vocab is None else logits[..., : self.shared_vocab]


def _has_vocabulary(model: nn.Module) -> bool:
    """Whether `model` has a language-model head (a BERT classifier's get_output_embeddings() is None)."""
    head = getattr(model, "get_output_embeddings", None)
    return callable(head) and head() is not None


def _keyword_names(fn: Callable) -> set[str]:
    return set(inspect.signature(fn).parameters)
