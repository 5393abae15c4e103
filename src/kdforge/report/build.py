"""`kdforge report DIR`: one self-contained HTML page (images inlined as data URIs, no external resources) and its
Markdown twin for a run directory (from `kdforge distill`), a bench directory (from `kdforge bench`) or a demo
directory (from `kdforge demo`: the same page the demo wrote). A folder that is none of these is refused untouched.

Whatever is absent (an unfinished run, a bench still going, no eval.json) is listed under "Missing" with the command
that would produce it; the report is written anyway.
"""
from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import KDForgeError
from ..io import atomic_write_text
from .plots import plot_cka_heatmap, plot_loss_curves, plot_reliability, plot_term_curves, read_metrics
from .tables import _fmt

ASSETS = "report_files"

RUN_COLUMNS = [("perplexity", "held-out ppl"), ("bits_per_char", "bits/char"), ("ece", "ECE"),
               ("top1_agreement", "top-1 agr."), ("kl_teacher_student", "KL(T‖S)"),
               ("kl_student_teacher", "KL(S‖T)"), ("ood_perplexity", "OOD ppl"),
               ("gen_token_agreement", "gen. token agr."), ("gen_exact_match", "gen. exact"),
               ("prefill_tokens_per_s", "prefill tok/s"), ("generation_tokens_per_s", "gen. tok/s"),
               ("parameters", "params"), ("safetensors_bytes", "safetensors bytes")]
# a classifier's run (task image_classification): final.json and eval.json hold accuracy, not perplexity
# multi-label (task multi_label_classification) and detection (task object_detection) runs
MULTILABEL_RUN_COLUMNS = [("map", "mAP"), ("macro_f1", "macro-F1 @0.5"), ("exact_match", "exact set"),
                          ("teacher_agreement", "teacher agr."), ("examples_per_s", "eval examples/s"),
                          ("parameters", "params")]
DETECTION_RUN_COLUMNS = [("map50", "mAP@0.5"), ("map50_vs_teacher", "mAP@0.5 vs teacher"),
                         ("detections_per_canvas", "detections/canvas"), ("examples_per_s", "eval examples/s"),
                         ("parameters", "params")]
CLASSIFIER_RUN_COLUMNS = [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("ece", "ECE"), ("nll", "NLL"),
                          ("top1_agreement", "top-1 agr."), ("kl_teacher_student", "KL(T‖S)"),
                          ("examples_per_s", "eval examples/s"), ("parameters", "params")]


@dataclass
class Report:
    """The page as a list of blocks, rendered twice (HTML and Markdown)."""

    title: str
    out_dir: Path
    blocks: list[tuple[str, Any]] = field(default_factory=list)  # (kind, payload)
    missing: list[str] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[Any]], caption: str | None = None) -> None:
        self.blocks.append(("table", (header, rows, caption)))

    def image(self, path: Path | None, alt: str) -> None:
        if path is not None and Path(path).is_file():
            self.blocks.append(("img", (Path(path), alt)))

    def pre(self, text: str, summary: str | None = None) -> None:
        """Preformatted text; with a summary it is folded (HTML <details>)."""
        self.blocks.append(("pre", (text, summary)))

    # --- rendering
    def html(self) -> str:
        esc = html.escape
        body = [f"<h1>{esc(self.title)}</h1>"]
        if self.missing:
            body.append('<section id="missing"><h2>Missing</h2><ul>' +
                        "".join(f"<li>{esc(m)}</li>" for m in self.missing) + "</ul></section>")
        for kind, payload in self.blocks:
            if kind == "h2":
                body.append(f"<h2>{esc(payload)}</h2>")
            elif kind == "p":
                body.append(f"<p>{esc(payload)}</p>")
            elif kind == "pre":
                text, summary = payload
                pre = f"<pre>{esc(text)}</pre>"
                body.append(f"<details><summary>{esc(summary)}</summary>{pre}</details>" if summary else pre)
            elif kind == "table":
                header, rows, caption = payload
                cap = f"<caption>{esc(caption)}</caption>" if caption else ""
                head = "".join(f"<th>{esc(str(h))}</th>" for h in header)
                trs = "".join("<tr>" + "".join(f"<td>{esc(_cell(v))}</td>" for v in r) + "</tr>" for r in rows)
                body.append(f'<div class="scroll"><table>{cap}<thead><tr>{head}</tr></thead>'
                            f"<tbody>{trs}</tbody></table></div>")
            elif kind == "img":
                path, alt = payload
                data = base64.b64encode(path.read_bytes()).decode()
                body.append(f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{esc(alt)}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
                 "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 7px;"
                 "text-align:left;vertical-align:top;font-size:13px}th{background:#f3f3f3}"
                 "td{white-space:pre-wrap}caption{text-align:left;font-weight:bold;padding:4px 0}"
                 ".scroll{overflow-x:auto}img{max-width:100%}pre{background:#f7f7f7;padding:.6em;overflow-x:auto;"
                 "font-size:12px}#missing{background:#fff4e5;border:1px solid #f0c36d;padding:.3em 1em}")
        return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{esc(self.title)}</title><style>{style}</style></head><body>\n"
                + "\n".join(body) + "\n</body></html>\n")

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        if self.missing:
            lines += ["## Missing", ""] + [f"- {m}" for m in self.missing] + [""]
        for kind, payload in self.blocks:
            if kind == "h2":
                lines += [f"## {payload}", ""]
            elif kind == "p":
                lines += [payload, ""]
            elif kind == "pre":
                text, summary = payload
                lines += ([f"{summary}:", ""] if summary else []) + ["```", text.rstrip("\n"), "```", ""]
            elif kind == "table":
                header, rows, caption = payload
                if caption:
                    lines += [f"**{caption}**", ""]
                lines.append("| " + " | ".join(_md(h) for h in header) + " |")
                lines.append("|" + "---|" * len(header))
                lines += ["| " + " | ".join(_md(_cell(v)) for v in r) + " |" for r in rows]
                lines.append("")
            elif kind == "img":
                path, alt = payload
                rel = path.relative_to(self.out_dir) if path.is_relative_to(self.out_dir) else path
                lines += [f"![{alt}]({rel.as_posix()})", ""]
        return "\n".join(lines)


def _cell(v: Any) -> str:
    return v if isinstance(v, str) else _fmt(v)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", "⏎")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, OSError):
        return None


# --------------------------------------------------------------------------- shared sections


def _manifest_section(rep: Report, manifest: dict | None, where: str) -> None:
    rep.heading("Manifest")
    if manifest is None:
        rep.missing.append(f"{where}/manifest.json: recipe hash, versions, commit, hardware and seed are unknown")
        rep.text("No manifest.json.")
        return
    versions = ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items())
    hw = manifest.get("hardware") or {}
    rows = [["recipe hash", manifest.get("recipe_hash")], ["seed", manifest.get("seed")],
            ["versions", versions], ["git commit", manifest.get("git_commit") or "unknown"],
            ["hardware", ", ".join(f"{k}: {v}" for k, v in hw.items())], ["created", manifest.get("created")]]
    rep.table(["field", "value"], [[k, "—" if v is None else str(v)] for k, v in rows])
    if manifest.get("recipe"):
        rep.pre(yaml.safe_dump(manifest["recipe"], sort_keys=False), summary="the resolved recipe")


def _generations_section(rep: Report, prompts: list[str], columns: dict[str, list[str]]) -> None:
    """One table per prompt: a row per model (teacher, baseline, students...)."""
    rep.heading("Generations (greedy)")
    for i, prompt in enumerate(prompts):
        rows = [[name, texts[i]] for name, texts in columns.items() if texts and i < len(texts)]
        rep.table(["model", "continuation"], rows, caption=f"prompt {i + 1}: {prompt!r}")


# --------------------------------------------------------------------------- a run


def _looks_like_run(d: Path) -> bool:
    return any((d / n).exists() for n in ("manifest.json", "metrics.jsonl", "final.json", "checkpoints"))


def _looks_like_demo(d: Path) -> bool:
    return (d / "metrics.json").is_file() and all((d / n / "final.json").is_file() for n in DEMO_RUNS)


DEMO_RUNS = ("baseline", "distilled")
DEMO_COLUMNS = [("model", "model"), ("parameters", "parameters"), ("perplexity", "held-out ppl"),
                ("bits_per_char", "bits/char"), ("top1_agreement", "top-1 agr."),
                ("kl_teacher_student", "KL(T‖S)"), ("tokens_per_s", "eval tok/s")]


def demo_report(demo: Path, rep: Report) -> None:
    """The demo's page: held-out results of teacher, CE baseline and distilled student, and their training
    cross-entropy side by side (like for like: the distilled run's total loss also holds its KD term)."""
    summary = _read_json(demo / "metrics.json") or {}
    rep.heading("Held-out results")
    rep.text("Same student, steps, data and seed for the baseline and the distilled run (and, where the student is "
             "cut from the teacher, the same sizes from fresh weights: scratch); evaluated on the held-out works.")
    rep.table([label for _, label in DEMO_COLUMNS],
              [[row.get(key) for key, _ in DEMO_COLUMNS] for row in summary.get("rows", [])])
    gain = summary.get("baseline_over_distilled_perplexity")
    if gain is not None:
        rep.text(f"Distilled student perplexity is {gain:.2f}x lower than the baseline's at equal steps and data."
                 if gain > 1 else f"The distilled student did NOT beat the baseline (ratio {gain:.2f}).")
    if "gap_closed" in summary:
        closed = summary["gap_closed"]
        rep.text("Gap closed: none to close (the baseline is not worse than the teacher)." if closed is None else
                 f"Gap closed: the distilled student closes {closed:.0%} of the baseline-to-teacher gap in "
                 "log-perplexity ((ln baseline - ln distilled) / (ln baseline - ln teacher)).")
    if summary.get("gap_closed_from_scratch") is not None:
        rep.text(f"From scratch: against the same sizes trained from fresh weights with cross-entropy, the distilled "
                 f"student (cut from the teacher, then distilled) closes {summary['gap_closed_from_scratch']:.0%} "
                 "of the gap to the teacher.")
    runs = {name: demo / name for name in ("scratch", *DEMO_RUNS) if (demo / name / "final.json").is_file()}
    # like for like: the cross-entropy term of both runs (the distilled run's total also holds its KD term), and
    # held-out perplexity from the periodic evaluations plus the final one
    finals = {}
    for name, run in runs.items():
        final = _read_json(run / "final.json") or {}
        if "step" in final and "perplexity" in (final.get("student") or {}):
            finals[name] = {"eval/perplexity": (final["step"], final["student"]["perplexity"])}
    rep.heading("Training curves")
    rep.image(plot_loss_curves(runs, rep.out_dir / ASSETS / "demo_cross_entropy.png",
                               keys=("loss/cross_entropy", "eval/perplexity"), finals=finals),
              "training cross-entropy and held-out perplexity: baseline vs distilled")
    for name, run in runs.items():
        _manifest_section(rep, _read_json(run / "manifest.json"), f"{name} run")


def _looks_like_bench(d: Path) -> bool:
    return (d / "results.json").is_file() or (d / "cells").is_dir() or (d / "matrix.yaml").is_file()


def run_report(run: Path, rep: Report) -> None:
    manifest = _read_json(run / "manifest.json")
    final = _read_json(run / "final.json")
    ev = _read_json(run / "eval.json")
    rows = read_metrics(run)
    steps_total = ((manifest or {}).get("recipe") or {}).get("train", {}).get("steps")
    last_step = max((r["step"] for r in rows), default=None)
    if final is None:
        progress = f"last logged step {last_step} of {steps_total}" if last_step else "no step was logged"
        rep.missing.append(f"final.json: the run has not finished its final evaluation ({progress}); rerun "
                           "`kdforge distill` with the same recipe and --out to resume")
    if ev is None:
        rep.missing.append("eval.json: no extended evaluation (out-of-domain perplexity, generation agreement, "
                           f"speed, CKA); run `kdforge eval {run}`")
    _run_overview(rep, manifest, final, ev, rows)
    # results
    rep.heading("Results")
    summary = (ev or {}).get("summary", {})
    table_rows = []
    held = (ev or {}).get("heldout") or {}
    models = {}
    if final:
        models["teacher"] = final.get("teacher")
        models["student"] = final.get("student")
    for name in ("teacher", "baseline", "student"):
        if held.get(name) and not models.get(name):
            models[name] = held[name]
    sources = {}
    classifier = any(m and "accuracy" in m and "perplexity" not in m for m in models.values())
    columns = CLASSIFIER_RUN_COLUMNS if classifier else RUN_COLUMNS
    for key, task_columns in (("map", MULTILABEL_RUN_COLUMNS), ("map50", DETECTION_RUN_COLUMNS)):
        if any(m and key in m for m in models.values()):  # the digit-canvas tasks
            columns = task_columns
    for name, m in models.items():
        if not m:
            continue
        held_from = "final.json" if final and final.get(name) is m else "eval.json"
        extra = ev is not None and name in ("student", "teacher")
        sources[name] = f"held-out: {held_from}" + ("; OOD, generation, speed, size: eval.json" if extra else "")
        vals = dict(m)
        if name == "student":
            vals.update({k: v for k, v in summary.items() if k not in vals})
        elif name == "teacher" and ev:
            vals["ood_perplexity"] = ((ev.get("ood") or {}).get("teacher") or {}).get("perplexity")
            tspeed = (ev.get("speed") or {}).get("teacher") or {}
            vals.update({k: v for k, v in tspeed.items() if v is not None})
            vals.update({k: v for k, v in ((ev.get("size") or {}).get("teacher") or {}).items() if v is not None})
        table_rows.append([name] + [vals.get(k) for k, _ in columns] + [sources[name]])
    if table_rows:
        step = (final or {}).get("step")
        rep.table(["model"] + [t for _, t in columns] + ["source"], table_rows,
                  caption=f"held-out metrics at the last step ({step})" if step else None)
        _provenance(rep, final, ev)
        if ev and (ev.get("ood") or {}).get("skipped"):
            rep.text(f"Out-of-domain perplexity: {ev['ood']['skipped']}.")
        if ev and ev.get("memory"):
            mem = ev["memory"]
            rep.text(f"Peak memory {mem['peak_rss_bytes'] / 2**20:,.0f} MiB — {mem['method']}.")
    else:
        rep.text("No results yet.")
    # curves
    rep.heading("Loss curves")
    if rows:
        png = plot_term_curves({run.name or "run": run}, rep.out_dir / ASSETS / "loss_curves.png")
        rep.image(png, "training loss per term (loss/<term> in metrics.jsonl)")
    else:
        rep.missing.append("metrics.jsonl: no training step was logged, so there are no loss curves")
        rep.text("No metrics.jsonl.")
    # calibration: a classifier's held-out reliability diagrams (final.json stores the bins)
    panels = {name: ((final or {}).get(name) or {}).get("calibration") for name in ("student", "teacher")}
    png = plot_reliability(panels, rep.out_dir / ASSETS / "reliability.png", "held-out reliability diagrams")
    if png:
        rep.heading("Calibration (held-out reliability diagrams)")
        rep.image(png, "reliability diagrams, student and teacher")
    # CKA
    rep.heading("Layer similarity (linear CKA)")
    cka = _cka_png(run, rep.out_dir / ASSETS / "cka.png", "student vs teacher")
    if cka:
        rep.image(cka, "linear CKA: student hidden states (rows) vs teacher hidden states (columns)")
    else:
        rep.text("No cka.json (written by `kdforge eval` with a teacher).")
    _manifest_section(rep, manifest, str(run))
    gen = (ev or {}).get("generation")
    if gen:
        cols = {"teacher": gen.get("teacher"), "baseline": gen.get("baseline"), "student": gen.get("student")}
        _generations_section(rep, gen["prompts"], {k: v for k, v in cols.items() if v})
    from .prompt_generations import from_eval

    from_eval(rep, ev)  # a run on prompt–response data: answers to held-out prompts, side by side, and their scores


def _measured_on(setup: dict | None) -> str:
    if not setup:
        return "an unrecorded setup (written before kdforge recorded it)"
    teacher = setup.get("teacher_precision")
    if "examples" in setup:  # a classifier's held-out images
        return f"{setup['examples']:,} held-out examples, batch {setup['batch_size']}, teacher {teacher or 'none'}"
    return (f"{setup['eval_tokens']:,} held-out tokens ({setup['blocks']} blocks of {setup['seq_len']}), batch "
            f"{setup['batch_size']}, teacher {teacher or 'none'}")


def _provenance(rep: Report, final: dict | None, ev: dict | None) -> None:
    """Which file each figure comes from, what it was measured on, and whether the two files agree."""
    parts = []
    if final:
        parts.append("final.json (the run's own final evaluation) measured on "
                     + _measured_on(final.get("heldout_setup")))
    if ev:
        parts.append(f"eval.json (`kdforge eval`) measured on {_measured_on(ev.get('heldout_setup'))}")
    rep.text("Sources: " + "; ".join(parts) + ".")
    s_final = (final or {}).get("student") or {}
    s_eval = ((ev or {}).get("heldout") or {}).get("student") or {}
    differ = [k for k in ("perplexity", "kl_teacher_student", "top1_agreement")
              if k in s_final and k in s_eval and abs(s_final[k] - s_eval[k]) > 1e-6 * max(1.0, abs(s_final[k]))]
    if differ:
        rep.text("final.json and eval.json disagree on the student's " + ", ".join(
            f"{k} ({s_final[k]:.6g} vs {s_eval[k]:.6g})" for k in differ) + "; the table shows final.json's. "
            "They were measured differently (see above) or on another student; rerun `kdforge eval` to refresh.")


def _run_overview(rep: Report, manifest: dict | None, final: dict | None, ev: dict | None,
                  rows: list[dict]) -> None:
    """Data, wall time, throughput and the baseline, in one table above the results."""
    recipe = (manifest or {}).get("recipe") or {}
    data, train_cfg = recipe.get("data") or {}, recipe.get("train") or {}
    logged = [r for r in rows if "tokens" in r]
    tokens = (final or {}).get("tokens_seen") or (logged[-1]["tokens"] if logged else None)
    tps = (final or {}).get("tokens_per_s") or (logged[-1].get("tokens_per_s") if logged else None)
    validation = data.get("validation")
    items = [("corpus", data.get("corpus")),
             ("held-out", ", ".join(map(str, validation)) if isinstance(validation, list) else validation),
             ("seq_len", data.get("seq_len")), ("steps", (final or {}).get("step") or train_cfg.get("steps")),
             ("batch", f"{train_cfg['batch_size']} x grad_accum {train_cfg.get('grad_accum', 1)}"
              if "batch_size" in train_cfg else None),
             ("tokens trained", tokens), ("training time", _duration((final or {}).get("train_seconds"))),
             ("wall time (final launch)", _duration((final or {}).get("wall_seconds"))),
             ("training tokens/s", tps)]
    baseline = ((ev or {}).get("heldout") or {}).get("baseline")
    if baseline:
        items.append(("baseline", (ev or {}).get("baseline_path") or "given to `kdforge eval --baseline`"))
    rep.heading("Run")
    rep.table(["field", "value"], [[k, "—" if v is None else v] for k, v in items])
    student = ((ev or {}).get("heldout") or {}).get("student")
    if baseline and student:
        ratio = baseline["perplexity"] / student["perplexity"]
        rep.text(f"Against the baseline (eval.json): held-out perplexity {student['perplexity']:.4g} vs "
                 f"{baseline['perplexity']:.4g}, {ratio:.2f}x " + ("lower." if ratio >= 1 else "HIGHER (worse)."))


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d} ({seconds:,.1f} s)"


def _cka_png(folder: Path, target: Path, title: str) -> Path | None:
    data = _read_json(folder / "cka.json")
    if data is None:
        return None
    return plot_cka_heatmap(data, target, title=title)


# --------------------------------------------------------------------------- a bench


def _seed(cell_dir: Path) -> int | None:
    """N of a cell folder named seedN; None for any other name."""
    n = cell_dir.name.removeprefix("seed")
    return int(n) if n.isdigit() else None


def _calibration_section(rep: Report, calibration: dict | None, cell_dirs: list[Path], baseline: str,
                         methods: list[str] | None) -> None:
    """Held-out reliability diagrams per student, one panel per method (bins pooled over its seeds) and the teacher's,
    from results.json's `calibration`, else from the finished cells' final.json. Nothing for a bench whose cells
    store no calibration bins (causal LM)."""
    from ..bench import CellResult, calibration_summary

    if calibration is None:
        calibration = calibration_summary([CellResult(d.parent.parent.name, d.parent.name, _seed(d), str(d), "done")
                                           for d in cell_dirs])
    rank = {m: i for i, m in enumerate(methods or [])}
    for student, arms in ((calibration or {}).get("students") or {}).items():
        order = sorted(arms, key=lambda m: (m != baseline, rank.get(m, len(rank)), m))
        panels = {(f"{m} (CE baseline)" if m == baseline else m): arms[m] for m in order}
        if calibration.get("teacher"):
            panels["teacher"] = calibration["teacher"]
        png = plot_reliability(panels, rep.out_dir / ASSETS / f"reliability_{student}.png",
                               f"held-out reliability diagrams, {student} (bins pooled over seeds)")
        if png:
            rep.heading(f"Calibration ({student}; held-out reliability diagrams)")
            rep.image(png, f"reliability diagrams per method, {student}")


def bench_report(bench: Path, rep: Report) -> None:
    from ..bench import CellResult, cell_metrics, results_tables, summarize_cells

    results = _read_json(bench / "results.json")
    plan = _read_json(bench / "plan.json") or {}
    # cells are cells/STUDENT/METHOD/seedN; siblings such as `kdforge reproduce`'s seedN-reproduce are not
    cell_dirs = sorted((p for p in (bench / "cells").glob("*/*/seed*") if p.is_dir() and _seed(p) is not None),
                       key=lambda p: (p.parent.parent.name, p.parent.name, _seed(p)))
    if results is None:
        n_done = sum((d / "final.json").is_file() for d in cell_dirs)
        planned = len(plan.get("cells") or []) or "?"
        rep.missing.append(f"results.json: the bench has not finished (or was never run); the tables below come from "
                           f"the {n_done} of {planned} planned cells finished under {bench / 'cells'}; rerun "
                           "`kdforge bench` with the same matrix and --out to complete it")
        found = []
        for d in cell_dirs:
            student, method, seed = d.parent.parent.name, d.parent.name, _seed(d)
            if (d / "final.json").is_file():
                found.append(CellResult(student, method, seed, str(d), "done", metrics=cell_metrics(d)))
            else:
                err = (_read_json(d / "failed.json") or {}).get("error", "not finished")
                found.append(CellResult(student, method, seed, str(d), "failed", err))
        started = {r.dir for r in found}
        not_started = [c["key"] for c in plan.get("cells", []) if c["dir"] not in started]
        if not_started:
            rep.missing.append(f"{len(not_started)} cell(s) not started: {', '.join(not_started[:6])}"
                               + (" ..." if len(not_started) > 6 else ""))
        results = {"name": bench.name, "summary": summarize_cells(found), "methods": plan.get("methods"),
                   "baseline": plan.get("baseline", "ce_baseline"),
                   "failed": [{"cell": f"{r.student}/{r.method}/seed{r.seed}", "error": r.error}
                              for r in found if r.status == "failed"],
                   "teacher": {}, "cells": [{"student": r.student, "method": r.method, "seed": r.seed,
                                            "dir": r.dir, "status": r.status} for r in found]}
    baseline = results.get("baseline", "")
    rep.heading("Results")
    if results.get("statistics"):
        rep.text(results["statistics"] + ".")
    teacher = results.get("teacher") or {}
    if teacher:
        rep.text("Teacher: " + ", ".join(f"{k.removeprefix('teacher_')} {_fmt(v)}" for k, v in teacher.items()))
    tables = results_tables(results["summary"], baseline, results.get("methods"))
    for title, header, rows in tables:
        rep.table(header, rows, caption=title)
    if not tables:
        rep.text("No finished cell yet.")
    if results.get("failed"):
        rep.heading("Failed cells")
        rep.table(["cell", "error"], [[f["cell"], f["error"] or ""] for f in results["failed"]])
    _calibration_section(rep, results.get("calibration"), cell_dirs, baseline, results.get("methods"))
    # group cell dirs by student and method
    groups: dict[str, dict[str, list[Path]]] = {}
    for d in cell_dirs:
        groups.setdefault(d.parent.parent.name, {}).setdefault(d.parent.name, []).append(d)
    for student, methods in groups.items():
        rank = {m: i for i, m in enumerate(results.get("methods") or [])}
        order = sorted(methods, key=lambda m: (m != baseline, rank.get(m, len(rank)), m))
        rep.heading(f"Loss curves ({student}; mean over seeds)")
        png = plot_term_curves({m: methods[m] for m in order}, rep.out_dir / ASSETS / f"loss_{student}.png")
        if png:
            rep.image(png, f"training loss per term, {student}")
        else:
            rep.text("No cell has logged a training step yet.")
        rep.heading(f"Layer similarity ({student}; linear CKA, first finished seed)")
        shown = False
        for m in order:
            for d in sorted(methods[m], key=_seed):
                png = _cka_png(d, rep.out_dir / ASSETS / f"cka_{student}_{m}.png", f"{m} ({d.name}) vs teacher")
                if png:
                    rep.image(png, f"linear CKA, {m} ({d.name})")
                    shown = True
                    break
        if not shown:
            rep.text("No cell has a cka.json yet.")
        # generations: teacher / baseline / each method, first seed with eval.json
        prompts, columns = None, {}
        for m in order:
            for d in sorted(methods[m], key=_seed):
                gen = (_read_json(d / "eval.json") or {}).get("generation")
                if gen:
                    prompts = prompts or gen["prompts"]
                    if "teacher" not in columns and gen.get("teacher"):
                        columns["teacher"] = gen["teacher"]
                    label = f"{m} (CE baseline)" if m == baseline else m
                    columns[f"{label}, {d.name}"] = gen["student"]
                    break
        if prompts:
            _generations_section(rep, prompts, columns)
        elif not any((d / "eval.json").is_file() for ds in methods.values() for d in ds):
            # cells evaluated without generations (a classifier's eval.json, eval.generation false) miss nothing
            rep.missing.append(f"generations ({student}): no cell has an eval.json yet")
        from .prompt_generations import from_cells

        evals = {}  # answers to held-out prompts (prompt–response matrices): first seed with eval.json per method
        for m in order:
            for d in sorted(methods[m], key=_seed):
                ev = _read_json(d / "eval.json")
                if ev and ev.get("prompt_generation"):
                    evals[f"{m} (CE baseline)" if m == baseline else m] = ev
                    break
        from_cells(rep, evals)
    # manifest of the first cell, and every cell's recipe hash
    first = next((d for d in cell_dirs if (d / "manifest.json").is_file()), None)
    _manifest_section(rep, _read_json(first / "manifest.json") if first else None,
                      str(first) if first else f"{bench}/cells/*")
    cells = results.get("cells") or []
    if cells:
        rep.table(["cell", "status", "recipe hash", "error"],
                  [[f"{c['student']}/{c['method']}/seed{c['seed']}", c.get("status"), c.get("recipe_hash") or "—",
                    c.get("error") or ""] for c in cells], caption="cells")


# --------------------------------------------------------------------------- entry point


def build_report(path: str | Path, out: str | Path | None = None) -> tuple[Path, Path, list[str]]:
    """Write report.html and report.md for a run or bench directory; returns (html, md, missing items)."""
    path = Path(path)
    if not path.exists():
        raise KDForgeError(f"'{path}' does not exist; give a run directory (kdforge distill --out) or a bench "
                           "directory (kdforge bench --out)")
    if not path.is_dir():
        raise KDForgeError(f"'{path}' is a file; give the run or bench directory that holds it")
    out_dir = Path(out) if out else path
    if _looks_like_demo(path):
        rep = Report("kdforge demo", out_dir)
        demo_report(path, rep)
    elif _looks_like_bench(path):
        rep = Report(f"kdforge bench report: {path.resolve().name}", out_dir)
        bench_report(path, rep)
    elif _looks_like_run(path):
        name = (((_read_json(path / "manifest.json") or {}).get("recipe") or {}).get("name")
                or path.resolve().name)  # the recipe's name; the folder's only without a manifest
        rep = Report(f"kdforge run report: {name}", out_dir)
        run_report(path, rep)
    else:  # refuse before writing anything into a folder that is not ours
        runs = sorted(p.name for p in path.iterdir() if p.is_dir() and _looks_like_run(p))
        hint = f"; it holds runs: {', '.join(runs)}: report on one of them" if runs else \
            "; give a run directory (kdforge distill --out) or a bench directory (kdforge bench --out)"
        raise KDForgeError(f"'{path}' holds neither a run (manifest.json, metrics.jsonl, final.json) nor a bench "
                           f"(results.json, cells/){hint}")
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    atomic_write_text(html_path, rep.html())
    atomic_write_text(md_path, rep.markdown())
    return html_path, md_path, rep.missing
