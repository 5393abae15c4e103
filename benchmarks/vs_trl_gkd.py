"""kdforge's GKD vs TRL's GKDTrainer at lambda 0.5, beta 0.5: same teacher, student, prompts, order and steps; tokens/s
and peak RSS side by side (issue #15's target: >= 1.5x TRL's tokens/s at <= 0.7x its memory).

    .venv/bin/python benchmarks/vs_trl_gkd.py [--steps 16] [--batch 4] [--seq 128] [--threads 2]
                                              [--variants trl,kdforge]

Needs the bench extra (trl) and the embedded teacher. A sibling of benchmarks/vs_trl.py (offline forward KL), kept
apart because that file is being reworked at the same time.

Setup shared by both: teacher = embedded SmolLM2-135M-Instruct; student = recipes/gkd.yaml's 4-layer d=256 Llama,
built by kdforge with seed 0; data = the embedded "continue this passage" prompts (Shakespeare training works) as
kdforge's prompt–response blocks of --seq tokens (prompt <= seq/2, labels on the response), visited in kdforge's seeded
order (TRL gets them pre-ordered with a sequential sampler, the prompt left-padded beside each block as its collator
would make it); objective = generalized JSD, beta 0.5, temperature 1; lambda 0.5: a step's responses are the
student's own samples (temperature 1, up to 64 new tokens, KV cache) with probability 0.5 (TRL: python's random,
seeded; kdforge: its per-step seeded coin), and each side reports how many of its steps generated; optimiser =
AdamW (betas 0.9/0.95, weight decay 0.01 on matrices, lr 2e-3, clip 1.0) with kdforge's warm-up + cosine schedule,
float32 student.

Variants (each in a fresh subprocess, so peak RSS is that run's alone):
  trl      GKDTrainer, teacher in float32 (TRL's default), full [B, T, V] logits
  kdforge  kdforge distill of recipes/gkd.yaml at these sizes: teacher at teacher.dtype auto, chunked logit loss

tokens/s = steps·batch·seq / wall time of the training loop (loading, data preparation, evaluation excluded; the same
batch shape on both sides whatever the responses' lengths). Peak RSS = the process's VmHWM right after training.
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

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "gkd.yaml"
VARIANTS = ["trl", "kdforge"]


def _hwm_mib() -> float:
    from kdforge.evaluate.speed import rss_kib

    hwm = rss_kib("VmHWM")
    return float("nan") if hwm is None else hwm / 1024


def _recipe(args, out: Path):
    from kdforge.recipe import load_recipe

    return load_recipe(RECIPE, [f"output_dir={out}", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
                                f"data.seq_len={args.seq}", "train.save_every=0", f"train.log_every={args.steps}",
                                f"train.warmup_steps={max(1, args.steps // 10)}", f"train.lr={args.lr}",
                                "onpolicy.lambda=0.5", "train.bf16=false"])


def run_kdforge(args) -> dict:
    import kdforge.train as kt

    out = Path(args.workdir) / "kdforge"
    recipe = _recipe(args, out)
    result = {}

    def finish(setup_, out_, **_):  # measure instead of the final evaluation and export
        result["peak_rss_mib"] = _hwm_mib()
        rows = [json.loads(line) for line in (Path(out_) / "metrics.jsonl").read_text().splitlines()]
        result["train_seconds"] = rows[-1]["tokens"] / rows[-1]["tokens_per_s"]
        result["generated_steps"] = round(rows[-1]["onpolicy/generated"] * args.steps)
        return {}

    kt.finish = finish
    kt.train(recipe, progress=False)
    result["teacher_dtype"] = recipe.teacher.dtype
    return result


def run_trl(args) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kdforge.data.packing import batch_indices
    from kdforge.data.prompts import prompt_blocks
    from kdforge.models import build_student, load_teacher, load_tokenizer
    from kdforge.onpolicy import prompts_of
    from kdforge.train import lr_lambda

    recipe = _recipe(args, Path(args.workdir) / "trl")
    teacher, tok = load_teacher(recipe.teacher, torch.float32), load_tokenizer(recipe.teacher)  # TRL's default
    blocks, _ = prompt_blocks(recipe, tok)
    student = build_student(recipe.student, teacher, recipe.seed)
    order = torch.cat([batch_indices(len(blocks.ids), args.batch, s, recipe.seed) for s in range(args.steps)])
    ids, labels, mask = blocks.ids[order], blocks.labels[order], blocks.attention_mask[order]
    prompts = prompts_of({"input_ids": ids, "labels": labels, "attention_mask": mask})
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist(),
                                 "attention_mask": mask.tolist(), "prompt": prompts})
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def collate(rows):
        width = max(len(r["prompt"]) for r in rows)
        prompt = torch.full((len(rows), width), pad, dtype=torch.long)
        prompt_mask = torch.zeros_like(prompt)
        for i, r in enumerate(rows):  # left-padded, as TRL's DataCollatorForChatML makes `prompts`
            prompt[i, width - len(r["prompt"]):] = torch.tensor(r["prompt"])
            prompt_mask[i, width - len(r["prompt"]):] = 1
        return {"input_ids": torch.tensor([r["input_ids"] for r in rows]),
                "attention_mask": torch.tensor([r["attention_mask"] for r in rows]),
                "labels": torch.tensor([r["labels"] for r in rows]), "prompts": prompt,
                "prompt_attention_mask": prompt_mask}

    generated = {"n": 0}

    class InOrder(GKDTrainer):
        def _get_train_sampler(self, *a, **kw):
            return SequentialSampler(self.train_dataset)

        @staticmethod
        def generate_on_policy_outputs(model, inputs, generation_config):
            generated["n"] += 1
            return GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)

    config = GKDConfig(
        output_dir=str(Path(args.workdir) / "trl"), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=max(1, args.steps // 10), weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95,
        max_grad_norm=1.0, logging_steps=args.steps, save_strategy="no", report_to=[], lmbda=0.5, beta=0.5,
        temperature=1.0, max_new_tokens=recipe.onpolicy.max_new_tokens, seq_kd=False, max_length=args.seq,
        use_cpu=True, dataloader_num_workers=0, seed=recipe.seed, remove_unused_columns=False)
    groups = [{"params": [p for p in student.parameters() if p.ndim >= 2], "weight_decay": 0.01},
              {"params": [p for p in student.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    t = recipe.train
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, t.warmup_steps, t.steps, t.min_lr_ratio))
    trainer = InOrder(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                      processing_class=tok, data_collator=collate, optimizers=(optimizer, scheduler))
    random.seed(recipe.seed)  # TRL's coin: random.random() <= lmbda per training step
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return {"peak_rss_mib": _hwm_mib(), "train_seconds": seconds, "generated_steps": generated["n"],
            "teacher_dtype": "float32"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        res = run_trl(args) if args.child == "trl" else run_kdforge(args)
        print("RESULT " + json.dumps(res))
        return
    import torch

    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            cmd = [sys.executable, __file__, "--child", name, "--workdir", tmp, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--lr", str(args.lr),
                   "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{name} failed:\n{proc.stderr[-3000:]}")
                continue
            results[name] = json.loads(line[len("RESULT "):])
    load_after = os.getloadavg()
    tokens = args.steps * args.batch * args.seq
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} "
          f"thread(s), os.cpu_count() {os.cpu_count()}, load average (1 min) {load_before[0]:.2f} before / "
          f"{load_after[0]:.2f} after; {args.steps} steps x {args.batch} x {args.seq} tokens, lambda 0.5, beta 0.5")
    print(f"{'variant':<9} {'teacher':>9} {'generated':>10} {'tokens/s':>9} {'peak RSS MiB':>13}")
    for name, r in results.items():
        print(f"{name:<9} {r['teacher_dtype']:>9} {r['generated_steps']:>6}/{args.steps:<3} "
              f"{tokens / r['train_seconds']:9.1f} {r['peak_rss_mib']:13.0f}")
    if {"trl", "kdforge"} <= set(results):
        k, t = results["kdforge"], results["trl"]
        print(f"kdforge / TRL: tokens/s {(tokens / k['train_seconds']) / (tokens / t['train_seconds']):.2f}x, "
              f"peak RSS {k['peak_rss_mib'] / t['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
