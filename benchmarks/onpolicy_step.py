"""Cost of an on-policy (GKD) step against an off-policy KD step on the same batch shape, side by side in one process.

recipes/gkd.yaml on the embedded default (SmolLM2-135M-Instruct teacher at the precision kdforge picks for this CPU,
the ~15M-parameter student, 8 Shakespeare "continue this passage" prompts x 128 tokens, generalized JSD beta 0.5,
chunked). Each round times, on the same batch:

* off: the off-policy KD step (teacher forward, student forward + backward, AdamW update) on the data's responses;
* on: the step of kdforge.onpolicy at lambda 0.5 (a seeded coin: half the rounds the student first samples up to
  64 new tokens per prompt with the KV cache, then the same KD step on its responses);
* gen: the step with lambda 1 (every step generates), for the cost of generation alone.

Rounds alternate the three so machine load hits them alike. Prints the mean step times, on/off (issue #15's target
<= 1.5x) and gen/off, the CPU capability and the load average before and after.

    .venv/bin/python benchmarks/onpolicy_step.py [--rounds 8] [--threads N] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from kdforge.onpolicy import OnPolicy
from kdforge.recipe import load_recipe
from kdforge.train import param_groups, prepare

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "gkd.yaml"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE (as kdforge distill --set)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    recipe = load_recipe(RECIPE, args.set)
    setup = prepare(recipe)
    distiller = setup.distiller
    distiller.train()
    optimizer = torch.optim.AdamW(param_groups(distiller, recipe), lr=recipe.train.lr)
    source = distiller.teacher_source

    def controller(lmbda: float) -> OnPolicy:
        spec = recipe.onpolicy.model_copy(update={"lmbda": lmbda})
        return OnPolicy(spec, seed=recipe.seed, steps=recipe.train.steps, student=setup.student, teacher=source.model,
                        tokenizer=setup.tokenizer, bf16=bool(recipe.train.bf16), teacher_autocast=source.autocast)

    half, always = controller(0.5), controller(1.0)
    g = torch.Generator().manual_seed(0)
    batch_size = recipe.train.batch_size
    batches = [setup.task.make_batch(setup.train_blocks, torch.randperm(len(setup.train_blocks), generator=g)[:batch_size])
               for _ in range(args.rounds + 1)]

    def step(batch, policy: OnPolicy | None, index: int) -> float:
        start = time.perf_counter()
        if policy is not None:
            batch = policy.batches([batch], index)[0]
        loss, _ = distiller(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    step(batches[-1], None, 0)  # warm-up: first-call allocations
    step(batches[-1], always, 10_000)
    times: dict[str, list[float]] = {"off": [], "on": [], "gen": []}
    for i in range(args.rounds):
        times["off"].append(step(batches[i], None, i))
        times["on"].append(step(batches[i], half, i))
        times["gen"].append(step(batches[i], always, i))
    load_after = os.getloadavg()
    mean = {k: statistics.mean(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} thread(s), os.cpu_count() {os.cpu_count()}, load average (1 min) "
          f"{load_before[0]:.2f} before / {load_after[0]:.2f} after")
    print(f"teacher {recipe.teacher.model} at {source.dtype}, student bf16 autocast {bool(recipe.train.bf16)}, batch "
          f"{batch_size} x {recipe.data.seq_len} tokens, max_new_tokens {recipe.onpolicy.max_new_tokens}, "
          f"{args.rounds} rounds")
    print(f"lambda 0.5 generated {half.counts['generated']} of {args.rounds} steps")
    for k, label in (("off", "off-policy KD step"), ("on", "on-policy step, lambda 0.5"),
                     ("gen", "on-policy step, lambda 1")):
        print(f"{label:<28} {mean[k]:8.3f} s  (min {min(times[k]):.3f}, max {max(times[k]):.3f})")
    print(f"on/off (lambda 0.5): {mean['on'] / mean['off']:.2f}x   gen/off (lambda 1): {mean['gen'] / mean['off']:.2f}x")


if __name__ == "__main__":
    main()
