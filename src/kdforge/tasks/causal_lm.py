"""task causal_lm: a causal language model distilled on text (the default task).

Data: a corpus (kdforge.data.corpus) tokenized and packed into blocks of data.seq_len tokens
(kdforge.data.corpus_blocks); a batch is {input_ids [B, T], attention_mask [B, T], labels [B, T], block_index [B]},
and position t predicts token t+1 (kdforge.batches shifts targets and logits). Models: a transformers causal LM
teacher (live, an offline top-k cache, or a curriculum of teachers) and a student built from it
(kdforge.models.build_student). Metrics: held-out perplexity and bits per character, teacher fidelity (top-1
agreement, KL both ways, ECE; kdforge.evaluate.metrics). Export: a plain `save_pretrained` folder with the tokenizer
and a model card.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..checks import check_seq_len, check_student_tokenizer
from ..data.corpus_blocks import tokenize_corpus
from ..data.packing import TokenBlocks, make_batch
from ..distiller import Distiller
from ..errors import KDForgeError
from ..evaluate.metrics import evaluate_models
from ..io import atomic_write_dir, disk_full_as_error
from ..models import (build_student, count_parameters, hold_teacher_weights, is_peft, load_teacher, load_tokenizer,
                      merged_state_dict, plain_model)
from ..progress import phase
from ..recipe import ModelSpec, Recipe
from ..teachers.cache import cached_teacher_for, teacher_architecture
from ..teachers.curriculum import CurriculumTeacher
from .base import Setup

__all__ = ["CausalLM", "crossfit_split", "data_fingerprint", "model_card", "tokenize_corpus"]

DISK_HINT = "use an --out on a larger disk"


def data_fingerprint(train_blocks: TokenBlocks, val_blocks: TokenBlocks) -> str:
    """sha256 of the token ids a run trains and evaluates on: a resume on edited data files is refused by it."""
    digest = hashlib.sha256()
    for blocks in (train_blocks, val_blocks):
        digest.update(str(tuple(blocks.ids.shape)).encode())
        digest.update(blocks.ids.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def crossfit_split(recipe: Recipe, out: str | Path) -> dict[str, Any]:
    """`kdforge crossfit-split RECIPE --out DIR`: the recipe's training blocks dealt into teacher.crossfit's folds
    (kdforge.crossfit.block_folds), and for each fold k the text teacher k may be fine-tuned on, written to DIR
    (kdforge.crossfit.write_crossfit_split). The manifest records the folds, the seed, the blocks' sha256 and the
    tokenizer, the same fingerprints the offline cache of the K teachers records. Returns the manifest.

    Raises KDForgeError (one line) for another task (image and sentiment recipes train their fold teachers
    themselves) or a recipe without teacher.crossfit. (data.prompts cannot get here: the recipe refuses it with
    teacher.kind: cache, which teacher.crossfit needs for causal_lm.)"""
    from ..crossfit import block_folds, write_crossfit_split
    from ..teachers.cache import crossfit_split_identity

    crossfit = recipe.teacher.crossfit if recipe.teacher is not None else None
    if recipe.task != "causal_lm":
        raise KDForgeError(f"crossfit-split writes the training text of K causal-LM teachers that you fine-tune; task "
                           f"{recipe.task} has none to write (task image_classification and sequence_classification "
                           "train their fold teachers themselves from teacher.crossfit)")
    if crossfit is None:
        raise KDForgeError("crossfit-split needs teacher.crossfit; set teacher: {kind: cache, path: DIR, crossfit: "
                           "{folds: K}} (teacher.crossfit.models is filled in after the K teachers are fine-tuned)")
    tokenizer = load_tokenizer(recipe.teacher)
    with phase(f"tokenizing {recipe.data.corpus}"):
        train_blocks, _ = tokenize_corpus(recipe, tokenizer)
    folds = block_folds(len(train_blocks), crossfit.folds, seed=crossfit.seed)
    info = {**crossfit_split_identity(crossfit, train_blocks.ids, tokenizer), "models": list(crossfit.models or [])}
    return write_crossfit_split(train_blocks.ids, folds, tokenizer, out, info=info)


def model_card(recipe: Recipe, final: dict[str, Any]) -> str:
    """The exported student's README.md: what it was distilled from, how, on what, and how well it does."""
    from .. import __version__

    teacher = recipe.teacher.model if recipe.teacher is not None else "none (cross-entropy only)"
    terms = "\n".join(f"- `{t.loss}` weight {t.weight:g}" + "".join(f", {k} {v}" for k, v in t.params.items())
                      + (f", student `{t.student}` ← teacher `{t.teacher}`" if t.student else "")
                      for t in recipe.objective)
    rows = [("perplexity", "held-out perplexity"), ("bits_per_char", "bits per character"),
            ("top1_agreement", "top-1 agreement with the teacher"), ("kl_teacher_student", "KL(teacher ‖ student)")]
    student, teacher_res = final["student"], final.get("teacher") or {}
    table = "\n".join(f"| {label} | {student[k]:.4g} | {teacher_res[k]:.4g} |" if k in teacher_res else
                      f"| {label} | {student[k]:.4g} | — |" for k, label in rows if k in student)
    t = recipe.train
    return f"""---
library_name: transformers
tags: [kdforge, knowledge-distillation]
---
# {recipe.name}

A {final["student_parameters"]:,}-parameter student distilled with kdforge {__version__} from `{teacher}`.

## Objective
{terms}

## Training
{t.steps} steps of {t.batch_size} × {recipe.data.seq_len} tokens (gradient accumulation {t.grad_accum}), lr {t.lr:g},
seed {recipe.seed}, on `{recipe.data.corpus}`.

## Held-out results
| metric | student | teacher |
|---|---|---|
{table}

The full recipe, versions and hardware are in the run's `manifest.json`; `kdforge reproduce RUN/manifest.json`
retrains it.
"""


class CausalLM:
    """The causal-LM task (kdforge.tasks.base.Task)."""

    name = "causal_lm"

    def prepare(self, recipe: Recipe, *, teacher=None, tokenizer=None,
                blocks: tuple[TokenBlocks, TokenBlocks] | None = None) -> Setup:
        """Load teacher, tokenizer, student and data as the recipe says. A preloaded teacher/tokenizer and the
        (train, held-out) blocks `tokenize_corpus` made with that tokenizer may be passed in."""
        if recipe.student.tokenizer is not None:  # the student has its own tokenizer (kdforge.cross_tokenizer)
            from ..cross_tokenizer import prepare as prepare_cross_tokenizer

            return prepare_cross_tokenizer(recipe, self, teacher=teacher)
        spec = recipe.teacher
        cached = spec is not None and spec.kind == "cache"  # an offline cache stands in for the teacher in training
        # a student made of the teacher's weights copies them from an fp32 teacher, which is then cast to the dtype
        # it is held in (bf16 for teacher.dtype bfloat16); a teacher passed in is used as it is
        copies_weights = recipe.student.init in ("from_teacher", "pruned")
        loaded_fp32 = False
        if spec is not None and teacher is None and not (cached and not copies_weights):
            with phase(f"loading teacher {spec.model}"):
                teacher = load_teacher(spec, torch.float32 if copies_weights else None)
                loaded_fp32 = copies_weights
        if tokenizer is None:
            tok_spec = spec or (ModelSpec(model=recipe.student.model) if recipe.student.model else None)
            if tok_spec is None:
                raise KDForgeError("no tokenizer: set teacher.model, or student.model for a CE-only run")
            tokenizer = load_tokenizer(tok_spec)
        if blocks is None and recipe.student.init == "pruned":  # pruning ranks the teacher's units on training blocks
            with phase(f"tokenizing {recipe.data.corpus}"):
                blocks = tokenize_corpus(recipe, tokenizer)
        torch.manual_seed(recipe.seed)
        student = build_student(recipe.student, teacher if teacher is not None or not cached
                                else teacher_architecture(spec), recipe.seed,
                                calibration=blocks[0].ids if blocks is not None else None)
        if loaded_fp32:
            teacher = hold_teacher_weights(teacher, spec)
        check_seq_len(recipe.data.seq_len, {"teacher": teacher, "student": student})
        if recipe.student.init == "pretrained":
            check_student_tokenizer(recipe.student.model, tokenizer)
        teacher_source = teacher
        if spec is not None and spec.curriculum is not None:  # PWKD: a sequence of teachers, one per stage
            teacher_source = CurriculumTeacher.from_spec(
                teacher, spec.curriculum, recipe.train.steps, dtype=spec.dtype,
                load=lambda name: load_teacher(ModelSpec(model=name, dtype=spec.dtype)))
        if blocks is None:
            with phase(f"tokenizing {recipe.data.corpus}"):
                blocks = tokenize_corpus(recipe, tokenizer)
        train_blocks, val_blocks = blocks
        example_batch = None
        if cached:
            teacher_source = cached_teacher_for(recipe, tokenizer, train_blocks, student)
            example_batch = make_batch(train_blocks, torch.arange(min(2, len(train_blocks.ids))))
        distiller = Distiller(teacher_source, student, recipe.objective,
                              truncate_to_shared_vocab=recipe.truncate_to_shared_vocab,
                              teacher_dtype=spec.dtype if spec else "float32", seq_len=recipe.data.seq_len,
                              example_batch=example_batch, logit_chunk_size=recipe.train.logit_chunk_size)
        return Setup(recipe, tokenizer, teacher, student, distiller, train_blocks, val_blocks, self)

    def make_batch(self, data: TokenBlocks, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return make_batch(data, index)

    def fingerprint(self, train: TokenBlocks, val: TokenBlocks) -> str:
        return data_fingerprint(train, val)

    def periodic_metrics(self, setup: Setup) -> dict[str, float]:
        from ..recipe import EvalSpec

        res = evaluate_models({"student": setup.student}, setup.val_blocks, batch_size=EvalSpec().batch_size)
        return {"eval/perplexity": res["student"]["perplexity"], "eval/bits_per_char": res["student"]["bits_per_char"]}

    def final_metrics(self, setup: Setup, *, progress: bool = True) -> dict[str, Any]:
        """Held-out metrics against the teacher, measured as `kdforge eval` measures them
        (kdforge.evaluate.suite.heldout_setup: the same blocks, evaluation batch size and teacher precision), so
        final.json and eval.json agree on the same student."""
        from ..evaluate.suite import heldout_setup
        from ..precision import resolve

        if setup.recipe.student.tokenizer is not None:  # vocabularies differ: no agreement or KL (kdforge.cross_tokenizer)
            from ..cross_tokenizer import final_metrics

            return final_metrics(setup, progress=progress)

        student = setup.student
        models = {"student": student}
        teacher = setup.teacher
        if teacher is None and setup.recipe.teacher is not None and setup.recipe.teacher.kind == "cache":
            with phase(f"loading teacher {setup.recipe.teacher.model} for the final evaluation", enabled=progress):
                teacher = load_teacher(setup.recipe.teacher)  # trained from an offline cache: loaded for evaluation
        if teacher is not None:
            models["teacher"] = teacher
        measured = heldout_setup(setup.val_blocks,
                                 resolve(setup.recipe.teacher.dtype) if teacher is not None else None)
        res = evaluate_models(models, setup.val_blocks, reference="teacher" if teacher is not None else None,
                              batch_size=measured["batch_size"],
                              bf16={"teacher": measured["teacher_precision"] == "bfloat16"},
                              progress="final evaluation" if progress else None)
        final = {"step": setup.recipe.train.steps, "student": res["student"], "teacher": res.get("teacher"),
                 "student_parameters": count_parameters(plain_model(student)), "heldout_setup": measured}
        if is_peft(student):  # the exported student/ is the merged model: the plain model's parameters
            final["student_parameters"] -= sum(p.numel() for n, p in student.named_parameters() if ".lora_" in n)
            final["adapter_parameters"] = sum(p.numel() for p in student.parameters() if p.requires_grad)
        return final

    def export(self, setup: Setup, out: Path, final: dict[str, Any]) -> None:
        """out/student: a plain transformers folder with the tokenizer and a model card; with student.lora the adapter
        merged in, and the adapter alone in out/student_adapter."""
        student = setup.student
        peft = is_peft(student)

        def fill(tmp: Path) -> None:
            plain = plain_model(student)
            if peft:  # the adapter's base keeps its name (a user applies the adapter to it)
                plain.save_pretrained(tmp, state_dict=merged_state_dict(student))
                config = json.loads((tmp / "config.json").read_text())
                config["_name_or_path"] = setup.recipe.name
                (tmp / "config.json").write_text(json.dumps(config, indent=2))
            else:
                student.config._name_or_path = setup.recipe.name  # not the teacher's (GGUF) name it was derived from
                student.save_pretrained(tmp)
            setup.tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(model_card(setup.recipe, final))

        def fill_adapter(tmp: Path) -> None:
            student.save_pretrained(tmp)
            setup.tokenizer.save_pretrained(tmp)

        if peft:  # the adapter alone, for peft on the same base: PeftModel.from_pretrained(base, RUN/student_adapter)
            with disk_full_as_error(out / "student_adapter", DISK_HINT):
                atomic_write_dir(out / "student_adapter", fill_adapter)
        with disk_full_as_error(out / "student", DISK_HINT):
            atomic_write_dir(out / "student", fill)

    def run_eval(self, run_dir: Path, recipe: Recipe, *, out_dir: Path | None = None) -> dict[str, Any]:
        from ..evaluate.suite import run_eval

        return run_eval(run_dir, out_dir=out_dir)
