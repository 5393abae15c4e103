"""Semiparametric KD from recipes (issue 13): `teacher.crossfit` for task image_classification (K fold teachers,
each training image labelled by the teacher that never saw it, through PrecomputedTeacher; held-out figures from the
teacher trained on everything), the one-line refusals of bad cross-fitting and correction settings, and the bench
report's reliability diagrams."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("sklearn.datasets")

from kdforge.crossfit import stratified_folds  # noqa: E402
from kdforge.errors import KDForgeError  # noqa: E402
from kdforge.recipe import CORRECTIONS, parse_recipe  # noqa: E402
from kdforge.tasks import image_classification as ic  # noqa: E402
from kdforge.train import prepare, train  # noqa: E402

# a small teacher keeps K + 1 teacher trainings to a few seconds
TEACHER = {"channels": [8, 8], "pool_after": [1], "head": "flatten", "epochs": 2, "batch_size": 64}
K = 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """The first 600 of scikit-learn's real digits as an .npz (every class has 40+ training images)."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = tmp_path_factory.mktemp("digits") / "digits600.npz"
    np.savez(path, images=(digits.images[:600] / 16).astype(np.float32), labels=digits.target[:600])
    return str(path)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kdforge_cache")


@pytest.fixture(autouse=True)
def _cache_env(cache, corpus, monkeypatch):
    monkeypatch.setenv("KDFORGE_CACHE", str(cache))  # fold teachers trained once per module
    global CORPUS
    CORPUS = corpus


CORPUS = ""


def recipe(out: Path, *, crossfit: dict | None = None, objective: list | None = None, **train) -> dict:
    teacher = {"model": "cnn", "config": TEACHER}
    if crossfit is not None:
        teacher["crossfit"] = crossfit
    return {"task": "image_classification", "output_dir": str(out), "teacher": teacher,
            "student": {"config": {"channels": [4, 8], "pool_after": [1]}}, "data": {"corpus": CORPUS},
            "objective": objective or [{"loss": "cross_entropy", "weight": 0.5},
                                       {"loss": "forward_kl", "weight": 0.5, "temperature": 4.0}],
            "train": {"steps": 12, "batch_size": 64, "lr": 0.01, "warmup_steps": 2, "save_every": 0,
                      "log_every": 4, **train}}


def one_line(match: str, call) -> str:
    with pytest.raises(KDForgeError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_each_training_image_gets_the_outputs_of_the_teacher_that_did_not_see_it(tmp_path):
    hint = {"loss": "hidden_mse", "weight": 0.1, "student": "features.1", "teacher": "features.1",
            "projector": "conv1x1"}
    objective = [{"loss": "forward_kl", "temperature": 2.0}, hint]
    setup = prepare(parse_recipe(recipe(tmp_path / "r", crossfit={"folds": K, "seed": 7}, objective=objective)))
    train_set, source = setup.train_blocks, setup.distiller.teacher_source
    assert isinstance(source, ic.PrecomputedTeacher) and source.folds is not None
    # the folds: stratified (each class split as evenly as it can be) and fixed by the seed
    folds = source.folds
    assert torch.equal(folds, stratified_folds(train_set.labels, K, seed=7))
    assert not torch.equal(folds, stratified_folds(train_set.labels, K, seed=8))
    for c in range(10):
        per_fold = torch.bincount(folds[train_set.labels == c], minlength=K)
        assert int(per_fold.max() - per_fold.min()) <= 1
    # fold k's stored logits and features are those of a teacher trained directly on the other folds, not the full one
    for k in range(K):
        held = (folds == k).nonzero().flatten()
        direct = ic.train_teacher(TEACHER, train_set.subset((folds != k).nonzero().flatten()))
        with torch.no_grad():
            feats = direct.features(train_set.images[held])
            logits = direct.classifier(feats)
            full = setup.teacher(train_set.images[held])
        torch.testing.assert_close(source.logits[held].float(), logits)
        torch.testing.assert_close(source.features["hidden_mse.t"][held].float(), feats)
        assert (source.logits[held].float() - full).abs().max() > 1e-3, "fold k was labelled by the full teacher"
    # each fold teacher is cached like the single teacher, keyed by the images it saw
    for k in range(K):
        seen = train_set.subset((folds != k).nonzero().flatten())
        assert (ic.teacher_cache_folder(setup.recipe.teacher.config, seen) / "model.safetensors").is_file()
    # a training batch reads the stored out-of-fold outputs; no teacher runs
    batch = setup.task.make_batch(train_set, torch.tensor([0, 5, 400]))
    out = source(batch, setup.distiller.teacher_taps)
    torch.testing.assert_close(out.logits, source.logits[batch["index"]])
    calls = []
    handle = setup.teacher.register_forward_hook(lambda *args: calls.append(1))
    setup.distiller.train()
    loss, _ = setup.distiller(batch)
    loss.backward()
    handle.remove()
    assert not calls


def test_a_crossfit_recipe_trains_end_to_end_and_held_out_figures_use_the_full_teacher(tmp_path):
    objective = [{"loss": "cross_entropy", "weight": 0.5},
                 {"loss": "forward_kl", "weight": 0.5, "temperature": 4.0, "correction": "orthogonal", "eps": 0.05}]
    r = parse_recipe(recipe(tmp_path / "run", crossfit={"folds": K}, objective=objective))
    out = train(r, progress=False)
    final = json.loads((out / "final.json").read_text())
    train_set, val = ic.load_split(r)
    full = ic.cached_teacher(r.teacher.config, train_set)
    t_logits, _ = ic.predict(full, val)
    s_logits, _ = ic.predict(ic.CNN.from_pretrained(out / "student"), val)
    want_teacher = ic.classification_metrics(t_logits, val.labels)
    want_student = ic.classification_metrics(s_logits, val.labels, t_logits)
    for key in ("accuracy", "nll", "ece"):
        assert final["teacher"][key] == pytest.approx(want_teacher[key])
    for key in ("accuracy", "top1_agreement", "kl_teacher_student"):
        assert final["student"][key] == pytest.approx(want_student[key], rel=1e-5)
    soft = final["train_soft_labels"]
    assert soft["crossfit"] is True and sum(soft["fold_sizes"]) == len(train_set) and len(soft["fold_sizes"]) == K
    # the out-of-fold soft labels are held-out figures: no better than the full teacher's on its own training images
    full_train, _ = ic.predict(full, train_set)
    assert soft["nll"] > ic.classification_metrics(full_train, train_set.labels)["nll"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 12 and torch.isfinite(torch.tensor(rows[-1]["loss"]))
    # kdforge eval of the run compares against the full teacher as well
    ev = ic.ImageClassification().run_eval(out, r)
    assert ev["heldout"]["teacher"]["accuracy"] == pytest.approx(want_teacher["accuracy"])
    assert "calibration" not in ev["summary"] and sum(ev["heldout"]["student"]["calibration"]["count"]) == len(val)
    # the run's report draws the student's and the teacher's reliability diagrams from final.json's bins
    from kdforge.report.build import build_report

    bins = final["student"]["calibration"]
    assert sum(bins["count"]) == len(val) and sum(bins["correct"]) == round(final["student"]["accuracy"] * len(val))
    _, md, _ = build_report(out)
    assert "## Calibration (held-out reliability diagrams)" in md.read_text()
    assert (out / "report_files" / "reliability.png").is_file()


def test_bad_crossfit_and_correction_settings_are_one_line_refusals(tmp_path, monkeypatch):
    base = recipe(tmp_path / "r")
    for folds in (1, 0, 2.5, True):
        one_line(rf"teacher.crossfit.folds must be an integer from 2 .*got {folds!r}",
                 lambda: parse_recipe({**base, "teacher": {**base["teacher"], "crossfit": {"folds": folds}}}))
    # K above the smallest class count: refused before any teacher trains, naming the class and the valid range
    monkeypatch.setattr(ic, "train_teacher", lambda *a: pytest.fail("a teacher trained before the refusal"))
    r = parse_recipe(recipe(tmp_path / "r", crossfit={"folds": 500}))
    counts = torch.bincount(ic.load_split(r)[0].labels)
    low = int(counts.min())
    one_line(rf"teacher.crossfit.folds=500 exceeds the smallest class count .*class {int(counts.argmin())} has "
             rf"{low} images.*; use 2..{low}$", lambda: prepare(r))
    # a teacher that cannot be refit, and the tasks cross-fitting does not cover
    one_line("retrains the teacher on K-1 folds.*'runs/x/student'.*set teacher.model: cnn",
             lambda: parse_recipe({**base, "teacher": {"model": "runs/x/student", "crossfit": {"folds": 3}}}))
    one_line("needs a live teacher", lambda: parse_recipe(
        {**base, "teacher": {**base["teacher"], "kind": "cache", "path": "c", "crossfit": {"folds": 3}}}))
    one_line("teacher.crossfit for task causal_lm reads every block's top-k .*set teacher.kind: cache",
             lambda: parse_recipe({"teacher": {"model": "tiny-llama", "crossfit": {"folds": 3}}}))
    # corrections: a loss without one, an unknown one, eps and smoothing out of range, no labels, a top-k teacher
    kd = {"loss": "forward_kl", "temperature": 4.0}
    bad = [({"loss": "reverse_kl", "correction": "orthogonal"}, "loss 'reverse_kl' has no correction .*forward_kl: "
            "orthogonal; logit_mse: orthogonal, gamma_one, gamma_one_minus_p"),
           ({**kd, "correction": "gamma_one"}, "forward_kl has no correction 'gamma_one'; valid: orthogonal"),
           ({**kd, "correction": "orthogonal", "eps": 0.0}, r"eps must be in \(0, 1\), got 0.0"),
           ({**kd, "correction": "orthogonal", "eps": 1}, r"eps must be in \(0, 1\), got 1"),
           ({"loss": "logit_mse", "smoothing": 1.5}, r"smoothing must be in \[0, 1\], got 1.5")]
    for term, match in bad:
        one_line(match, lambda: parse_recipe({**base, "objective": [term]}))
    one_line("correction 'orthogonal' needs one class label per example, which task sentence_embedding does not have",
             lambda: parse_recipe({"task": "sentence_embedding", "teacher": {"model": "all-minilm-l6-v2"},
                                   "objective": [{**kd, "correction": "orthogonal"}]}))
    one_line("needs the teacher's probability of every class.*use teacher.kind: live",
             lambda: parse_recipe({"teacher": {"model": "tiny-llama", "kind": "cache", "path": "c"},
                                   "objective": [{**kd, "correction": "orthogonal"}]}))


def test_the_recipes_correction_table_matches_the_losses():
    from kdforge.losses.logits import MSE_CORRECTIONS, forward_kl, logit_mse

    assert CORRECTIONS["logit_mse"] == MSE_CORRECTIONS
    y, z = torch.tensor([0, 1]), torch.randn(2, 3)
    for name in CORRECTIONS["forward_kl"]:
        assert torch.isfinite(forward_kl(z, z, labels=y, correction=name))
    for name in CORRECTIONS["logit_mse"]:
        assert torch.isfinite(logit_mse(z, z, labels=y, correction=name))


def test_the_bench_report_shows_reliability_diagrams_per_arm(tmp_path):
    from kdforge.bench import run_bench
    from kdforge.report.build import build_report

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(recipe(tmp_path / "unused", steps=4)))
    matrix = tmp_path / "m.yaml"
    matrix.write_text(yaml.safe_dump({
        "name": "calib", "base": str(base), "seeds": [0, 1],
        "methods": {"ce": {"objective": [{"loss": "cross_entropy"}]},
                    "crossfit_kd": {"teacher.crossfit": {"folds": 2},
                                    "objective": [{"loss": "forward_kl", "temperature": 4.0}]}}}))
    res = run_bench(matrix, out=tmp_path / "bench")
    assert not res["failed"]
    n_val = json.loads((tmp_path / "bench/cells/default/ce/seed0/final.json").read_text())["heldout_setup"]["examples"]
    pooled = res["calibration"]["students"]["default"]
    for method in ("ce", "crossfit_kd"):
        bins = pooled[method]
        assert bins["seeds"] == 2 and sum(bins["count"]) == 2 * n_val and len(bins["count"]) == bins["n_bins"] == 15
        # pooled bins give back the mean of the cells' accuracies (same held-out set in every cell)
        assert sum(bins["correct"]) / sum(bins["count"]) == pytest.approx(
            res["summary"]["default"][method]["metrics"]["accuracy"]["mean"], abs=1e-6)
    assert sum(res["calibration"]["teacher"]["count"]) == n_val
    _, md, missing = build_report(tmp_path / "bench")
    assert not any("generations" in m for m in missing), missing  # a classifier's eval.json has none to miss
    text = md.read_text()
    assert "## Calibration (default; held-out reliability diagrams)" in text
    png = tmp_path / "bench" / "report_files" / "reliability_default.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG" and "reliability_default.png" in text
