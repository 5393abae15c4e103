"""task image_classification: a CNN image classifier distilled into a smaller CNN.

Data (`data.corpus`): `digits`, scikit-learn's bundled 1,797 real 8x8 handwritten digits (pixel values 0..16 scaled
to 0..1), or an .npz file holding `images` [N, H, W] or [N, C, H, W] (uint8 scaled by 1/255, floats as they are) and
integer `labels` [N]. The held-out split is stratified: every class gives round(data.validation_split x its count)
images (at least one when it has two), drawn once with data.split_seed, so every seed of a bench sees the same
held-out images. A batch is {inputs [B, C, H, W], labels [B]}: the Distiller compares class logits [B, K] (nothing
is shifted) and feature terms tap the CNNs' blocks `features.0`, `features.1`, ... ([B, C_i, H_i, W_i]) and their
class activation maps `cam` ([B, K, H, W]: the linear head applied at every position of the last block's map, what
CAT-KD compares; CNN.class_maps). Block-KD's stepping stones run the teacher's own blocks and head
(kdforge.teachers.stepping_stones: a CNN's stages are `features`, its head `classifier`).

Models: `CNN` built from `student.config` / `teacher.config` (kdforge.recipe.CNNSpec). The teacher `cnn` is trained
once on the training split with plain cross-entropy (Adam) and cached as safetensors under
KDFORGE_CACHE/image_teachers/<hash of its config and the training data>; a teacher folder written by an earlier run
(`RUN/student`) loads as well. In training the teacher's logits and tapped features on every training image are
computed once (PrecomputedTeacher: the images never change between epochs); a Block-KD term still reads the teacher's
logits from there and runs the live teacher's blocks for its stepping stones. Metrics: accuracy, macro-F1, ECE (15
bins), NLL, top-1 agreement with the teacher and KL(teacher || student), and held-out examples/s (the only wall-clock
figure).

PWKD (Zhang, Zhang & Sun, arXiv 2109.12507), `teacher.curriculum` with `width` stages: the teacher CNN is made
slimmable (`teacher.config.widths`; SlimmableCNN, trained jointly over its widths, train_teacher) and the student
learns from its width sub-networks in stages, partial first and whole last (WidthCurriculum), the learning rate
restarting at every stage (kdforge.train.lr_lambda).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distiller import Distiller
from ..errors import KDForgeError
from ..evaluate.metrics import expected_calibration_error, reliability_bins
from ..io import atomic_write_dir, atomic_write_json, disk_full_as_error
from ..losses.cam import class_activation_maps
from ..models import cache_dir, count_parameters
from ..progress import phase
from ..recipe import CNNSpec, CNNTeacherSpec, CurriculumSpec, Recipe, teacher_cnn_config
from ..teachers.curriculum import StagedTeacher, stage_spans
from ..teachers.live import LiveTeacher, TeacherOutput
from .base import Setup, write_student_folder

log = logging.getLogger("kdforge")

CONFIG_MARK = "kdforge_cnn"  # config.json key that says a folder holds a kdforge CNN
EVAL_BATCH = 256


# --------------------------------------------------------------------------- data


@dataclass
class ImageSet:
    """Images [N, C, H, W] (float32), their class ids [N] (int64) and each image's record index in the source [N]
    (what error messages name)."""

    images: Tensor
    labels: Tensor
    rows: Tensor
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.rows[index], self.source)


def load_images(corpus: str) -> ImageSet:
    """All images of `corpus` (`digits` or an .npz file), unsplit. Raises KDForgeError (one line: the cause and the
    fix) for a missing file or array, images that are not [N, H, W] / [N, C, H, W], labels that are not one integer
    per image, or a non-finite pixel (naming its record)."""
    if corpus == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise KDForgeError("data.corpus digits needs scikit-learn; pip install scikit-learn") from None
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        return ImageSet(images, labels, torch.arange(len(labels)), "digits")
    return _load_npz(Path(corpus))


def _load_npz(path: Path) -> ImageSet:
    import numpy as np

    if path.suffix != ".npz" or not path.is_file():
        raise KDForgeError(f"data.corpus '{path}' is not `digits` or an existing .npz file; for task "
                           "image_classification save one with np.savez(path, images=..., labels=...)")
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in ("images", "labels") if k not in npz.files]
        if missing:
            raise KDForgeError(f"{path} has no '{missing[0]}' array (it holds {', '.join(npz.files) or 'none'}); "
                               "save it with np.savez(path, images=[N, H, W] or [N, C, H, W], labels=[N])")
        images, labels = npz["images"], npz["labels"]
    if images.ndim not in (3, 4):
        raise KDForgeError(f"{path}: images has shape {images.shape}; give [N, H, W] or [N, C, H, W] (channels first)")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise KDForgeError(f"{path}: labels has shape {labels.shape} and dtype {labels.dtype} for {len(images)} "
                           "images; give one integer class id per image")
    x = torch.from_numpy(images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0))
    x = x.unsqueeze(1) if x.dim() == 3 else x
    bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero()
    if len(bad):
        raise KDForgeError(f"{path}: record {int(bad[0])} has a non-finite pixel; fix or drop that image")
    return ImageSet(x, torch.from_numpy(labels.astype(np.int64)), torch.arange(len(labels)), str(path))


def check_images(data: ImageSet, heads: dict[str, dict[str, Any]]) -> None:
    """Every image has the channels each model takes, and every class id is in each model's head. `heads`: model
    name -> its CNN config (in_channels, num_classes). Raises KDForgeError naming the first bad record and the fix."""
    channels = data.images.shape[1]
    for name, config in heads.items():
        if channels != config["in_channels"]:
            raise KDForgeError(f"{data.source}: record {int(data.rows[0])} (like every image there) has {channels} "
                               f"channel(s) but the {name} CNN takes {config['in_channels']}; set "
                               f"{name}.config.in_channels: {channels}, or convert the images to "
                               f"{config['in_channels']} channel(s)")
        k = config["num_classes"]
        bad = ((data.labels < 0) | (data.labels >= k)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise KDForgeError(f"{data.source}: record {int(data.rows[i])} has class id {int(data.labels[i])} but "
                               f"the {name}'s head has {k} classes (0..{k - 1}); set {name}.config.num_classes: "
                               f"{max(int(data.labels.max()) + 1, k)}, or fix that label")


def stratified_split(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(training, held-out): each class gives round(fraction x its count) images to the held-out side (at least one
    when it has two or more), drawn with a generator seeded by `seed`; both sides keep the source order."""
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in torch.unique(data.labels):
        members = (data.labels == c).nonzero().flatten()
        n = len(members)
        k = min(n - 1, max(1, round(fraction * n))) if n >= 2 else 0
        held.append(members[torch.randperm(n, generator=g)[:k]])
    mask = torch.zeros(len(data), dtype=torch.bool)
    mask[torch.cat(held)] = True
    if mask.all() or not mask.any():
        raise KDForgeError(f"{data.source}: {len(data)} images leave nothing to train or hold out; add images or "
                           "change data.validation_split")
    return data.subset((~mask).nonzero().flatten()), data.subset(mask.nonzero().flatten())


def load_split(recipe: Recipe) -> tuple[ImageSet, ImageSet]:
    """The recipe's (training, held-out) images: data.corpus split by data.validation_split with data.split_seed."""
    return stratified_split(load_images(recipe.data.corpus), recipe.data.validation_split, recipe.data.split_seed)


def fingerprint(*sets: ImageSet) -> str:
    """sha256 of the images and labels (first 16 hex digits)."""
    digest = hashlib.sha256()
    for s in sets:
        digest.update(str(tuple(s.images.shape)).encode())
        digest.update(s.images.contiguous().numpy().tobytes())
        digest.update(s.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- models


class ClassMaps(nn.Module):
    """The tap point `cam` of a CNN: called with the last feature map and the head's weight, it returns the class
    activation maps [B, K, H, W] (kdforge.losses.cam.class_activation_maps). It holds no parameters, so a CNN's
    state dict and logits are the same with or without it; the CNN calls it only while something hooks it (a tap),
    so an untapped forward costs nothing more."""

    def forward(self, features: Tensor, weight: Tensor) -> Tensor:
        return class_activation_maps(features, weight)

    @property
    def tapped(self) -> bool:
        return bool(self._forward_hooks or self._forward_pre_hooks)


class CNN(nn.Module):
    """conv3x3 -> BatchNorm -> ReLU blocks (`features.i`, a 2x2 max-pool after the blocks in `pool_after`) and a
    linear head (`classifier`) on the flattened or globally average-pooled last map.

    Input [B, in_channels, H, W]; output class logits [B, num_classes]. Raises KDForgeError on an input of another
    channel count. `save_pretrained` / `from_pretrained` read and write a folder (config.json, model.safetensors).
    A tap on `cam` captures the class activation maps of each forward (class_maps); `kdforge_stages` names the
    blocks and head that Block-KD's stepping stones run (kdforge.teachers.stepping_stones)."""

    kdforge_stages = ("features", "classifier")

    def __init__(self, config: dict[str, Any], image_size: tuple[int, int]):
        super().__init__()
        self.config = {**CNNSpec.model_validate({k: v for k, v in config.items() if k in CNNSpec.model_fields})
                       .model_dump(), "image_size": list(image_size)}
        c = self.config
        blocks, channels = [], c["in_channels"]
        h, w = image_size
        for i, out in enumerate(c["channels"]):
            layers = [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            if i in c["pool_after"]:
                if min(h, w) < 2:
                    raise KDForgeError(f"a CNN with pool_after {c['pool_after']} pools a {h}x{w} map at block {i}; "
                                       "pool fewer times for these images")
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            blocks.append(nn.Sequential(*layers))
            channels = out
        self.features = nn.Sequential(*blocks)
        if c["head"] == "avgpool":
            self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, c["num_classes"]))
        else:
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels * h * w, c["num_classes"]))
        self.cam = ClassMaps()

    @property
    def in_channels(self) -> int:
        return self.config["in_channels"]

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    def check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise KDForgeError(f"this CNN takes images [B, {self.in_channels}, H, W], got {tuple(x.shape)}; convert "
                               f"the images to {self.in_channels} channel(s) or set config.in_channels")

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        features = self.features(x)
        if self.cam.tapped:
            self.cam(features, self.head_weight(features))
        return self.classifier(features)

    def head_weight(self, features: Tensor) -> Tensor:
        """The linear head's weight as class_activation_maps takes it: [K, C] for the avgpool head (the paper's
        GAP + FC), [K, C, H, W] for the flatten head (one weight per channel and position of `features`)."""
        weight = self.classifier[-1].weight
        return weight if self.config["head"] == "avgpool" else weight.view(len(weight), *features.shape[1:])

    def class_maps(self, x: Tensor) -> Tensor:
        """Class activation maps [B, K, H, W] of images x [B, C, H', W'] on the last block's H x W grid: the head
        applied at every position, bias left out (kdforge.losses.cam.class_activation_maps). Their spatial mean
        (avgpool head) or sum (flatten head) plus the head's bias is exactly forward(x)'s logits."""
        features = self.features(x)
        return self.cam(features, self.head_weight(features))

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """config.json and model.safetensors in `folder` (what kdforge's checkpoints and export write)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if state_dict is None else state_dict
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({CONFIG_MARK: True, **self.config}, indent=2))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "CNN":
        """The CNN saved in `folder`. Raises KDForgeError when it holds no kdforge CNN."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config_file = folder / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if not config.get(CONFIG_MARK) or not (folder / "model.safetensors").is_file():
            raise KDForgeError(f"'{folder}' holds no kdforge CNN (config.json with {CONFIG_MARK} and "
                               "model.safetensors); give teacher.model: cnn, or the student/ folder of an "
                               "image_classification run")
        model = (SlimmableCNN if config.get("widths") else cls)(config, tuple(config["image_size"]))
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.eval()


def slim_channels(channels: int, width: float) -> int:
    """ceil(width x channels), the channels a width-`width` sub-network keeps (the float product's rounding noise
    ignored: 0.1 x 30 keeps 3)."""
    return max(1, math.ceil(round(width * channels, 9)))


class SlimmableCNN(CNN):
    """A CNN whose weight-sharing sub-networks of the same depth and smaller width run on their own (slimmable
    networks, Yu et al. 2019; PWKD's decomposed teacher, Zhang, Zhang & Sun, arXiv 2109.12507).

    `config["widths"]`: the width multipliers, ascending, ending at 1.0. The sub-network of width w keeps the first
    ceil(w x C_i) output channels of every conv (and the matching input channels of the next conv and of the head: for
    a flatten head, the columns of those channels at every position); each width < 1 has BatchNorms of its own
    (`slim_norms`: switchable BatchNorm, since the statistics of a slice differ from those of the whole), while width 1
    is exactly the plain CNN with the same weights (module paths, taps and state-dict keys of CNN, plus
    `slim_norms.*`). forward(x [B, C, H, W], width=1.0) -> logits [B, K]; KDForgeError for a width it does not hold."""

    def __init__(self, config: dict[str, Any], image_size: tuple[int, int]):
        super().__init__(config, image_size)
        self.config["widths"] = [float(w) for w in config["widths"]]
        self.slim_norms = nn.ModuleDict({
            self._key(w): nn.ModuleList(nn.BatchNorm2d(slim_channels(c, w)) for c in self.config["channels"])
            for w in self.config["widths"] if w != 1.0})

    @staticmethod
    def _key(width: float) -> str:
        return f"{width:g}".replace(".", "_")

    def forward(self, x: Tensor, width: float = 1.0) -> Tensor:
        if width == 1.0:
            return super().forward(x)
        if self._key(width) not in self.slim_norms:
            raise KDForgeError(f"this slimmable CNN has widths {self.config['widths']}, not {width}; use one of them "
                               "or retrain the teacher with it in teacher.config.widths")
        self.check_input(x)
        c_in = self.in_channels
        for block, norm in zip(self.features, self.slim_norms[self._key(width)]):
            conv, c_out = block[0], norm.num_features
            x = F.relu(norm(F.conv2d(x, conv.weight[:c_out, :c_in], conv.bias[:c_out], padding=1)))
            for pool in block[3:]:
                x = pool(x)
            c_in = c_out
        linear = self.classifier[-1]
        if self.config["head"] == "avgpool":
            return F.linear(x.mean(dim=(2, 3)), linear.weight[:, :c_in], linear.bias)
        weight = linear.weight.view(len(linear.weight), self.config["channels"][-1], -1)[:, :c_in]
        return F.linear(x.flatten(1), weight.flatten(1), linear.bias)


class WidthView(nn.Module):
    """The width-`width` sub-network of a SlimmableCNN as a model of its own: forward(x [B, C, H, W]) -> [B, K]."""

    def __init__(self, model: SlimmableCNN, width: float):
        super().__init__()
        self.model, self.width = model, width

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x, width=self.width)


def is_cnn_folder(path: str | Path) -> bool:
    """Whether `path` is a folder holding a kdforge CNN (its config.json says so)."""
    config = Path(path) / "config.json"
    try:
        return config.is_file() and bool(json.loads(config.read_text()).get(CONFIG_MARK))
    except (OSError, ValueError):
        return False


def _batches(n: int, size: int, generator: torch.Generator) -> list[Tensor]:
    order = torch.randperm(n, generator=generator)
    return [order[i: i + size] for i in range(0, n, size)]


def train_teacher(config: dict[str, Any], train: ImageSet) -> CNN:
    """A teacher CNN trained from scratch on `train`: `epochs` passes of Adam (`lr`) on plain cross-entropy in
    batches of `batch_size`, seeded by `seed` (the global RNG is left as it was).

    With `widths` (a SlimmableCNN, PWKD's decomposed teacher) the widths are trained jointly by slimmable networks'
    rule (Yu et al. 2019, Algorithm 1): every step sums the cross-entropy of each width's sub-network on the same
    batch, one backward and one Adam step, each width normalised by its own BatchNorms. Its initial weights are the
    plain CNN's of the same seed (BatchNorms draw no random numbers)."""
    spec = CNNTeacherSpec.model_validate(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = (SlimmableCNN if spec.widths else CNN)(teacher_cnn_config(config), tuple(train.images.shape[-2:]))
        opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
        g = torch.Generator().manual_seed(spec.seed)
        model.train()
        for _ in range(spec.epochs):
            for idx in _batches(len(train), spec.batch_size, g):
                x, y = train.images[idx], train.labels[idx]
                loss = F.cross_entropy(model(x), y)
                for width in (spec.widths or [1.0])[:-1]:  # the full width (the last) is the line above
                    loss = loss + F.cross_entropy(model(x, width=width), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return model.eval().requires_grad_(False)


def teacher_cache_folder(config: dict[str, Any], train: ImageSet) -> Path:
    """KDFORGE_CACHE/image_teachers/<sha256 of the teacher config and the training images, 16 hex digits>."""
    key = hashlib.sha256(json.dumps({"config": config, "data": fingerprint(train)}, sort_keys=True).encode())
    return cache_dir() / "image_teachers" / key.hexdigest()[:16]


def cached_teacher(config: dict[str, Any], train: ImageSet) -> CNN:
    """The teacher CNN of `config` trained on `train`: read from its cache folder, else trained once and written
    there atomically (config.json, model.safetensors)."""
    config = teacher_cnn_config(config)  # without widths: the plain teacher's key of old
    folder = teacher_cache_folder(config, train)
    if (folder / "model.safetensors").is_file():
        return CNN.from_pretrained(folder).requires_grad_(False)
    spec = CNNTeacherSpec.model_validate(config)
    with phase(f"training the teacher CNN once ({len(train)} images, {spec.epochs} epochs)"):
        model = train_teacher(config, train)
    with disk_full_as_error(folder, "set KDFORGE_CACHE to a folder on a larger disk"):
        atomic_write_dir(folder, model.save_pretrained)
    log.info("teacher CNN cached in %s", folder)
    return model


def crossfit_folds(train: ImageSet, folds: int, seed: int) -> Tensor:
    """[N] fold ids (0..folds-1) of the training images, stratified by class and fixed by `seed`
    (kdforge.crossfit.label_folds). Raises KDForgeError (one line) when `folds` exceeds the smallest class count
    of the training split, naming that class and the valid range."""
    from ..crossfit import label_folds

    return label_folds(train.labels, folds, seed=seed, where=f"the training split ({train.source})",
                       unit="images")


def fold_teachers(config: dict[str, Any], train: ImageSet, folds: Tensor) -> list[CNN]:
    """Teacher k of `config` trained on the training images outside fold k, for k = 0..max(folds); each is cached
    like the single teacher (cached_teacher: keyed by the config and the images it saw)."""
    n = int(folds.max()) + 1
    teachers = []
    for k in range(n):
        with phase(f"cross-fitting: teacher {k + 1} of {n} (without fold {k})"):
            teachers.append(cached_teacher(config, train.subset((folds != k).nonzero().flatten())))
    return teachers


class PrecomputedTeacher:
    """A live teacher's outputs on every training image, computed once: its logits [N, K] and each tapped tensor
    [N, ...], looked up by the batch's `index` [B]. Exact because a training batch is stored images unchanged (no
    augmentation) and the teacher runs in eval mode, so each image's outputs never change; a step then costs the
    student's work and a lookup instead of a teacher forward. A batch without `index` (the Distiller's probe) runs
    the live teacher. `model`, `dtype` and `autocast` are the live teacher's."""

    def __init__(self, live: LiveTeacher, logits: Tensor, features: dict[str, Tensor]):
        self.live, self.model, self.dtype, self.autocast = live, live.model, live.dtype, live.autocast
        self.logits, self.features = logits, features

    MAX_BYTES = 1 << 29
    """Above this many bytes of stored outputs the teacher stays live (build returns None)."""

    @classmethod
    def build(cls, live: LiveTeacher, data: ImageSet, taps, batch_size: int = EVAL_BATCH) -> "PrecomputedTeacher | None":
        """The outputs of `live` (with `taps`, the Distiller's teacher taps, or None) on all of `data`; None when a
        tap holds something other than one tensor per batch, or the outputs would exceed MAX_BYTES. The images go to
        the teacher's device (WidthCurriculum builds a stage's outputs mid-training, after kdforge.train moved the
        teacher), and the outputs stay there."""
        device = next(live.model.parameters()).device
        logits, features = [], {}
        for i in range(0, len(data), batch_size):
            out = live({"inputs": data.images[i: i + batch_size].to(device)}, taps)
            if not all(isinstance(v, Tensor) for v in out.features.values()):
                return None
            logits.append(out.logits)
            for k, v in out.features.items():
                features.setdefault(k, []).append(v)
            if i == 0:
                per_image = sum(t.element_size() * t[0].numel() for t in (out.logits, *out.features.values()))
                if per_image * len(data) > cls.MAX_BYTES:
                    return None
        return cls(live, torch.cat(logits), {k: torch.cat(v) for k, v in features.items()})

    folds: Tensor | None = None
    """[N] the fold of each training image when the outputs are cross-fitted (crossfit), else None."""

    @classmethod
    def crossfit(cls, live: LiveTeacher, fold_teachers: list[nn.Module], folds: Tensor, data: ImageSet, taps,
                 batch_size: int = EVAL_BATCH) -> "PrecomputedTeacher":
        """Out-of-fold outputs: image i's logits [K] and tapped tensors come from fold_teachers[folds[i]], the teacher
        trained without fold folds[i] (Dao et al. 2021, cross-fitting). `live` (the teacher trained on all of `data`)
        stays for batches without `index` (the Distiller's probe). Each fold teacher runs with its own Taps of the
        same specs as `taps` (or none), at the live teacher's dtype. Raises KDForgeError when the outputs cannot be
        stored (a tap that is not one tensor per batch, or more than MAX_BYTES)."""
        from ..taps import Taps

        logits: Tensor | None = None
        features: dict[str, Tensor] = {}
        for k, model in enumerate(fold_teachers):
            held = (folds == k).nonzero().flatten()
            fold_taps = Taps(model, {n: s.raw for n, s in taps.specs.items()}) if taps is not None else None
            out = cls.build(LiveTeacher(model, live.dtype), data.subset(held), fold_taps, batch_size)
            if out is None:
                raise KDForgeError("teacher.crossfit needs every fold teacher's outputs stored once, but the tapped "
                                   f"tensors are not one tensor per batch or exceed {cls.MAX_BYTES >> 20} MiB; tap "
                                   "fewer or smaller layers, or remove teacher.crossfit")
            if logits is None:
                logits = out.logits.new_empty((len(data), *out.logits.shape[1:]))
                features = {n: v.new_empty((len(data), *v.shape[1:])) for n, v in out.features.items()}
            logits[held] = out.logits
            for n, v in out.features.items():
                features[n][held] = v
        result = cls(live, logits, features)
        result.folds = folds
        return result

    def __call__(self, batch: dict[str, Tensor], taps=None) -> TeacherOutput:
        if "index" not in batch:
            return self.live(batch, taps)
        device = batch["inputs"].device
        idx = batch["index"].to(self.logits.device)
        return TeacherOutput(self.logits[idx].to(device), {k: v[idx].to(device) for k, v in self.features.items()})


class WidthCurriculum(StagedTeacher):
    """PWKD's stages for images (Zhang, Zhang & Sun, arXiv 2109.12507): training steps [start, stop) of stage k learn
    from the width-w_k sub-network of the slimmable teacher (SlimmableCNN), partial first, whole last. Each stage's
    logits on every training image [N, K] are computed once when the stage begins (a PrecomputedTeacher of the
    WidthView, at the live teacher's dtype; the previous stage's are dropped; above PrecomputedTeacher.MAX_BYTES the
    sub-network runs live), so a step costs what plain KD costs. The learning-rate restarts at the stage boundaries
    are kdforge.train's (stage_boundaries, lr_lambda). `model` is the whole teacher (what the training loop moves to
    the device and the held-out metrics evaluate).

    Call: (batch {inputs, labels, index}, taps=None, *, step) -> TeacherOutput, logits [B, K] only: `taps` are not
    served (ImageClassification.prepare refuses feature terms with a curriculum, since a sub-network's features have
    fewer channels than the whole teacher's)."""

    def __init__(self, live: LiveTeacher, data: ImageSet, stages: list[tuple[int, int, float]]):
        self.model, self.dtype, self.autocast = live.model, live.dtype, live.autocast
        self.data, self.stages = data, stages
        self._starts = [start for start, _, _ in stages]
        self._current: tuple[int, PrecomputedTeacher | LiveTeacher] | None = None

    @classmethod
    def from_spec(cls, live: LiveTeacher, spec: CurriculumSpec, total_steps: int, data: ImageSet) -> "WidthCurriculum":
        """From a recipe's `teacher.curriculum` (stages with `width`, null: 1.0) over `total_steps` steps."""
        stages = [(start, stop, 1.0 if stage.width is None else stage.width)
                  for start, stop, stage in stage_spans(spec, total_steps)]
        log.info("teacher curriculum (PWKD): %s", "; ".join(f"steps {a}-{b - 1}: width {w:g}" for a, b, w in stages))
        return cls(live, data, stages)

    def __call__(self, batch: dict[str, Tensor], taps=None, *, step: int = 0) -> TeacherOutput:
        k = self.stage_index(step)
        if self._current is None or self._current[0] != k:
            width = self.stages[k][2]
            log.info("teacher curriculum: stage %d/%d from step %d: width %g", k + 1, len(self.stages), step, width)
            view = LiveTeacher(WidthView(self.model, width), self.dtype)
            self._current = (k, PrecomputedTeacher.build(view, self.data, None) or view)  # too big: stays live
        return self._current[1](batch)


# --------------------------------------------------------------------------- metrics


def macro_f1(pred: Tensor, labels: Tensor) -> float:
    """Unweighted mean over the classes present in `labels` [N] or `pred` [N] of F1 = 2 TP / (2 TP + FP + FN)
    (scikit-learn's f1_score(average="macro") over the same classes)."""
    f1 = []
    for c in torch.unique(torch.cat([labels, pred])):
        tp = int(((pred == c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        f1.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1) / len(f1)


@torch.no_grad()
def predict(model: nn.Module, data: ImageSet, batch_size: int = EVAL_BATCH) -> tuple[Tensor, float]:
    """(class logits [N, K] in float32, examples per second of the forward passes over `data`). Eval mode; the
    model's mode is restored. The speed: after one untimed pass, whole passes repeated until 0.2 s have passed (at
    most 50), in `batch_size` chunks."""
    was_training = model.training
    model.eval()

    def one_pass() -> Tensor:
        return torch.cat([model(data.images[i: i + batch_size]).float() for i in range(0, len(data), batch_size)])

    logits = one_pass()  # also the warm-up
    passes, start = 0, time.perf_counter()
    while passes < 50 and (passes == 0 or time.perf_counter() - start < 0.2):
        one_pass()
        passes += 1
    seconds = time.perf_counter() - start
    model.train(was_training)
    return logits, passes * len(data) / seconds


def classification_metrics(logits: Tensor, labels: Tensor, reference: Tensor | None = None) -> dict[str, float]:
    """accuracy, macro_f1, ece (15 equal-width bins of the top-1 confidence), nll (mean cross-entropy) of logits
    [N, K] against labels [N]; with the teacher's `reference` logits [N, K] also top1_agreement and
    kl_teacher_student (mean KL(teacher || model), nats)."""
    lp = logits.log_softmax(-1)
    pred = lp.argmax(-1)
    correct = pred == labels
    res = {"accuracy": float(correct.float().mean()), "macro_f1": macro_f1(pred, labels),
           "ece": expected_calibration_error(lp.exp().max(-1).values, correct),
           "nll": float(F.nll_loss(lp, labels))}
    if reference is not None:
        ref = reference.log_softmax(-1)
        res["top1_agreement"] = float((pred == ref.argmax(-1)).float().mean())
        res["kl_teacher_student"] = float((ref.exp() * (ref - lp)).sum(-1).mean())
    return res


def soft_label_summary(source: "PrecomputedTeacher", train: ImageSet) -> dict[str, Any]:
    """What the student was trained towards on the training split: accuracy, NLL and ECE of the stored teacher logits
    [N, K] against the training labels, `crossfit` (whether each image's logits come from a teacher that did not see
    it) and, when cross-fitted, the images per fold. An in-sample teacher's figures here are optimistic; cross-fitted
    ones are honest held-out figures."""
    figures = classification_metrics(source.logits.float(), train.labels)
    out: dict[str, Any] = {k: figures[k] for k in ("accuracy", "nll", "ece")}
    out["crossfit"] = source.folds is not None
    if source.folds is not None:
        out["fold_sizes"] = torch.bincount(source.folds).tolist()
    return out


def evaluate_classifiers(student: nn.Module, teacher: nn.Module | None, data: ImageSet) -> dict[str, Any]:
    """{"student": figures, "teacher": figures | None, "heldout_setup": ...} on the held-out images (the teacher in
    float32). Each model's figures hold `calibration`, its reliability-diagram bins (evaluate.metrics.reliability_bins
    of the top-1 confidence, the 15 bins of its ECE)."""
    s_logits, s_speed = predict(student, data)
    res: dict[str, Any] = {"teacher": None}
    t_logits = None
    if teacher is not None:
        t_logits, t_speed = predict(teacher, data)
        res["teacher"] = {**classification_metrics(t_logits, data.labels), "examples_per_s": t_speed,
                          "parameters": count_parameters(teacher)}
    res["student"] = {**classification_metrics(s_logits, data.labels, t_logits), "examples_per_s": s_speed,
                      "parameters": count_parameters(student)}
    for name, logits in (("student", s_logits), ("teacher", t_logits)):  # a reliability diagram's bins (the ECE's)
        if logits is not None:
            probs = logits.softmax(-1).max(-1)
            res[name]["calibration"] = reliability_bins(probs.values, probs.indices == data.labels)
    res["heldout_setup"] = {"examples": len(data), "batch_size": EVAL_BATCH,
                            "teacher_precision": "float32" if teacher is not None else None}
    return res


# --------------------------------------------------------------------------- the task


def build_teacher(recipe: Recipe, train: ImageSet) -> CNN | None:
    """The recipe's teacher: None without one; `cnn`: trained once on `train` and cached (cached_teacher); else a
    CNN folder (CNN.from_pretrained, which raises KDForgeError for any other folder)."""
    spec = recipe.teacher
    if spec is None:
        return None
    if spec.model == "cnn":
        return cached_teacher(spec.config, train)
    return CNN.from_pretrained(spec.model).requires_grad_(False)


def _card(recipe: Recipe, final: dict[str, Any]) -> str:
    s, t = final["student"], final.get("teacher") or {}
    rows = "\n".join(f"| {k} | {s[k]:.4g} | {t[k]:.4g} |" if k in t else f"| {k} | {s[k]:.4g} | — |"
                     for k in ("accuracy", "macro_f1", "ece", "top1_agreement") if k in s)
    teacher = recipe.teacher.model if recipe.teacher is not None else "none (cross-entropy only)"
    return (f"# {recipe.name}\n\nA {final['student_parameters']:,}-parameter CNN image classifier distilled with "
            f"kdforge from `{teacher}` on `{recipe.data.corpus}`; load it with "
            "`kdforge.tasks.image_classification.CNN.from_pretrained(folder)`.\n\n"
            f"| held-out | student | teacher |\n|---|---|---|\n{rows}\n")


class ImageClassification:
    """The image-classification task (kdforge.tasks.base.Task)."""

    name = "image_classification"

    def data(self, recipe: Recipe) -> tuple[ImageSet, ImageSet]:
        """The recipe's (training, held-out) images (load_split)."""
        return load_split(recipe)

    def prepare(self, recipe: Recipe, *, teacher: nn.Module | None = None, tokenizer=None,
                blocks: tuple[ImageSet, ImageSet] | None = None) -> Setup:
        """Images, teacher (given, or built as the recipe says), the student CNN (seeded by recipe.seed) and the
        Distiller, whose live teacher is swapped for a PrecomputedTeacher where that is exact. `tokenizer` is unused
        (Setup.tokenizer is None). Raises KDForgeError for images that do not fit a CNN (channels, class ids),
        teacher and student heads of different sizes, or fewer training images than one batch."""
        train, val = blocks if blocks is not None else self.data(recipe)
        heads = {"student": recipe.student.config}
        if recipe.teacher is not None and recipe.teacher.model == "cnn":
            heads["teacher"] = recipe.teacher.config
        for part in (train, val):
            check_images(part, heads)
        crossfit = recipe.teacher.crossfit if recipe.teacher is not None else None
        folds = crossfit_folds(train, crossfit.folds, crossfit.seed) if crossfit is not None else None
        if teacher is None:
            teacher = build_teacher(recipe, train)
        if teacher is not None:
            check_images(train, {"teacher": teacher.config})
            if teacher.config["num_classes"] != recipe.student.config["num_classes"]:
                raise KDForgeError(f"the teacher has {teacher.config['num_classes']} classes but the student "
                                   f"{recipe.student.config['num_classes']}; set student.config.num_classes: "
                                   f"{teacher.config['num_classes']}")
        if len(train) < recipe.train.batch_size:
            raise KDForgeError(f"{train.source} has {len(train)} training images, fewer than one batch of "
                               f"train.batch_size={recipe.train.batch_size}; lower train.batch_size")
        torch.manual_seed(recipe.seed)
        student = CNN(recipe.student.config, tuple(train.images.shape[-2:]))
        example = self.make_batch(train, torch.arange(min(4, len(train))))
        distiller = Distiller(teacher, student, recipe.objective,
                              teacher_dtype=recipe.teacher.dtype if recipe.teacher else "float32",
                              example_batch=example)
        source = distiller.teacher_source
        if folds is not None and len(distiller.stepping_stones):
            raise KDForgeError("teacher.crossfit serves each training image the outputs of its fold's teacher, but "
                               "a block_kd term runs the teacher's own blocks; remove block_kd or teacher.crossfit")
        curriculum = recipe.teacher.curriculum if recipe.teacher is not None else None
        if curriculum is not None and source is not None:  # PWKD: a slimmable teacher's widths, stage by stage
            if not isinstance(teacher, SlimmableCNN):
                raise KDForgeError("teacher.curriculum distils from a slimmable teacher's width sub-networks, but this "
                                   "teacher is a plain CNN; set teacher.model: cnn with teacher.config.widths")
            if len(distiller.feature_terms) or len(distiller.stepping_stones):
                raise KDForgeError("PWKD's width stages give the teacher's logits only (a sub-network's features have "
                                   "fewer channels); remove the feature and block_kd terms, or teacher.curriculum")
            distiller.teacher_source = WidthCurriculum.from_spec(source, curriculum, recipe.train.steps, train)
            distiller.teacher_takes_step = True
        elif isinstance(source, LiveTeacher):  # Block-KD's stones keep running the live teacher's blocks themselves
            taps = distiller.teacher_taps if distiller.teacher_taps is not None and len(distiller.feature_terms) \
                else None
            if folds is not None:  # every training image labelled by the teacher that did not see it
                distiller.teacher_source = PrecomputedTeacher.crossfit(
                    source, fold_teachers(recipe.teacher.config, train, folds), folds, train, taps)
            else:
                distiller.teacher_source = PrecomputedTeacher.build(source, train, taps) or source
        return Setup(recipe, None, teacher, student, distiller, train, val, self)

    def make_batch(self, data: ImageSet, index: Tensor) -> dict[str, Tensor]:
        """{inputs [B, C, H, W], labels [B], index [B]}; `index` (the images' positions in `data`) is for a
        PrecomputedTeacher's lookup: models see only `inputs`."""
        return {"inputs": data.images[index], "labels": data.labels[index],
                "index": torch.as_tensor(index, dtype=torch.long)}

    def fingerprint(self, train: ImageSet, val: ImageSet) -> str:
        return fingerprint(train, val)

    def periodic_metrics(self, setup: Setup) -> dict[str, float]:
        logits, _ = predict(setup.student, setup.val_blocks)
        res = classification_metrics(logits, setup.val_blocks.labels)
        return {"eval/accuracy": res["accuracy"], "eval/nll": res["nll"]}

    def final_metrics(self, setup: Setup, *, progress: bool = True) -> dict[str, Any]:
        res = evaluate_classifiers(setup.student, setup.teacher, setup.val_blocks)
        out = {"step": setup.recipe.train.steps, "student": res["student"], "teacher": res["teacher"],
               "student_parameters": count_parameters(setup.student), "heldout_setup": res["heldout_setup"]}
        source = setup.distiller.teacher_source
        if isinstance(source, PrecomputedTeacher):
            out["train_soft_labels"] = soft_label_summary(source, setup.train_blocks)
        return out

    def export(self, setup: Setup, out: Path, final: dict[str, Any]) -> None:
        """out/student: config.json, model.safetensors (CNN.from_pretrained reads it) and a README.md."""
        write_student_folder(out, setup.student.save_pretrained, _card(setup.recipe, final))

    def run_eval(self, run_dir: Path, recipe: Recipe, *, out_dir: Path | None = None) -> dict[str, Any]:
        """`kdforge eval RUN`: the exported student (and the teacher) on the run's held-out images; eval.json is
        written to out_dir (default: the run folder)."""
        folder = Path(run_dir) / "student"
        if not is_cnn_folder(folder):
            raise KDForgeError(f"run '{run_dir}' has not finished, so it has no exported student yet; rerun "
                               "`kdforge distill` with the same recipe and --out to finish it, then evaluate")
        return self.evaluate_folder(folder, recipe, out_dir=Path(out_dir or run_dir))

    def evaluate_folder(self, folder: Path, recipe: Recipe, *, out_dir: Path | None = None) -> dict[str, Any]:
        """The CNN in `folder` (and recipe's teacher, if any) on the recipe's held-out images; eval.json goes to
        out_dir when given. Raises KDForgeError when the images do not fit the CNN (channels, classes)."""
        train, val = self.data(recipe)
        student = CNN.from_pretrained(folder)
        check_images(val, {"student": student.config})
        teacher = build_teacher(recipe, train)
        res = evaluate_classifiers(student, teacher, val)
        heldout = {"student": res["student"], **({"teacher": res["teacher"]} if teacher is not None else {})}
        out = {"task": self.name, "heldout": heldout, "heldout_setup": res["heldout_setup"],
               "summary": {k: v for k, v in res["student"].items() if k != "calibration"},
               "student_path": str(folder),
               "teacher": recipe.teacher.model_dump() if recipe.teacher else None, "data": recipe.data.model_dump(),
               "notes": []}
        if out_dir is not None:
            atomic_write_json(Path(out_dir) / "eval.json", out)
        return out


def folder_recipe(folder: Path, *, corpus: str | None = None, teacher: str | None = None) -> Recipe:
    """What `kdforge eval FOLDER` of a CNN folder (not a run) evaluates on: `corpus` (default digits) split as a recipe
    splits it, against `teacher` (`cnn`: the default teacher CNN, trained once and cached; a CNN folder; None or '':
    no teacher)."""
    from ..recipe import parse_recipe

    config = json.loads((Path(folder) / "config.json").read_text())
    data = {"task": "image_classification", "data": {"corpus": corpus or "digits"},
            "student": {"config": {k: config[k] for k in CNNSpec.model_fields}}}
    if teacher:
        data["teacher"] = {"model": teacher}
    return parse_recipe(data)
