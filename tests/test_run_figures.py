"""final.json and eval.json agree on the same student (same blocks, batch and teacher precision, recorded beside the
figures), and the run report names the recipe, the data, wall time, tokens/s, the baseline and each figure's file."""
from __future__ import annotations

import json

import pytest

from kdforge.evaluate.metrics import evaluate_models
from kdforge.evaluate.suite import run_eval
from kdforge.models import load_causal_lm, load_teacher
from kdforge.recipe import EvalSpec, ModelSpec, parse_recipe
from kdforge.report.build import build_report
from kdforge.train import prepare, train

QUICK = EvalSpec(ood=None, generation=False, speed=False, cka=False)


@pytest.fixture()
def bf16_run(tiny_recipe, tmp_path):
    """A bf16-teacher run trained at batch 4 (kdforge eval's batch is 8), in a folder not named like the recipe."""
    recipe = {**tiny_recipe, "name": "tiny-bf16", "output_dir": str(tmp_path / "folder_name"),
              "teacher": {**tiny_recipe["teacher"], "dtype": "bfloat16"},
              "train": {**tiny_recipe["train"], "steps": 2, "save_every": 0}}
    return train(parse_recipe(recipe), progress=False), parse_recipe(recipe)


def test_final_json_and_eval_json_agree_and_say_what_they_measured(bf16_run):
    run, recipe = bf16_run
    final = json.loads((run / "final.json").read_text())
    ev = run_eval(run, spec=QUICK)
    assert final["heldout_setup"] == ev["heldout_setup"] == {
        "blocks": 32, "seq_len": 32, "eval_tokens": 32 * 31, "batch_size": 8, "teacher_precision": "bfloat16"}
    for key in ("perplexity", "kl_teacher_student", "kl_student_teacher", "top1_agreement", "eval_tokens"):
        assert final["student"][key] == ev["heldout"]["student"][key], key
    # they disagreed when final.json used the training batch (4): one fp32 sum over a whole batch's [B, T, V] moved
    # the KL with the batch shape; summed a block at a time, the batch no longer matters beyond rounding
    setup = prepare(recipe)
    student = load_causal_lm(ModelSpec(model=str(run / "student")))
    at_train_batch = evaluate_models({"student": student, "teacher": load_teacher(recipe.teacher)}, setup.val_blocks,
                                     reference="teacher", batch_size=4, bf16={"teacher": True})["student"]
    for key in ("kl_teacher_student", "kl_student_teacher", "top1_agreement"):
        assert at_train_batch[key] == pytest.approx(final["student"][key], rel=1e-6), key


def test_run_report_names_recipe_data_time_throughput_baseline_and_sources(bf16_run):
    run, _ = bf16_run
    run_eval(run, spec=QUICK, baseline=run / "student")
    _, md_path, _ = build_report(run)
    md = md_path.read_text()
    assert md.startswith("# kdforge run report: tiny-bf16\n")  # the recipe's name, not the folder's
    final = json.loads((run / "final.json").read_text())
    for text in ("| corpus |", "| seq_len | 32 |", f"| tokens trained | {2 * 4 * 31} |", "| training tokens/s |",
                 "| wall time (final launch) | 0:00:", "| baseline |", "Against the baseline (eval.json)",
                 "Sources: final.json (the run's own final evaluation) measured on 992 held-out tokens",
                 "eval.json (`kdforge eval`) measured on 992 held-out tokens", "held-out: final.json; OOD",
                 "held-out: eval.json"):
        assert text in md, text
    assert final["tokens_per_s"] > 0 and "disagree" not in md
    # a stale eval.json (another measurement) is called out, not silently mixed
    ev = json.loads((run / "eval.json").read_text())
    ev["heldout"]["student"]["kl_teacher_student"] += 0.01
    (run / "eval.json").write_text(json.dumps(ev))
    _, md_path, _ = build_report(run)
    assert "final.json and eval.json disagree on the student's kl_teacher_student" in md_path.read_text()
