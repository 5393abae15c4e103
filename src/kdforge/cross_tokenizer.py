"""Teacher and student with different tokenizers (`student.tokenizer`): the student's tokenizer, prompt–response
blocks tokenized by both, the pairs of positions the cross-tokenizer terms compare, and the distiller that trains on
them.

Data: the recipe's prompt–response records (`data.prompts`, kdforge.data.prompts) are tokenized twice, with the
student's tokenizer (what the student trains on: ``input_ids``, ``labels`` masking the prompt, ``attention_mask``)
and with the teacher's (what the teacher reads), with the same left truncation of the prompt and right cut of the
response as kdforge.data.prompts.encode_records; a record is kept only when both tokenizations keep a response token.
Per block, two lists of position pairs (student position p predicts student token p+1; the same for the teacher):

- ``uld``: the k-th response token of each side, k < min(the two response lengths), as Boizard et al. pair them;
- ``span``: student and teacher response tokens that cover the same characters (kdforge.align.tokenizers), neither
  of them a special token (an ``<unk>`` over a character outside a vocabulary stands for no string).

Sequence-level KD needs neither: with only `cross_entropy` in the objective the student trains on the text (e.g. the
teacher's generated responses, `kdforge generate`) re-tokenized with its own tokenizer.

The distiller (CrossTokenizerDistiller) runs the student on its blocks and, when a term needs it, the teacher on the
same records' teacher blocks (looked up by ``block_index``), and sums the weighted terms: ``cross_entropy`` on the
student's response tokens, ``uld`` and ``span_kl`` (kdforge.losses.cross_tokenizer) on the paired positions.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .align.tokenizers import SharedVocabulary, align_spans, check_alignment, shared_vocabulary, spans_from_offsets
from .batches import shifted_targets
from .data.packing import TokenBlocks
from .data.prompts import EncodeStats, PromptRecord
from .errors import KDForgeError
from .losses.registry import check_arguments, lookup

log = logging.getLogger("kdforge")

BPE_SPEC = re.compile(r"^bpe:(\d+)$")
BPE_EOS = "<|endoftext|>"
BPE_TRAIN_CHARS = 1_000_000  # the student's BPE learns from at most this many characters of the training text
MIN_SHARED_FRACTION = 0.5
MIN_ALIGNED_FRACTION = 0.3
CROSS_TERMS = ("uld", "span_kl")


# ---------------------------------------------------------------------------------------------------------------
# the student's tokenizer


def train_bpe_tokenizer(texts: list[str], vocab_size: int, max_chars: int = BPE_TRAIN_CHARS):
    """A byte-level BPE tokenizer (transformers PreTrainedTokenizerFast) of ``vocab_size`` entries learnt from
    ``texts`` (their first ``max_chars`` characters) with the `tokenizers` library; EOS and padding
    ``<|endoftext|>``. Deterministic for the same texts. KDForgeError for a vocabulary under 300 (the 256 bytes,
    EOS and some merges) or no text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise KDForgeError(f"student.tokenizer bpe:{vocab_size} is too small; a byte-level BPE needs its 256 bytes "
                           "and some merges: give bpe:N with N >= 300 (e.g. bpe:4096)")
    kept, total = [], 0
    for text in texts:
        if total >= max_chars:
            break
        kept.append(text[: max_chars - total])
        total += len(kept[-1])
    if not total:
        raise KDForgeError("student.tokenizer bpe:N learns from the training text, which is empty; give data.prompts "
                           "records with text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(kept, trainer, length=len(kept))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=BPE_EOS, pad_token=BPE_EOS)


def load_student_tokenizer(value: str, texts: list[str]):
    """The tokenizer `student.tokenizer` names: ``bpe:N`` (trained on ``texts``) or a folder / embedded model name
    whose tokenizer is loaded."""
    m = BPE_SPEC.match(value)
    if m:
        return train_bpe_tokenizer(texts, int(m.group(1)))
    from .models import load_tokenizer
    from .recipe import ModelSpec

    return load_tokenizer(ModelSpec(model=value))


# ---------------------------------------------------------------------------------------------------------------
# paired blocks


@dataclass
class PairedBlocks:
    """The same records tokenized for the student (``student``) and the teacher (``teacher``), row for row, and per
    row the paired positions [N, P] (-1 where there is none): ``uld_*`` (k-th response token of each side) and
    ``span_*`` (tokens over the same characters)."""

    student: TokenBlocks
    teacher: TokenBlocks
    uld_student: torch.Tensor
    uld_teacher: torch.Tensor
    span_student: torch.Tensor
    span_teacher: torch.Tensor
    stats: EncodeStats

    @property
    def aligned_fraction(self) -> float:
        return int((self.span_student >= 0).sum()) / max(self.stats.response_tokens, 1)


def _side(tokenizer, records: list[PromptRecord]) -> tuple[list[list[int]], list[list[int]], list[list[tuple]]]:
    prompts = tokenizer([r.prompt for r in records], add_special_tokens=False)["input_ids"] if records else []
    enc = (tokenizer([r.response or "" for r in records], add_special_tokens=False, return_offsets_mapping=True)
           if records else {"input_ids": [], "offset_mapping": []})
    return prompts, enc["input_ids"], [spans_from_offsets(o) for o in enc["offset_mapping"]]


def _cut(tokenizer, record: PromptRecord, p: list[int], r: list[int], spans: list[tuple], seq_len: int, limit: int):
    """encode_records' rule for one side: prompt keeps its last `limit` tokens, response (+ EOS for a pair) is cut
    at what seq_len leaves. (prompt ids, response ids, response spans, prompt truncated?, response cut?)."""
    truncated = len(p) > limit
    p = p[-limit:] if truncated else p
    eos = tokenizer.eos_token_id
    r, spans = list(r), list(spans)
    if r and not record.chat and eos is not None:
        r.append(eos)
        spans.append((spans[-1][1], spans[-1][1]))  # EOS covers no character: never span-aligned
    room = seq_len - len(p)
    cut = len(r) > room
    return p, r[:room], spans[:room], truncated, cut


def _rows(rows: list[list[int]], width: int, fill: int) -> torch.Tensor:
    return torch.tensor([x + [fill] * (width - len(x)) for x in rows], dtype=torch.long).reshape(len(rows), width)


def encode_pairs(records: list[PromptRecord], student_tok, teacher_tok, seq_len: int,
                 max_prompt_tokens: int | None = None, max_tokens: int | None = None,
                 what: str = "prompt–response data", min_blocks: int = 1) -> PairedBlocks:
    """Paired student/teacher blocks [N, seq_len] of ``records`` (see the module docstring); ``max_tokens`` caps the
    student's response tokens (whole records, in order). KDForgeError when fewer than ``min_blocks`` records keep a
    response token on both sides."""
    limit = max_prompt_tokens or seq_len // 2
    sides = [_side(tok, records) for tok in (student_tok, teacher_tok)]
    # a special token (e.g. <unk> over a character outside the vocabulary) stands for no string: never span-aligned
    specials = [set(getattr(tok, "all_special_ids", []) or []) for tok in (student_tok, teacher_tok)]
    stats = EncodeStats()
    out = {k: [] for k in ("s_ids", "s_lab", "s_mask", "s_chars", "t_ids", "t_lab", "t_mask", "t_chars",
                           "us", "ut", "ss", "st")}
    for i, record in enumerate(records):
        cut = [_cut(tok, record, side[0][i], side[1][i], side[2][i], seq_len, limit)
               for tok, side in zip((student_tok, teacher_tok), sides)]
        (ps, rs, spans_s, trunc, rcut), (pt, rt, spans_t, _, _) = cut
        if not rs or not rt:
            stats.skipped_empty += 1
            continue
        if max_tokens is not None and stats.response_tokens + len(rs) > max_tokens:
            break
        stats.prompts_truncated += int(trunc)
        stats.responses_cut += int(rcut)
        for key, tok, p, r, spans in (("s", student_tok, ps, rs, spans_s), ("t", teacher_tok, pt, rt, spans_t)):
            pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
            n = len(p) + len(r)
            out[f"{key}_ids"].append(p + r + [pad] * (seq_len - n))
            out[f"{key}_lab"].append([-100] * len(p) + r + [-100] * (seq_len - n))
            out[f"{key}_mask"].append([1] * n + [0] * (seq_len - n))
            out[f"{key}_chars"].append(max(spans[-1][1], 0))
        k_max = min(len(rs), len(rt))
        pairs = [(len(ps) + k - 1, len(pt) + k - 1) for k in range(k_max) if len(ps) + k > 0 and len(pt) + k > 0]
        out["us"].append([a for a, _ in pairs])
        out["ut"].append([b for _, b in pairs])
        aligned = [(len(ps) + a - 1, len(pt) + b - 1) for a, b in align_spans(spans_s, spans_t)
                   if len(ps) + a > 0 and len(pt) + b > 0 and rs[a] not in specials[0] and rt[b] not in specials[1]]
        out["ss"].append([a for a, _ in aligned])
        out["st"].append([b for _, b in aligned])
        stats.kept += 1
        stats.response_tokens += len(rs)
    if stats.kept < min_blocks:
        fix = (f"lower train.batch_size to at most {stats.kept}, or add records" if stats.kept else
               "add records with non-empty responses, or raise data.seq_len")
        raise KDForgeError(f"the {what} makes {stats.kept} usable record(s) of {len(records)} for both tokenizers, "
                           f"fewer than {min_blocks}; {fix}")

    def blocks(key: str) -> TokenBlocks:
        return TokenBlocks(torch.tensor(out[f"{key}_ids"], dtype=torch.long),
                           torch.tensor(out[f"{key}_chars"], dtype=torch.long),
                           labels=torch.tensor(out[f"{key}_lab"], dtype=torch.long),
                           attention_mask=torch.tensor(out[f"{key}_mask"], dtype=torch.long))

    wu = max(1, max(len(x) for x in out["us"]))
    ws = max(1, max(len(x) for x in out["ss"]))
    return PairedBlocks(blocks("s"), blocks("t"), _rows(out["us"], wu, -1), _rows(out["ut"], wu, -1),
                        _rows(out["ss"], ws, -1), _rows(out["st"], ws, -1), stats)


# ---------------------------------------------------------------------------------------------------------------
# the distiller


def _gather(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V] at positions [B, P] (-1 read as 0; mask them) -> [B, P, V]."""
    index = positions.clamp_min(0).to(logits.device)
    return logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


class CrossTokenizerDistiller(nn.Module):
    """The Distiller's interface (``(total, {term: value}) = distiller(batch, num_tokens=, step=)``, ``.student``,
    ``.teacher_source``) for a student with its own tokenizer. Terms: ``cross_entropy`` (the student's response
    tokens), ``uld`` and ``span_kl`` (paired positions, kdforge.losses.cross_tokenizer); any other term is refused.
    ``teacher``: the frozen teacher (None for a cross-entropy-only objective); ``pairs``: the training blocks
    (batches carry their rows in ``block_index``); ``shared``: the shared-vocabulary mapping (span_kl)."""

    def __init__(self, teacher: nn.Module | None, student: nn.Module, objective: list, pairs: PairedBlocks,
                 shared: SharedVocabulary | None = None, teacher_dtype: str = "float32"):
        super().__init__()
        from .recipe import Term
        from .teachers.live import LiveTeacher

        self.student = student
        self.pairs = pairs
        self.shared = shared
        self.terms = []
        for raw in objective:
            term = raw if isinstance(raw, Term) else Term.model_validate(raw)
            kind, fn = lookup(term.loss)
            kwargs = term.params
            for key in ("min_shared_fraction", "min_aligned_fraction"):
                if term.loss == "span_kl":
                    kwargs.pop(key, None)
            if kind != "label" and term.loss not in CROSS_TERMS:
                raise KDForgeError(f"loss '{term.loss}' compares the teacher's and the student's tokens one for one, "
                                   "which differ under student.tokenizer; use cross_entropy, uld or span_kl")
            check_arguments(term.loss, fn, kwargs)
            self.terms.append((term, kind, fn, kwargs))
        needs_teacher = any(kind != "label" for _, kind, _, _ in self.terms)
        if needs_teacher and teacher is None:
            raise KDForgeError("the objective has uld / span_kl terms but no teacher; set `teacher:` in the recipe")
        if any(t.loss == "span_kl" for t, _, _, _ in self.terms) and shared is None:
            raise KDForgeError("span_kl needs the shared-vocabulary mapping of the two tokenizers")
        self.teacher_source = LiveTeacher(teacher, teacher_dtype) if needs_teacher else None

    def forward(self, batch: dict[str, torch.Tensor], *, num_tokens: float | None = None,
                step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and detached per-term values; ``num_tokens`` scales each term by this micro-batch's share of
        the step's response tokens, as kdforge.distiller.Distiller does."""
        labels, mask = shifted_targets(batch)
        out = self.student(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
        s_logits = out.logits
        idx = batch["block_index"].cpu()
        t_logits = None
        if self.teacher_source is not None:
            t = self.pairs.teacher
            device = batch["input_ids"].device
            t_batch = {"input_ids": t.ids[idx].to(device), "attention_mask": t.attention_mask[idx].to(device)}
            t_logits = self.teacher_source(t_batch).logits
        scale = 1.0 if num_tokens is None else mask.sum().float() / num_tokens
        total = s_logits.new_zeros((), dtype=torch.float32)
        values: dict[str, torch.Tensor] = {}
        for term, kind, fn, kwargs in self.terms:
            if step < term.start_step or (term.end_step is not None and step >= term.end_step):
                continue
            if kind == "label":
                value = fn(s_logits[:, :-1], labels, mask=mask, **kwargs)
            elif term.loss == "uld":
                sp, tp = self.pairs.uld_student[idx], self.pairs.uld_teacher[idx]
                value = fn(_gather(s_logits, sp), _gather(t_logits, tp), mask=(sp >= 0).to(s_logits.device),
                           **kwargs)
            else:  # span_kl
                sp, tp = self.pairs.span_student[idx], self.pairs.span_teacher[idx]
                valid = (sp >= 0).to(s_logits.device)
                value = fn(_gather(s_logits, sp)[valid], _gather(t_logits, tp)[valid], self.shared.student_ids,
                           self.shared.teacher_ids, **kwargs)
            values[term.label] = value.detach()
            total = total + term.weight * value * scale
        return total, values


# ---------------------------------------------------------------------------------------------------------------
# the run: prepare and final metrics (kdforge.tasks.causal_lm hands a recipe with student.tokenizer over to these)


def check_recipe(recipe) -> None:
    """What a student.tokenizer recipe must be, checked before any model loads (KDForgeError naming the fix)."""
    if recipe.data.prompts is None:
        raise KDForgeError("student.tokenizer trains on prompt–response records, tokenized by both models; set "
                           "data.prompts (e.g. shakespeare, or a kdforge generate file)")
    if recipe.student.init != "config":
        raise KDForgeError("student.tokenizer gives the student a new vocabulary, so its weights start fresh: use "
                           "student.init: config")
    if recipe.teacher is None or recipe.teacher.kind != "live" or recipe.teacher.curriculum is not None:
        raise KDForgeError("student.tokenizer needs a live teacher (teacher.kind: live, no curriculum)")
    for term in recipe.objective:
        kind = lookup(term.loss)[0]
        if kind != "label" and term.loss not in CROSS_TERMS:
            raise KDForgeError(f"loss '{term.loss}' compares the teacher's and the student's tokens one for one, which "
                               "differ under student.tokenizer; use cross_entropy, uld or span_kl")


def prepare(recipe, task, *, teacher=None):
    """The kdforge.tasks.base.Setup of a recipe whose student has its own tokenizer: teacher, teacher tokenizer,
    the prompt records, the student's tokenizer (trained or loaded), paired blocks, the student (its vocabulary the
    student tokenizer's), the alignment check of span_kl terms (refused with the figures) and the distiller."""
    from .data.prompts import load_prompt_set
    from .models import build_student, load_teacher, load_tokenizer
    from .progress import phase
    from .tasks.base import Setup

    check_recipe(recipe)
    data, spec = recipe.data, recipe.teacher
    if recipe.generate.prompts is not None and not Path(data.prompts).expanduser().exists():
        raise KDForgeError(f"data.prompts '{data.prompts}' does not exist yet: it is the file `kdforge generate` "
                           "writes from generate.prompts; run `kdforge generate RECIPE` first")
    teacher_tok = load_tokenizer(spec)
    prompt_set = load_prompt_set(data, teacher_tok)  # chat records rendered with the teacher's template, as text
    with phase(f"student tokenizer {recipe.student.tokenizer}"):
        student_tok = load_student_tokenizer(recipe.student.tokenizer,
                                              [r.prompt + (r.response or "") for r in prompt_set.train])
    train = encode_pairs(prompt_set.train, student_tok, teacher_tok, data.seq_len, data.max_prompt_tokens,
                         data.max_train_tokens, "training prompt set", min_blocks=recipe.train.batch_size)
    val = encode_pairs(prompt_set.validation, student_tok, teacher_tok, data.seq_len, data.max_prompt_tokens,
                       data.max_eval_tokens, "held-out prompt set")
    limit = data.max_prompt_tokens or data.seq_len // 2
    log.info(train.stats.line(f"training prompts ({data.prompts}), student tokenizer", limit, data.seq_len))
    log.info(val.stats.line("held-out prompts, student tokenizer", limit, data.seq_len))
    shared = shared_vocabulary(student_tok, teacher_tok)
    for term in recipe.objective:
        if term.loss == "span_kl":
            params = term.params
            figures = check_alignment(shared, int((train.span_student >= 0).sum()), train.stats.response_tokens,
                                      min_shared_fraction=float(params.get("min_shared_fraction",
                                                                           MIN_SHARED_FRACTION)),
                                      min_aligned_fraction=float(params.get("min_aligned_fraction",
                                                                            MIN_ALIGNED_FRACTION)))
            log.info("span_kl: %d shared vocabulary strings (%.1f%% of the student's %d), %.1f%% of the student's "
                     "training response tokens aligned with a teacher token", figures["shared_strings"],
                     100 * figures["shared_fraction"], figures["student_vocabulary"],
                     100 * figures["aligned_fraction"])
    if teacher is None:
        with phase(f"loading teacher {spec.model}"):
            teacher = load_teacher(spec)
    config = {**recipe.student.config, "vocab_size": len(student_tok), "eos_token_id": student_tok.eos_token_id,
              "bos_token_id": student_tok.eos_token_id, "pad_token_id": student_tok.pad_token_id}
    torch.manual_seed(recipe.seed)
    student = build_student(recipe.student.model_copy(update={"config": config}), teacher, recipe.seed)
    distiller = CrossTokenizerDistiller(teacher, student, recipe.objective, train, shared, teacher_dtype=spec.dtype)
    distiller.val_pairs = val
    return Setup(recipe, student_tok, teacher, student, distiller, train.student, val.student, task)


def final_metrics(setup, *, progress: bool = True) -> dict[str, Any]:
    """final.json of a cross-tokenizer run: the student on its held-out blocks and the teacher on the same records'
    teacher blocks (perplexities per each model's own tokens; bits per character compare the two), no token
    agreement or KL (the vocabularies differ)."""
    from .evaluate.metrics import evaluate_models
    from .evaluate.suite import heldout_setup
    from .models import count_parameters, plain_model
    from .precision import resolve
    from .recipe import EvalSpec

    batch = EvalSpec().batch_size
    res = evaluate_models({"student": setup.student}, setup.val_blocks, batch_size=batch,
                          progress="final evaluation" if progress else None)
    precision = resolve(setup.recipe.teacher.dtype) if setup.teacher is not None else None
    final: dict[str, Any] = {"step": setup.recipe.train.steps, "student": res["student"], "teacher": None,
                             "student_parameters": count_parameters(plain_model(setup.student)),
                             "heldout_setup": heldout_setup(setup.val_blocks, precision, batch),
                             "cross_tokenizer": {"student_vocabulary": len(setup.tokenizer)}}
    val_pairs = getattr(setup.distiller, "val_pairs", None)
    if setup.teacher is not None and val_pairs is not None:
        final["teacher"] = evaluate_models({"teacher": setup.teacher}, val_pairs.teacher, batch_size=batch,
                                           bf16={"teacher": precision == "bfloat16"})["teacher"]
        final["cross_tokenizer"].update({"teacher_heldout_blocks": int(len(val_pairs.teacher)),
                                         "heldout_aligned_fraction": val_pairs.aligned_fraction})
    if setup.distiller.shared is not None:
        final["cross_tokenizer"].update({"shared_strings": setup.distiller.shared.size,
                                         "shared_fraction": setup.distiller.shared.student_fraction})
    return final
