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


def run_demo(quick: bool = False, out: Path = Path("runs/demo"), progress: bool = True) -> dict:
    distilled = demo_recipe(quick, out)
    baseline = baseline_of(distilled, out)
    shared = prepare(distilled)  # loads the teacher, tokenizer and data once for both runs
    train(distilled, setup=shared, progress=progress, out=Path(distilled.output_dir))
    # a student cut from the teacher is cut from its float32 weights: the baseline then loads its own teacher (the
    # shared one is now held in bf16 where auto picked it), so both runs start from the same weights
    cut = distilled.student.init in ("from_teacher", "pruned")
    base_setup = prepare(baseline, teacher=None if cut else shared.teacher, tokenizer=shared.tokenizer,
                         blocks=(shared.train_blocks, shared.val_blocks))
    train(baseline, setup=base_setup, progress=progress, out=Path(baseline.output_dir))
    return write_demo_report(out, {"baseline": Path(baseline.output_dir), "distilled": Path(distilled.output_dir)})


def gap_closed(teacher: float, baseline: float, distilled: float) -> float:
    """The share of the baseline-to-teacher gap in log-perplexity that the distilled student closes:
    (ln baseline - ln distilled) / (ln baseline - ln teacher). 1 = the teacher's perplexity, 0 = no better than the
    baseline, negative = worse. NaN when the baseline is not worse than the teacher (no gap to close)."""
    import math

    gap = math.log(baseline) - math.log(teacher)
    return (math.log(baseline) - math.log(distilled)) / gap if gap > 0 else float("nan")


def write_demo_report(out: Path, runs: dict[str, Path]) -> dict:
    """metrics.json (the results table and the perplexity ratio), then the demo's report (kdforge.report: the page
    `kdforge report OUT` rebuilds)."""
    import json

    from .report.build import build_report

    finals = {name: json.loads((path / "final.json").read_text()) for name, path in runs.items()}
    teacher = next(iter(finals.values()))["teacher"]
    rows = [{"model": "teacher (SmolLM2-135M-Instruct)", **teacher}]
    rows += [{"model": f"student, {name}", **f["student"]} for name, f in finals.items()]
    gain = finals["baseline"]["student"]["perplexity"] / finals["distilled"]["student"]["perplexity"]
    summary = {"rows": rows, "baseline_over_distilled_perplexity": gain,
               "distilled_beats_baseline": gain > 1.0,
               "gap_closed": gap_closed(teacher["perplexity"], finals["baseline"]["student"]["perplexity"],
                                        finals["distilled"]["student"]["perplexity"])}
    if summary["gap_closed"] != summary["gap_closed"]:  # NaN: no gap to close; JSON has no NaN
        summary["gap_closed"] = None
    atomic_write_json(out / "metrics.json", summary)
    build_report(out)
    return summary
