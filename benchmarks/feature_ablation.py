"""Feature-family ablation on the embedded default: the same student, steps, data and seeds with
(a) CE only, (b) CE + logit KD, (c) CE + logit KD + one feature family per arm.

Prints held-out perplexity and bits/char per arm as mean ± std over seeds, and writes the table to
benchmarks/results/feature_ablation.md (+ .json). Finished cells are reused on rerun (each cell is a kdforge run dir).

    .venv/bin/python benchmarks/feature_ablation.py [--steps 60] [--seeds 0 1 2] [--out runs/feature_ablation]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from kdforge.demo import demo_recipe
from kdforge.io import atomic_write_json, atomic_write_text
from kdforge.recipe import parse_recipe
from kdforge.train import prepare, train

CE = {"loss": "cross_entropy", "weight": 0.5}
KD = {"loss": "forward_kl", "weight": 0.5, "temperature": 1.0}
LAYERS = {"student": "model.layers.*", "teacher": "model.layers.*"}
LAST_QKV = {k: f"model.layers.-1.self_attn.{k}_proj" for k in ("q", "k", "v")}
ARMS: dict[str, list[dict]] = {
    "ce_only": [{"loss": "cross_entropy"}],
    "logit_kd": [CE, KD],
    "+hidden_mse": [CE, KD, {"loss": "hidden_mse", "projector": "linear", **LAYERS}],
    "+pkd": [CE, KD, {"loss": "pkd_patient", "projector": "linear", "layer_map": "skip", **LAYERS}],
    "+cka": [CE, KD, {"loss": "cka", **LAYERS}],
    "+minilm": [CE, KD, {"loss": "minilm_relations", "num_relation_heads": 16, "causal": True,
                         "student": LAST_QKV, "teacher": LAST_QKV}],
    "+rkd": [CE, KD, {"loss": "rkd", "student": "hidden_states.-1", "teacher": "hidden_states.-1"}],
    "+fam": [CE, KD, {"loss": "hidden_mse", "projector": {"kind": "fam_seq"}, "student": "model.layers.-1",
                      "teacher": "model.layers.-1"}],
    "+block_kd": [CE, KD, {"loss": "block_kd", "weight": 0.5, "projector": "linear"}],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    ap.add_argument("--out", type=Path, default=Path("runs/feature_ablation"))
    args = ap.parse_args()

    base = demo_recipe().model_dump(mode="json")
    base["train"].update(steps=args.steps, batch_size=args.batch, save_every=args.steps,
                         warmup_steps=max(1, args.steps // 10))
    base["data"]["max_eval_tokens"] = 8192
    shared = None
    results: dict[str, list[dict]] = {}
    for arm in args.arms:
        for seed in args.seeds:
            recipe = parse_recipe({**base, "name": f"{arm}-s{seed}", "seed": seed, "objective": ARMS[arm]})
            out = args.out / arm / f"seed{seed}"
            if not (out / "final.json").is_file():
                if shared is None:
                    shared = prepare(recipe)  # loads the teacher and tokenizer once for every cell
                setup = prepare(recipe, teacher=shared.teacher, tokenizer=shared.tokenizer)
                train(recipe, setup=setup, out=out, progress=False)
            results.setdefault(arm, []).append(json.loads((out / "final.json").read_text())["student"])
            print(f"{arm:14s} seed {seed}: ppl {results[arm][-1]['perplexity']:.1f}", flush=True)

    def ms(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {sd:.2f}"

    lines = [f"Held-out (King Lear + The Tempest), {args.steps} steps × batch {args.batch}×128, seeds {args.seeds}; "
             "mean ± std over seeds, last step.", "",
             "| arm | perplexity | bits/char | top-1 agreement |", "|---|---|---|---|"]
    for arm, rows in results.items():
        lines.append(f"| {arm} | {ms([r['perplexity'] for r in rows])} | {ms([r['bits_per_char'] for r in rows])} "
                     f"| {ms([r['top1_agreement'] for r in rows])} |")
    table = "\n".join(lines) + "\n"
    print(table)
    atomic_write_text(Path("benchmarks/results/feature_ablation.md"), table)
    atomic_write_json(Path("benchmarks/results/feature_ablation.json"), results)


if __name__ == "__main__":
    main()
