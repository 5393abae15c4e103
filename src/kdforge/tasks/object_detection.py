"""task object_detection: a single-stage anchor-based digit detector distilled with Label Assignment Distillation.

Data (`data.corpus`): `digit_canvases` -- real scikit-learn digits pasted at 8x8 and 16x16 pixels on 40x40 canvases by
default (data.canvas; kdforge.data.digits_canvas: fixed seed, disjoint source digits, the same held-out set every
run) -- or an .npz file (kdforge.tasks.canvases.load_npz). A batch is {inputs [B, 1, S, S], labels [B, K] multi-hot
(the classes present: one target per canvas), boxes [B, M, 4] xyxy pixels and box_classes [B, M] padded with -1,
index [B]}.

Model (:class:`Detector`, kdforge.recipe.DetectorSpec): three conv blocks with 2x2 pools, 1x1 laterals on the stride-4
and stride-8 maps, one head shared by both levels; one square anchor per cell (kdforge.losses.lad.make_anchors:
sizes 8 and 16 pixels), outputs flattened to class logits [B, A, K] and box deltas [B, A, 4] in the anchors' order
(flatten_head_outputs; deltas in lad.py's coder, stds 0.1/0.1/0.2/0.2). The teacher `cnn` is a wider Detector
(teacher.config) trained once on its own IoU assignment and cached.

Objective terms (`objective:` losses this task takes):

* `detection` -- focal loss + 1.3 x GIoU loss (kdforge.losses.lad.detection_loss: alpha, gamma, box_loss,
  box_weight) on the positives and negatives an assignment chose; `assignment: iou` (default) -- the student's own
  max-IoU matcher (lad.iou_assign, RetinaNet's 0.5/0.4 with low-quality matches) -- or `assignment: lad` -- Label
  Assignment Distillation (Nguyen et al., "Improving Object Detection by Label Assignment Distillation", WACV 2022):
  the teacher's predictions decide which anchors are positive or negative, by PAA's probabilistic anchor assignment
  (Kim & Lee, ECCV 2020) run on the teacher's class logits and boxes (lad.lad_assign: candidates at IoU 0.1, cost =
  the teacher's focal loss + 1.3 GIoU loss, top-9 per level, a two-component GMM split);
* `binary_kd` -- soft-label KD: one binary KD per class on every anchor's class logits [B, A, K]
  (kdforge.losses.cam.binary_kd; temperature), beside a `detection` term.

Both assignments are computed once per run for every training canvas: the canvases are never augmented and the
teacher is frozen (eval mode), so each canvas's IoU and LAD assignment never changes -- exact, and LAD's PAA step
(~2 ms a canvas) then costs nothing per training step. The teacher's logits and deltas are stored likewise.

Metric: mAP@0.5, VOC style (:func:`voc_average_precision`, all-point interpolation, our own code pinned against a
hand-computed case in tests/test_object_detection.py: torchmetrics' MeanAveragePrecision would need torchvision, which
kdforge does not install), of detections after a score threshold of 0.05 and per-class greedy NMS at IoU 0.5 (at most
20 per canvas); per-class AP; the student's mAP@0.5 against the teacher's own detections of score >= 0.5 as ground
truth (teacher agreement); held-out examples/s of the forward pass.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import KDForgeError
from ..losses.cam import binary_kd
from ..losses.lad import (Assignment, box_iou, decode_boxes, detection_loss, flatten_head_outputs, iou_assign,
                          lad_assign, make_anchors)
from ..models import count_parameters
from ..progress import phase
from ..recipe import DetectorSpec, DetectorTeacherSpec, Recipe
from .base import Setup
from .canvases import (EVAL_BATCH, CanvasObjective, CanvasSet, CanvasTask, CanvasTerm, StoredTeacher, bind_terms, cached_teacher,
                       check_fits, conv_blocks, epoch_batches, forward_speed, load_folder, load_split,
                       read_folder_config, save_folder)

log = logging.getLogger("kdforge")

CONFIG_MARK = "kdforge_detector"
STRIDES = (4, 8)
PRIOR = 0.01  # the class head's initial probability (RetinaNet's prior bias)


# --------------------------------------------------------------------------- model


class Detector(nn.Module):
    """A small single-stage anchor-based detector (kdforge.recipe.DetectorSpec).

    Input [B, in_channels, S, S] with S a multiple of 8; output (class logits [B, A, K], box deltas [B, A, 4]) over
    `anchors(S)` [A, 4]. Raises KDForgeError for another channel count or a side that is not a multiple of 8.
    `save_pretrained` / `from_pretrained`: a folder with config.json and model.safetensors."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = DetectorSpec.model_validate({k: v for k, v in config.items()
                                                   if k in DetectorSpec.model_fields}).model_dump()
        c = self.config
        hc, k = c["head_channels"], c["num_classes"]
        self.features = conv_blocks(c["in_channels"], c["channels"], [0, 1, 2])
        self.lateral = nn.ModuleList([nn.Conv2d(c["channels"][1], hc, 1), nn.Conv2d(c["channels"][2], hc, 1)])
        self.head = nn.Sequential(nn.Conv2d(hc, hc, 3, padding=1), nn.ReLU())
        self.cls = nn.Conv2d(hc, k, 3, padding=1)
        self.box = nn.Conv2d(hc, 4, 3, padding=1)
        for conv in (self.cls, self.box):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls.bias, -float(torch.log(torch.tensor((1 - PRIOR) / PRIOR))))

    def anchors(self, size: int) -> tuple[Tensor, Tensor]:
        """(anchors [A, 4], level [A]) of an S x S input (kdforge.losses.lad.make_anchors)."""
        return make_anchors(size, STRIDES, self.config["anchor_sizes"])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = self.config
        if x.dim() != 4 or x.shape[1] != c["in_channels"]:
            raise KDForgeError(f"this detector takes images [B, {c['in_channels']}, H, W], got {tuple(x.shape)}; "
                               "convert the images or set config.in_channels")
        if x.shape[-1] % 8 or x.shape[-2] % 8:
            raise KDForgeError(f"this detector takes sides that are multiples of 8 (strides 4 and 8), got "
                               f"{tuple(x.shape[-2:])}; set data.canvas.canvas_size to a multiple of 8")
        f1 = self.features[1](self.features[0](x))
        f2 = self.features[2](f1)
        heads = [self.head(lat(f)) for lat, f in zip(self.lateral, (f1, f2))]
        return (flatten_head_outputs([self.cls(h) for h in heads], c["num_classes"]),
                flatten_head_outputs([self.box(h) for h in heads], 4))

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        save_folder(self, folder, CONFIG_MARK, state_dict)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "Detector":
        return load_folder(cls, folder, CONFIG_MARK, "detector")


def is_detector_folder(path: str | Path) -> bool:
    return read_folder_config(path, CONFIG_MARK) is not None


# --------------------------------------------------------------------------- assignments


def assign_all(kind: str, data: CanvasSet, anchors: Tensor, levels: Tensor, num_classes: int,
               teacher: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(labels [N, A], gt_index [N, A]) of every canvas of `data` (kdforge.losses.lad.Assignment's encoding):
    `iou` -- iou_assign; `lad` -- lad_assign on the teacher's stored `cls` [N, A, K] and `deltas` [N, A, 4]."""
    labels, gt_index = [], []
    for i in range(len(data)):
        boxes, classes = data.objects(i)
        if kind == "iou":
            a = iou_assign(anchors, boxes, classes, num_classes)
        else:
            a = lad_assign(anchors, levels, teacher["cls"][i], teacher["deltas"][i], boxes, classes)
        labels.append(a.labels)
        gt_index.append(a.gt_index)
    return torch.stack(labels), torch.stack(gt_index)


def _fit_teacher(model: Detector, train: CanvasSet, config: dict[str, Any]) -> None:
    """Adam on detection_loss over the teacher's own IoU assignment, config's epochs (DetectorTeacherSpec)."""
    spec = DetectorTeacherSpec.model_validate(config)
    anchors, levels = model.anchors(train.images.shape[-1])
    labels, gt_index = assign_all("iou", train, anchors, levels, spec.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    g = torch.Generator().manual_seed(spec.seed)
    for _ in range(spec.epochs):
        for idx in epoch_batches(len(train), spec.batch_size, g):
            cls, deltas = model(train.images[idx])
            assignments = [Assignment(labels[i], gt_index[i], spec.num_classes) for i in idx.tolist()]
            loss = detection_loss(cls, deltas, anchors, assignments, [train.objects(i)[0] for i in idx.tolist()])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def build_teacher(recipe: Recipe, train: CanvasSet) -> Detector | None:
    spec = recipe.teacher
    if spec is None:
        return None
    if spec.model == "cnn":
        config = DetectorTeacherSpec.model_validate(spec.config).model_dump()
        return cached_teacher("detection_teachers", config, train, Detector, _fit_teacher, Detector.from_pretrained)
    return Detector.from_pretrained(spec.model).requires_grad_(False)


def _teacher_run(model: nn.Module, images: Tensor) -> dict[str, Tensor]:
    cls, deltas = model(images)
    return {"cls": cls, "deltas": deltas}


# --------------------------------------------------------------------------- objective


LOSSES = {"detection": ("label", detection_loss), "binary_kd": ("teacher", binary_kd)}
ASSIGNMENTS = ("iou", "lad")


class DetectionObjective(CanvasObjective):
    """The detection terms (module docstring) on the student's class logits and deltas, with the IoU or LAD
    assignment of each training canvas computed once (`assignments[kind]` = (labels [N, A], gt_index [N, A]))."""

    def __init__(self, student: Detector, teacher_source: StoredTeacher | None, terms: list[CanvasTerm],
                 anchors: Tensor, levels: Tensor, assignments: dict[str, tuple[Tensor, Tensor]]):
        super().__init__(student, teacher_source, terms, keep_source="lad" in assignments)
        self.anchors, self.levels, self.assignments = anchors, levels, assignments
        self.num_classes = student.config["num_classes"]

    def teacher_outputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """The teacher's stored outputs when a term reads them: binary_kd, or LAD on a batch without `index` (whose
        assignment is then computed here); a stored LAD assignment needs none."""
        if self.teacher_source is None:
            return None
        if any(t.term.loss == "binary_kd" for t in self.terms) or "index" not in batch:
            return self.teacher_source(batch)
        return None

    def outputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cls, deltas = self.student(batch["inputs"])
        return {"cls": cls, "deltas": deltas}

    def batch_assignments(self, kind: str, batch: dict[str, Tensor], teacher: dict[str, Tensor] | None
                          ) -> list[Assignment]:
        """One Assignment per canvas of the batch: looked up by `index`, else computed here."""
        device = batch["inputs"].device
        if "index" in batch:
            labels, gt_index = self.assignments[kind]
            idx = batch["index"].cpu()
            return [Assignment(labels[i].to(device), gt_index[i].to(device), self.num_classes) for i in idx]
        anchors = self.anchors.to(device)
        out = []
        for b in range(len(batch["inputs"])):
            keep = batch["box_classes"][b] >= 0
            boxes, classes = batch["boxes"][b][keep], batch["box_classes"][b][keep]
            if kind == "iou":
                out.append(iou_assign(anchors, boxes, classes, self.num_classes))
            else:
                out.append(lad_assign(anchors, self.levels.to(device), teacher["cls"][b], teacher["deltas"][b],
                                      boxes, classes))
        return out

    def value(self, t: CanvasTerm, student, teacher, batch) -> Tensor:
        if t.term.loss == "binary_kd":
            return binary_kd(student["cls"], teacher["cls"], **t.kwargs)
        kwargs = dict(t.kwargs)
        kind = kwargs.pop("assignment", "iou")
        keep = batch["box_classes"] >= 0
        gt_boxes = [batch["boxes"][b][keep[b]] for b in range(len(keep))]
        return detection_loss(student["cls"], student["deltas"], self.anchors.to(batch["inputs"].device),
                              self.batch_assignments(kind, batch, teacher), gt_boxes, **kwargs)


# --------------------------------------------------------------------------- detections and AP


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression: indices [D'] of the boxes [D, 4] kept, by descending score; a box is dropped
    when its IoU with a kept higher-scoring box exceeds `iou_threshold`."""
    order = torch.argsort(scores, descending=True, stable=True)
    iou = box_iou(boxes[order], boxes[order])
    dropped = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if dropped[i]:
            continue
        keep.append(i)
        dropped |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long)]


def detections(cls: Tensor, deltas: Tensor, anchors: Tensor, size: int, *, score_threshold: float = 0.05,
               iou_threshold: float = 0.5, max_detections: int = 20) -> tuple[Tensor, Tensor, Tensor]:
    """One canvas's detections from class logits [A, K] and deltas [A, 4]: every (anchor, class) of sigmoid score
    above `score_threshold`, its box decoded and clipped to the S x S canvas, greedy NMS per class at
    `iou_threshold`, the `max_detections` best kept. Returns (boxes [D, 4], scores [D], classes [D])."""
    scores = cls.float().sigmoid()
    a_idx, k_idx = torch.nonzero(scores > score_threshold, as_tuple=True)
    boxes = decode_boxes(anchors[a_idx].float(), deltas[a_idx].float()).clamp(0, size)
    s = scores[a_idx, k_idx]
    keep = []
    for k in torch.unique(k_idx):
        members = torch.nonzero(k_idx == k).flatten()
        keep.append(members[nms(boxes[members], s[members], iou_threshold)])
    keep = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)
    keep = keep[torch.argsort(s[keep], descending=True, stable=True)][:max_detections]
    return boxes[keep], s[keep], k_idx[keep]


def voc_average_precision(dets: list[tuple[Tensor, Tensor, Tensor]], truth: list[tuple[Tensor, Tensor]],
                          num_classes: int, iou_threshold: float = 0.5) -> tuple[float, list[float]]:
    """mAP and per-class AP, Pascal VOC style (VOC2010+ devkit, all-point interpolation), our own implementation.

    `dets[i]` = (boxes [D, 4], scores [D], classes [D]) and `truth[i]` = (boxes [n, 4], classes [n]) of canvas i,
    boxes xyxy in pixels (continuous coordinates: no VOC "+1"; no "difficult" flags). Per class, all detections
    in descending score order (ties: image order, then detection order) are matched in turn: to the ground truth of
    that class in its image with the largest IoU; a true positive when that IoU exceeds `iou_threshold` (VOC's
    strict `>`) and that ground truth is not matched yet, else a false positive. AP is the area under the
    precision-recall curve after precision is made monotone (each precision replaced by the highest at any larger
    recall), summed at every recall change. A class with no ground truth is left out of the mean (its AP is NaN);
    one with ground truth but no detection has AP 0. Why our own: torchmetrics' MeanAveragePrecision needs
    torchvision (not installed with kdforge); tests/test_object_detection.py pins this against a case computed by
    hand. Raises KDForgeError when `dets` and `truth` differ in length."""
    if len(dets) != len(truth):
        raise KDForgeError(f"voc_average_precision: {len(dets)} detection lists for {len(truth)} canvases; give one "
                           "of each per canvas")
    per_class = []
    for k in range(num_classes):
        gts = [b[c == k] for b, c in truth]
        n_gt = sum(len(g) for g in gts)
        if n_gt == 0:
            per_class.append(float("nan"))
            continue
        entries = [(float(s), i, j) for i, (b, s_all, c) in enumerate(dets)
                   for j, s in enumerate(s_all.tolist()) if int(c[j]) == k]
        entries.sort(key=lambda e: -e[0])  # stable: ties keep image, then detection order
        matched = [torch.zeros(len(g), dtype=torch.bool) for g in gts]
        tp = torch.zeros(len(entries), dtype=torch.float64)
        for n, (_, i, j) in enumerate(entries):
            if len(gts[i]) == 0:
                continue
            iou = box_iou(dets[i][0][j: j + 1].float(), gts[i].float())[0]
            best = int(torch.argmax(iou))
            if float(iou[best]) > iou_threshold and not matched[i][best]:
                matched[i][best] = True
                tp[n] = 1.0
        ctp = torch.cumsum(tp, 0)
        recall = ctp / n_gt
        precision = ctp / torch.arange(1, len(entries) + 1, dtype=torch.float64)
        mrec = torch.cat([torch.zeros(1, dtype=torch.float64), recall, torch.ones(1, dtype=torch.float64)])
        mpre = torch.cat([torch.zeros(1, dtype=torch.float64), precision, torch.zeros(1, dtype=torch.float64)])
        mpre = torch.flip(torch.cummax(torch.flip(mpre, [0]), 0).values, [0])
        change = torch.nonzero(mrec[1:] != mrec[:-1]).flatten()
        per_class.append(float(((mrec[change + 1] - mrec[change]) * mpre[change + 1]).sum()))
    present = [a for a in per_class if a == a]
    return (sum(present) / len(present) if present else float("nan")), per_class


@torch.no_grad()
def predict(model: Detector, images: Tensor, batch_size: int = EVAL_BATCH) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Each canvas's detections (:func:`detections`) from eval-mode forward passes; the model's mode is restored."""
    was = model.training
    model.eval()
    anchors, _ = model.anchors(images.shape[-1])
    out = []
    for i in range(0, len(images), batch_size):
        cls, deltas = model(images[i: i + batch_size])
        out.extend(detections(c, d, anchors, images.shape[-1]) for c, d in zip(cls, deltas))
    model.train(was)
    return out


def evaluate_models(student: Detector, teacher: Detector | None, data: CanvasSet) -> dict[str, Any]:
    """{"student": figures, "teacher": figures | None, "heldout_setup": ...} on the held-out canvases."""
    truth = [data.objects(i) for i in range(len(data))]
    k = student.config["num_classes"]
    res: dict[str, Any] = {"teacher": None}
    s_dets = predict(student, data.images)
    s_map, s_per = voc_average_precision(s_dets, truth, k)
    res["student"] = {"map50": s_map, "ap50_per_class": s_per, "examples_per_s": forward_speed(student, data.images),
                      "parameters": count_parameters(student),
                      "detections_per_canvas": sum(len(d[0]) for d in s_dets) / len(s_dets)}
    if teacher is not None:
        t_dets = predict(teacher, data.images)
        t_map, t_per = voc_average_precision(t_dets, truth, k)
        res["teacher"] = {"map50": t_map, "ap50_per_class": t_per,
                          "examples_per_s": forward_speed(teacher, data.images),
                          "parameters": count_parameters(teacher),
                          "detections_per_canvas": sum(len(d[0]) for d in t_dets) / len(t_dets)}
        confident = [(b[s >= 0.5], c[s >= 0.5]) for b, s, c in t_dets]
        res["student"]["map50_vs_teacher"] = voc_average_precision(s_dets, confident, k)[0]
    res["heldout_setup"] = {"examples": len(data), "batch_size": EVAL_BATCH, "source": data.source,
                            "score_threshold": 0.05, "nms_iou": 0.5, "max_detections": 20}
    return res


# --------------------------------------------------------------------------- the task


def _card(recipe: Recipe, final: dict[str, Any]) -> str:
    s, t = final["student"], final.get("teacher") or {}
    teacher = recipe.teacher.model if recipe.teacher is not None else "none"
    t_map = f"{t['map50']:.4g}" if t else "—"
    return (f"# {recipe.name}\n\nA {final['student_parameters']:,}-parameter single-stage digit detector distilled "
            f"with kdforge from `{teacher}` on `{recipe.data.corpus}`; load it with "
            "`kdforge.tasks.object_detection.Detector.from_pretrained(folder)`.\n\n"
            f"| held-out | student | teacher |\n|---|---|---|\n| mAP@0.5 | {s['map50']:.4g} | {t_map} |\n")


class ObjectDetection(CanvasTask):
    """The object-detection task (kdforge.tasks.base.Task)."""

    name = "object_detection"
    unit = "examples"
    model = Detector
    is_model_folder = staticmethod(is_detector_folder)
    build_teacher = staticmethod(build_teacher)
    evaluate = staticmethod(evaluate_models)
    card = staticmethod(_card)

    def data(self, recipe: Recipe) -> tuple[CanvasSet, CanvasSet]:
        return load_split(recipe, with_boxes=True)

    def prepare(self, recipe: Recipe, *, teacher: nn.Module | None = None, tokenizer=None,
                blocks: tuple[CanvasSet, CanvasSet] | None = None) -> Setup:
        train, val = blocks if blocks is not None else self.data(recipe)
        for part in (train, val):
            check_fits(part, recipe.student.config, "student")
        terms = bind_terms(recipe.objective, LOSSES, self.name, own={"assignment"})
        kinds = {t.kwargs.get("assignment", "iou") for t in terms if t.term.loss == "detection"}
        bad = kinds - set(ASSIGNMENTS)
        if bad:
            raise KDForgeError(f"detection term: assignment {sorted(bad)[0]!r} is not one of {', '.join(ASSIGNMENTS)}; "
                               "iou: the student's own max-IoU matcher, lad: the teacher's (LAD)")
        needs_teacher = "lad" in kinds or any(t.kind != "label" for t in terms)
        if needs_teacher and teacher is None and recipe.teacher is None:
            raise KDForgeError("the objective has distillation terms (binary_kd or assignment: lad) but no teacher; "
                               "set `teacher:` in the recipe")
        if teacher is None and recipe.teacher is not None:  # also for a baseline: final.json's teacher figures
            teacher = build_teacher(recipe, train)
        if teacher is not None:
            check_fits(train, teacher.config, "teacher")
        if len(train) < recipe.train.batch_size:
            raise KDForgeError(f"{train.source} has {len(train)} training canvases, fewer than one batch of "
                               f"train.batch_size={recipe.train.batch_size}; lower train.batch_size")
        torch.manual_seed(recipe.seed)
        student = Detector(recipe.student.config)
        anchors, levels = student.anchors(train.images.shape[-1])
        source = StoredTeacher.build(teacher, _teacher_run, train) if needs_teacher else None
        if source is not None and source.outputs["cls"].shape[1] != len(anchors):
            raise KDForgeError(f"the teacher predicts on {source.outputs['cls'].shape[1]} anchors but the student on "
                               f"{len(anchors)}; give both the same anchor_sizes and canvas size")
        k = student.config["num_classes"]
        assignments = {}
        for kind in sorted(kinds):
            with phase(f"{kind} assignment of {len(train)} training canvases (once)"):
                assignments[kind] = assign_all(kind, train, anchors, levels, k, source.outputs if source else None)
        objective = DetectionObjective(student, source, terms, anchors, levels, assignments)
        return Setup(recipe, None, teacher, student, objective, train, val, self)

    def make_batch(self, data: CanvasSet, index: Tensor) -> dict[str, Tensor]:
        """{inputs [B, C, H, W], labels [B, K] multi-hot (the classes present), boxes [B, M, 4], box_classes [B, M]
        (-1: padding), index [B] (for the stored assignments and teacher outputs)}."""
        return {"inputs": data.images[index], "labels": data.labels[index], "boxes": data.boxes[index],
                "box_classes": data.box_classes[index], "index": torch.as_tensor(index, dtype=torch.long)}

    def periodic_metrics(self, setup: Setup) -> dict[str, float]:
        val = setup.val_blocks
        m, _ = voc_average_precision(predict(setup.student, val.images), [val.objects(i) for i in range(len(val))],
                                     setup.student.config["num_classes"])
        return {"eval/map50": m}
