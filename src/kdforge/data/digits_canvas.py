"""Multi-label and detection data built from real handwritten digits: scikit-learn's bundled ``load_digits``.

scikit-learn ships 1,797 real 8x8 handwritten digits (grey levels 0..16, UCI "optdigits" test set). Each record
here is a square canvas (default 32x32, one channel, values in [0, 1]) with 2..4 of those digits pasted at random
positions, never overlapping. Its targets are

* ``labels``: multi-hot ``[10]`` (float32), 1 for each digit class present (a class placed twice is one 1);
* ``boxes``: ``[n, 4]`` float32, where each digit was placed, ``(x0, y0, x1, y1)`` in pixels with ``x1 = x0 + w``
  (pixel edges, exclusive end), ``0 <= x0 < x1 <= canvas_size``;
* ``classes``: ``[n]`` int64, each box's digit class 0..9;
* ``sources``: ``[n]`` int64, each box's row in ``load_digits`` (so a split can be checked).

Determinism: one generator seed (default :data:`DEFAULT_SEED`); the train and test canvases come from two
independent streams of ``numpy.random.default_rng([seed, split])``, so the test set is the same every run whatever
``n_train`` is. The split is by *source digit*: the 1,797 digits are permuted once by the seed and a
``test_fraction`` of them may appear only on test canvases, the rest only on train canvases -- no source image is
in both. :meth:`DigitCanvases.fingerprint` is a sha256 of every array, which tests pin.

:func:`validate_records` checks records from anywhere (this builder or a user's file) and refuses, in one line
naming the record: an empty label set, a box outside the canvas (or with no area), a class id outside 0..9, and
labels that disagree with the boxes' classes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..errors import KDForgeError

__all__ = ["DEFAULT_SEED", "NUM_CLASSES", "DigitCanvases", "load_source_digits", "split_sources", "make_canvases",
           "load_digit_canvases", "validate_records"]

DEFAULT_SEED = 1234
NUM_CLASSES = 10
_TRAIN_STREAM, _TEST_STREAM, _SPLIT_STREAM = 0, 1, 2
_MAX_TRIES = 200  # placements tried per digit before the canvas is started again
_MAX_RESTARTS = 100  # canvases started again before the layout is refused


@dataclass(frozen=True)
class DigitCanvases:
    """A set of canvases: ``images`` ``[N, 1, S, S]`` float32 in [0, 1], ``labels`` ``[N, 10]`` float32 multi-hot,
    and per record ``boxes[i]`` ``[n_i, 4]`` float32 xyxy pixels, ``classes[i]`` ``[n_i]`` int64 and
    ``sources[i]`` ``[n_i]`` int64 (rows of ``load_digits``)."""

    images: np.ndarray
    labels: np.ndarray
    boxes: list[np.ndarray]
    classes: list[np.ndarray]
    sources: list[np.ndarray]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def canvas_size(self) -> int:
        return int(self.images.shape[-1])

    def source_set(self) -> set[int]:
        """Every ``load_digits`` row used on any canvas of this set."""
        return {int(s) for row in self.sources for s in row}

    def fingerprint(self) -> str:
        """sha256 (hex) over images, labels, boxes, classes and sources, in record order."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.images, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(self.labels, dtype=np.float32).tobytes())
        for b, c, s in zip(self.boxes, self.classes, self.sources):
            h.update(np.int64(len(b)).tobytes())
            h.update(np.ascontiguousarray(b, dtype=np.float32).tobytes())
            h.update(np.ascontiguousarray(c, dtype=np.int64).tobytes())
            h.update(np.ascontiguousarray(s, dtype=np.int64).tobytes())
        return h.hexdigest()


def load_source_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits: images ``[1797, 8, 8]`` float32 scaled to [0, 1] (grey level / 16) and targets
    ``[1797]`` int64. Raises ``KDForgeError`` when scikit-learn is missing (``pip install 'kdforge[vision]'``)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise KDForgeError("the digits data needs scikit-learn, which is not installed; "
                           "run `pip install 'kdforge[vision]'`") from None
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def split_sources(n_sources: int, *, test_fraction: float = 0.2, seed: int = DEFAULT_SEED
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, test) index arrays over ``range(n_sources)``, sorted; the test part is
    ``round(test_fraction * n_sources)`` indices chosen by a seeded permutation. Raises ``KDForgeError`` for a
    fraction outside (0, 1) or a split that leaves either side empty."""
    if not 0.0 < test_fraction < 1.0:
        raise KDForgeError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    n_test = int(round(test_fraction * n_sources))
    if n_test < 1 or n_test >= n_sources:
        raise KDForgeError(f"test_fraction {test_fraction} of {n_sources} source digits leaves an empty side; "
                           "use more digits or another fraction")
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n_sources)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _place(rng: np.random.Generator, sizes: list[int], canvas_size: int) -> list[tuple[int, int]] | None:
    """Top-left corners for squares of the given sizes, pairwise disjoint, or None when one did not fit."""
    corners: list[tuple[int, int, int]] = []
    for size in sizes:
        for _ in range(_MAX_TRIES):
            x, y = (int(v) for v in rng.integers(0, canvas_size - size + 1, size=2))
            if all(x + size <= cx or cx + cs <= x or y + size <= cy or cy + cs <= y for cx, cy, cs in corners):
                corners.append((x, y, size))
                break
        else:
            return None
    return [(x, y) for x, y, _ in corners]


def make_canvases(
    n: int,
    digit_images: np.ndarray,
    digit_targets: np.ndarray,
    allowed_sources: np.ndarray,
    rng: np.random.Generator,
    *,
    canvas_size: int = 32,
    min_digits: int = 2,
    max_digits: int = 4,
    scales: tuple[int, ...] = (1,),
) -> DigitCanvases:
    """``n`` canvases drawing digits only from ``allowed_sources`` (rows of ``digit_images`` ``[M, 8, 8]``).

    Per canvas: a count uniform in ``min_digits..max_digits``, a source row uniform in ``allowed_sources`` per
    digit, an integer upscaling factor uniform in ``scales`` (an 8x8 digit becomes ``8s x 8s`` by pixel
    repetition), and positions uniform over the canvas, redrawn until no two digits overlap. Raises
    ``KDForgeError`` when the digits cannot fit (``max_digits`` squares of the largest scale larger than the
    canvas), for bad counts or scales, or an empty ``allowed_sources``.
    """
    side = int(digit_images.shape[-1])
    if min_digits < 1 or max_digits < min_digits:
        raise KDForgeError(f"need 1 <= min_digits <= max_digits, got {min_digits} and {max_digits}")
    if not scales or any(int(s) != s or s < 1 for s in scales):
        raise KDForgeError(f"scales must be positive integers, got {scales!r}")
    if max_digits * (side * max(scales)) ** 2 > canvas_size**2 or side * max(scales) > canvas_size:
        raise KDForgeError(f"{max_digits} digits of {side * max(scales)}x{side * max(scales)} pixels cannot fit on "
                           f"a {canvas_size}x{canvas_size} canvas; use a larger canvas_size or fewer/smaller digits")
    if len(allowed_sources) == 0:
        raise KDForgeError("no source digits to draw from; check the train/test split")
    images = np.zeros((n, 1, canvas_size, canvas_size), dtype=np.float32)
    labels = np.zeros((n, NUM_CLASSES), dtype=np.float32)
    boxes, classes, sources = [], [], []
    for i in range(n):
        for _ in range(_MAX_RESTARTS):
            count = int(rng.integers(min_digits, max_digits + 1))
            rows = rng.choice(allowed_sources, size=count)
            sizes = [side * int(scales[int(rng.integers(len(scales)))]) for _ in range(count)]
            corners = _place(rng, sizes, canvas_size)
            if corners is not None:
                break
        else:
            raise KDForgeError(f"canvas {i}: could not place {count} digits without overlap on a {canvas_size}x"
                               f"{canvas_size} canvas in {_MAX_RESTARTS} tries; use a larger canvas_size or fewer/"
                               "smaller digits")
        box = np.zeros((count, 4), dtype=np.float32)
        for j, ((x, y), size, row) in enumerate(zip(corners, sizes, rows)):
            scale = size // side
            digit = np.kron(digit_images[row], np.ones((scale, scale), dtype=np.float32))
            images[i, 0, y:y + size, x:x + size] = digit
            box[j] = (x, y, x + size, y + size)
        cls = digit_targets[rows].astype(np.int64)
        labels[i, cls] = 1.0
        boxes.append(box)
        classes.append(cls)
        sources.append(np.asarray(rows, dtype=np.int64))
    return DigitCanvases(images, labels, boxes, classes, sources)


def load_digit_canvases(
    *,
    n_train: int = 2000,
    n_test: int = 500,
    seed: int = DEFAULT_SEED,
    canvas_size: int = 32,
    min_digits: int = 2,
    max_digits: int = 4,
    scales: tuple[int, ...] = (1,),
    test_fraction: float = 0.2,
) -> tuple[DigitCanvases, DigitCanvases]:
    """(train, test) canvases from scikit-learn's digits, split by source digit (see the module docstring).

    The test set depends only on ``seed``, ``n_test``, the canvas arguments and ``test_fraction`` -- not on
    ``n_train``. Both sets pass :func:`validate_records`. Raises ``KDForgeError`` as :func:`make_canvases` and
    :func:`split_sources`, and when scikit-learn is missing.
    """
    digit_images, digit_targets = load_source_digits()
    train_src, test_src = split_sources(len(digit_images), test_fraction=test_fraction, seed=seed)
    common = dict(canvas_size=canvas_size, min_digits=min_digits, max_digits=max_digits, scales=scales)
    train = make_canvases(n_train, digit_images, digit_targets, train_src,
                          np.random.default_rng([seed, _TRAIN_STREAM]), **common)
    test = make_canvases(n_test, digit_images, digit_targets, test_src,
                         np.random.default_rng([seed, _TEST_STREAM]), **common)
    for name, part in (("train", train), ("test", test)):
        validate_records(part.labels, part.boxes, part.classes, canvas_size=canvas_size, what=f"{name} canvas")
    return train, test


def validate_records(
    labels: np.ndarray,
    boxes: list[np.ndarray] | None = None,
    classes: list[np.ndarray] | None = None,
    *,
    canvas_size: int | tuple[int, int] | None = None,
    num_classes: int = NUM_CLASSES,
    what: str = "record",
) -> None:
    """Refuse, in one line naming the record's index, the first bad multi-label / detection record.

    ``labels`` ``[N, num_classes]`` multi-hot; ``boxes[i]`` ``[n_i, 4]`` xyxy pixels and ``classes[i]`` ``[n_i]``
    (both optional; together). ``canvas_size``: the canvas side (or ``(height, width)``) that boxes must lie in.
    Raises ``KDForgeError`` for: a label matrix that is not ``[N, num_classes]`` or not 0/1; an empty label set;
    box and class counts that differ; a box outside ``[0, width] x [0, height]`` or with ``x1 <= x0`` or
    ``y1 <= y0``; a class id outside ``0..num_classes-1``; labels that differ from the set of box classes.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] != num_classes:
        raise KDForgeError(f"labels must be [N, {num_classes}] multi-hot, got shape {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        bad = int(np.argwhere(~np.isin(labels, (0, 1)))[0, 0])
        raise KDForgeError(f"{what} {bad}: labels must be 0/1 multi-hot; got {labels[bad].tolist()}")
    empty = np.flatnonzero(labels.sum(axis=1) == 0)
    if len(empty):
        raise KDForgeError(f"{what} {int(empty[0])}: empty label set (no class present); every multi-label record "
                           "needs at least one class -- drop it or label it")
    if boxes is None and classes is None:
        return
    if boxes is None or classes is None or len(boxes) != len(labels) or len(classes) != len(labels):
        raise KDForgeError(f"boxes and classes must both be given, one entry per record ({len(labels)} records)")
    if canvas_size is None:
        height = width = None
    else:
        height, width = (canvas_size, canvas_size) if np.isscalar(canvas_size) else canvas_size
    for i, (box, cls) in enumerate(zip(boxes, classes)):
        box, cls = np.asarray(box, dtype=np.float64).reshape(-1, 4), np.asarray(cls).reshape(-1)
        if len(box) != len(cls):
            raise KDForgeError(f"{what} {i}: {len(box)} boxes but {len(cls)} class ids; give one class per box")
        for j, (x0, y0, x1, y1) in enumerate(box.tolist()):
            if not (x1 > x0 and y1 > y0):
                raise KDForgeError(f"{what} {i}: box {j} {[x0, y0, x1, y1]} has no area; boxes are (x0, y0, x1, y1) "
                                   "with x1 > x0 and y1 > y0")
            if height is not None and (x0 < 0 or y0 < 0 or x1 > width or y1 > height):
                raise KDForgeError(f"{what} {i}: box {j} {[x0, y0, x1, y1]} lies outside the {width}x{height} canvas; "
                                   "clip it to the canvas or drop it")
        for j, c in enumerate(cls.tolist()):
            if int(c) != c or not 0 <= c < num_classes:
                raise KDForgeError(f"{what} {i}: box {j} has class id {c}, outside 0..{num_classes - 1} of the "
                                   f"{num_classes}-class head; fix the label or the head's class count")
        present = set(np.flatnonzero(labels[i]).tolist())
        if present != {int(c) for c in cls.tolist()}:
            raise KDForgeError(f"{what} {i}: labels say classes {sorted(present)} but the boxes hold "
                               f"{sorted({int(c) for c in cls.tolist()})}; the multi-hot labels must be the boxes' "
                               "classes")
