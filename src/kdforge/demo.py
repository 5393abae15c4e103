"""`kdforge demo`: distil the embedded teacher and train a cross-entropy baseline of the same student, same steps and
data; evaluate teacher, baseline and distilled student on held-out works; write a table, metrics and a report."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from .io import atomic_write_json
from .recipe import Recipe, Term, parse_recipe
from .train import prepare, train


# The demo's student before the demo cut it from the teacher (student.init pruned, benchmarks/student_init.py): fresh
# weights of the same sizes, 15.7M parameters. Benchmarks whose README figures were measured with it ask for it.
FRESH_STUDENT = {"init": "config", "config": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                                              "num_key_value_heads": 2, "intermediate_size": 768, "head_dim": 64}}


def demo_recipe(quick: bool = False, out: Path = Path("runs/demo"), student: dict | None = None) -> Recipe:
    """The embedded demo recipe (recipes/demo.yaml); `quick`: the 60-step schedule of `kdforge demo --quick`;
    `student`: another student section (e.g. FRESH_STUDENT)."""
    data = yaml.safe_load(resources.files("kdforge").joinpath("recipes/demo.yaml").read_text())
    data["output_dir"] = str(out / "distilled")
    if student is not None:
        data["student"] = student
    if quick:
        data["train"].update(steps=60, save_every=30, eval_every=30, warmup_steps=10)
        data["data"]["max_eval_tokens"] = 8192
    return parse_recipe(data)


def baseline_of(recipe: Recipe, out: Path) -> Recipe:
    """Same student, data, steps and seed; cross-entropy only."""
    return recipe.model_copy(update={
        "name": recipe.name.replace("distilled", "baseline"),
        "output_dir": str(out / "baseline"),
        "objective": [Term(loss="cross_entropy")],
    })


SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
             "head_dim")


def scratch_of(baseline: Recipe, student_config, out: Path) -> Recipe:
    """The baseline with fresh weights (student.init config) of the sizes in `student_config` (the cut student's
    transformers config): what cross-entropy alone gives without the teacher's weights."""
    sizes = {k: getattr(student_config, k) for k in SIZE_KEYS if getattr(student_config, k, None) is not None}
    return baseline.model_copy(update={
        "name": baseline.name.replace("baseline", "scratch"),
        "output_dir": str(out / "scratch"),
        "student": baseline.student.model_copy(update={"init": "config", "config": sizes, "prune": None,
                                                       "layers": None}),
    })


def run_demo(quick: bool = False, out: Path = Path("runs/demo"), progress: bool = True) -> dict:
    """The distilled run and its CE baseline (same student init, data, steps, seed); when the student is cut from the
    teacher (init pruned / from_teacher), also the CE run of a student of the same sizes from fresh weights."""
    distilled = demo_recipe(quick, out)
    baseline = baseline_of(distilled, out)
    shared = prepare(distilled)  # loads the teacher, tokenizer and data once for every run
    blocks = (shared.train_blocks, shared.val_blocks)
    train(distilled, setup=shared, progress=progress, out=Path(distilled.output_dir))
    runs = {}
    # a student cut from the teacher is cut from its float32 weights: the baseline then loads its own teacher (the
    # shared one is now held in bf16 where auto picked it), so both runs start from the same weights
    cut = distilled.student.init in ("from_teacher", "pruned")
    if cut:
        scratch = scratch_of(baseline, shared.student.config, out)
        train(scratch, setup=prepare(scratch, teacher=shared.teacher, tokenizer=shared.tokenizer, blocks=blocks),
              progress=progress, out=Path(scratch.output_dir))
        runs["scratch"] = Path(scratch.output_dir)
    base_setup = prepare(baseline, teacher=None if cut else shared.teacher, tokenizer=shared.tokenizer, blocks=blocks)
    train(baseline, setup=base_setup, progress=progress, out=Path(baseline.output_dir))
    runs.update(baseline=Path(baseline.output_dir), distilled=Path(distilled.output_dir))
    return write_demo_report(out, runs)


def gap_closed(teacher: float, baseline: float, distilled: float) -> float:
    """The share of the baseline-to-teacher gap in log-perplexity that the distilled student closes:
    (ln baseline - ln distilled) / (ln baseline - ln teacher). 1 = the teacher's perplexity, 0 = no better than the
    baseline, negative = worse. NaN when the baseline is not worse than the teacher (no gap to close)."""
    import math

    gap = math.log(baseline) - math.log(teacher)
    return (math.log(baseline) - math.log(distilled)) / gap if gap > 0 else float("nan")


def write_demo_report(out: Path, runs: dict[str, Path]) -> dict:
    """metrics.json (the results table, the perplexity ratio and the gap closed), then the demo's report
    (kdforge.report: the page `kdforge report OUT` rebuilds). `runs`: "baseline" and "distilled", and optionally
    "scratch" (the baseline's sizes from fresh weights), whose gap to the teacher the distilled student's closing is
    reported too: what pruning and distillation together give over training from scratch."""
    import json

    from .report.build import build_report

    finals = {name: json.loads((path / "final.json").read_text()) for name, path in runs.items()}
    teacher = next(iter(finals.values()))["teacher"]
    ppl = {name: f["student"]["perplexity"] for name, f in finals.items()}
    rows = [{"model": "teacher (SmolLM2-135M-Instruct)", **teacher}]
    rows += [{"model": f"student, {name}" + (" (fresh weights)" if name == "scratch" else ""), **f["student"]}
             for name, f in finals.items()]
    gain = ppl["baseline"] / ppl["distilled"]
    summary = {"rows": rows, "baseline_over_distilled_perplexity": gain, "distilled_beats_baseline": gain > 1.0,
               "gap_closed": gap_closed(teacher["perplexity"], ppl["baseline"], ppl["distilled"])}
    if "scratch" in ppl:
        summary["gap_closed_from_scratch"] = gap_closed(teacher["perplexity"], ppl["scratch"], ppl["distilled"])
    for key in ("gap_closed", "gap_closed_from_scratch"):
        if key in summary and summary[key] != summary[key]:  # NaN: no gap to close; JSON has no NaN
            summary[key] = None
    atomic_write_json(out / "metrics.json", summary)
    build_report(out)
    return summary
