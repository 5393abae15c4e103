"""Cost of a distillation step on the digit canvases (tasks multi_label_classification and object_detection), measured
side by side in one process.

For each distillation recipe of a task, prints  t(distillation step) / t(plain supervised step)  of the same student
(the plain step: the task's own supervised term alone -- binary cross-entropy, or the detection loss on the
student's own IoU assignment -- and no teacher), both with the AdamW update, steps alternating so machine load hits
both alike, by wall clock and by this thread's CPU time (the CPU time is what machine load does not inflate); and the
training examples/s of each. The teacher's outputs (and, for LAD, the assignment) are computed once per run, as in
training; that one-time cost is printed too. Target of issue #12: <= 1.3x.

    .venv/bin/python benchmarks/canvas_step_cost.py [--task multilabel|detection|both] [--steps 100] [--batch 32]
        [--threads 1] [--n-train N] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from kdforge.recipe import load_recipe
from kdforge.train import param_groups, prepare

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ARMS = {"multilabel": ("multilabel_bce", ["multilabel_binary_kd", "multilabel_cam_kd", "multilabel_cat_kd"]),
        "detection": ("detection_iou", ["detection_lad", "detection_soft_kd"])}


def step_fn(objective, recipe, batches):
    optimizer = torch.optim.AdamW(param_groups(objective, recipe), lr=recipe.train.lr)
    objective.train()
    state = {"i": 0}

    def step() -> None:
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss, _ = objective(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timed(step) -> tuple[float, float]:
    w, c = time.perf_counter(), time.thread_time()
    step()
    return time.perf_counter() - w, time.thread_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=["multilabel", "detection", "both"], default="both")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-train", type=int, default=None, help="training canvases (default: the recipes')")
    ap.add_argument("--set", action="append", default=[], help="a recipe override for every recipe, like distill --set")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} "
          f"CPUs, load average {os.getloadavg()[0]:.1f}, {args.threads} thread(s), batch {args.batch}, {args.steps} "
          "timed steps each, alternating")
    print(f"{'recipe':<22} {'plain ms':>9} {'KD ms':>8} {'ratio':>6} {'plain CPU ms':>13} {'KD CPU ms':>10} "
          f"{'CPU ratio':>9} {'plain ex/s':>11} {'KD ex/s':>8} {'once s':>7}")
    for task in (["multilabel", "detection"] if args.task == "both" else [args.task]):
        plain_name, arms = ARMS[task]
        extra = ([f"train.batch_size={args.batch}"] + ([f"data.canvas.n_train={args.n_train}"] if args.n_train else [])
                 + args.set)
        plain_recipe = load_recipe(RECIPES / f"{plain_name}.yaml", extra)
        plain = prepare(plain_recipe)
        g = torch.Generator().manual_seed(0)
        n = len(plain.train_blocks)
        batches = [plain.task.make_batch(plain.train_blocks, torch.randperm(n, generator=g)[: args.batch])
                   for _ in range(16)]
        for name in arms:
            recipe = load_recipe(RECIPES / f"{name}.yaml", extra)
            t0 = time.perf_counter()
            setup = prepare(recipe, teacher=plain.teacher, blocks=(plain.train_blocks, plain.val_blocks))
            once = time.perf_counter() - t0  # the stored teacher outputs (and LAD's assignment), once per run
            torch.manual_seed(0)
            setup.student.load_state_dict(plain.student.state_dict())
            kd_step, plain_step = step_fn(setup.distiller, recipe, batches), step_fn(plain.distiller, plain_recipe,
                                                                                      batches)
            for _ in range(10):  # warm-up
                kd_step()
                plain_step()
            kd, ce = [], []
            for _ in range(args.steps):
                kd.append(timed(kd_step))
                ce.append(timed(plain_step))
            kw, cw = statistics.median(t[0] for t in kd), statistics.median(t[0] for t in ce)
            kc, cc = statistics.median(t[1] for t in kd), statistics.median(t[1] for t in ce)
            print(f"{name:<22} {cw * 1e3:>9.2f} {kw * 1e3:>8.2f} {kw / cw:>6.2f} {cc * 1e3:>13.2f} {kc * 1e3:>10.2f} "
                  f"{kc / cc:>9.2f} {args.batch / cw:>11,.0f} {args.batch / kw:>8,.0f} {once:>7.1f}")


if __name__ == "__main__":
    main()
