"""Cost of a distillation step for the text tasks (sequence_classification on the tweets, sentence_embedding on
Shakespeare + tweets), measured side by side in one process.

For a logit (or embedding) KD recipe and a feature recipe of the task, prints  t(distillation step) / t(plain step)
of the same student, by wall clock and by this thread's CPU time (which machine load does not inflate), and the
training examples/s of each. Every step includes the AdamW update; one round runs the plain step and then every arm,
in an order that rotates each round, so load hits them alike; figures are medians over the rounds.

The plain step:
  sentiment -- the same student's cross-entropy-only step (the Distiller with {loss: cross_entropy}, no teacher).
  embedding -- there are no labels, so no supervised step exists. The plain step is the cost floor without a teacher:
               the student's forward, 1 - cos(embedding, a fixed target embedding of that sentence), backward and
               AdamW, written out here without the Distiller (the targets are the teacher's embeddings, computed once).
The arms, per distillation recipe:
  live auto    -- the teacher runs every step as the recipe says (teacher.dtype auto: bf16 autocast on a CPU with
                  native bf16, else float32);
  live fp32    -- the same with teacher.dtype float32;
  stored       -- the teacher's outputs (logits and tapped tensors) on the benchmark's fixed batches, computed once
                  and looked up by the batch's indices. kdforge has no cached-teacher path for the text tasks (a text
                  batch is padded to its own longest text, so token-level tapped tensors depend on the batch); this
                  arm is the floor such a cache could reach, not something a run can use today.
Target of issue #12: <= 1.3x.

    .venv/bin/python benchmarks/text_step_cost.py --task sentiment|embedding [--steps 30] [--batch 32] [--threads 1]
        [--n-train 2000] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from canvas_step_cost import timed  # (wall, CPU) seconds of one step; benchmarks/ is the script's path
from kdforge.recipe import load_recipe
from kdforge.train import param_groups, prepare

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# task -> (the recipe whose student, teacher and data every arm shares, the distillation recipes)
TASKS = {"sentiment": ("sentiment_kd", ["sentiment_kd", "sentiment_tinybert"]),
         "embedding": ("embedding_cosine", ["embedding_cosine", "embedding_minilm"])}


class StoredTeacher:
    """The live teacher's outputs on each fixed benchmark batch, computed once and looked up by the batch's `index`
    (what a step costs when the teacher's outputs come from a store). Other batches (the Distiller's probe) run live."""

    def __init__(self, live, batches, taps):
        self.live, self.model, self.dtype, self.autocast = live, live.model, live.dtype, live.autocast
        self.store = {tuple(b["index"].tolist()): live(b, taps) for b in batches}

    def __call__(self, batch, taps=None, **kwargs):
        stored = self.store.get(tuple(batch["index"].tolist()))
        return stored if stored is not None else self.live(batch, taps, **kwargs)


def optimizer_step(params, lr: float, loss_fn, batches):
    """A step function: loss_fn(batch) on the next fixed batch, backward, AdamW update."""
    optimizer = torch.optim.AdamW(params, lr=lr)
    state = {"i": 0}

    def step() -> None:
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def distiller_step(setup, recipe, batches):
    setup.distiller.train()
    return optimizer_step(param_groups(setup.distiller, recipe), recipe.train.lr,
                          lambda b: setup.distiller(b)[0], batches)


def embedding_plain_step(setup, recipe, batches):
    """The student's forward, 1 - cos against the teacher's embeddings of the batch (computed here, once), backward."""
    with torch.no_grad():
        targets = {tuple(b["index"].tolist()): setup.teacher(b["inputs"], attention_mask=b["attention_mask"]).logits
                   for b in batches}
    student = setup.student.train()

    def loss(b):
        emb = student(b["inputs"], attention_mask=b["attention_mask"]).logits
        return (1 - F.cosine_similarity(emb, targets[tuple(b["index"].tolist())], dim=-1)).mean()

    return optimizer_step(param_groups(setup.distiller, recipe), recipe.train.lr, loss, batches)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--steps", type=int, default=30, help="timed rounds (each: the plain step and every arm)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-train", type=int, default=2000,
                    help="training texts read (data.max_train_examples; >= the teacher's 2,000 keeps its cache)")
    ap.add_argument("--set", action="append", default=[], help="a recipe override for every recipe, like distill --set")
    ap.add_argument("--out", type=Path, default=None, help="also write the printed table to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    base_name, kd_names = TASKS[args.task]
    extra = [f"train.batch_size={args.batch}", f"data.max_train_examples={args.n_train}"] + args.set
    if args.task == "sentiment":  # the matrix's teacher (fine-tuned on 2,000 tweets; cached)
        extra = ["teacher.config.max_examples=2000"] + extra
    base_recipe = load_recipe(RECIPES / f"{base_name}.yaml", extra)
    plain_recipe = base_recipe
    if args.task == "sentiment":
        plain_recipe = load_recipe(RECIPES / f"{base_name}.yaml", extra + ['objective=[{"loss": "cross_entropy"}]'])
    t0 = time.perf_counter()
    plain = prepare(plain_recipe)
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    n = len(plain.train_blocks)
    batches = [plain.task.make_batch(plain.train_blocks, torch.randperm(n, generator=g)[: args.batch])
               for _ in range(8)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    steps = {"plain": (distiller_step(plain, plain_recipe, batches) if args.task == "sentiment"
                       else embedding_plain_step(plain, plain_recipe, batches))}
    once = {}
    for name in kd_names:
        # each recipe its own copy of the teacher: a recipe with attention taps switches its models to eager attention
        teacher = copy.deepcopy(plain.teacher)
        for arm, dtype in (("live auto", "auto"), ("live fp32", "float32"), ("stored", "auto")):
            recipe = load_recipe(RECIPES / f"{name}.yaml", extra + [f"teacher.dtype={dtype}"])
            setup = prepare(recipe, teacher=teacher, blocks=(plain.train_blocks, plain.val_blocks))
            setup.student.load_state_dict(plain.student.state_dict())
            if arm == "stored":
                t0 = time.perf_counter()
                setup.distiller.teacher_source = StoredTeacher(setup.distiller.teacher_source, batches,
                                                               setup.distiller.teacher_taps)
                once[f"{name} {arm}"] = time.perf_counter() - t0
            steps[f"{name} {arm}"] = distiller_step(setup, recipe, batches)
    say(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the start, {args.threads} thread(s), batch {args.batch} "
        f"({tokens:.0f} tokens per batch on average, 8 fixed batches), {args.steps} timed rounds after 3 warm-up "
        f"rounds; setup (data, teacher) {load_s:.0f} s")
    names = list(steps)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
    for r in range(3 + args.steps):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            t = timed(steps[k])
            if r >= 3:
                times[k].append(t)
    wall = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    cpu = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    say(f"load average {os.getloadavg()[0]:.1f} at the end")
    say(f"{'arm':<32} {'wall ms':>9} {'ratio':>6} {'CPU ms':>9} {'CPU ratio':>9} {'ex/s':>7} {'once s':>7}")
    for k in names:
        say(f"{k:<32} {wall[k] * 1e3:>9.1f} {wall[k] / wall['plain']:>6.2f} {cpu[k] * 1e3:>9.1f} "
            f"{cpu[k] / cpu['plain']:>9.2f} {args.batch / wall[k]:>7.1f} "
            f"{once[k] if k in once else float('nan'):>7.2f}")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
