"""Loss-curve plots with matplotlib (headless)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curves(runs: dict[str, Path], path: Path, keys: tuple[str, ...] = ("loss/cross_entropy",),
                     finals: dict[str, dict[str, tuple[int, float]]] | None = None) -> Path:
    """One panel per metric key, one line per run (e.g. baseline vs distilled cross-entropy). finals: per run, points
    `{key: (step, value)}` that end its line (the final held-out perplexity after the periodic evaluations)."""
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, run in runs.items():
            points = [(r["step"], r[key]) for r in read_metrics(run) if key in r]
            if key in ((finals or {}).get(name) or {}):
                points.append(finals[name][key])
            if points:
                ax.plot(*zip(*points), label=name, marker="o" if key.startswith("eval/") else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def loss_terms(runs: dict[str, Path]) -> list[str]:
    """Every `loss/<term>` key any run logged, then the total `loss`."""
    keys: list[str] = []
    for run in runs.values():
        for row in read_metrics(run):
            keys += [k for k in row if k.startswith("loss/") and k not in keys]
    return sorted(keys) + ["loss"]


def plot_term_curves(runs: dict[str, Path | list[Path]], path: Path, keys: list[str] | None = None) -> Path | None:
    """One panel per loss term, one line per run. A run given as several folders (seeds) is drawn as their mean at
    the steps all of them logged. Returns None when no run has logged anything."""
    groups = {name: ([p] if isinstance(p, (str, Path)) else list(p)) for name, p in runs.items()}
    flat = {f"{name}/{i}": p for name, ps in groups.items() for i, p in enumerate(ps)}
    keys = keys or loss_terms(flat)
    if not any(read_metrics(p) for p in flat.values()):
        return None
    cols = min(3, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.0 * cols, 3.3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, paths in groups.items():
            series = [{r["step"]: r[key] for r in read_metrics(p) if key in r} for p in paths]
            series = [s for s in series if s]
            if not series:
                continue
            steps = sorted(set.intersection(*(set(s) for s in series)))
            ax.plot(steps, [sum(s[st] for s in series) / len(series) for st in steps], label=name)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def plot_cka_heatmap(data: dict, path: Path, title: str = "linear CKA") -> Path:
    """Heatmap of a CKA matrix (rows: student layers, columns: teacher layers), colour scale fixed to [0, 1]."""
    import numpy as np

    m = np.asarray(data["matrix"], dtype=float)
    s_labels, t_labels = data["student_layers"], data["teacher_layers"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.28 * m.shape[1] + 2.5), max(2.5, 0.35 * m.shape[0] + 1.5)))
    im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(m.shape[1]))
    ax.set_xticklabels(t_labels, fontsize=7, rotation=90)
    ax.set_yticks(range(m.shape[0]))
    ax.set_yticklabels(s_labels, fontsize=7)
    ax.set_xlabel("teacher hidden state")
    ax.set_ylabel("student hidden state")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability(arms: dict[str, dict], path: Path, title: str = "reliability") -> Path | None:
    """Reliability diagrams (Guo et al. 2017), one panel per arm: over each equal-width top-1 confidence bin that
    holds examples, its accuracy (bar) and the gap to its mean confidence (hatched), against the diagonal of
    perfect calibration; the panel's title gives the ECE of those bins and the example count. `arms`: name -> bins as kdforge.evaluate.metrics.reliability_bins writes them (count,
    confidence_sum, correct per bin; pooled over seeds by kdforge.bench.calibration_summary). Returns None when no
    arm has an example."""
    arms = {k: v for k, v in arms.items() if v and sum(v["count"])}
    if not arms:
        return None
    cols = min(4, len(arms))
    nrows = (len(arms) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.3 * cols, 3.3 * nrows), squeeze=False)
    for ax, (name, b) in zip(axes.flat, arms.items()):
        n_bins, total = b["n_bins"], sum(b["count"])
        width = 1.0 / n_bins
        lefts, accs, confs, gap = [], [], [], 0.0
        for i, (n, conf, right) in enumerate(zip(b["count"], b["confidence_sum"], b["correct"])):
            if n:
                lefts.append(i * width)
                accs.append(right / n)
                confs.append(conf / n)
                gap += abs(conf - right)
        ax.bar(lefts, accs, width=width, align="edge", color="tab:blue", edgecolor="white", label="accuracy")
        ax.bar(lefts, [abs(c - a) for c, a in zip(confs, accs)], bottom=[min(c, a) for c, a in zip(confs, accs)],
               width=width, align="edge", fill=False, edgecolor="tab:red", hatch="///", linewidth=0.8,
               label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("top-1 confidence")
        ax.set_ylabel("accuracy")
        seeds = f", {b['seeds']} seeds" if b.get("seeds", 1) > 1 else ""
        ax.set_title(f"{name}\nECE {gap / total:.3f}, n={total}{seeds}", fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(arms):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
