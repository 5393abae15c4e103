"""task multi_label_classification: which digits are on a canvas, distilled from a CAM-headed CNN into a smaller one.

Data (`data.corpus`): `digit_canvases` -- 2..4 real scikit-learn digits pasted on a canvas (data.canvas, kdforge.data
.digits_canvas: a fixed generator seed, train and held-out canvases drawn from disjoint source digits, the same
held-out set every run) -- or an .npz file (kdforge.tasks.canvases.load_npz). A batch is {inputs [B, 1, S, S],
labels [B, 10] multi-hot float, index [B]}.

Models (:class:`CAMNet`, kdforge.recipe.CanvasCNNSpec): conv blocks, then a bias-free 1x1 convolution (`cam`) whose
output [B, K, H, W] is each class's activation map (Zhou et al., CVPR 2016; CAT-KD's converted head), globally
average-pooled, plus a per-class bias: logits [B, K], one sigmoid per class. The teacher `cnn` (teacher.config) is
trained once with binary cross-entropy and cached; its logits and maps on every training canvas are computed once
per run (kdforge.tasks.canvases.StoredTeacher).

Objective terms (`objective:` losses this task takes):

* `binary_cross_entropy` -- the supervised term: BCE-with-logits against the multi-hot labels, summed over the K
  classes, averaged over examples;
* `binary_kd` -- logit KD as one binary KD per class (kdforge.losses.cam.binary_kd; temperature);
* `classwise_cam_kd` -- the teacher's per-class maps guide the student's (kdforge.losses.cam.classwise_cam_kd;
  `classes: all | present`: with present the batch's labels choose the maps; pool_size, resize);
* `cat_kd` -- CAT-KD (Guo et al., CVPR 2023; kdforge.losses.cam.cat_kd: pool_size, normalize, convention).

Metrics (final.json, `kdforge eval`): mAP (macro average precision over the classes; scikit-learn's
`average_precision_score` when scikit-learn is installed, else :func:`average_precision`, the same step-wise
definition), F1 per class at probability 0.5 and their macro mean, exact-set accuracy, agreement with the teacher's
0.5 decisions (per class and per canvas), and held-out examples/s (the only wall-clock figure).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KDForgeError
from ..losses.cam import binary_kd, cat_kd, classwise_cam_kd
from ..models import count_parameters
from ..recipe import CanvasCNNSpec, CanvasCNNTeacherSpec, Recipe
from .base import Setup
from .canvases import (EVAL_BATCH, CanvasObjective, CanvasSet, CanvasTask, CanvasTerm, StoredTeacher, bind_terms, cached_teacher,
                       check_fits, conv_blocks, epoch_batches, forward_speed, load_folder, load_split,
                       read_folder_config, save_folder)

log = logging.getLogger("kdforge")

CONFIG_MARK = "kdforge_camnet"


# --------------------------------------------------------------------------- model


class CAMNet(nn.Module):
    """conv blocks (`features.i`) -> bias-free 1x1 conv (`cam`, the class activation maps [B, K, H, W]) -> global
    average pool + per-class `bias` [K] -> logits [B, K].

    `forward(x)` gives the logits; `maps(x)` gives (logits, maps). Input [B, in_channels, H, W]; raises KDForgeError
    for another channel count. `save_pretrained` / `from_pretrained`: a folder with config.json and
    model.safetensors."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = CanvasCNNSpec.model_validate({k: v for k, v in config.items()
                                                    if k in CanvasCNNSpec.model_fields}).model_dump()
        c = self.config
        self.features = conv_blocks(c["in_channels"], c["channels"], c["pool_after"])
        self.cam = nn.Conv2d(c["channels"][-1], c["num_classes"], 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(c["num_classes"]))

    def maps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or x.shape[1] != self.config["in_channels"]:
            raise KDForgeError(f"this CNN takes images [B, {self.config['in_channels']}, H, W], got {tuple(x.shape)}; "
                               "convert the images or set config.in_channels")
        cams = self.cam(self.features(x))
        return cams.mean(dim=(2, 3)) + self.bias, cams

    def forward(self, x: Tensor) -> Tensor:
        return self.maps(x)[0]

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        save_folder(self, folder, CONFIG_MARK, state_dict)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "CAMNet":
        return load_folder(cls, folder, CONFIG_MARK, "multi-label CNN")


def is_camnet_folder(path: str | Path) -> bool:
    return read_folder_config(path, CONFIG_MARK) is not None


def multilabel_bce(logits: Tensor, labels: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Binary cross-entropy with logits [B, K] against multi-hot labels [B, K] (0/1), summed over the K classes and
    averaged over the examples (those where `mask` [B] is True). Raises KDForgeError for differing shapes."""
    if logits.shape != labels.shape:
        raise KDForgeError(f"binary_cross_entropy: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
                           "differ; give one multi-hot row per example")
    per = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").sum(-1)
    if mask is not None:
        per = per[mask.bool()]
    return per.mean() if per.numel() else per.sum()


def _fit_teacher(model: CAMNet, train: CanvasSet, config: dict[str, Any]) -> None:
    """Adam on multilabel_bce for config's epochs (kdforge.recipe.CanvasCNNTeacherSpec)."""
    spec = CanvasCNNTeacherSpec.model_validate(config)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    g = torch.Generator().manual_seed(spec.seed)
    for _ in range(spec.epochs):
        for idx in epoch_batches(len(train), spec.batch_size, g):
            loss = multilabel_bce(model(train.images[idx]), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def build_teacher(recipe: Recipe, train: CanvasSet) -> CAMNet | None:
    spec = recipe.teacher
    if spec is None:
        return None
    if spec.model == "cnn":
        config = CanvasCNNTeacherSpec.model_validate(spec.config).model_dump()
        return cached_teacher("multilabel_teachers", config, train, CAMNet, _fit_teacher,
                              CAMNet.from_pretrained)
    return CAMNet.from_pretrained(spec.model).requires_grad_(False)


def _teacher_run(model: nn.Module, images: Tensor) -> dict[str, Tensor]:
    logits, cams = model.maps(images)
    return {"logits": logits, "cams": cams}


# --------------------------------------------------------------------------- objective


LOSSES = {"binary_cross_entropy": ("label", multilabel_bce), "binary_kd": ("teacher", binary_kd),
          "classwise_cam_kd": ("teacher", classwise_cam_kd), "cat_kd": ("teacher", cat_kd)}


class MultiLabelObjective(CanvasObjective):
    """The multi-label terms (module docstring) on the student's logits and maps and the teacher's stored ones."""

    def outputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits, cams = self.student.maps(batch["inputs"])
        return {"logits": logits, "cams": cams}

    def value(self, t: CanvasTerm, student, teacher, batch) -> Tensor:
        name = t.term.loss
        if name == "binary_cross_entropy":
            return multilabel_bce(student["logits"], batch["labels"])
        if name == "binary_kd":
            return binary_kd(student["logits"], teacher["logits"], **t.kwargs)
        kwargs = dict(t.kwargs)
        if name == "classwise_cam_kd" and kwargs.get("classes") == "present":
            kwargs["labels"] = batch["labels"]
        return t.fn(student["cams"], teacher["cams"], **kwargs)


# --------------------------------------------------------------------------- metrics


def average_precision(scores: Tensor, truth: Tensor) -> float:
    """Average precision of one class: scores [N] against 0/1 truth [N], as scikit-learn's
    `average_precision_score` defines it (no interpolation): sum over the distinct score thresholds, from the highest,
    of (recall gained at the threshold) x (precision at the threshold); tied scores enter together. NaN when truth
    has no positive."""
    positives = float(truth.sum())
    if positives == 0:
        return float("nan")
    order = torch.argsort(scores.double(), descending=True, stable=True)
    s, y = scores.double()[order], truth.double()[order]
    tp = torch.cumsum(y, 0)
    last = torch.ones(len(s), dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # the last entry of each run of tied scores: one threshold
    tp, count = tp[last], torch.arange(1, len(s) + 1, dtype=torch.float64)[last]
    precision, recall = tp / count, tp / positives
    gained = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((gained * precision).sum())


def mean_average_precision(scores: Tensor, labels: Tensor) -> tuple[float, list[float]]:
    """(macro mAP, per-class AP [K]) of scores [N, K] against multi-hot labels [N, K], over the classes with at least
    one positive. scikit-learn's average_precision_score when installed, else :func:`average_precision`."""
    try:
        from sklearn.metrics import average_precision_score
    except ImportError:
        average_precision_score = None
    per = []
    for k in range(labels.shape[1]):
        if labels[:, k].sum() == 0:
            per.append(float("nan"))
        elif average_precision_score is not None:
            per.append(float(average_precision_score(labels[:, k].numpy(), scores[:, k].double().numpy())))
        else:
            per.append(average_precision(scores[:, k], labels[:, k]))
    present = [a for a in per if a == a]
    return sum(present) / len(present), per


def f1_per_class(pred: Tensor, labels: Tensor) -> list[float]:
    """F1 = 2 TP / (2 TP + FP + FN) of each class of bool predictions [N, K] against labels [N, K] (1.0 for a class
    neither predicted nor present)."""
    y = labels.bool()
    tp = (pred & y).sum(0).double()
    fp = (pred & ~y).sum(0).double()
    fn = (~pred & y).sum(0).double()
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.ones_like(denom)).tolist()


def multilabel_metrics(logits: Tensor, labels: Tensor, reference: Tensor | None = None) -> dict[str, Any]:
    """mAP, per-class AP, per-class F1 at probability 0.5 and macro F1, exact-set accuracy and mean BCE of logits
    [N, K] against multi-hot labels [N, K]; with the teacher's `reference` logits [N, K] also teacher_agreement (share
    of the N x K decisions at 0.5 that match the teacher's) and teacher_set_agreement (share of canvases whose whole
    predicted set matches)."""
    pred = logits > 0  # sigmoid(z) > 0.5
    m_ap, per_ap = mean_average_precision(logits.float(), labels)
    f1 = f1_per_class(pred, labels)
    res = {"map": m_ap, "ap_per_class": per_ap, "macro_f1": sum(f1) / len(f1), "f1_per_class": f1,
           "exact_match": float((pred == labels.bool()).all(1).float().mean()),
           "bce": float(multilabel_bce(logits, labels))}
    if reference is not None:
        t_pred = reference > 0
        res["teacher_agreement"] = float((pred == t_pred).float().mean())
        res["teacher_set_agreement"] = float((pred == t_pred).all(1).float().mean())
    return res


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = EVAL_BATCH) -> Tensor:
    """Logits [N, K] (float32) of eval-mode forward passes; the model's mode is restored."""
    was = model.training
    model.eval()
    out = torch.cat([model(images[i: i + batch_size]).float() for i in range(0, len(images), batch_size)])
    model.train(was)
    return out


def evaluate_models(student: nn.Module, teacher: nn.Module | None, data: CanvasSet) -> dict[str, Any]:
    """{"student": figures, "teacher": figures | None, "heldout_setup": ...} on the held-out canvases."""
    s_logits = predict(student, data.images)
    t_logits = predict(teacher, data.images) if teacher is not None else None
    res: dict[str, Any] = {"teacher": None}
    if teacher is not None:
        res["teacher"] = {**multilabel_metrics(t_logits, data.labels),
                          "examples_per_s": forward_speed(teacher, data.images),
                          "parameters": count_parameters(teacher)}
    res["student"] = {**multilabel_metrics(s_logits, data.labels, t_logits),
                      "examples_per_s": forward_speed(student, data.images), "parameters": count_parameters(student)}
    res["heldout_setup"] = {"examples": len(data), "batch_size": EVAL_BATCH, "source": data.source}
    return res


# --------------------------------------------------------------------------- the task


def _card(recipe: Recipe, final: dict[str, Any]) -> str:
    s, t = final["student"], final.get("teacher") or {}
    rows = "\n".join(f"| {k} | {s[k]:.4g} | {t[k]:.4g} |" if k in t else f"| {k} | {s[k]:.4g} | — |"
                     for k in ("map", "macro_f1", "exact_match", "teacher_agreement") if k in s)
    teacher = recipe.teacher.model if recipe.teacher is not None else "none (binary cross-entropy only)"
    return (f"# {recipe.name}\n\nA {final['student_parameters']:,}-parameter multi-label CNN (CAM head) distilled with "
            f"kdforge from `{teacher}` on `{recipe.data.corpus}`; load it with "
            "`kdforge.tasks.multi_label_classification.CAMNet.from_pretrained(folder)`.\n\n"
            f"| held-out | student | teacher |\n|---|---|---|\n{rows}\n")


class MultiLabelClassification(CanvasTask):
    """The multi-label classification task (kdforge.tasks.base.Task)."""

    name = "multi_label_classification"
    unit = "examples"
    model = CAMNet
    is_model_folder = staticmethod(is_camnet_folder)
    build_teacher = staticmethod(build_teacher)
    evaluate = staticmethod(evaluate_models)
    card = staticmethod(_card)

    def data(self, recipe: Recipe) -> tuple[CanvasSet, CanvasSet]:
        return load_split(recipe, with_boxes=False)

    def prepare(self, recipe: Recipe, *, teacher: nn.Module | None = None, tokenizer=None,
                blocks: tuple[CanvasSet, CanvasSet] | None = None) -> Setup:
        train, val = blocks if blocks is not None else self.data(recipe)
        for part in (train, val):
            check_fits(part, recipe.student.config, "student")
        terms = bind_terms(recipe.objective, LOSSES, self.name)
        if teacher is None and recipe.teacher is not None:  # also for a baseline: final.json's teacher figures
            teacher = build_teacher(recipe, train)
        if teacher is not None:
            check_fits(train, teacher.config, "teacher")
        if len(train) < recipe.train.batch_size:
            raise KDForgeError(f"{train.source} has {len(train)} training canvases, fewer than one batch of "
                               f"train.batch_size={recipe.train.batch_size}; lower train.batch_size")
        torch.manual_seed(recipe.seed)
        student = CAMNet(recipe.student.config)
        needs_teacher = any(t.kind != "label" for t in terms)
        source = StoredTeacher.build(teacher, _teacher_run, train) if needs_teacher and teacher is not None else None
        objective = MultiLabelObjective(student, source, terms)
        # fail now, not at step 1, on maps the terms cannot compare (e.g. sizes without resize)
        with torch.no_grad():
            objective(self.make_batch(train, torch.arange(min(2, len(train)))))
        return Setup(recipe, None, teacher, student, objective, train, val, self)

    def make_batch(self, data: CanvasSet, index: Tensor) -> dict[str, Tensor]:
        """{inputs [B, C, H, W], labels [B, K] multi-hot float, index [B]} (index: for the stored teacher)."""
        return {"inputs": data.images[index], "labels": data.labels[index],
                "index": torch.as_tensor(index, dtype=torch.long)}

    def periodic_metrics(self, setup: Setup) -> dict[str, float]:
        res = multilabel_metrics(predict(setup.student, setup.val_blocks.images), setup.val_blocks.labels)
        return {"eval/map": res["map"], "eval/macro_f1": res["macro_f1"]}
