"""Feature-family ablation on the embedded default: the same student, steps, data and seeds with
(a) CE only, (b) CE + logit KD, (c) CE + logit KD + one representation-transfer family per arm.

The arms are the feature methods of benchmarks/llm_matrix.yaml, so this runs that matrix restricted to them, into the
same bench directory: cells finished by either command are reused by the other. Prints held-out perplexity and
bits/char per arm as mean ± std over seeds and writes benchmarks/results/feature_ablation.md.
(`kdforge bench benchmarks/llm_matrix.yaml` afterwards rewrites the full matrix's results.md from the cached cells.)

    .venv/bin/python benchmarks/feature_ablation.py [--out runs/bench/llm_matrix] [--set train.steps=40]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from kdforge.bench import _fmt, run_bench
from kdforge.io import atomic_write_text

MATRIX = Path(__file__).with_name("llm_matrix.yaml")
ARMS = ["ce", "forward_kl", "tinybert", "minilm", "pkd", "cka", "fam", "block_kd", "pwkd"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/bench/llm_matrix"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    args = ap.parse_args()
    summary = run_bench(MATRIX, out=args.out, recipe_overrides=args.overrides, seeds=args.seeds, only_methods=ARMS,
                        echo=print)
    rows = next(iter(summary["summary"].values()), {})
    lines = ["| arm | perplexity | bits/char | top-1 agreement | seeds ok |", "|---|---|---|---|---|"]
    for arm in ARMS:
        row = rows.get(arm)
        if not row:
            lines.append(f"| {arm} | missing | | | |")
            continue
        m = row["metrics"]
        lines.append(f"| {arm} | {_fmt(m.get('perplexity'), 'perplexity')} | "
                     f"{_fmt(m.get('bits_per_char'), 'bits_per_char')} | "
                     f"{_fmt(m.get('top1_agreement'), 'top1_agreement')} | {row['seeds'] - row['failed']}/{row['seeds']} |")
    table = "\n".join(lines) + "\n"
    print(table)
    atomic_write_text(Path(__file__).with_name("results") / "feature_ablation.md", table)


if __name__ == "__main__":
    main()
