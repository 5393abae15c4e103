"""A cross-fitted teacher cache against a plain one: build time and the time to read a training batch.

A cross-fitted cache (task causal_lm, `teacher.crossfit.models`; kdforge.teachers.cache.build_crossfit_cache) is K
ordinary caches, fold k's blocks cached from teacher k, and a reader that sends each block to its fold's cache. This
measures what that costs against one cache of one teacher over the same blocks, with the same options: the build
(each block goes through one teacher either way) and the read of a batch (what a training step adds).

    .venv/bin/python benchmarks/crossfit_cache.py [--blocks 192] [--seq 128] [--vocab 49152] [--hidden 64]
                                                  [--layers 2] [--folds 3] [--k 64] [--batch 8] [--reads 50]
                                                  [--repeats 3] [--threads 1]

The teachers are random Llamas (`kdforge.models.tiny_llama`, one seed per fold) saved to a temporary folder, the
blocks random token ids; the caches use the default options (top-64, packed ids, int6 values). Reads draw the batches
of a seeded batch order (kdforge.data.packing.batch_indices); plain and cross-fitted reads alternate for --repeats
rounds after one warm-up each, and the figures are medians.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # as the kdforge command: no loading bars
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("blocks", 192), ("seq", 128), ("vocab", 49152), ("hidden", 64), ("layers", 2),
                          ("folds", 3), ("k", 64), ("batch", 8), ("reads", 50), ("repeats", 3), ("threads", 1)):
        p.add_argument(f"--{name}", type=int, default=default)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from kdforge.data.packing import batch_indices
    from kdforge.models import load_teacher, tiny_llama
    from kdforge.recipe import TeacherSpec
    from kdforge.teachers.cache import CacheOptions, CachedTeacher, build_cache, build_crossfit_cache

    root = Path(tempfile.mkdtemp(prefix="kdforge-crossfit-cache-"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    folders = []
    for k in range(args.folds):
        folder = root / f"teacher_{k}"
        tiny_llama(vocab_size=args.vocab, hidden=args.hidden, layers=args.layers, seed=k).save_pretrained(folder)
        folders.append(str(folder))
    ids = torch.randint(0, args.vocab, (args.blocks, args.seq), generator=torch.Generator().manual_seed(0))
    spec = TeacherSpec(model=folders[0], dtype="float32", kind="cache", path=str(root / "crossfit"),
                       crossfit={"folds": args.folds, "models": folders})

    def options() -> CacheOptions:
        return CacheOptions(k=args.k, batch_size=args.batch)

    start = time.perf_counter()
    build_cache(load_teacher(spec), tokenizer, ids, root / "plain", teacher_spec=spec.model_dump(), options=options())
    plain_build = time.perf_counter() - start
    start = time.perf_counter()
    build_crossfit_cache(spec, tokenizer, ids, root / "crossfit", options=options())
    crossfit_build = time.perf_counter() - start

    readers = {"plain": CachedTeacher(root / "plain"), "crossfit": CachedTeacher(root / "crossfit")}
    batches = []
    for step in range(args.reads):
        index = batch_indices(args.blocks, args.batch, step, seed=0)
        batches.append({"input_ids": ids[index], "attention_mask": torch.ones_like(ids[index]), "block_index": index})
    times: dict[str, list[float]] = {name: [] for name in readers}
    for rnd in range(args.repeats + 1):
        for name, reader in readers.items():
            start = time.perf_counter()
            for batch in batches:
                reader(batch)
            if rnd:  # the first round warms up
                times[name].append((time.perf_counter() - start) / len(batches))
    print(f"{args.blocks} blocks x {args.seq} tokens, V={args.vocab}, k={args.k}, K={args.folds} folds, "
          f"{args.threads} thread(s)")
    print(f"build: plain {plain_build:.2f} s, cross-fitted {crossfit_build:.2f} s (teacher loads included)")
    for name, values in times.items():
        print(f"read a batch of {args.batch} blocks: {name} {1000 * statistics.median(values):.2f} ms "
              f"(rounds: {', '.join(f'{1000 * v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
