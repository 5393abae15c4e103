"""`kdforge bench MATRIX.yaml`: methods x seeds (x students) with identical data, steps and evaluation.

Each cell is the base recipe plus the matrix's overrides, the student's, the method's and its seed, trained by
`kdforge.train.train` into `<out>/cells/<student>/<method>/seed<k>/` and then evaluated by the same Evaluator
(`eval.json`, `cka.json/png`). Cells with final.json are not retrained, so a stopped bench resumes. A cell that fails
is recorded with its one-line error and the others go on. `results.json` and `results.md` give, per metric, the mean
and sample standard deviation over seeds of the last-step values (never the best of a run); every table has a
cross-entropy-only baseline row (added to the matrix when it lacks one; a sentence-embedding matrix, which has no
labels, takes its first method as the reference row instead).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import KDForgeError
from .io import atomic_write_json, atomic_write_text
from .recipe import EvalSpec, MatrixSpec, ModelSpec, Recipe, _format_validation_error, apply_overrides, parse_recipe

log = logging.getLogger("kdforge")

BASELINE = "ce_baseline"
DEFAULT_STUDENT = "default"

# (key in a cell's flat metrics, column title, lower is better?) -- the tables' columns, in order
QUALITY_COLUMNS = [
    ("perplexity", "held-out ppl", True), ("bits_per_char", "bits/char", True),
    ("top1_agreement", "top-1 agr.", False), ("kl_teacher_student", "KL(T‖S)", True),
    ("kl_student_teacher", "KL(S‖T)", True), ("ece", "ECE", True), ("ood_perplexity", "OOD ppl", True),
    ("gen_token_agreement", "gen. token agr.", False), ("gen_exact_match", "gen. exact", False),
    ("cka_last_to_last", "CKA last", False), ("train_loss/cross_entropy", "train CE (last step)", True),
]
# a matrix on prompt–response data (data.prompts) adds a table of its generations on held-out prompts
GENERATION_COLUMNS = [
    ("rougeL_reference", "ROUGE-L vs real", False), ("rougeL_teacher", "ROUGE-L vs teacher", False),
    ("distinct_1", "distinct-1", False), ("distinct_2", "distinct-2", False),
    ("mean_response_tokens", "mean length (tokens)", False),
]
COST_COLUMNS = [
    ("prefill_tokens_per_s", "prefill tok/s", False), ("generation_tokens_per_s", "gen. tok/s", False),
    ("parameters", "params", True), ("safetensors_bytes", "safetensors bytes", True),
    ("peak_rss_bytes", "peak RSS bytes", True), ("train_seconds", "wall s", True),
]
# the same for a matrix of classifiers (task image_classification: cells report accuracy, not perplexity)
CLASSIFIER_QUALITY_COLUMNS = [
    ("accuracy", "accuracy", False), ("macro_f1", "macro-F1", False), ("ece", "ECE", True),
    ("nll", "NLL", True), ("top1_agreement", "top-1 agr.", False), ("kl_teacher_student", "KL(T‖S)", True),
    ("train_loss/cross_entropy", "train CE (last step)", True),
]
# multi-label (task multi_label_classification) and detection (task object_detection) matrices
MULTILABEL_QUALITY_COLUMNS = [
    ("map", "mAP", False), ("macro_f1", "macro-F1 @0.5", False), ("exact_match", "exact set", False),
    ("teacher_agreement", "teacher agr.", False), ("train_loss/binary_cross_entropy", "train BCE (last step)", True),
]
DETECTION_QUALITY_COLUMNS = [
    ("map50", "mAP@0.5", False), ("map50_vs_teacher", "mAP@0.5 vs teacher", False),
    ("detections_per_canvas", "detections/canvas", False), ("train_loss/detection", "train det. loss (last step)", True),
]
CLASSIFIER_COST_COLUMNS = [
    ("examples_per_s", "eval examples/s", False), ("parameters", "params", True), ("train_seconds", "wall s", True),
]
# sentence-embedding matrices (task sentence_embedding: no labels; the student's embeddings against the teacher's)
EMBEDDING_QUALITY_COLUMNS = [
    ("spearman_cosine", "Spearman (cosines)", False), ("top10_overlap", "top-10 overlap", False),
    ("teacher_cosine", "cos(S, T)", False),
]
EMBEDDING_COST_COLUMNS = [
    ("sentences_per_s", "eval sentences/s", False), ("parameters", "params", True), ("train_seconds", "wall s", True),
]


@dataclass
class Cell:
    student: str
    method: str
    seed: int
    dir: str
    recipe: dict[str, Any] | None = None  # the resolved recipe (JSON); None when it did not validate
    error: str | None = None  # why the recipe did not validate

    @property
    def key(self) -> str:
        return f"{self.student}/{self.method}/seed{self.seed}"


@dataclass
class CellResult:
    student: str
    method: str
    seed: int
    dir: str
    status: str  # done | failed | skipped (already finished)
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# --------------------------------------------------------------------------- the matrix


def load_matrix(path: str | Path, recipe_overrides: list[str] | None = None, seeds: list[int] | None = None,
                only_methods: list[str] | None = None) -> tuple[MatrixSpec, dict[str, Any]]:
    """The matrix and its base recipe (a dict, before any override).

    recipe_overrides (`key=value`, like `kdforge distill --set`) are applied to every cell last; `seeds` replaces the
    matrix's seeds; `only_methods` keeps those methods (the CE baseline is still added when none of them is one)."""
    path = Path(path)
    if not path.is_file():
        raise KDForgeError(f"matrix file '{path}' not found; see benchmarks/llm_matrix.yaml for an example")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise KDForgeError(f"matrix '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise KDForgeError(f"matrix '{path}' must be a mapping with base, methods and seeds")
    try:
        spec = MatrixSpec.model_validate(data)
    except ValidationError as err:
        raise KDForgeError(f"invalid matrix '{path}': {_format_validation_error(err)}") from None
    if recipe_overrides:
        spec.recipe_overrides = list(recipe_overrides)
    if seeds:
        spec.seeds = list(seeds)
    if only_methods:
        unknown = [m for m in only_methods if m not in spec.methods]
        if unknown:
            raise KDForgeError(f"method '{unknown[0]}' is not in the matrix (it has: {', '.join(spec.methods)})")
        spec.only_methods = list(only_methods)
    return spec, base_recipe_data(spec.base, path.parent)


def base_recipe_data(base: str, relative_to: Path) -> dict[str, Any]:
    if base == "demo":
        return yaml.safe_load(resources.files("kdforge").joinpath("recipes/demo.yaml").read_text())
    path = Path(base)
    if not path.is_absolute() and not path.is_file():
        path = relative_to / base
    if not path.is_file():
        raise KDForgeError(f"base recipe '{base}' not found (also looked in {relative_to}); give a path or 'demo'")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise KDForgeError(f"base recipe '{path}' must be a YAML mapping")
    return data


def _as_strings(overrides: dict[str, Any] | list[str] | None) -> list[str]:
    """A mapping of dotted keys becomes `key=<JSON>` (JSON is YAML, so apply_overrides reads it back unchanged)."""
    if not overrides:
        return []
    if isinstance(overrides, list):
        return [str(o) for o in overrides]
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def is_ce_only(recipe: Recipe) -> bool:
    """Whether the recipe trains on the labels alone: cross-entropy, the multi-label task's binary cross-entropy, or
    the detection task's loss on the student's own IoU assignment."""
    return all(t.loss in ("cross_entropy", "binary_cross_entropy")
               or (t.loss == "detection" and t.params.get("assignment", "iou") == "iou") for t in recipe.objective)


def plan_cells(spec: MatrixSpec, base: dict[str, Any], out: Path) -> tuple[list[Cell], str]:
    """All cells, and the name of the cross-entropy baseline method (added when the matrix has none). A task without
    labels (sentence_embedding) has no cross-entropy to train: its matrix's first method is the reference row."""
    students = spec.students or {DEFAULT_STUDENT: {}}
    methods = dict(spec.methods)

    def resolve(student: str, method: str, seed: int, method_overrides) -> Cell:
        cell_dir = out / "cells" / student / method / f"seed{seed}"
        data = copy.deepcopy(base)
        try:
            data = apply_overrides(data, _as_strings(spec.overrides) + _as_strings(students[student])
                                   + _as_strings(method_overrides) + list(spec.recipe_overrides))
            data.update(seed=seed, output_dir=str(cell_dir),
                        name=f"{spec.name}-{student}-{method}-seed{seed}")
            recipe = parse_recipe(data)
        except (KDForgeError, ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
            return Cell(student, method, seed, str(cell_dir), None, one_line(err))
        return Cell(student, method, seed, str(cell_dir), recipe.model_dump(mode="json"))

    baseline = None
    first_student = next(iter(students))
    for name, overrides in methods.items():
        probe = resolve(first_student, name, spec.seeds[0], overrides)
        if probe.recipe is not None and is_ce_only(parse_recipe(probe.recipe)):
            baseline = name
            break
    if baseline is None and base.get("task") == "sentence_embedding":
        baseline = next(iter(methods))
    if baseline is None:
        baseline = BASELINE
        methods = {BASELINE: {"objective": [{"loss": "cross_entropy"}]}, **methods}
    else:  # the baseline first in every table
        methods = {baseline: methods[baseline], **{k: v for k, v in methods.items() if k != baseline}}
    if spec.only_methods:  # a subset, always with the baseline
        methods = {k: v for k, v in methods.items() if k == baseline or k in spec.only_methods}
    cells = [resolve(s, m, seed, methods[m]) for s in students for m in methods for seed in spec.seeds]
    return cells, baseline


# --------------------------------------------------------------------------- running one cell

_CONTEXT: dict[str, Any] = {}  # per process: loaded teachers/tokenizers and evaluators, reused across cells


def _teacher_and_tokenizer(recipe: Recipe):
    import torch

    from .models import load_teacher, load_tokenizer

    # a student made of the teacher's weights (from_teacher, pruned) copies them from an fp32 teacher
    fp32 = recipe.student.init in ("from_teacher", "pruned")
    key = json.dumps([recipe.teacher.model_dump() if recipe.teacher else None, recipe.student.model, fp32],
                     sort_keys=True)
    if key not in _CONTEXT:
        spec = recipe.teacher
        teacher = load_teacher(spec, torch.float32 if fp32 else None) if spec is not None else None
        tok_spec = spec or (ModelSpec(model=recipe.student.model) if recipe.student.model else None)
        if tok_spec is None:
            raise KDForgeError("no tokenizer: set teacher.model, or student.model for a CE-only run")
        _CONTEXT[key] = (teacher, load_tokenizer(tok_spec))
    return _CONTEXT[key]


def _corpus_blocks(recipe: Recipe, tokenizer):
    """The (train, held-out) token blocks of the recipe's corpus, tokenized once per process (seconds per cell)."""
    from .data.corpus_blocks import tokenize_corpus

    key = json.dumps(["corpus", recipe.teacher.model_dump() if recipe.teacher else None, recipe.student.model,
                      recipe.data.model_dump(), recipe.train.batch_size], sort_keys=True)
    if key not in _CONTEXT:
        _CONTEXT[key] = tokenize_corpus(recipe, tokenizer)
    return _CONTEXT[key]


def _evaluator(recipe: Recipe, teacher, tokenizer, spec: EvalSpec):
    from .evaluate.suite import Evaluator
    from .models import resolve_model_path

    key = json.dumps(["eval", recipe.teacher.model_dump() if recipe.teacher else None,
                      recipe.data.model_dump(), spec.model_dump()], sort_keys=True)
    if key not in _CONTEXT:
        val = _corpus_blocks(recipe, tokenizer)[1]  # the held-out blocks training evaluated on
        teacher_dir = resolve_model_path(recipe.teacher) if recipe.teacher else None
        records = None
        if recipe.data.prompts is not None:  # held-out prompts: answered and scored (ROUGE-L, distinct-n, length)
            from .data.prompts import load_prompt_set

            records = load_prompt_set(recipe.data, tokenizer).validation
        _CONTEXT[key] = Evaluator(tokenizer, teacher, val, spec,
                                  teacher_bf16=bool(recipe.teacher and recipe.teacher.dtype == "bfloat16"),
                                  teacher_dir=teacher_dir if isinstance(teacher_dir, Path) else None,
                                  prompt_records=records)
    return _CONTEXT[key]


def cell_metrics(cell_dir: Path) -> dict[str, float]:
    """Flat last-step figures of a finished cell: final.json (held-out, at the last step), eval.json, the last
    metrics.jsonl row (final training loss per term) and the wall time."""
    out: dict[str, float] = {}
    final = json.loads((cell_dir / "final.json").read_text())
    for k, v in (final.get("student") or {}).items():
        if isinstance(v, (int, float)) and k != "tokens_per_s":
            out[k] = v
    for k, v in (final.get("teacher") or {}).items():
        if isinstance(v, (int, float)) and k in ("perplexity", "bits_per_char", "ece", "accuracy", "macro_f1"):
            out[f"teacher_{k}"] = v
    if (cell_dir / "eval.json").is_file():
        summary = json.loads((cell_dir / "eval.json").read_text()).get("summary", {})
        out.update({k: v for k, v in summary.items() if k not in out})
    rows = [json.loads(line) for line in (cell_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (cell_dir / "metrics.jsonl").is_file() else []
    train_rows = [r for r in rows if "loss" in r]
    if train_rows:
        last = max(train_rows, key=lambda r: r["step"])
        out["train_loss"] = last["loss"]
        out.update({f"train_{k}": v for k, v in last.items() if k.startswith("loss/")})
    timing = cell_dir / "bench_time.json"
    if timing.is_file():
        out["train_seconds"] = json.loads(timing.read_text())["seconds"]
    return out


def run_cell(cell: Cell, eval_spec: EvalSpec, keep_checkpoints: bool = False) -> CellResult:
    """Train (unless finished) and evaluate one cell. Never raises except on KeyboardInterrupt."""
    from .evaluate.speed import reset_peak_rss
    from .models import load_causal_lm
    from .train import prepare, train

    cell_dir = Path(cell.dir)
    result = CellResult(cell.student, cell.method, cell.seed, cell.dir, "done")
    reset_peak_rss()  # this cell's peak memory, not the process's since its first cell
    t0 = time.perf_counter()
    try:
        if cell.recipe is None:
            raise KDForgeError(cell.error or "the cell's recipe is invalid")
        finished = (cell_dir / "final.json").is_file() and (cell_dir / "eval.json").is_file()
        if finished:
            result.status = "skipped"
        else:
            (cell_dir / "failed.json").unlink(missing_ok=True)
            recipe = parse_recipe(cell.recipe)
            # the task trains, then evaluates as `kdforge eval` does (eval.json); so does a student with its own
            # tokenizer (student.tokenizer), which the shared held-out blocks and evaluator below do not fit
            if recipe.task != "causal_lm" or recipe.student.tokenizer is not None:
                from .tasks import task_for

                if not (cell_dir / "final.json").is_file():
                    train(recipe, progress=False, out=cell_dir)
                    atomic_write_json(cell_dir / "bench_time.json", {"seconds": time.perf_counter() - t0})
                task_for(recipe).run_eval(cell_dir, recipe)
                if not keep_checkpoints:
                    shutil.rmtree(cell_dir / "checkpoints", ignore_errors=True)
                result.metrics = cell_metrics(cell_dir)
                result.seconds = time.perf_counter() - t0
                return result
            teacher, tokenizer = _teacher_and_tokenizer(recipe)
            if not (cell_dir / "final.json").is_file():
                setup = prepare(recipe, teacher=teacher, tokenizer=tokenizer,
                                blocks=_corpus_blocks(recipe, tokenizer))
                train(recipe, setup=setup, progress=False, out=cell_dir)
                atomic_write_json(cell_dir / "bench_time.json", {"seconds": time.perf_counter() - t0})
                student = setup.student
                if recipe.student.lora is not None:  # evaluate what was exported: the adapter merged in
                    student = load_causal_lm(ModelSpec(model=str(cell_dir / "student")))
            else:
                student = load_causal_lm(ModelSpec(model=str(cell_dir / "student")))
            evaluator = _evaluator(recipe, teacher, tokenizer, eval_spec)
            res = evaluator.evaluate(student, student_dir=cell_dir / "student", out_dir=cell_dir, heldout=False)
            atomic_write_json(cell_dir / "eval.json", res)
        if not keep_checkpoints:
            shutil.rmtree(cell_dir / "checkpoints", ignore_errors=True)
        result.metrics = cell_metrics(cell_dir)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - one failing cell must not stop the bench
        result.status, result.error = "failed", one_line(err)
        log.debug("cell %s failed", cell.key, exc_info=True)
        try:
            atomic_write_json(cell_dir / "failed.json", {"error": result.error})
        except OSError:
            pass
    result.seconds = time.perf_counter() - t0
    return result


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _run_cell_job(cell: dict, eval_spec: dict, keep_checkpoints: bool) -> dict:
    return asdict(run_cell(Cell(**cell), EvalSpec.model_validate(eval_spec), keep_checkpoints))


# --------------------------------------------------------------------------- the bench


def run_bench(matrix_path: str | Path, out: str | Path | None = None, workers: int = 1,
              recipe_overrides: list[str] | None = None, seeds: list[int] | None = None,
              only_methods: list[str] | None = None, echo=None) -> dict[str, Any]:
    """Run (or resume) every cell, then write results.json and results.md into `out`. Returns the results."""
    echo = echo or (lambda msg: log.info(msg))
    spec, base = load_matrix(matrix_path, recipe_overrides, seeds, only_methods)
    out = Path(out or Path("runs") / "bench" / spec.name)
    out.mkdir(parents=True, exist_ok=True)
    cells, baseline = plan_cells(spec, base, out)
    atomic_write_text(out / "matrix.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    atomic_write_json(out / "plan.json", {"baseline": baseline, "methods": list(dict.fromkeys(c.method for c in cells)),
                                          "cells": [{"key": c.key, "dir": c.dir} for c in cells]})
    results: list[CellResult] = []

    def done(i: int, r: CellResult) -> None:
        results.append(r)
        what = r.error if r.status == "failed" else (
            f"ppl {r.metrics['perplexity']:.4g}" if "perplexity" in r.metrics else
            f"accuracy {r.metrics['accuracy']:.4g}" if "accuracy" in r.metrics else "")
        echo(f"[{len(results)}/{len(cells)}] {r.student}/{r.method}/seed{r.seed}: {r.status} {what} "
             f"({r.seconds:.0f} s)")

    if workers <= 1:
        for i, cell in enumerate(cells):
            done(i, run_cell(cell, spec.eval, spec.keep_checkpoints))
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(threads,)) as pool:
            futures = {pool.submit(_run_cell_job, asdict(c), spec.eval.model_dump(), spec.keep_checkpoints): (i, c)
                       for i, c in enumerate(cells)}
            for fut in as_completed(futures):
                i, c = futures[fut]
                try:
                    r = CellResult(**fut.result())
                except Exception as err:  # noqa: BLE001 - a worker that died (e.g. killed) fails only its cells
                    r = CellResult(c.student, c.method, c.seed, c.dir, "failed", one_line(err))
                done(i, r)
    order = {c.key: i for i, c in enumerate(cells)}
    results.sort(key=lambda r: order[f"{r.student}/{r.method}/seed{r.seed}"])
    summary = write_results(out, spec, baseline, cells, results)
    return summary


def mean_std(values: list[float]) -> dict[str, float | int | None]:
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def summarize_cells(results: list[CellResult]) -> dict[str, dict[str, dict[str, Any]]]:
    """{student: {method: {"seeds": k, "failed": j, "metrics": {name: {mean, std, n}}}}} over finished seeds."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        row = table.setdefault(r.student, {}).setdefault(r.method, {"seeds": 0, "failed": 0, "values": {}})
        row["seeds"] += 1
        if r.status == "failed":
            row["failed"] += 1
            continue
        for k, v in r.metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                row["values"].setdefault(k, []).append(float(v))
    for student in table.values():
        for row in student.values():
            row["metrics"] = {k: mean_std(v) for k, v in row.pop("values").items()}
    return table


def calibration_summary(results: list[CellResult]) -> dict[str, Any] | None:
    """Reliability-diagram bins pooled over each method's finished seeds, from the cells' final.json (classifier
    tasks store `calibration` there: kdforge.evaluate.metrics.reliability_bins of the held-out top-1 confidence):
    {"students": {student: {method: {n_bins, count, confidence_sum, correct, seeds}}}, "teacher": the first cell's
    teacher bins or None}. Pooling adds the per-bin counts and sums, so a bin's accuracy is correct / count over
    all seeds' held-out examples. None when no cell has them (a causal-LM bench)."""
    students: dict[str, dict[str, Any]] = {}
    teacher = None
    for r in results:
        final = Path(r.dir) / "final.json"
        if r.status == "failed" or not final.is_file():
            continue
        data = json.loads(final.read_text())
        bins = (data.get("student") or {}).get("calibration")
        if not bins:
            continue
        teacher = teacher or (data.get("teacher") or {}).get("calibration")
        pooled = students.setdefault(r.student, {}).get(r.method)
        if pooled is None or pooled["n_bins"] != bins["n_bins"]:
            students[r.student][r.method] = {**bins, "seeds": 1}
            continue
        for key in ("count", "confidence_sum", "correct"):
            pooled[key] = [a + b for a, b in zip(pooled[key], bins[key])]
        pooled["seeds"] += 1
    return {"students": students, "teacher": teacher} if students else None


def _fmt(ms: dict[str, Any] | None, key: str) -> str:
    if not ms or ms.get("mean") is None:
        return "—"
    mean, std = ms["mean"], ms["std"]
    if key in ("parameters", "safetensors_bytes", "peak_rss_bytes") or abs(mean) >= 1000:
        text, err = f"{mean:,.0f}", f"{std:,.0f}"
    else:
        text, err = f"{mean:.4g}", f"{std:.2g}"
    return f"{text} ± {err}" if ms["n"] > 1 else text


def results_tables(summary: dict, baseline: str,
                   order: list[str] | None = None) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per student and table kind, as display strings; the baseline first, then `order`."""
    tables = []
    rank = {m: i for i, m in enumerate(order or [])}
    for student, methods in summary.items():
        names = sorted(methods, key=lambda m: (m != baseline, rank.get(m, len(rank)), m))
        classifier = any("accuracy" in row["metrics"] and "perplexity" not in row["metrics"]
                         for row in methods.values())
        kinds = ((("quality", CLASSIFIER_QUALITY_COLUMNS), ("cost", CLASSIFIER_COST_COLUMNS)) if classifier else
                 (("quality", QUALITY_COLUMNS), ("cost", COST_COLUMNS)))
        for key, columns in (("map", MULTILABEL_QUALITY_COLUMNS), ("map50", DETECTION_QUALITY_COLUMNS)):
            if any(key in row["metrics"] for row in methods.values()):
                kinds = (("quality", columns), ("cost", CLASSIFIER_COST_COLUMNS))
        embedding = _is_embedding(methods)
        if embedding:
            kinds = (("quality", EMBEDDING_QUALITY_COLUMNS), ("cost", EMBEDDING_COST_COLUMNS))
        if any("rougeL_reference" in row["metrics"] for row in methods.values()):
            kinds = (*kinds, ("generation on held-out prompts", GENERATION_COLUMNS))
        for title, columns in kinds:
            header = ["method", "seeds ok"] + [c[1] for c in columns]
            rows = []
            for method in names:
                row = methods[method]
                name = (f"{method} ({'reference' if embedding else 'CE baseline'})" if method == baseline
                        else method)
                ok = f"{row['seeds'] - row['failed']}/{row['seeds']}"
                rows.append([name, ok] + [_fmt(row["metrics"].get(k), k) for k, _, _ in columns])
            tables.append((f"{student}: {title}", header, rows))
    return tables


def _markdown(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out: Path, spec: MatrixSpec, baseline: str, cells: list[Cell],
                  results: list[CellResult]) -> dict[str, Any]:
    summary = summarize_cells(results)
    teacher = {}
    for r in results:
        for k in ("teacher_perplexity", "teacher_bits_per_char", "teacher_ece", "teacher_ood_perplexity",
                  "teacher_accuracy", "teacher_macro_f1"):
            if k in r.metrics:
                teacher.setdefault(k, r.metrics[k])
    failed = [{"cell": f"{r.student}/{r.method}/seed{r.seed}", "error": r.error} for r in results
              if r.status == "failed"]
    data = {
        "name": spec.name, "dir": str(out), "matrix": spec.model_dump(mode="json"), "baseline": baseline,
        "methods": list(dict.fromkeys(c.method for c in cells)),
        "seeds": spec.seeds, "teacher": teacher, "summary": summary, "failed": failed,
        "calibration": calibration_summary(results),
        "cells": [{**asdict(r), "recipe_hash": parse_recipe(c.recipe).hash() if c.recipe else None}
                  for r, c in zip(results, cells)],
        "statistics": "mean ± sample standard deviation (n-1) over seeds of each cell's last-step values; "
                      "failed cells are left out of the mean and counted in 'seeds ok'",
    }
    atomic_write_json(out / "results.json", data)
    atomic_write_text(out / "results.md", results_markdown(data))
    return data


def _is_embedding(methods: dict[str, Any]) -> bool:
    """Whether a student's summary rows ({method: {metrics, ...}}) are a sentence-embedding matrix's (no labels: its
    first method is the reference row, not a cross-entropy baseline)."""
    return any("spearman_cosine" in row["metrics"] for row in methods.values())


def results_markdown(data: dict[str, Any]) -> str:
    teacher = data.get("teacher") or {}
    embedding = any(_is_embedding(methods) for methods in data["summary"].values())
    parts = [f"# kdforge bench: {data['name']}", "",
             f"Seeds {data['seeds']}; {data['statistics']}. {'Reference row' if embedding else 'CE baseline'}: "
             f"`{data['baseline']}`.", ""]
    if teacher:
        parts += ["Teacher: " + ", ".join(f"{k.removeprefix('teacher_')} {v:.4g}" for k, v in teacher.items()), ""]
    for title, header, rows in results_tables(data["summary"], data["baseline"], data.get("methods")):
        parts += [_markdown(title, header, rows), ""]
    if data["failed"]:
        parts += ["### failed cells", ""] + [f"- `{f['cell']}`: {f['error']}" for f in data["failed"]] + [""]
    return "\n".join(parts)
