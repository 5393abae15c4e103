"""Cost of a distillation step on the digits (task image_classification), measured side by side in one process.

For each digits recipe, prints  t(distillation step) / t(plain supervised step)  of the same student (the plain step:
the Distiller with only cross-entropy, no teacher), both with the AdamW update, steps alternating so machine load
hits both alike; and the training examples/s of the distillation step. The teacher is the recipes' CNN (trained once
and cached); its logits and tapped features are computed once per run as in training (PrecomputedTeacher), and
Block-KD's stepping stone runs the teacher's last blocks and head live in every step. Every recipes/digits_*.yaml is
measured (CAT-KD and Block-KD included). Target of issue #12: <= 1.3x.

    .venv/bin/python benchmarks/digits_step_cost.py [--steps 200] [--batch 64] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from kdforge.recipe import load_recipe
from kdforge.train import param_groups, prepare

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def step_fn(distiller, recipe, batches):
    optimizer = torch.optim.AdamW(param_groups(distiller, recipe), lr=recipe.train.lr)
    distiller.train()
    state = {"i": 0}

    def step() -> None:
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss, _ = distiller(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} thread(s), batch {args.batch}, {args.steps} timed steps each, alternating")
    print(f"{'recipe':<18} {'plain ms':>9} {'KD ms':>9} {'ratio':>6} {'KD examples/s':>14}")
    for path in sorted(RECIPES.glob("digits_*.yaml")):
        recipe = load_recipe(path, [f"train.batch_size={args.batch}"])
        setup = prepare(recipe)
        plain_recipe = load_recipe(path, [f"train.batch_size={args.batch}", "objective=[{loss: cross_entropy}]"])
        plain = prepare(plain_recipe, teacher=setup.teacher, blocks=(setup.train_blocks, setup.val_blocks))
        g = torch.Generator().manual_seed(0)
        batches = [setup.task.make_batch(setup.train_blocks, torch.randperm(len(setup.train_blocks),
                                                                            generator=g)[: args.batch])
                   for _ in range(16)]
        kd_step, plain_step = step_fn(setup.distiller, recipe, batches), step_fn(plain.distiller, plain_recipe,
                                                                                  batches)
        for _ in range(10):  # warm-up
            kd_step()
            plain_step()
        kd, ce = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            kd_step()
            t1 = time.perf_counter()
            plain_step()
            kd.append(t1 - t0)
            ce.append(time.perf_counter() - t1)
        k, c = statistics.median(kd), statistics.median(ce)
        print(f"{path.stem:<18} {c * 1e3:>9.2f} {k * 1e3:>9.2f} {k / c:>6.2f} {args.batch / k:>14,.0f}")


if __name__ == "__main__":
    main()
