"""task multi_label_classification on digit canvases (real scikit-learn digits): the CAM-headed CNN, the objective's
terms wired to the CAM losses, mAP against scikit-learn and a hand case, `kdforge distill` / `kdforge eval` on small
slices, resume, and bad input refused in one line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

pytest.importorskip("sklearn.datasets")

from kdforge.cli import app  # noqa: E402
from kdforge.errors import KDForgeError  # noqa: E402
from kdforge.losses.cam import binary_kd, cat_kd, classwise_cam_kd  # noqa: E402
from kdforge.recipe import parse_recipe  # noqa: E402
from kdforge.tasks import multi_label_classification as ml  # noqa: E402
from kdforge.train import prepare, train  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SMALL = {"teacher": {"model": "cnn", "config": {"channels": [16, 32, 32], "pool_after": [0, 1], "epochs": 4,
                                                "lr": 0.004}},
         "student": {"config": {"channels": [16, 32, 32], "pool_after": [0, 1]}},
         "data": {"canvas": {"n_train": 256, "n_test": 128}}}
TRAIN = {"steps": 80, "batch_size": 32, "lr": 0.01, "warmup_steps": 2, "save_every": 40, "log_every": 5}


@pytest.fixture(autouse=True)
def _cache_env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "ml_cache"))  # one teacher per session


def small_recipe(name: str, out: Path, **train) -> dict:
    r = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    r.update(output_dir=str(out), teacher={**r["teacher"], **SMALL["teacher"]}, student=SMALL["student"])
    r["data"] = {"corpus": "digit_canvases", "canvas": SMALL["data"]["canvas"]}
    r["train"].update(TRAIN, **train)
    return r


def test_the_task_validates_and_fills_in_its_defaults():
    r = parse_recipe({"task": "multi_label_classification", "teacher": {"model": "cnn"}})
    assert r.data.corpus == "digit_canvases" and r.data.canvas["n_test"] == 500 and r.data.canvas["scales"] == [1]
    assert r.student.config["channels"] == [16, 32, 32] and r.teacher.config["epochs"] == 8
    assert parse_recipe({}).hash() == parse_recipe({"task": "causal_lm"}).hash()  # data.canvas leaves old hashes
    with pytest.raises(KDForgeError, match="data.canvas describes digit canvases") as err:
        parse_recipe({"data": {"canvas": {"n_train": 4}}})
    assert "\n" not in str(err.value)
    with pytest.raises(KDForgeError, match="student.config has an unknown key 'chanels'"):
        parse_recipe({"task": "multi_label_classification", "student": {"config": {"chanels": [4]}}})
    r = parse_recipe({**small_recipe("multilabel_bce", Path("x")), "objective": [{"loss": "forward_kl"}]})
    with pytest.raises(KDForgeError, match="has no loss 'forward_kl'; its losses are binary_cross_entropy") as err:
        prepare(r)
    assert "\n" not in str(err.value)


def test_camnet_logits_are_the_pooled_maps_and_the_terms_compare_what_the_losses_say(tmp_path):
    r = parse_recipe({**small_recipe("multilabel_cam_kd", tmp_path),
                      "objective": [{"loss": "binary_cross_entropy"}, {"loss": "binary_kd", "temperature": 2.0},
                                    {"loss": "classwise_cam_kd", "classes": "present"},
                                    {"loss": "cat_kd", "pool_size": 2}]})
    setup = prepare(r)
    batch = setup.task.make_batch(setup.train_blocks, torch.arange(8))
    student, teacher = setup.student, setup.teacher
    logits, cams = student.maps(batch["inputs"])
    assert torch.allclose(logits, cams.mean((2, 3)) + student.bias, atol=1e-6)  # a bias-free 1x1 conv, then GAP
    assert cams.shape == (8, 10, 8, 8) and student.cam.bias is None
    _, values = setup.distiller(batch)
    with torch.no_grad():
        t_logits, t_cams = teacher.maps(batch["inputs"])
    labels = batch["labels"]
    expect = {"binary_cross_entropy": ml.multilabel_bce(logits, labels),
              "binary_kd": binary_kd(logits, t_logits, temperature=2.0),
              "classwise_cam_kd": classwise_cam_kd(cams, t_cams, labels=labels, classes="present"),
              "cat_kd": cat_kd(cams, t_cams, pool_size=2)}
    for name, value in expect.items():
        assert float(values[name]) == pytest.approx(float(value.detach()), rel=1e-5), name
    # `present` really reads the labels: counting every class gives another value
    assert float(classwise_cam_kd(cams.detach(), t_cams)) != pytest.approx(float(values["classwise_cam_kd"]), rel=1e-3)


def test_average_precision_matches_scikit_learn_and_a_hand_case():
    from sklearn.metrics import average_precision_score

    # scores 0.9 (pos), 0.8 (neg), 0.8 (pos), 0.1 (neg): thresholds 0.9 -> P 1, R 1/2; 0.8 -> P 2/3, R 1
    hand = ml.average_precision(torch.tensor([0.9, 0.8, 0.8, 0.1]), torch.tensor([1, 0, 1, 0]))
    assert hand == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        scores = torch.randint(0, 6, (40,), generator=g).float()  # many ties
        truth = (torch.rand(40, generator=g) < 0.4).long()
        truth[0] = 1
        assert ml.average_precision(scores, truth) == pytest.approx(average_precision_score(truth, scores))
    labels = torch.tensor([[1, 0], [0, 1], [1, 1]]).float()
    res = ml.multilabel_metrics(torch.tensor([[2.0, -1.0], [-1.0, 0.5], [-0.5, 3.0]]), labels,
                                torch.tensor([[1.0, -1.0], [-1.0, -1.0], [1.0, 1.0]]))
    assert res["f1_per_class"] == pytest.approx([2 / 3, 1.0]) and res["exact_match"] == pytest.approx(2 / 3)
    assert res["teacher_agreement"] == pytest.approx(4 / 6) and res["teacher_set_agreement"] == pytest.approx(1 / 3)


def test_distill_and_eval_through_the_cli_learn_above_chance(tmp_path):
    out = tmp_path / "cam"
    path = tmp_path / "cam.yaml"
    path.write_text(yaml.safe_dump(small_recipe("multilabel_cam_kd", out)))
    runner = CliRunner()
    res = runner.invoke(app, ["distill", str(path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    assert last["loss/binary_cross_entropy"] < 0.85 * first["loss/binary_cross_entropy"]
    assert last["loss/classwise_cam_kd"] < first["loss/classwise_cam_kd"]
    assert last["tokens"] == 80 * 32  # one counted target per canvas, not per class
    final = json.loads((out / "final.json").read_text())
    test_labels = parse_recipe(yaml.safe_load(path.read_text()))
    _, val = ml.MultiLabelClassification().data(test_labels)
    prevalence = float(val.labels.mean())  # the mAP of scores that carry no information
    assert final["student"]["map"] > prevalence + 0.15
    assert 0 <= final["student"]["teacher_agreement"] <= 1 and final["teacher"]["map"] > prevalence + 0.15
    res = runner.invoke(app, ["eval", str(out)])
    assert res.exit_code == 0, res.output
    ev = json.loads((out / "eval.json").read_text())
    assert ev["task"] == "multi_label_classification"
    assert ev["heldout"]["student"]["map"] == pytest.approx(final["student"]["map"])
    assert ev["heldout"]["student"]["f1_per_class"] == pytest.approx(final["student"]["f1_per_class"])


def test_a_resumed_run_ends_with_the_same_student(tmp_path):
    r = small_recipe("multilabel_binary_kd", tmp_path / "a", steps=10, save_every=5)
    a = train(parse_recipe(r), progress=False)
    b = train(parse_recipe({**r, "output_dir": str(tmp_path / "b")}), progress=False)
    train(parse_recipe({**r, "output_dir": str(tmp_path / "b")}), progress=False, resume_from="step_00000005")
    sa, sb = ml.CAMNet.from_pretrained(a / "student"), ml.CAMNet.from_pretrained(b / "student")
    for (name, x), (_, y) in zip(sa.state_dict().items(), sb.state_dict().items()):
        assert torch.equal(x, y), name


def _npz(path: Path, labels: np.ndarray, channels: int = 1) -> Path:
    n = len(labels)
    images = np.random.default_rng(0).random((n, channels, 16, 16)).astype(np.float32)
    np.savez(path, images=images, labels=labels, is_test=np.arange(n) % 4 == 0)
    return path


def test_bad_input_is_refused_in_one_line(tmp_path):
    labels = np.eye(10, dtype=np.float32)[np.arange(40) % 10]
    base = {"task": "multi_label_classification", "student": {"config": {"channels": [4], "pool_after": []}},
            "objective": [{"loss": "binary_cross_entropy"}], "train": {"batch_size": 4}}
    empty = labels.copy()
    empty[7] = 0
    cases = [(_npz(tmp_path / "empty.npz", empty), "record 7: empty label set"),
             (_npz(tmp_path / "rgb.npz", labels, channels=3), "has 3 channel\\(s\\) but the student takes 1"),
             (_npz(tmp_path / "wide.npz", np.eye(12, dtype=np.float32)[np.arange(40) % 12]),
              "labels have 12 classes but the student's head has 10"),
             (tmp_path / "missing.npz", "is not `digit_canvases` or an existing .npz file")]
    for path, message in cases:
        with pytest.raises(KDForgeError, match=message) as err:
            prepare(parse_recipe({**base, "data": {"corpus": str(path)}}))
        assert "\n" not in str(err.value)
    setup = prepare(parse_recipe({**base, "data": {"corpus": str(_npz(tmp_path / "ok.npz", labels))}}))
    assert len(setup.train_blocks) == 30 and len(setup.val_blocks) == 10


def test_the_bench_matrices_resolve_with_their_own_supervised_baseline(tmp_path):
    from kdforge.bench import load_matrix, plan_cells

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    for name, baseline, methods in (("multilabel_matrix", "bce", 4), ("detection_matrix", "iou", 3)):
        spec, base = load_matrix(benchmarks / f"{name}.yaml")
        cells, chosen = plan_cells(spec, base, tmp_path / name)
        assert chosen == baseline  # no cross-entropy cell is added to a task that has no cross_entropy loss
        assert len(cells) == methods * len(spec.seeds) and all(c.recipe is not None for c in cells), \
            [c.error for c in cells]
