"""Cross-fitting on the real tweets (task sequence_classification, issue 13): what routing each batch row to its fold's
teacher costs, and what the out-of-fold soft labels are worth.

Prints (1) the teacher's part of a training step: the full teacher on a batch (plain KD's live teacher) against
FoldRoutedTeacher on the same batch (each row through the teacher fine-tuned without its fold), alternating batch by
batch so machine load hits both alike, medians by wall clock and by this thread's CPU time; (2) accuracy, NLL and ECE
of the soft labels on the training tweets, in-sample (the full teacher) and out-of-fold, and each fold teacher's
held-out figures. The K + 1 teachers are fine-tuned first when they are not cached (`kdforge finetune-teacher` with
the same --set builds them).

    .venv/bin/python benchmarks/sentiment_crossfit_cost.py [--batches 40] [--batch 16] [--threads 1]
        [--set key=value ...]   (default: benchmarks/sentiment_semiparametric.yaml's slice, K = 3)
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from kdforge.recipe import load_recipe
from kdforge.tasks import sequence_classification as sc
from kdforge.tasks.image_classification import classification_metrics
from kdforge.teachers.live import LiveTeacher

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "sentiment_kd.yaml"
SLICE = ["teacher.config.max_examples=null", "teacher.dtype=float32", "data.max_train_examples=800",
         "data.max_eval_examples=500", "data.seq_len=48", "teacher.crossfit={folds: 3, seed: 0}"]


def rounded(figures: dict) -> dict:
    return {k: round(v, 4) for k, v in figures.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(RECIPE, SLICE + args.overrides)
    tokenizer = sc.load_tokenizer(sc.encoder_folder(recipe.teacher.model))
    train, val, _ = sc.SequenceClassification().data(recipe, tokenizer)
    full, _ = sc.finetuned_teacher(recipe, train, tokenizer)
    folds = sc.crossfit_folds(train, recipe.teacher.crossfit.folds, recipe.teacher.crossfit.seed)
    fold_models = [m for m, _ in sc.fold_teachers(recipe, train, folds, tokenizer)]
    plain, routed = LiveTeacher(full, recipe.teacher.dtype), sc.FoldRoutedTeacher(full, fold_models, folds,
                                                                                  recipe.teacher.dtype)
    g = torch.Generator().manual_seed(0)
    batches = [sc.text_batch(train, torch.randperm(len(train), generator=g)[: args.batch])
               for _ in range(args.batches + 2)]
    wall: dict[str, list[float]] = {"plain": [], "routed": []}
    cpu: dict[str, list[float]] = {"plain": [], "routed": []}
    for i, batch in enumerate(batches):
        for name, source in (("plain", plain), ("routed", routed)):
            w, c = time.perf_counter(), time.thread_time()
            source(batch)
            if i >= 2:  # two warm-up batches
                wall[name].append(time.perf_counter() - w)
                cpu[name].append(time.thread_time() - c)
    print(f"{len(train)} training tweets, K={len(fold_models)} folds of {torch.bincount(folds).tolist()}; "
          f"{args.threads} thread(s), CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name in wall:
        print(f"teacher per batch of {args.batch} ({name}): {1000 * statistics.median(wall[name]):.1f} ms wall, "
              f"{1000 * statistics.median(cpu[name]):.1f} ms CPU (medians of {args.batches})")
    inside = sc.predict(full, train)[0]
    oof = torch.empty_like(inside)
    for k, model in enumerate(fold_models):
        rows = (folds == k).nonzero().flatten()
        oof[rows] = sc.predict(model, train.subset(rows))[0]
        print(f"fold teacher {k} on the held-out tweets:", rounded(classification_metrics(sc.predict(model, val)[0],
                                                                                          val.labels)))
    for name, logits in (("in-sample (full teacher)", inside), ("out-of-fold", oof)):
        print(f"soft labels on the training tweets, {name}:", rounded(classification_metrics(logits, train.labels)))


if __name__ == "__main__":
    main()
