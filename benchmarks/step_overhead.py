"""Distillation step time vs. its parts, measured side by side in one process.

Prints the ratio  t(distillation step) / (t(teacher forward) + t(student CE train step))  for the demo's teacher and
student. A ratio near 1.0 means kdforge adds nothing beyond the two unavoidable passes.

    .venv/bin/python benchmarks/step_overhead.py [--steps 10] [--batch 8] [--seq 128]

With --cached the teacher is read from an offline top-64 cache (--sampled N: a sampled cache of N draws per token;
built first, over just the blocks used, and not timed) and the ratio is  t(distillation step) / t(student CE step)
of the same student: what distilling from a cache costs over plain training (target <= 1.1, issue 14). --chunk N
also sets train.logit_chunk_size for the KD step.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdforge.demo import FRESH_STUDENT, demo_recipe
from kdforge.recipe import Term
from kdforge.train import prepare


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--cached", action="store_true", help="teacher from an offline cache vs a plain CE step")
    ap.add_argument("--chunk", type=int, default=None, help="train.logit_chunk_size of the KD step (--cached)")
    ap.add_argument("--sampled", type=int, default=None, help="--cached: a sampled cache of this many draws per token")
    args = ap.parse_args()
    recipe = demo_recipe(student=FRESH_STUDENT)
    recipe.data.seq_len = args.seq
    if args.cached:
        return cached_overhead(recipe, args)
    setup = prepare(recipe)
    d = setup.distiller
    ids = setup.train_blocks.ids[: args.batch]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    opt = torch.optim.AdamW(d.student.parameters(), lr=1e-4)
    ce_only = prepare(recipe.model_copy(update={"objective": [Term(loss="cross_entropy")]}),
                      teacher=setup.teacher, tokenizer=setup.tokenizer).distiller
    ce_only.student.load_state_dict(d.student.state_dict())
    ce_opt = torch.optim.AdamW(ce_only.student.parameters(), lr=1e-4)

    def kd_step():
        loss, _ = d(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()

    def teacher_forward():
        d.teacher_source(batch)

    def ce_step():
        loss, _ = ce_only(batch)
        loss.backward()
        ce_opt.step()
        ce_opt.zero_grad()

    # Interleave the three measurements so machine noise hits all of them alike.
    for fn in (kd_step, teacher_forward, ce_step):
        fn()  # warm-up
    kd, tf, ce = [], [], []
    for _ in range(args.steps):
        kd.append(timed(kd_step))
        tf.append(timed(teacher_forward))
        ce.append(timed(ce_step))
    m = statistics.median
    tokens = ids.numel()
    print(f"batch {args.batch}x{args.seq}, teacher dtype {recipe.teacher.dtype}, {args.steps} steps each (medians)")
    print(f"teacher forward      {m(tf):.3f} s  ({tokens / m(tf):,.0f} tok/s)")
    print(f"student CE step      {m(ce):.3f} s  ({tokens / m(ce):,.0f} tok/s)")
    print(f"distillation step    {m(kd):.3f} s  ({tokens / m(kd):,.0f} tok/s)")
    print(f"overhead ratio       {m(kd) / (m(tf) + m(ce)):.3f}  (distillation step / (teacher forward + CE step))")


def cached_overhead(recipe, args) -> None:
    import tempfile

    from kdforge.data.packing import make_batch
    from kdforge.teachers.cache import CacheOptions, cache_recipe_teacher

    recipe.data.max_train_tokens = max(2 * args.batch, recipe.train.batch_size) * args.seq  # cache only this
    with tempfile.TemporaryDirectory(prefix="kdforge-step-cache-") as tmp:
        t0 = time.perf_counter()
        options = (CacheOptions(mode="sampled", samples=args.sampled, temperature=1.0) if args.sampled
                   else CacheOptions(k=64, temperature=1.0))
        path, index = cache_recipe_teacher(recipe, out=tmp, options=options)
        print(f"cache: {index['bytes_per_token']:.1f} bytes/token, built in {time.perf_counter() - t0:.1f} s")
        teacher = recipe.teacher.model_copy(update={"kind": "cache", "path": str(path)})
        train = recipe.train.model_copy(update={"logit_chunk_size": args.chunk})
        kd_recipe = recipe.model_copy(update={"teacher": teacher, "train": train})
        setup = prepare(kd_recipe)
        ce_setup = prepare(kd_recipe.model_copy(update={"objective": [Term(loss="cross_entropy")],
                                                        "train": recipe.train}), tokenizer=setup.tokenizer)
        d, ce_only = setup.distiller, ce_setup.distiller
        ce_only.student.load_state_dict(d.student.state_dict())
        batch = make_batch(setup.train_blocks, torch.arange(args.batch))
        opt = torch.optim.AdamW(d.student.parameters(), lr=1e-4)
        ce_opt = torch.optim.AdamW(ce_only.student.parameters(), lr=1e-4)

        def step(model, optimizer):
            loss, _ = model(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        kd_step, ce_step = (lambda: step(d, opt)), (lambda: step(ce_only, ce_opt))
        kd_step(), ce_step()  # warm-up
        kd, ce = [], []
        for _ in range(args.steps):  # interleaved so machine noise hits both alike
            kd.append(timed(kd_step))
            ce.append(timed(ce_step))
    m = statistics.median
    tokens = batch["input_ids"].numel()
    terms = ", ".join(f"{t.weight} {t.loss}" for t in recipe.objective)
    kind = f"sampled, N={args.sampled}" if args.sampled else "top-64"
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    print(f"batch {args.batch}x{args.seq}, cached teacher ({kind}), objective {terms}, "
          f"logit_chunk_size {args.chunk}, {args.steps} steps each (medians)")
    print(f"student CE step          {m(ce):.3f} s  ({tokens / m(ce):,.0f} tok/s)")
    print(f"cached distillation step {m(kd):.3f} s  ({tokens / m(kd):,.0f} tok/s)")
    print(f"overhead ratio           {m(kd) / m(ce):.3f}  (cached distillation step / CE step; target <= 1.1)")


if __name__ == "__main__":
    main()
