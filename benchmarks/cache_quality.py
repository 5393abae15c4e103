"""Teacher-cache quality: the same student, data, steps and seed trained from the live teacher (its full
distribution), from top-k caches, from sampled caches and from hybrid caches; bytes/token, held-out perplexity, ECE,
KL(teacher || student) and training tokens/s in one table.

    .venv/bin/python benchmarks/cache_quality.py [--steps 60] [--batch 4] [--seq 128] [--threads 2]
                                                 [--top-k 16,64,256] [--samples 8,16,32,64] [--sampling iid]
                                                 [--hybrid 4+8,8+8] [--arms ce,live,top_k,sampled,hybrid]
                                                 [--eval-tokens 8192] [--out results.md]

Setup shared by every arm: teacher = the embedded SmolLM2-135M-Instruct (the demo recipe's teacher, at its
teacher.dtype); student = a fresh 4-layer d=256 Llama (demo.FRESH_STUDENT), built with seed 0 (identical
initial weights in every arm); data = the first steps·batch·seq tokens of the Shakespeare training works in seq-token
blocks, visited in kdforge's seeded order; objective = forward KL(teacher || student) at T=1 only, chunked
(train.logit_chunk_size); the demo recipe's optimiser and schedule. Arms:

  ce          cross-entropy on the data's next tokens only (no teacher): the plain step the cached steps are timed
              against
  live        the teacher run at every step (its full distribution)
  top_k K     an offline top-K cache (int6 values, packed ids; the "bucket" tail), K from --top-k
  sampled N   an offline sampled cache of N draws per token (--sampling), N from --samples; forward KL's
              unbiased estimate (Anshumann et al., ACL 2025)
  hybrid K+N  an offline hybrid cache: the top K exactly (int6 values, packed ids, the exact tail mass) plus N draws
              from the tail (--sampling), K+N from --hybrid; forward KL's unbiased estimate with the head exact

Each cache is built once before its arm (its build time is printed, not counted in tokens/s). Each arm trains in its
own subprocess. tokens/s = steps·batch·seq / wall time of the training loop. Held-out metrics = kdforge's
evaluate_models on the held-out works with the teacher as reference (perplexity, ECE of the top-1 prediction,
KL(teacher || student) in nats/token). Targets (issue 14): a cache at <= 48 bytes/token whose student is
within 1% of the live student's perplexity and no worse calibrated; the cached training step <= 1.1x a plain CE
step (cached tokens/s >= CE tokens/s / 1.1). --out also writes the table as Markdown, with the load average
(/proc/loadavg) at the start and the end of the run: tokens/s depend on the machine's load, quality figures do not.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _recipe(args, out: Path, arm: str, cache: Path | None = None):
    from kdforge.demo import FRESH_STUDENT, demo_recipe
    from kdforge.recipe import Term

    recipe = demo_recipe(student=FRESH_STUDENT)
    data = recipe.data.model_copy(update={"seq_len": args.seq, "max_train_tokens": args.steps * args.batch * args.seq,
                                          "max_eval_tokens": args.eval_tokens})
    train = recipe.train.model_copy(update={
        "steps": args.steps, "batch_size": args.batch, "warmup_steps": max(1, args.steps // 10), "save_every": 0,
        "eval_every": 0, "log_every": args.steps, "logit_chunk_size": args.chunk})
    teacher = recipe.teacher
    if cache is not None:
        teacher = teacher.model_copy(update={"kind": "cache", "path": str(cache)})
    objective = [Term(loss="cross_entropy", weight=1.0)] if arm == "ce" else [
        Term(loss="forward_kl", weight=1.0, temperature=1.0)]
    return recipe.model_copy(update={"output_dir": str(out), "data": data, "train": train, "teacher": teacher,
                                     "objective": objective})


def _cache_options(arm: str, args):
    from kdforge.teachers.cache import CacheOptions

    kind, size = arm.split(":")
    if kind == "top_k":
        return CacheOptions(k=int(size), temperature=1.0, batch_size=8)
    if kind == "hybrid":
        k, n = size.split("+")
        return CacheOptions(mode="hybrid", k=int(k), samples=int(n), sampling=args.sampling, temperature=1.0,
                            batch_size=8)
    return CacheOptions(mode="sampled", samples=int(size), sampling=args.sampling, temperature=1.0, batch_size=8)


def _folder(arm: str) -> str:
    return arm.replace(":", "_").replace("+", "p")


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def build(args, arm: str) -> dict:
    from kdforge.models import load_teacher, load_tokenizer
    from kdforge.teachers.cache import build_cache
    from kdforge.train import tokenize_corpus

    recipe = _recipe(args, Path(args.workdir) / "unused", arm)
    teacher, tok = load_teacher(recipe.teacher), load_tokenizer(recipe.teacher)
    blocks, _ = tokenize_corpus(recipe, tok)
    t0 = time.perf_counter()
    index = build_cache(teacher, tok, blocks.ids, Path(args.workdir) / _folder(arm),
                        teacher_spec=recipe.teacher.model_dump(), options=_cache_options(arm, args))
    return {"build_seconds": time.perf_counter() - t0, "bytes_per_token": index["bytes_per_token"]}


def run(args, arm: str) -> dict:
    import kdforge.train as kt
    from kdforge.evaluate.metrics import evaluate_models
    from kdforge.models import load_teacher

    work = Path(args.workdir)
    cache = work / _folder(arm) if ":" in arm else None
    recipe = _recipe(args, work / f"run_{_folder(arm)}", arm, cache)
    setup = kt.prepare(recipe)
    result = {}

    def finish(setup_, out, **_):  # replaces the final export: held-out metrics with the teacher as reference
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        result["train_seconds"] = rows[-1]["tokens"] / rows[-1]["tokens_per_s"]
        teacher = setup_.teacher if setup_.teacher is not None else load_teacher(recipe.teacher)
        metrics = evaluate_models({"student": setup_.student, "teacher": teacher}, setup_.val_blocks,
                                  batch_size=args.batch, reference="teacher")
        s = metrics["student"]
        result.update(perplexity=s["perplexity"], ece=s["ece"], kl=s["kl_teacher_student"],
                      teacher_perplexity=metrics["teacher"]["perplexity"])
        return {}

    kt.finish = finish
    kt.train(recipe, setup=setup, progress=False)
    return result


def _subprocess(args, passthrough: list[str], what: str, arm: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *passthrough, f"--{what}={arm}"], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=64, help="train.logit_chunk_size")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top-k", default="16,64,256")
    ap.add_argument("--samples", default="8,16,32,64")
    ap.add_argument("--sampling", default="iid", choices=["iid", "systematic"])
    ap.add_argument("--hybrid", default="4+8,8+8", help="hybrid arms, K+N each (top-K head + N tail draws)")
    ap.add_argument("--arms", default="ce,live,top_k,sampled,hybrid", help="which kinds of arm to run")
    ap.add_argument("--out", default=None, help="also write the table as Markdown here")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--build", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.run or args.build:
        import logging

        import torch

        torch.set_num_threads(args.threads)
        logging.basicConfig(level=logging.WARNING)
        print("RESULT " + json.dumps(run(args, args.run) if args.run else build(args, args.build)))
        return

    kinds = args.arms.split(",")
    arms = [k for k in ("ce", "live") if k in kinds]
    arms += [f"top_k:{k}" for k in args.top_k.split(",") if "top_k" in kinds and k]
    arms += [f"sampled:{n}" for n in args.samples.split(",") if "sampled" in kinds and n]
    arms += [f"hybrid:{kn}" for kn in args.hybrid.split(",") if "hybrid" in kinds and kn]
    import torch

    load_start, t_start = _loadavg(), time.time()

    with tempfile.TemporaryDirectory(prefix="kdforge-cache-quality-") as tmp:
        workdir = args.workdir or tmp
        passthrough = [f"--steps={args.steps}", f"--batch={args.batch}", f"--seq={args.seq}", f"--chunk={args.chunk}",
                       f"--eval-tokens={args.eval_tokens}", f"--threads={args.threads}",
                       f"--sampling={args.sampling}", f"--workdir={workdir}"]
        results: dict[str, dict] = {}
        for arm in arms:
            built = _subprocess(args, passthrough, "build", arm) if ":" in arm else {}
            results[arm] = {**built, **(_subprocess(args, passthrough, "run", arm) if "error" not in built else {})}
            print(f"[{arm}] {results[arm]}", file=sys.stderr, flush=True)

    tokens = args.steps * args.batch * args.seq
    load_end, wall = _loadavg(), time.time() - t_start
    header = (f"{args.steps} steps x {args.batch}x{args.seq} tokens ({tokens:,}), forward KL at T=1, chunked; "
              f"{args.threads} threads; CPU capability {torch.backends.cpu.get_cpu_capability()}; sampling "
              f"{args.sampling}; load average (1/5/15 min) at the start {load_start}, at the end {load_end}; "
              f"wall {wall / 60:.1f} min")
    print("\n" + header)
    ce_tps = tokens / results["ce"]["train_seconds"] if "train_seconds" in results.get("ce", {}) else float("nan")
    live = results.get("live", {})
    print(f"{'arm':<12}{'bytes/tok':>10}{'build s':>9}{'tok/s':>8}{'vs CE':>7}{'ppl':>9}{'vs live':>9}{'ECE':>8}"
          f"{'KL(t||s)':>10}")
    md = ["| arm | bytes/token | build s | tokens/s | step vs CE | held-out ppl | vs live | ECE "
          "| KL(teacher‖student) |", "|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        r = results[arm]
        if "error" in r:
            print(f"{arm:<12}  failed: {r['error']}")
            md.append(f"| {arm} | failed: {r['error']} |")
            continue
        tps = tokens / r["train_seconds"]
        vs_live = r["perplexity"] / live["perplexity"] - 1 if "perplexity" in live else float("nan")
        size = f"{r['bytes_per_token']:.1f}" if "bytes_per_token" in r else "-"
        build_s = f"{r['build_seconds']:.0f}" if "build_seconds" in r else "-"
        print(f"{arm:<12}{size:>10}{build_s:>9}{tps:>8,.0f}{ce_tps / tps:>7.2f}{r['perplexity']:>9.1f}"
              f"{vs_live:>+9.1%}{r['ece']:>8.4f}{r['kl']:>10.4f}")
        md.append(f"| {arm} | {size} | {build_s} | {tps:,.0f} | {ce_tps / tps:.2f} | {r['perplexity']:.1f} | "
                  f"{'—' if arm == 'live' else f'{vs_live:+.1%}'} | {r['ece']:.4f} | {r['kl']:.4f} |")
    if "teacher_perplexity" in live:
        print(f"teacher perplexity {live['teacher_perplexity']:.1f}; 'vs CE' = the arm's step time / the CE step's")
    if args.out:
        text = [f"# Teacher-cache quality (`benchmarks/cache_quality.py`)", "", header + ".", "", *md, ""]
        if "teacher_perplexity" in live:
            text.append(f"Teacher perplexity {live['teacher_perplexity']:.1f}. 'step vs CE' = the arm's training "
                        "time / the CE arm's (depends on the load).")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
