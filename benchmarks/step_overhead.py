"""Distillation step time vs. its parts, measured side by side in one process.

Prints the ratio  t(distillation step) / (t(teacher forward) + t(student CE train step))  for the demo's teacher and
student. A ratio near 1.0 means kdforge adds nothing beyond the two unavoidable passes.

    .venv/bin/python benchmarks/step_overhead.py [--steps 10] [--batch 8] [--seq 128]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdforge.demo import demo_recipe
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
    args = ap.parse_args()
    recipe = demo_recipe()
    recipe.data.seq_len = args.seq
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


if __name__ == "__main__":
    main()
