"""Data efficiency: how many training tokens does distillation save? The same student trained on 1/8, 1/4, 1/2 and
all of a fixed training-token budget with cross-entropy only, forward KL, the best feature recipe of the method
matrix (FAM) and sequence-level KD, at the same steps per token; held-out perplexity against training tokens.

    .venv/bin/python benchmarks/data_efficiency.py [--budget 65536] [--seeds 0,1,2] [--batch 8] [--seq 64]
                     [--methods ce,forward_kl,fam,seqkd] [--samples 64] [--prompt-tokens 16] [--decoding sample]
                     [--eval-tokens 8192] [--threads 2] [--out runs/data_efficiency]
                     [--results benchmarks/results/data_efficiency]

Setup shared by every cell: teacher = the embedded SmolLM2-135M-Instruct (the demo recipe's, teacher.dtype auto);
student = a fresh 4-layer d=256 Llama (demo.FRESH_STUDENT, 15.7M parameters), built from the cell's seed; the demo
recipe's optimiser and learning rate, warm-up over the first tenth of the steps; held out = King Lear + The Tempest
(the first --eval-tokens tokens, packed like the matrix's).

Data. The Shakespeare training works are packed into blocks of --seq tokens; the budget is a fixed random sample of
--budget tokens' worth of those blocks (seed 0, whatever the training seed), in a fixed order, and fraction f trains
on the first f of them: the fractions' data are nested prefixes of the budget's. The budget is rounded down to whole
batches at every fraction. A cell at fraction f takes exactly one pass over its blocks (f·budget / (batch·seq)
steps; the order within the pass comes from the cell's seed), so steps are proportional to tokens and no cell sees
a block twice. Budgets are nested too: a smaller budget's blocks are the first ones of a larger budget's, so a cell
at fraction f of budget B repeats the cell at 2f of budget B/2 exactly (same blocks, steps and seed).

Methods (the objectives of ce, forward_kl and fam are read from benchmarks/llm_matrix.yaml, so they are the matrix's):

  ce          cross-entropy on the budget's next tokens, no teacher
  forward_kl  0.5 CE + 0.5 forward KL(teacher || student), from an offline SAMPLED teacher cache of --samples draws
              per token at T=1 (Anshumann et al. 2025; kdforge cache-teacher --mode sampled), built once over the
              whole budget: a KD step then costs about a CE step
  fam         the forward_kl objective + FAM's token-axis frequency-attention projector on the last hidden layer
              (layer-normed MSE), the best row of the README's method matrix; the teacher's last-layer hidden states
              are stored in the same cache (bf16), so FAM runs from the cache too
  seqkd       sequence-level KD (Kim & Rush 2016): for every budget block, its first --prompt-tokens tokens are the
              prompt and the teacher writes the other seq - prompt tokens (kdforge.generate.generate_batch, KV cache,
              --decoding sample at T=1 or greedy, no stop at EOS, so every block keeps --seq tokens); the student
              trains with CE on the teacher's tokens only (the prompt is masked, as kdforge's prompt–response data
              does). Generated once, over the whole budget; fraction f trains on the first f of the generated blocks

Every cell's held-out perplexity is written to OUT/cells/METHOD/fFRACTION/seedS.json as it finishes (atomically);
rerunning the same command skips the cells already written, and the cache and generations resume where they
stopped. OUT/settings.json refuses a rerun with other settings into the same OUT. After every cell the results
markdown (RESULTS.md: mean ± sample std over seeds per method and fraction, the headline fractions) and the plot
(RESULTS.png: perplexity against training tokens, log x, error bars = std) are rewritten.

Headline: the fraction of the budget each distillation method needs to reach CE's perplexity on the whole budget,
interpolated linearly in perplexity against log(tokens) between the two measured fractions around the first
crossing (see `fraction_to_reach`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import torch

from kdforge.data.packing import TokenBlocks

FRACTIONS = (Fraction(1, 8), Fraction(1, 4), Fraction(1, 2), Fraction(1))
METHODS = ("ce", "forward_kl", "fam", "seqkd")
MATRIX = Path(__file__).with_name("llm_matrix.yaml")
FAM_TAP = "model.layers.-1"  # the teacher tensor FAM compares (llm_matrix.yaml's fam term), cached with the logits
BUDGET_SEED = 0
REACHED_AT_FIRST = "at or below the smallest fraction"
NOT_REACHED = "not reached"


# --------------------------------------------------------------------------- pure pieces (tested in tests/)


def round_budget(budget_tokens: int, batch: int, seq: int) -> int:
    """The budget rounded down so that every fraction is a whole number of batches of batch·seq tokens."""
    unit = batch * seq * max(f.denominator for f in FRACTIONS)
    return budget_tokens // unit * unit


def budget_blocks(blocks: TokenBlocks, budget_tokens: int, seed: int = BUDGET_SEED) -> TokenBlocks:
    """budget_tokens' worth of the training blocks: a seeded random sample, in a seeded order."""
    n = budget_tokens // blocks.ids.shape[1]
    if n > len(blocks):
        raise SystemExit(f"--budget {budget_tokens:,} needs {n} blocks; the training corpus has {len(blocks)}")
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[:n]
    return TokenBlocks(blocks.ids[order], blocks.chars[order])


def fraction_blocks(blocks: TokenBlocks, fraction: Fraction) -> TokenBlocks:
    """The first `fraction` of the blocks (fractions of the same blocks are nested prefixes)."""
    n = len(blocks) * fraction.numerator // fraction.denominator
    labels, mask = blocks.labels, blocks.attention_mask
    return TokenBlocks(blocks.ids[:n], blocks.chars[:n], None if labels is None else labels[:n],
                       None if mask is None else mask[:n])


def fraction_to_reach(fractions: list[float], perplexities: list[float], target: float) -> tuple[float | None, str]:
    """The fraction of the budget at which a perplexity curve first reaches `target`: (fraction, how).

    Between the measured fractions around the first one at or below the target, perplexity is interpolated linearly
    in log(fraction). Reached at the smallest fraction: (that fraction, REACHED_AT_FIRST), an upper bound (nothing
    is measured below it). Never reached: (None, NOT_REACHED)."""
    points = sorted(zip(fractions, perplexities))
    for i, (f, p) in enumerate(points):
        if p <= target:
            if i == 0:
                return f, REACHED_AT_FIRST
            f0, p0 = points[i - 1]
            t = (p0 - target) / (p0 - p)
            return math.exp(math.log(f0) + t * (math.log(f) - math.log(f0))), "interpolated"
    return None, NOT_REACHED


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


# --------------------------------------------------------------------------- the runs


def method_objectives() -> dict[str, list]:
    import yaml

    methods = yaml.safe_load(MATRIX.read_text())["methods"]
    return {"ce": methods["ce"]["objective"], "forward_kl": methods["forward_kl"]["objective"],
            "fam": methods["fam"]["objective"], "seqkd": methods["ce"]["objective"]}


def base_recipe(args, out: Path):
    from kdforge.demo import FRESH_STUDENT, demo_recipe

    recipe = demo_recipe(student=FRESH_STUDENT)
    data = recipe.data.model_copy(update={"seq_len": args.seq, "max_eval_tokens": args.eval_tokens})
    return recipe.model_copy(update={"output_dir": str(out), "data": data})


def cell_recipe(base, method: str, steps: int, seed: int, batch: int, cache: Path):
    from kdforge.recipe import parse_recipe

    data = base.model_dump(mode="json")
    data.update(seed=seed, objective=method_objectives()[method])
    data["train"].update(steps=steps, batch_size=batch, warmup_steps=max(1, steps // 10), save_every=0, eval_every=0,
                         log_every=steps)
    if method in ("forward_kl", "fam"):
        data["teacher"].update(kind="cache", path=str(cache))
    return parse_recipe(data)


def build_teacher_cache(args, teacher, tokenizer, budget: TokenBlocks, out: Path) -> dict:
    from kdforge.teachers.cache import CacheOptions, build_cache

    t0 = time.perf_counter()
    spec = base_recipe(args, out).teacher
    index = build_cache(teacher, tokenizer, budget.ids, out / "teacher_cache", teacher_spec=spec.model_dump(),
                        options=CacheOptions(mode="sampled", samples=args.samples, temperature=1.0,
                                             features=[FAM_TAP], feature_dtype="bfloat16", batch_size=8))
    return {"seconds": time.perf_counter() - t0, "bytes_per_token": index["bytes_per_token"]}


def generate_seqkd(args, teacher, tokenizer, budget: TokenBlocks, out: Path) -> tuple[TokenBlocks, float]:
    """The teacher's continuations of every budget block's first --prompt-tokens tokens, as prompt-masked blocks;
    written in chunks (atomically) so a killed run resumes at the chunk it was on."""
    import io

    from kdforge.generate import generate_batch
    from kdforge.io import atomic_write_bytes
    from kdforge.precision import resolve
    from kdforge.recipe import GenerateSpec

    p, seq = args.prompt_tokens, args.seq
    gen = GenerateSpec(max_new_tokens=seq - p, stop_at_eos=False, do_sample=args.decoding == "sample",
                       temperature=1.0, top_p=1.0, batch_size=args.gen_batch)
    bf16 = resolve("auto") == "bfloat16"
    folder = out / "seqkd"
    folder.mkdir(parents=True, exist_ok=True)
    t0, chunks, chunk = time.perf_counter(), [], 64
    for c0 in range(0, len(budget), chunk):
        path = folder / f"blocks_{c0:06d}.pt"
        if not path.is_file():
            rows = []
            for b0 in range(c0, min(c0 + chunk, len(budget)), gen.batch_size):
                prompts = budget.ids[b0:min(b0 + gen.batch_size, c0 + chunk, len(budget)), :p].tolist()
                answers = generate_batch(teacher, tokenizer, prompts, gen, seed=b0, bf16=bf16)
                rows += [prompt + a["ids"] for prompt, a in zip(prompts, answers)]
            buf = io.BytesIO()
            torch.save(torch.tensor(rows, dtype=torch.long), buf)
            atomic_write_bytes(path, buf.getvalue())
            print(f"  seqkd: generated blocks {c0}..{c0 + len(rows) - 1} of {len(budget)} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        chunks.append(torch.load(path))
    ids = torch.cat(chunks)
    labels = ids.clone()
    labels[:, :p] = -100  # the loss counts the teacher's tokens only
    # chars are the source blocks' (bits/char is not reported for training blocks)
    return TokenBlocks(ids, budget.chars, labels=labels, attention_mask=torch.ones_like(ids)), time.perf_counter() - t0


@contextmanager
def student_only_finish(val_blocks: TokenBlocks, result: dict):
    """Replace kdforge.train.finish (the final evaluation against the teacher and the export) with the student's
    held-out perplexity alone: the teacher's own figures are measured once, not per cell."""
    import kdforge.train as kt
    from kdforge.evaluate.metrics import evaluate_models

    def finish(setup, out, *, timing=None, **_):
        result.update(timing or {})
        result["perplexity"] = evaluate_models({"student": setup.student}, val_blocks)["student"]["perplexity"]
        return result

    saved, kt.finish = kt.finish, finish
    try:
        yield
    finally:
        kt.finish = saved


def run_cell(args, method: str, fraction: Fraction, seed: int, ctx: dict) -> dict:
    from kdforge.train import prepare, train

    work = Path(args.out) / "run"
    shutil.rmtree(work, ignore_errors=True)
    data = ctx["seqkd"] if method == "seqkd" else ctx["budget"]
    blocks = fraction_blocks(data, fraction)
    steps = len(blocks) // args.batch
    recipe = cell_recipe(ctx["base"], method, steps, seed, args.batch, Path(args.out) / "teacher_cache")
    t0 = time.perf_counter()
    if recipe.teacher.kind == "cache":  # the cache covers the whole budget: open it there, train on the prefix
        setup = prepare(recipe, tokenizer=ctx["tokenizer"], blocks=(data, ctx["val"]))
        setup = replace(setup, train_blocks=blocks)
    else:
        setup = prepare(recipe, teacher=ctx["teacher"], tokenizer=ctx["tokenizer"], blocks=(blocks, ctx["val"]))
    result = {"method": method, "fraction": str(fraction), "seed": seed, "steps": steps,
              "tokens": steps * args.batch * args.seq}
    with student_only_finish(ctx["val"], result):
        train(recipe, setup=setup, progress=False, out=work)
    shutil.rmtree(work, ignore_errors=True)
    result.update(cell_seconds=time.perf_counter() - t0, load=os.getloadavg()[0])
    return result


# --------------------------------------------------------------------------- results


def cell_path(out: Path, method: str, fraction: Fraction, seed: int) -> Path:
    return out / "cells" / method / f"f{fraction.numerator}_{fraction.denominator}" / f"seed{seed}.json"


def read_cells(out: Path, methods: list[str], seeds: list[int]) -> dict:
    """{(method, fraction): [cell results]} of the cells written so far."""
    cells = {}
    for m in methods:
        for f in FRACTIONS:
            found = [json.loads(p.read_text()) for s in seeds if (p := cell_path(out, m, f, s)).is_file()]
            if found:
                cells[m, f] = found
    return cells


def headline(cells: dict, methods: list[str]) -> tuple[float | None, dict[str, tuple[float | None, str]]]:
    """CE's full-budget mean perplexity and, per distillation method measured at every fraction, the fraction of
    the budget it needs to reach it."""
    if ("ce", FRACTIONS[-1]) not in cells:
        return None, {}
    target = mean_std([c["perplexity"] for c in cells["ce", FRACTIONS[-1]]])[0]
    out = {}
    for m in methods:
        if m != "ce" and all((m, f) in cells for f in FRACTIONS):
            means = [mean_std([c["perplexity"] for c in cells[m, f]])[0] for f in FRACTIONS]
            out[m] = fraction_to_reach([float(f) for f in FRACTIONS], means, target)
    return target, out


def _fmt(mean: float, std: float | None) -> str:
    return f"{mean:,.1f}" + (f" ± {std:,.1f}" if std is not None else "")


def write_results(args, cells: dict, methods: list[str], seeds: list[int], budget_tokens: int, info: dict) -> None:
    from kdforge.io import atomic_write_text
    from kdforge.precision import cpu_capability

    results = Path(args.results)
    planned = len(methods) * len(FRACTIONS) * len(seeds)
    done = sum(len(v) for v in cells.values())
    tokens = [budget_tokens * f.numerator // f.denominator for f in FRACTIONS]
    lines = ["# Data efficiency: held-out perplexity against training tokens", ""]
    if done < planned:
        lines += [f"**PARTIAL**: {done} of {planned} cells measured; a row's seeds column says how many seeds it has.",
                  ""]
    loads = [c["load"] for v in cells.values() for c in v]
    wall = sum(c["cell_seconds"] for v in cells.values() for c in v) + info.get("cache", {}).get("seconds", 0) + \
        info.get("seqkd_seconds", 0)
    setup = ""
    if "cache" in info:
        setup += (f" Forward KL and FAM from a sampled teacher cache, N={args.samples} draws per token at T=1, plus "
                  f"the last layer's hidden states in bf16 ({info['cache']['bytes_per_token']:,.0f} bytes/token; built "
                  f"in {info['cache']['seconds']:.0f} s).")
    if "seqkd" in methods:
        setup += (f" SeqKD on the teacher's {'sampled (T=1)' if args.decoding == 'sample' else 'greedy'} "
                  f"continuations of each block's first {args.prompt_tokens} tokens (generated in "
                  f"{info.get('seqkd_seconds', 0):.0f} s; loss on the {args.seq - args.prompt_tokens} generated "
                  "tokens per block).")
    lines += [f"`{info['command']}`", "",
              f"Budget {budget_tokens:,} training tokens (blocks of {args.seq} tokens sampled from the Shakespeare "
              f"training works), batch {args.batch}×{args.seq}, one pass per cell (steps ∝ tokens); seeds "
              f"{', '.join(map(str, seeds))}; held out: lear + tempest, {args.eval_tokens:,} tokens. Teacher "
              f"SmolLM2-135M-Instruct ({info['teacher_dtype']}): held-out perplexity "
              f"{info['teacher_perplexity']:.1f}. Student: the demo's 4-layer d=256 Llama.{setup}", "",
              f"CPU capability {cpu_capability()}, {args.threads} torch thread(s); load average (1 min) at the end of "
              f"the cells {min(loads, default=0):.1f}-{max(loads, default=0):.1f}; wall time of the cells, the cache "
              f"and the generations: {wall / 60:.1f} min.", "",
              "| method | " + " | ".join(f"{f} ({t:,} tokens)" for f, t in zip(FRACTIONS, tokens)) + " | seeds |",
              "|---|" + "---|" * (len(FRACTIONS) + 1)]
    for m in methods:
        row = []
        for f in FRACTIONS:
            ppl = [c["perplexity"] for c in cells.get((m, f), [])]
            row.append(_fmt(*mean_std(ppl)) if ppl else "—")
        n = sorted({len(cells.get((m, f), [])) for f in FRACTIONS})
        seeds_done = f"{n[0]}" if n[0] == n[-1] else f"{n[0]}–{n[-1]}"
        lines.append(f"| {m} | " + " | ".join(row) + f" | {seeds_done} |")
    target, reach = headline(cells, methods)
    lines += ["", "Mean ± sample std of held-out perplexity over seeds.", ""]
    if target is not None:
        lines.append(f"**Headline**: the fraction of the budget each method needs to reach CE's full-budget "
                     f"perplexity ({target:.1f}), interpolated linearly in perplexity against log(tokens):")
        lines.append("")
        for m, (frac, how) in reach.items():
            if frac is None:
                lines.append(f"- {m}: not reached within the budget")
            elif how == REACHED_AT_FIRST:
                lines.append(f"- {m}: ≤ {frac:.3f} (already at the smallest fraction, {tokens[0]:,} tokens)")
            else:
                lines.append(f"- {m}: {frac:.3f} of the budget ({frac * budget_tokens:,.0f} tokens, {1 / frac:.2f}× "
                             "fewer than CE)")
    results.parent.mkdir(parents=True, exist_ok=True)
    lines += ["", f"Plot: [{results.name}.png]({results.name}.png)", ""]
    atomic_write_text(results.with_suffix(".md"), "\n".join(lines))
    plot(cells, methods, budget_tokens, target, info, results.with_suffix(".png"))


def plot(cells: dict, methods: list[str], budget_tokens: int, target: float | None, info: dict, path: Path) -> None:
    from kdforge.report.plots import _save, plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in methods:
        pts = [(budget_tokens * float(f), *mean_std([c["perplexity"] for c in cells[m, f]]))
               for f in FRACTIONS if (m, f) in cells]
        if pts:
            x, y, err = zip(*pts)
            ax.errorbar(x, y, yerr=[e or 0 for e in err], marker="o", capsize=3, label=m)
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=1, label="CE, full budget")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([budget_tokens * float(f) for f in FRACTIONS], [f"{int(budget_tokens * f):,}" for f in FRACTIONS])
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out perplexity (lear + tempest)")
    ax.set_title(f"student perplexity vs tokens (teacher {info['teacher_perplexity']:.0f})")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=65536, help="training tokens of the full budget")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--samples", type=int, default=64, help="teacher draws per token in the sampled cache")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="SeqKD: real tokens the teacher continues")
    ap.add_argument("--decoding", default="sample", choices=["sample", "greedy"], help="SeqKD: teacher decoding")
    ap.add_argument("--gen-batch", type=int, default=16, help="SeqKD: prompts per generate call")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a 2-core machine that other jobs "
                    "oversubscribe, 2 threads ran a teacher forward 3-20x slower than 1)")
    ap.add_argument("--out", default="runs/data_efficiency")
    ap.add_argument("--results", default=str(Path(__file__).with_name("results") / "data_efficiency"),
                    help="path stem of the results markdown and plot (.md, .png)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the markdown and plot from OUT's cells")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from kdforge.evaluate.metrics import evaluate_models
    from kdforge.io import atomic_write_json
    from kdforge.models import load_teacher, load_tokenizer
    from kdforge.precision import resolve
    from kdforge.train import tokenize_corpus

    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown or not 0 < args.prompt_tokens < args.seq:
        raise SystemExit(f"unknown methods {sorted(unknown)}" if unknown else "--prompt-tokens must be in (0, --seq)")
    budget_tokens = round_budget(args.budget, args.batch, args.seq)
    if budget_tokens == 0:
        raise SystemExit(f"--budget must be at least {round_budget(args.batch * args.seq * 8, args.batch, args.seq):,} "
                         "tokens (one batch at the smallest fraction)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("seeds", "methods", "threads", "out", "results",
                                                                "report_only")}
    settings["budget"] = budget_tokens
    if (out / "settings.json").is_file() and json.loads((out / "settings.json").read_text()) != settings:
        raise SystemExit(f"{out} holds cells measured with other settings ({out / 'settings.json'}); use another --out")
    atomic_write_json(out / "settings.json", settings)
    if args.report_only:
        info = json.loads((out / "info.json").read_text())
        write_results(args, read_cells(out, methods, seeds), methods, seeds, budget_tokens, info)
        print(Path(args.results).with_suffix(".md").read_text())
        return

    started = time.perf_counter()
    base = base_recipe(args, out / "run")
    tokenizer = load_tokenizer(base.teacher)
    train_blocks, val = tokenize_corpus(base, tokenizer)
    budget = budget_blocks(train_blocks, budget_tokens)
    teacher = load_teacher(base.teacher)
    info_path = out / "info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if "teacher_perplexity" not in info:
        bf16 = resolve(base.teacher.dtype) == "bfloat16"
        info["teacher_perplexity"] = evaluate_models({"teacher": teacher}, val, bf16={"teacher": bf16}
                                                     )["teacher"]["perplexity"]
        info["teacher_dtype"] = resolve(base.teacher.dtype)
    info["command"] = "python benchmarks/data_efficiency.py " + " ".join(sys.argv[1:])
    atomic_write_json(info_path, info)
    if {"forward_kl", "fam"} & set(methods) and "cache" not in info:
        info["cache"] = build_teacher_cache(args, teacher, tokenizer, budget, out)
        atomic_write_json(info_path, info)
    seqkd = None
    if "seqkd" in methods:
        seqkd, seconds = generate_seqkd(args, teacher, tokenizer, budget, out)
        info.setdefault("seqkd_seconds", seconds)
        atomic_write_json(info_path, info)
    print(f"budget {budget_tokens:,} tokens = {len(budget)} blocks; teacher perplexity "
          f"{info['teacher_perplexity']:.1f}; setup {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    ctx = {"base": base, "tokenizer": tokenizer, "teacher": teacher, "budget": budget, "seqkd": seqkd, "val": val}
    for seed in seeds:  # a whole seed first: a run stopped early still has every method and fraction
        for fraction in FRACTIONS:
            for method in methods:
                path = cell_path(out, method, fraction, seed)
                if path.is_file():
                    continue
                result = run_cell(args, method, fraction, seed, ctx)
                atomic_write_json(path, result)
                print(f"[{method} {fraction} seed {seed}] {result['steps']} steps, perplexity "
                      f"{result['perplexity']:.1f}, {result['cell_seconds']:.0f} s, load {result['load']:.1f}",
                      file=sys.stderr, flush=True)
                write_results(args, read_cells(out, methods, seeds), methods, seeds, budget_tokens, info)
    write_results(args, read_cells(out, methods, seeds), methods, seeds, budget_tokens, info)
    print(Path(args.results).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
