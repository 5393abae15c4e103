"""task image_classification end to end on scikit-learn's real 8x8 digits: the recipe's `task:`, the fixed stratified
split, the teacher CNN trained once and cached, every digits recipe through the shared training loop (checkpoints,
resume, final.json), `kdforge distill` / `kdforge eval` on a run, and the bad inputs refused in one line."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

pytest.importorskip("sklearn.datasets")

from kdforge.cli import app  # noqa: E402
from kdforge.errors import KDForgeError  # noqa: E402
from kdforge.recipe import PLANNED_TASKS, TASKS, parse_recipe  # noqa: E402
from kdforge.tasks import image_classification as ic  # noqa: E402
from kdforge.train import prepare, train  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DIGITS = sorted(RECIPES.glob("digits_*.yaml"))
TRAIN = {"steps": 30, "save_every": 15, "log_every": 5, "warmup_steps": 3}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kdforge_cache")


@pytest.fixture(autouse=True)
def _cache_env(cache, monkeypatch):
    monkeypatch.setenv("KDFORGE_CACHE", str(cache))  # the teacher CNN is trained once per module, here


def digits_recipe(name: str, out: Path, **train_overrides) -> dict:
    r = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    r["output_dir"] = str(out)
    r["train"].update(TRAIN, **train_overrides)
    return r


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_task_field_defaults_to_causal_lm_and_refuses_what_is_not_built():
    plain = parse_recipe({})
    assert plain.task == "causal_lm"
    assert parse_recipe({"task": "causal_lm"}).hash() == plain.hash()  # recipes from before `task:` keep their hash
    assert {"causal_lm", "image_classification"} <= set(TASKS) and not set(TASKS) & set(PLANNED_TASKS)
    for planned in PLANNED_TASKS:  # named by the design, refused until built
        with pytest.raises(KDForgeError, match=f"implemented tasks are {', '.join(TASKS)}$") as err:
            parse_recipe({"task": planned})
        assert "\n" not in str(err.value) and "planned" in str(err.value)
    with pytest.raises(KDForgeError, match="implemented tasks"):
        parse_recipe({"task": "speech"})
    with pytest.raises(KDForgeError, match="teacher.config describes an image-classification"):
        parse_recipe({"teacher": {"model": "smollm2-135m", "config": {"channels": [4]}}})
    with pytest.raises(KDForgeError, match="student.config has an unknown key 'chanels'"):
        parse_recipe({"task": "image_classification", "student": {"config": {"chanels": [4]}}})
    with pytest.raises(KDForgeError, match="builds the student CNN from student.config"):
        parse_recipe({"task": "image_classification", "student": {"init": "from_teacher", "layers": [0]}})
    r = parse_recipe({"task": "image_classification", "teacher": {"model": "cnn"}})
    assert r.data.corpus == "digits" and r.data.validation_split == 0.25 and r.data.split_seed == 0
    assert r.teacher.config["channels"] == [16, 32, 64, 64] and r.student.config["channels"] == [8, 16]


def test_the_held_out_split_is_fixed_stratified_and_the_same_for_every_seed():
    a_train, a_val = ic.load_split(parse_recipe({"task": "image_classification", "seed": 0}))
    b_train, b_val = ic.load_split(parse_recipe({"task": "image_classification", "seed": 7}))
    assert torch.equal(a_val.rows, b_val.rows) and torch.equal(a_train.rows, b_train.rows)
    assert len(a_train) + len(a_val) == 1797 and not set(a_train.rows.tolist()) & set(a_val.rows.tolist())
    counts = torch.bincount(a_train.labels, minlength=10) + torch.bincount(a_val.labels, minlength=10)
    held = torch.bincount(a_val.labels, minlength=10)
    assert torch.equal(held, (counts.double() * 0.25).round().long())  # every class gives its quarter
    assert a_train.images.shape[1:] == (1, 8, 8) and 0 <= float(a_train.images.min()) < float(a_train.images.max()) <= 1


def test_the_teacher_cnn_is_trained_once_then_read_from_its_cache(cache, monkeypatch):
    recipe = parse_recipe({"task": "image_classification", "teacher": {"model": "cnn"}})
    train_set, val = ic.load_split(recipe)
    first = ic.cached_teacher(recipe.teacher.config, train_set)
    folder = ic.teacher_cache_folder(recipe.teacher.config, train_set)
    assert folder.parent == cache / "image_teachers" and (folder / "model.safetensors").is_file()
    monkeypatch.setattr(ic, "train_teacher", lambda *a: pytest.fail("the cached teacher was retrained"))
    again = ic.cached_teacher(recipe.teacher.config, train_set)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    logits, _ = ic.predict(again, val)
    assert ic.classification_metrics(logits, val.labels)["accuracy"] > 0.95
    other = {**recipe.teacher.config, "epochs": 1}  # another config is another cache entry
    assert ic.teacher_cache_folder(other, train_set) != folder


# CAT-KD at the authors' default beta (400) spends its first steps matching the class maps: its cross-entropy halves
# only after about 60 steps, so it gets 90 here (the others 30).
STEPS = {"digits_cat_kd": 90}


@pytest.mark.parametrize("path", DIGITS, ids=lambda p: p.stem)
def test_each_digits_recipe_trains_a_student_well_above_chance(path, tmp_path):
    steps = STEPS.get(path.stem, TRAIN["steps"])
    recipe = parse_recipe(digits_recipe(path.stem, tmp_path / path.stem, steps=steps, save_every=steps // 2))
    out = train(recipe, progress=False)
    rows = [r for r in rows_of(out) if "loss" in r]
    assert {k[len("loss/"):] for k in rows[-1] if k.startswith("loss/")} == {t.label for t in recipe.objective}
    assert rows[-1]["loss/cross_entropy"] < 0.5 * rows[0]["loss/cross_entropy"], "the student learns"
    assert rows[-1]["tokens"] == steps * 64  # the loop counts examples for this task
    final = json.loads((out / "final.json").read_text())
    s, t = final["student"], final["teacher"]
    assert s["accuracy"] > 0.7, f"{path.stem}: held-out accuracy {s['accuracy']:.3f} after {steps} steps (chance 0.1)"
    assert t["accuracy"] > 0.95 and final["heldout_setup"]["examples"] == 450
    for key in ("accuracy", "macro_f1", "ece", "top1_agreement"):
        assert 0.0 <= s[key] <= 1.0
    assert s["kl_teacher_student"] >= 0 and s["examples_per_s"] > 0
    assert abs(s["top1_agreement"] - s["accuracy"]) < 0.1  # the teacher is nearly always right
    assert s["parameters"] < t["parameters"] / 5
    student = ic.CNN.from_pretrained(out / "student")
    logits, _ = ic.predict(student, ic.load_split(recipe)[1])
    assert ic.classification_metrics(logits, ic.load_split(recipe)[1].labels)["accuracy"] == pytest.approx(s["accuracy"])


def test_the_teachers_outputs_are_computed_once_and_equal_the_live_teachers(tmp_path):
    setup = prepare(parse_recipe(digits_recipe("digits_fitnets", tmp_path / "r")))
    source, taps = setup.distiller.teacher_source, setup.distiller.teacher_taps
    assert isinstance(source, ic.PrecomputedTeacher) and source.logits.shape == (len(setup.train_blocks), 10)
    batch = setup.task.make_batch(setup.train_blocks, torch.tensor([5, 700, 3]))
    stored, live = source(batch, taps), source.live({"inputs": batch["inputs"]}, taps)
    torch.testing.assert_close(stored.logits, live.logits)
    assert stored.features.keys() == live.features.keys() == {"fitnets_hint.t"}
    torch.testing.assert_close(stored.features["fitnets_hint.t"], live.features["fitnets_hint.t"])
    calls = []
    handle = setup.teacher.register_forward_hook(lambda *args: calls.append(1))
    setup.distiller.train()
    loss, _ = setup.distiller(batch)
    loss.backward()
    handle.remove()
    assert not calls, "a training step ran the teacher again"


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path):
    whole = train(parse_recipe(digits_recipe("digits_fitnets", tmp_path / "whole")), progress=False)
    cut = train(parse_recipe(digits_recipe("digits_fitnets", tmp_path / "cut")), progress=False)
    # as if killed after the step-15 checkpoint: the step-30 checkpoint and the outputs are gone
    shutil.rmtree(cut / "checkpoints" / "step_00000030")
    shutil.rmtree(cut / "student")
    (cut / "final.json").unlink()
    assert (cut / "checkpoints" / "step_00000015" / "extras.safetensors").is_file()  # the hint's regressor
    train(parse_recipe(digits_recipe("digits_fitnets", tmp_path / "cut")), progress=False)
    a, b = ic.CNN.from_pretrained(whole / "student"), ic.CNN.from_pretrained(cut / "student")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    strip = {"tokens_per_s"}
    assert [{k: v for k, v in r.items() if k not in strip} for r in rows_of(whole)] == \
           [{k: v for k, v in r.items() if k not in strip} for r in rows_of(cut)]
    fa, fb = (json.loads((p / "final.json").read_text())["student"] for p in (whole, cut))
    assert fa["accuracy"] == fb["accuracy"] and fa["nll"] == fb["nll"]


def test_distill_and_eval_from_the_command_line(tmp_path):
    recipe = tmp_path / "kd.yaml"
    recipe.write_text(yaml.safe_dump(digits_recipe("digits_kd", tmp_path / "run", eval_every=15)))
    res = CliRunner().invoke(app, ["distill", str(recipe), "--no-progress"])
    assert res.exit_code == 0, res.output
    periodic = [r for r in rows_of(tmp_path / "run") if "eval/accuracy" in r]
    assert [r["step"] for r in periodic] == [15] and 0.1 < periodic[0]["eval/accuracy"] <= 1
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output and "macro-F1" in res.output
    evaluated = json.loads((tmp_path / "run" / "eval.json").read_text())
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert evaluated["task"] == "image_classification"
    for key in ("accuracy", "macro_f1", "ece", "top1_agreement", "kl_teacher_student"):
        assert evaluated["heldout"]["student"][key] == pytest.approx(final["student"][key], abs=1e-6)
    res = CliRunner().invoke(app, ["report", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| model | accuracy | macro-F1 | ECE |" in report and "450 held-out examples" in report
    assert f"| student | {final['student']['accuracy']:.4g} |" in report
    # the exported folder alone: evaluated on the digits' held-out split, against the default teacher CNN
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "run" / "student"), "--teacher", "cnn", "--json",
                                   str(tmp_path / "folder.json")])
    assert res.exit_code == 0, res.output
    alone = json.loads((tmp_path / "folder.json").read_text())["heldout"]
    assert alone["student"]["accuracy"] == pytest.approx(final["student"]["accuracy"])
    assert alone["teacher"]["accuracy"] == pytest.approx(final["teacher"]["accuracy"])
    res = CliRunner().invoke(app, ["taps", str(tmp_path / "run" / "student")])
    assert res.exit_code == 0 and "features.*" in res.output and "classifier" in res.output
    res = CliRunner().invoke(app, ["cache-teacher", str(recipe)])
    assert res.exit_code == 2 and "task image_classification computes its teacher's outputs once" in res.output


def _npz(tmp_path: Path, name: str, images: np.ndarray, labels: np.ndarray) -> str:
    path = tmp_path / f"{name}.npz"
    np.savez(path, images=images, labels=labels)
    return str(path)


def test_bad_images_and_labels_are_refused_in_one_line_naming_the_record(tmp_path):
    rng = np.random.default_rng(0)
    gray, labels = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), np.arange(40) % 4
    base = {"task": "image_classification", "objective": [{"loss": "cross_entropy"}],
            "student": {"config": {"num_classes": 4}}, "train": {"batch_size": 8}}

    def refused(corpus: str, **extra) -> str:
        with pytest.raises(KDForgeError) as err:
            prepare(parse_recipe({**base, **extra, "data": {"corpus": corpus, "validation_split": 0.25}}))
        assert "\n" not in str(err.value)
        return str(err.value)

    rgb = _npz(tmp_path, "rgb", np.repeat(gray[:, None], 3, axis=1), labels)
    msg = refused(rgb)
    assert "record 0" in msg and "3 channel(s)" in msg and "in_channels: 3" in msg
    beyond = labels.copy()
    beyond[17] = 9
    msg = refused(_npz(tmp_path, "beyond", gray, beyond))
    assert "record 17 has class id 9" in msg and "4 classes" in msg and "num_classes: 10" in msg
    np.savez(tmp_path / "nolabels.npz", images=gray)
    assert "no 'labels' array" in refused(str(tmp_path / "nolabels.npz"))
    # the same file with a 3-channel CNN trains
    ok = prepare(parse_recipe({**base, "student": {"config": {"num_classes": 4, "in_channels": 3}},
                               "data": {"corpus": rgb, "validation_split": 0.25}}))
    assert ok.student(ok.task.make_batch(ok.train_blocks, torch.arange(2))["inputs"]).shape == (2, 4)
    with pytest.raises(KDForgeError, match=r"takes images \[B, 3, H, W\], got \(2, 1, 8, 8\)"):
        ok.student(torch.zeros(2, 1, 8, 8))


def test_feature_maps_of_different_sizes_are_resized_with_the_mode_logged_or_refused_naming_both(caplog):
    from kdforge import Distiller

    recipe = parse_recipe({"task": "image_classification", "teacher": {"model": "cnn"}})
    setup = prepare(recipe)
    batch = setup.task.make_batch(setup.train_blocks, torch.arange(8))
    hint = {"loss": "fitnets_hint", "student": "features.0", "teacher": "features.3", "projector": "conv1x1"}
    with caplog.at_level(logging.INFO, logger="kdforge"):
        d = Distiller(setup.teacher, ic.CNN(recipe.student.config, (8, 8)), [hint], example_batch=batch)
    assert "student's 8x8 feature map is resized to the teacher's 4x4 by adaptive average pooling" in caplog.text
    _, values = d(batch)
    s_map = d.feature_terms["0"].projectors[0](d._student_forward(batch)[1]["fitnets_hint.s"])
    with torch.no_grad():
        t_map = setup.teacher.features(batch["inputs"])
    expected = 0.5 * (torch.nn.functional.adaptive_avg_pool2d(s_map, 4) - t_map).pow(2).sum(-1).mean()
    assert float(values["fitnets_hint"]) == pytest.approx(float(expected.detach()), rel=1e-5)
    at = {"loss": "attention_transfer", "student": "features.0", "teacher": "features.3"}
    with pytest.raises(ValueError, match=r"spatial sizes differ, student \(8, 8\) vs teacher \(4, 4\)"):
        Distiller(setup.teacher, ic.CNN(recipe.student.config, (8, 8)), [at], example_batch=batch)


def test_reproduce_of_a_digits_run_finds_no_difference(tmp_path):
    from kdforge.reproduce import reproduce

    run = train(parse_recipe(digits_recipe("digits_at", tmp_path / "run", steps=20, save_every=20)), progress=False)
    out, rows, warnings = reproduce(run / "manifest.json", out=tmp_path / "again")
    assert rows == [] and warnings == []
    assert json.loads((out / "final.json").read_text())["student"]["accuracy"] > 0.3


def test_a_digits_bench_matrix_tables_accuracy_per_method(tmp_path):
    from kdforge.bench import run_bench

    matrix = tmp_path / "m.yaml"
    matrix.write_text(yaml.safe_dump({
        "name": "digits", "base": str(RECIPES / "digits_kd.yaml"), "seeds": [0, 1],
        "overrides": {"train.steps": 8, "train.warmup_steps": 2, "train.save_every": 8, "train.log_every": 4},
        "methods": {"kd": {"objective": [{"loss": "cross_entropy", "weight": 0.5},
                                         {"loss": "forward_kl", "weight": 0.5, "temperature": 4.0}]}}}))
    res = run_bench(matrix, out=tmp_path / "bench")
    assert not res["failed"] and res["baseline"] == "ce_baseline"
    for method in ("ce_baseline", "kd"):
        acc = res["summary"]["default"][method]["metrics"]["accuracy"]
        assert acc["n"] == 2 and 0.1 < acc["mean"] <= 1 and acc["std"] >= 0
    assert res["teacher"]["teacher_accuracy"] > 0.95
    table = (tmp_path / "bench" / "results.md").read_text()
    assert "| method | seeds ok | accuracy | macro-F1 |" in table and "held-out ppl" not in table
    cell = tmp_path / "bench" / "cells" / "default" / "kd" / "seed1"
    assert json.loads((cell / "eval.json").read_text())["task"] == "image_classification"
    assert not (cell / "checkpoints").exists()
