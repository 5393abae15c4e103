"""What the two digit-canvas tasks share (multi_label_classification, object_detection).

* the data as tensors (:class:`CanvasSet`): canvases of real scikit-learn digits made by
  :mod:`kdforge.data.digits_canvas` from ``data.canvas`` (memoised per process: making 2,500 canvases takes ~1-3 s), or
  a user's .npz file (:func:`load_npz`), both checked with :func:`kdforge.data.digits_canvas.validate_records`;
* a model folder (config.json with a marker key, model.safetensors) and a teacher trained once and cached under
  ``KDFORGE_CACHE/<kind>/<hash of its config and the training canvases>`` (:func:`cached_teacher`);
* :class:`StoredTeacher`: the teacher's outputs on every training canvas, computed once and looked up by the batch's
  ``index`` (exact: the canvases are never augmented and the teacher runs in eval mode);
* :class:`CanvasObjective`: the Distiller's interface (``forward(batch, num_tokens=, step=) -> (total, {term:
  value})``, ``.student``, ``.teacher_source``) for objectives whose terms need more than (logits, labels): the
  class activation maps and the labels (multi-label CAM KD), or anchors, assignments and boxes (detection);
* :func:`forward_speed`: held-out examples per second of a model's forward passes.

Errors raise :class:`kdforge.errors.KDForgeError` in one line naming the record and the fix.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..batches import shifted_targets
from ..data.digits_canvas import load_digit_canvases, validate_records
from ..errors import KDForgeError
from ..io import atomic_write_dir, disk_full_as_error
from ..losses.registry import check_arguments
from ..models import cache_dir
from ..progress import phase
from ..recipe import Recipe, Term

log = logging.getLogger("kdforge")

EVAL_BATCH = 256


# --------------------------------------------------------------------------- data


@dataclass
class CanvasSet:
    """Canvases as tensors: ``images`` [N, C, H, W] float32, ``labels`` [N, K] float32 multi-hot, ``boxes`` [N, M, 4]
    float32 xyxy pixels and ``box_classes`` [N, M] int64, padded to M (the most boxes on a canvas) with class -1,
    and ``rows`` [N] (each canvas's record index in `source`, what error messages name)."""

    images: Tensor
    labels: Tensor
    boxes: Tensor
    box_classes: Tensor
    rows: Tensor
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> "CanvasSet":
        return CanvasSet(self.images[index], self.labels[index], self.boxes[index], self.box_classes[index],
                         self.rows[index], self.source)

    def objects(self, i: int) -> tuple[Tensor, Tensor]:
        """(boxes [n, 4], classes [n]) of canvas i, padding dropped."""
        keep = self.box_classes[i] >= 0
        return self.boxes[i][keep], self.box_classes[i][keep]

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the images, labels, boxes and box classes."""
        digest = hashlib.sha256()
        for t in (self.images, self.labels, self.boxes, self.box_classes):
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def _padded(boxes: list[np.ndarray], classes: list[np.ndarray]) -> tuple[Tensor, Tensor]:
    m = max((len(b) for b in boxes), default=0)
    out_boxes = torch.zeros(len(boxes), m, 4)
    out_classes = torch.full((len(boxes), m), -1, dtype=torch.long)
    for i, (b, c) in enumerate(zip(boxes, classes)):
        out_boxes[i, : len(b)] = torch.as_tensor(np.asarray(b, dtype=np.float32).reshape(-1, 4))
        out_classes[i, : len(c)] = torch.as_tensor(np.asarray(c, dtype=np.int64).reshape(-1))
    return out_boxes, out_classes


def _to_set(images: np.ndarray, labels: np.ndarray, boxes: list[np.ndarray], classes: list[np.ndarray],
            rows: np.ndarray, source: str) -> CanvasSet:
    b, c = _padded(boxes, classes)
    return CanvasSet(torch.as_tensor(images, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.float32),
                     b, c, torch.as_tensor(rows, dtype=torch.long), source)


_MEMO: dict[str, tuple[CanvasSet, CanvasSet]] = {}


def digit_canvas_split(canvas: dict[str, Any]) -> tuple[CanvasSet, CanvasSet]:
    """(training, held-out) canvases of the data.canvas settings (kdforge.recipe.CanvasSpec), made once per process."""
    key = json.dumps(canvas, sort_keys=True)
    if key not in _MEMO:
        args = {**canvas, "scales": tuple(canvas["scales"])}
        train, test = load_digit_canvases(**args)
        _MEMO[key] = tuple(_to_set(part.images, part.labels, part.boxes, part.classes, np.arange(len(part)),
                                   f"digit_canvases ({name})")
                           for name, part in (("train", train), ("test", test)))
    return _MEMO[key]


def load_npz(path: Path, *, with_boxes: bool) -> tuple[CanvasSet, CanvasSet]:
    """(training, held-out) records of an .npz file: ``images`` [N, H, W] or [N, C, H, W] (uint8 scaled by 1/255,
    floats as they are), ``labels`` [N, K] multi-hot, ``is_test`` [N] bool (True: a held-out record) and, for
    detection (`with_boxes`), ``boxes`` [M, 4] xyxy pixels, ``box_classes`` [M] and ``box_image`` [M] (the record
    each box belongs to). Raises KDForgeError for a missing file or array, wrong shapes, a non-finite pixel, and each
    bad record :func:`kdforge.data.digits_canvas.validate_records` refuses (empty label set, box outside the canvas,
    class id outside the labels' width, labels that differ from the boxes' classes), naming the record."""
    needed = ("images", "labels", "is_test") + (("boxes", "box_classes", "box_image") if with_boxes else ())
    if path.suffix != ".npz" or not path.is_file():
        raise KDForgeError(f"data.corpus '{path}' is not `digit_canvases` or an existing .npz file; save one with "
                           f"np.savez(path, {', '.join(k + '=...' for k in needed)})")
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in needed if k not in npz.files]
        if missing:
            raise KDForgeError(f"{path} has no '{missing[0]}' array (it holds {', '.join(npz.files) or 'none'}); "
                               f"save it with np.savez(path, {', '.join(k + '=...' for k in needed)})")
        arrays = {k: npz[k] for k in needed}
    images, labels, is_test = arrays["images"], arrays["labels"], arrays["is_test"].astype(bool)
    if images.ndim not in (3, 4):
        raise KDForgeError(f"{path}: images has shape {images.shape}; give [N, H, W] or [N, C, H, W] (channels first)")
    if labels.ndim != 2 or len(labels) != len(images) or is_test.shape != (len(images),):
        raise KDForgeError(f"{path}: labels {labels.shape} and is_test {is_test.shape} for {len(images)} images; "
                           "give labels [N, K] multi-hot and is_test [N]")
    x = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
    x = x[:, None] if x.ndim == 3 else x
    bad = np.flatnonzero(~np.isfinite(x).reshape(len(x), -1).all(axis=1))
    if len(bad):
        raise KDForgeError(f"{path}: record {int(bad[0])} has a non-finite pixel; fix or drop that image")
    boxes = classes = None
    if with_boxes:
        owner = arrays["box_image"].astype(np.int64)
        if arrays["boxes"].shape != (len(owner), 4) or arrays["box_classes"].shape != owner.shape:
            raise KDForgeError(f"{path}: boxes {arrays['boxes'].shape}, box_classes {arrays['box_classes'].shape} "
                               f"and box_image {owner.shape} must be [M, 4], [M] and [M]")
        if len(owner) and (owner.min() < 0 or owner.max() >= len(images)):
            raise KDForgeError(f"{path}: box_image names record {int(owner[(owner < 0) | (owner >= len(images))][0])}"
                               f" but there are {len(images)} images; fix box_image")
        boxes = [arrays["boxes"][owner == i] for i in range(len(images))]
        classes = [arrays["box_classes"][owner == i] for i in range(len(images))]
    validate_records(labels, boxes, classes, canvas_size=tuple(x.shape[-2:]), num_classes=labels.shape[1])
    if is_test.all() or not is_test.any():
        raise KDForgeError(f"{path}: is_test marks {int(is_test.sum())} of {len(images)} records held out; mark some "
                           "records, but not all, as held out")
    boxes = boxes or [np.zeros((0, 4), np.float32)] * len(images)
    classes = classes or [np.zeros((0,), np.int64)] * len(images)
    parts = []
    for held in (False, True):
        idx = np.flatnonzero(is_test == held)
        parts.append(_to_set(x[idx], labels[idx], [boxes[i] for i in idx], [classes[i] for i in idx], idx, str(path)))
    return parts[0], parts[1]


def load_split(recipe: Recipe, *, with_boxes: bool) -> tuple[CanvasSet, CanvasSet]:
    """The recipe's (training, held-out) canvases: data.corpus `digit_canvases` (data.canvas) or an .npz file."""
    if recipe.data.corpus == "digit_canvases":
        return digit_canvas_split(recipe.data.canvas)
    return load_npz(Path(recipe.data.corpus), with_boxes=with_boxes)


def check_fits(data: CanvasSet, config: dict[str, Any], name: str) -> None:
    """The canvases have the channels the model takes and no class beyond its head. Raises KDForgeError naming the
    first bad record and the fix."""
    channels = data.images.shape[1]
    if channels != config["in_channels"]:
        raise KDForgeError(f"{data.source}: record {int(data.rows[0])} (like every image there) has {channels} "
                           f"channel(s) but the {name} takes {config['in_channels']}; set {name}.config.in_channels: "
                           f"{channels}, or convert the images")
    k = config["num_classes"]
    if data.labels.shape[1] != k:
        raise KDForgeError(f"{data.source}: labels have {data.labels.shape[1]} classes but the {name}'s head has {k}; "
                           f"set {name}.config.num_classes: {data.labels.shape[1]}")
    bad = (data.box_classes >= k).any(1).nonzero()
    if len(bad):
        i = int(bad[0])
        raise KDForgeError(f"{data.source}: record {int(data.rows[i])} has a box of class "
                           f"{int(data.box_classes[i].max())} but the {name}'s head has {k} classes (0..{k - 1}); "
                           "fix that label or the head's class count")


# --------------------------------------------------------------------------- models


def conv_blocks(in_channels: int, channels: list[int], pool_after: list[int]) -> nn.Sequential:
    """conv3x3 -> BatchNorm -> ReLU blocks (a 2x2 max-pool after the blocks in `pool_after`), paths `0`, `1`, ..."""
    blocks, c = [], in_channels
    for i, out in enumerate(channels):
        layers = [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        if i in pool_after:
            layers.append(nn.MaxPool2d(2))
        blocks.append(nn.Sequential(*layers))
        c = out
    return nn.Sequential(*blocks)


def save_folder(model: nn.Module, folder: str | Path, mark: str, state_dict: dict[str, Tensor] | None = None) -> None:
    """config.json ({mark: true, **model.config}) and model.safetensors in `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state_dict is None else state_dict
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({mark: True, **model.config}, indent=2))


def read_folder_config(folder: str | Path, mark: str) -> dict[str, Any] | None:
    """The config of a model folder written with `mark`, or None when `folder` holds no such model."""
    config_file = Path(folder) / "config.json"
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except (OSError, ValueError):
        return None
    if not config.get(mark) or not (Path(folder) / "model.safetensors").is_file():
        return None
    return {k: v for k, v in config.items() if k != mark}


def load_folder(cls: type, folder: str | Path, mark: str, what: str) -> nn.Module:
    """The `cls` model saved in `folder` (eval mode). Raises KDForgeError when `folder` holds none."""
    from safetensors.torch import load_file

    config = read_folder_config(folder, mark)
    if config is None:
        raise KDForgeError(f"'{folder}' holds no kdforge {what} (config.json with {mark} and model.safetensors); give "
                           "teacher.model: cnn, or the student/ folder of a run of this task")
    model = cls(config)
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    return model.eval()


def cached_teacher(kind: str, config: dict[str, Any], train: CanvasSet, build: Callable[[dict], nn.Module],
                   fit: Callable[[nn.Module, CanvasSet, dict], None], load: Callable[[Path], nn.Module]) -> nn.Module:
    """The teacher of `config` trained on `train`: read from KDFORGE_CACHE/<kind>/<sha256 of config and data, 16 hex
    digits>, else built (`build(config)`), trained once (`fit(model, train, config)`, under a forked RNG seeded by
    config['seed']) and written there atomically. Returned frozen, in eval mode."""
    key = hashlib.sha256(json.dumps({"config": config, "data": train.fingerprint()}, sort_keys=True).encode())
    folder = cache_dir() / kind / key.hexdigest()[:16]
    if (folder / "model.safetensors").is_file():
        return load(folder).requires_grad_(False)
    with phase(f"training the teacher once ({len(train)} canvases, {config['epochs']} epochs)"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config["seed"])
            model = build(config)
            model.train()
            fit(model, train, config)
    model.eval().requires_grad_(False)
    with disk_full_as_error(folder, "set KDFORGE_CACHE to a folder on a larger disk"):
        atomic_write_dir(folder, model.save_pretrained)
    log.info("teacher cached in %s", folder)
    return model


def epoch_batches(n: int, size: int, generator: torch.Generator) -> list[Tensor]:
    order = torch.randperm(n, generator=generator)
    return [order[i: i + size] for i in range(0, n, size)]


# --------------------------------------------------------------------------- teacher outputs, objective


class StoredTeacher:
    """A frozen teacher's outputs on every training canvas, computed once: `outputs` name -> [N, ...], looked up by a
    batch's `index` [B]. A batch without `index` runs `run(model, images)` live. `model` is the teacher (the training
    loop moves it to the device)."""

    def __init__(self, model: nn.Module, run: Callable[[nn.Module, Tensor], dict[str, Tensor]],
                 outputs: dict[str, Tensor]):
        self.model, self.run, self.outputs = model, run, outputs

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, run: Callable[[nn.Module, Tensor], dict[str, Tensor]], data: CanvasSet,
              batch_size: int = EVAL_BATCH) -> "StoredTeacher":
        model.eval()
        parts: dict[str, list[Tensor]] = {}
        for i in range(0, len(data), batch_size):
            for k, v in run(model, data.images[i: i + batch_size]).items():
                parts.setdefault(k, []).append(v.float())
        return cls(model, run, {k: torch.cat(v) for k, v in parts.items()})

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if "index" not in batch:
            with torch.no_grad():
                return self.run(self.model.eval(), batch["inputs"])
        device = batch["inputs"].device
        idx = batch["index"].to("cpu")
        return {k: v[idx].to(device) for k, v in self.outputs.items()}


@dataclass
class CanvasTerm:
    term: Term
    kind: str  # "label" (needs no teacher) | "teacher"
    fn: Callable
    kwargs: dict[str, Any]


def bind_terms(objective: list[Term], table: dict[str, tuple[str, Callable]], task: str,
               own: set[str] = frozenset()) -> list[CanvasTerm]:
    """The recipe's terms bound to `table` (loss name -> (kind, function)); arguments are checked against the
    function's keyword arguments (kdforge.losses.registry.check_arguments), except the task's `own` ones. Raises
    KDForgeError for a loss the task does not take (naming the ones it does) and for an unknown argument."""
    bound, names = [], set()
    for term in objective:
        if term.loss not in table:
            raise KDForgeError(f"task {task} has no loss '{term.loss}'; its losses are {', '.join(table)}")
        if term.label in names:
            raise KDForgeError("two objective terms share a name; give each a distinct `name:`")
        names.add(term.label)
        kind, fn = table[term.loss]
        kwargs = term.params
        check_arguments(term.loss, fn, {k: v for k, v in kwargs.items() if k not in own})
        bound.append(CanvasTerm(term, kind, fn, kwargs))
    return bound


class CanvasObjective(nn.Module):
    """One step's loss on canvases as the sum of the recipe's weighted terms, with the Distiller's interface
    (`forward(batch, num_tokens=, step=) -> (total, {term label: detached value})`, `.student`, `.teacher_source`),
    so kdforge's training loop, checkpoints and resume run it unchanged. Subclasses give `outputs(batch)` (the
    student's tensors) and `value(term, student, teacher, batch)`. A term counts for start_step <= step < end_step;
    `num_tokens` (the global count of examples in the optimizer step) scales each micro-batch's mean so accumulated
    gradients equal one big batch's."""

    def __init__(self, student: nn.Module, teacher_source: StoredTeacher | None, terms: list[CanvasTerm], *,
                 keep_source: bool = False):
        """keep_source: keep `teacher_source` even when no term reads the teacher's outputs (a label term whose
        targets the teacher chose)."""
        super().__init__()
        self.student, self.terms = student, terms
        needs = any(t.kind != "label" for t in terms)
        if needs and teacher_source is None:
            raise KDForgeError("the objective has distillation terms but no teacher; set `teacher:` in the recipe")
        self.teacher_source = teacher_source if needs or keep_source else None

    def teacher_outputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """The teacher's outputs on the batch (None without a teacher)."""
        return self.teacher_source(batch) if self.teacher_source is not None else None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher_source is not None:
            self.teacher_source.model.eval()
        return self

    def outputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def value(self, term: CanvasTerm, student: dict[str, Tensor], teacher: dict[str, Tensor] | None,
              batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def forward(self, batch: dict[str, Tensor], *, num_tokens: float | None = None,
                step: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        n_local = shifted_targets(batch)[1].sum()
        scale = 1.0 if num_tokens is None else n_local.float() / num_tokens
        student = self.outputs(batch)
        teacher = self.teacher_outputs(batch)
        total = batch["inputs"].new_zeros((), dtype=torch.float32)
        values: dict[str, Tensor] = {}
        for t in self.terms:
            if step < t.term.start_step or (t.term.end_step is not None and step >= t.term.end_step):
                continue
            v = self.value(t, student, teacher, batch)
            values[t.term.label] = v.detach()
            total = total + t.term.weight * v * scale
        return total, values


# --------------------------------------------------------------------------- speed


@torch.no_grad()
def forward_speed(model: nn.Module, images: Tensor, batch_size: int = EVAL_BATCH) -> float:
    """Examples per second of eval-mode forward passes over `images` [N, C, H, W] in `batch_size` chunks: after one
    untimed pass, whole passes repeated until 0.2 s have passed (at most 50). The model's mode is restored."""
    was_training = model.training
    model.eval()

    def one_pass() -> None:
        for i in range(0, len(images), batch_size):
            model(images[i: i + batch_size])

    one_pass()
    passes, start = 0, time.perf_counter()
    while passes < 50 and (passes == 0 or time.perf_counter() - start < 0.2):
        one_pass()
        passes += 1
    seconds = time.perf_counter() - start
    model.train(was_training)
    return passes * len(images) / seconds


class CanvasTask:
    """What the two digit-canvas tasks share (kdforge.tasks.base.Task): their data fingerprint, final metrics,
    export and `kdforge eval` of an exported student. A subclass names its task, its model class (``model``:
    ``from_pretrained`` of an exported folder) and three functions of its own module: ``is_model_folder(path)``,
    ``build_teacher(recipe, train)`` and ``evaluate(student, teacher, data)`` (the held-out figures:
    {"student": ..., "teacher": ..., "heldout_setup": ...}), plus ``card(recipe, final)`` for the model card."""

    name: str
    model: type

    def fingerprint(self, train: CanvasSet, val: CanvasSet) -> str:
        return train.fingerprint() + val.fingerprint()

    def final_metrics(self, setup, *, progress: bool = True) -> dict[str, Any]:
        from ..models import count_parameters

        res = self.evaluate(setup.student, setup.teacher, setup.val_blocks)
        return {"step": setup.recipe.train.steps, "student": res["student"], "teacher": res["teacher"],
                "student_parameters": count_parameters(setup.student), "heldout_setup": res["heldout_setup"]}

    def export(self, setup, out: Path, final: dict[str, Any]) -> None:
        """out/student: config.json, model.safetensors (``model.from_pretrained`` reads it) and a README.md."""
        from .base import write_student_folder

        write_student_folder(out, setup.student.save_pretrained, self.card(setup.recipe, final))

    def run_eval(self, run_dir: Path, recipe: Recipe, *, out_dir: Path | None = None) -> dict[str, Any]:
        """`kdforge eval RUN`: the exported student (and the teacher) on the run's held-out canvases; eval.json is
        written to out_dir (default: the run folder). KDForgeError for a run with no exported student yet."""
        from ..io import atomic_write_json

        folder = Path(run_dir) / "student"
        if not self.is_model_folder(folder):
            raise KDForgeError(f"run '{run_dir}' has not finished, so it has no exported student yet; rerun "
                               "`kdforge distill` with the same recipe and --out to finish it, then evaluate")
        train, val = self.data(recipe)
        student = self.model.from_pretrained(folder)
        check_fits(val, student.config, "student")
        teacher = self.build_teacher(recipe, train)
        res = self.evaluate(student, teacher, val)
        heldout = {"student": res["student"], **({"teacher": res["teacher"]} if teacher is not None else {})}
        out = {"task": self.name, "heldout": heldout, "heldout_setup": res["heldout_setup"],
               "summary": dict(res["student"]), "student_path": str(folder),
               "teacher": recipe.teacher.model_dump() if recipe.teacher else None, "data": recipe.data.model_dump(),
               "notes": []}
        atomic_write_json(Path(out_dir or run_dir) / "eval.json", out)
        return out

