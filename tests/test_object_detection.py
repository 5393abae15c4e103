"""task object_detection on digit canvases (real scikit-learn digits): VOC AP@0.5 pinned to a hand-computed case,
LAD really trains the student on the teacher's assignment (a crafted teacher moves a positive), the objective's terms
equal lad.py's functions, `kdforge distill` / `kdforge eval` on small slices, resume, bad input in one line."""
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
from kdforge.losses.cam import binary_kd  # noqa: E402
from kdforge.losses.lad import box_iou, detection_loss, encode_boxes, iou_assign, lad_assign  # noqa: E402
from kdforge.recipe import parse_recipe  # noqa: E402
from kdforge.tasks import object_detection as od  # noqa: E402
from kdforge.train import prepare, train  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TEACHER = {"channels": [16, 32, 32], "head_channels": 32, "epochs": 8, "batch_size": 16, "lr": 0.005}
TRAIN = {"steps": 60, "batch_size": 32, "lr": 0.005, "warmup_steps": 2, "save_every": 30, "log_every": 5}


@pytest.fixture(autouse=True)
def _cache_env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "det_cache"))  # one teacher per session


def small_recipe(name: str, out: Path, **train) -> dict:
    r = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    r.update(output_dir=str(out), teacher={**r["teacher"], "config": TEACHER})
    r["data"]["canvas"].update(n_train=192, n_test=96)
    r["train"].update(TRAIN, **train)
    return r


def test_voc_ap_at_0_5_matches_a_hand_computed_case():
    """Class 0: two ground truths (one per canvas) and four detections, in score order: 0.9 on canvas 0 (IoU 0.81,
    TP), 0.8 on canvas 0 (the same box again: FP), 0.7 on canvas 1 (IoU 0.14: FP), 0.6 on canvas 1 (IoU 0.68: TP).
    Recall 1/2, 1/2, 1/2, 1; precision 1, 1/2, 1/3, 1/2; made monotone 1, 1/2, 1/2, 1/2 -> AP = 1/2 x 1 + 1/2 x 1/2
    = 0.75. Class 1: a ground truth never detected -> AP 0. Class 2: a detection but no ground truth -> left out.
    mAP = (0.75 + 0) / 2."""
    gt0, gt1 = torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[20.0, 20, 30, 30]])
    d = {"a": [0.0, 0, 9, 9], "b": [1.0, 1, 10, 10], "c": [25.0, 25, 35, 35], "d": [21.0, 21, 31, 31]}
    assert float(box_iou(torch.tensor([d["a"]]), gt0)) == pytest.approx(0.81)
    assert float(box_iou(torch.tensor([d["c"]]), gt1)) == pytest.approx(25 / 175)
    assert float(box_iou(torch.tensor([d["d"]]), gt1)) == pytest.approx(81 / 119)
    dets = [(torch.tensor([d["a"], d["b"], [0.0, 0, 5, 5]]), torch.tensor([0.9, 0.8, 0.95]), torch.tensor([0, 0, 2])),
            (torch.tensor([d["c"], d["d"]]), torch.tensor([0.7, 0.6]), torch.tensor([0, 0]))]
    truth = [(torch.cat([gt0, torch.tensor([[12.0, 0, 20, 8]])]), torch.tensor([0, 1])), (gt1, torch.tensor([0]))]
    m, per = od.voc_average_precision(dets, truth, 3)
    assert per[0] == pytest.approx(0.75) and per[1] == 0.0 and per[2] != per[2]
    assert m == pytest.approx(0.375)
    # VOC's strict '>': a detection at IoU exactly 0.5 is a false positive
    half = [(torch.tensor([[0.0, 0, 10, 5]]), torch.tensor([0.9]), torch.tensor([0]))]
    assert od.voc_average_precision(half, [(gt0, torch.tensor([0]))], 1)[0] == 0.0
    with pytest.raises(KDForgeError, match="2 detection lists for 1 canvases"):
        od.voc_average_precision(dets, truth[:1], 3)


def test_nms_and_detections():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
    assert od.nms(boxes, torch.tensor([0.5, 0.9, 0.4]), 0.5).tolist() == [1, 2]
    anchors = torch.tensor([[0.0, 0, 8, 8], [0, 0, 8, 8]])
    cls = torch.tensor([[3.0, -9.0], [2.0, 1.0]])  # anchor 1's class 0 duplicates anchor 0's; its class 1 stays
    b, s, c = od.detections(cls, torch.zeros(2, 4), anchors, 40)
    assert c.tolist() == [0, 1] and s[0] == pytest.approx(torch.sigmoid(torch.tensor(3.0)))


class CraftedTeacher(od.Detector):
    """Confident and exact at one anchor only: class `k` at +8 and a perfect box for `box` there, -8 elsewhere."""

    def __init__(self, config, anchors, anchor, k, box):
        super().__init__(config)
        self.cls_out = torch.full((len(anchors), config["num_classes"]), -8.0)
        self.cls_out[anchor, k] = 8.0
        self.box_out = torch.zeros(len(anchors), 4)
        self.box_out[anchor] = encode_boxes(anchors[anchor: anchor + 1], box[None])[0]

    def forward(self, x):
        return self.cls_out.expand(len(x), -1, -1), self.box_out.expand(len(x), -1, -1)


def test_lad_trains_the_student_on_the_teachers_assignment(tmp_path):
    r = parse_recipe(small_recipe("detection_lad", tmp_path, steps=2))
    train_set, _ = od.ObjectDetection().data(r)
    student = od.Detector(r.student.config)
    anchors, levels = student.anchors(40)
    boxes, classes = train_set.objects(0)
    own = iou_assign(anchors, boxes, classes, 10)
    # a candidate of box 0 (IoU >= 0.1, box 0 its best) that the student's own IoU matcher leaves negative
    iou = box_iou(anchors, boxes)
    candidates = ((iou.max(1).values >= 0.1) & (iou.argmax(1) == 0) & ~own.positive).nonzero().flatten()
    chosen = int(candidates[0])
    teacher = CraftedTeacher({**r.student.config, "channels": [4, 4, 4], "head_channels": 4}, anchors, chosen,
                             int(classes[0]), boxes[0])
    setup = prepare(r, teacher=teacher)
    labels, gt_index = setup.distiller.assignments["lad"]
    assert labels[0, chosen] == classes[0] and gt_index[0, chosen] == 0  # the teacher's pick is the student's positive
    assert not torch.equal(labels[0] < 10, own.positive)
    # the training term is detection_loss on exactly lad_assign's labels
    batch = setup.task.make_batch(setup.train_blocks, torch.tensor([0, 1]))
    _, values = setup.distiller(batch)
    cls, deltas = setup.student(batch["inputs"])
    t_cls, t_deltas = teacher(batch["inputs"])
    direct = [lad_assign(anchors, levels, t_cls[b], t_deltas[b], *train_set.objects(b)) for b in (0, 1)]
    expect = detection_loss(cls, deltas, anchors, direct, [train_set.objects(b)[0] for b in (0, 1)])
    assert float(values["detection"]) == pytest.approx(float(expect.detach()), rel=1e-5)
    with_own = detection_loss(cls, deltas, anchors, [iou_assign(anchors, *train_set.objects(b), 10) for b in (0, 1)],
                              [train_set.objects(b)[0] for b in (0, 1)])
    assert float(with_own.detach()) != pytest.approx(float(values["detection"]), rel=1e-3)


def test_soft_label_kd_is_binary_kd_on_every_anchor(tmp_path):
    setup = prepare(parse_recipe(small_recipe("detection_soft_kd", tmp_path, steps=2)))
    batch = setup.task.make_batch(setup.train_blocks, torch.arange(4))
    _, values = setup.distiller(batch)
    with torch.no_grad():
        cls, _ = setup.student(batch["inputs"])
        t_cls, _ = setup.teacher(batch["inputs"])
    assert cls.shape == (4, 125, 10)  # 10 x 10 anchors at stride 4 + 5 x 5 at stride 8 on 40 x 40 canvases
    assert float(values["binary_kd"]) == pytest.approx(float(binary_kd(cls, t_cls)), rel=1e-5)
    assert "lad" not in setup.distiller.assignments and "iou" in setup.distiller.assignments


def test_distill_and_eval_through_the_cli_learn_above_an_untrained_detector(tmp_path):
    out = tmp_path / "lad"
    path = tmp_path / "lad.yaml"
    path.write_text(yaml.safe_dump(small_recipe("detection_lad", out)))
    runner = CliRunner()
    res = runner.invoke(app, ["distill", str(path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss/detection"] < 0.7 * rows[0]["loss/detection"]
    final = json.loads((out / "final.json").read_text())
    recipe = parse_recipe(yaml.safe_load(path.read_text()))
    _, val = od.ObjectDetection().data(recipe)
    untrained = od.voc_average_precision(od.predict(od.Detector(recipe.student.config), val.images),
                                         [val.objects(i) for i in range(len(val))], 10)[0]
    assert final["student"]["map50"] > untrained + 0.03
    assert final["teacher"]["map50"] > untrained + 0.03
    agreement = final["student"]["map50_vs_teacher"]  # NaN when the teacher has no detection of score >= 0.5
    assert agreement != agreement or 0 <= agreement <= 1
    res = runner.invoke(app, ["eval", str(out)])
    assert res.exit_code == 0, res.output
    ev = json.loads((out / "eval.json").read_text())
    assert ev["task"] == "object_detection"
    assert ev["heldout"]["student"]["map50"] == pytest.approx(final["student"]["map50"])


def test_a_resumed_lad_run_ends_with_the_same_student(tmp_path):
    r = small_recipe("detection_lad", tmp_path / "a", steps=4, save_every=2)
    a = train(parse_recipe(r), progress=False)
    b_recipe = parse_recipe({**r, "output_dir": str(tmp_path / "b")})
    train(b_recipe, progress=False)
    b = train(b_recipe, progress=False, resume_from="step_00000002")
    sa, sb = od.Detector.from_pretrained(a / "student"), od.Detector.from_pretrained(b / "student")
    for (name, x), (_, y) in zip(sa.state_dict().items(), sb.state_dict().items()):
        assert torch.equal(x, y), name


def test_bad_input_is_refused_in_one_line(tmp_path):
    n = 16
    images = np.zeros((n, 1, 16, 16), np.float32)
    labels = np.eye(10, dtype=np.float32)[np.arange(n) % 10]
    boxes = np.tile(np.array([[2.0, 2, 10, 10]], np.float32), (n, 1))

    def npz(name, **change):
        arrays = {"images": images, "labels": labels, "is_test": np.arange(n) % 4 == 0, "boxes": boxes,
                  "box_classes": np.arange(n) % 10, "box_image": np.arange(n), **change}
        np.savez(tmp_path / name, **arrays)
        return str(tmp_path / name)

    outside = boxes.copy()
    outside[5] = [10, 10, 20, 20]
    beyond = labels.copy()
    beyond[3] = 0
    beyond[3, 9] = 1
    cases = [(npz("out.npz", boxes=outside), "record 5: box 0 \\[10.0, 10.0, 20.0, 20.0\\] lies outside the 16x16"),
             (npz("cls.npz", box_classes=np.where(np.arange(n) == 3, 12, np.arange(n) % 10), labels=beyond),
              "record 3: box 0 has class id 12, outside 0..9"),
             (npz("nobox.npz", box_image=np.full(n, 40)), "box_image names record 40 but there are 16 images")]
    base = {"task": "object_detection", "objective": [{"loss": "detection"}], "train": {"batch_size": 4}}
    for path, message in cases:
        with pytest.raises(KDForgeError, match=message) as err:
            prepare(parse_recipe({**base, "data": {"corpus": path}}))
        assert "\n" not in str(err.value)
    with pytest.raises(KDForgeError, match="assignment 'paa' is not one of iou, lad"):
        prepare(parse_recipe({**base, "data": {"corpus": npz("ok.npz")},
                              "objective": [{"loss": "detection", "assignment": "paa"}]}))
    with pytest.raises(KDForgeError, match="multiples of 8"):
        od.Detector({})(torch.zeros(1, 1, 36, 36))
