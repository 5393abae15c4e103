"""Multi-digit canvases from scikit-learn's real digits (kdforge.data.digits_canvas): the same arrays for the same
seed, a pinned checksum of the default test set, the split by source digit, the record invariants and the
one-line refusals of bad records."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from kdforge.data.digits_canvas import (  # noqa: E402
    DEFAULT_SEED,
    load_digit_canvases,
    load_source_digits,
    make_canvases,
    split_sources,
    validate_records,
)
from kdforge.errors import KDForgeError  # noqa: E402

# sha256 of the default test set (500 canvases, seed DEFAULT_SEED, 32x32, 2..4 digits at scale 1); a change here
# means every published test-set figure changes too.
DEFAULT_TEST_FINGERPRINT = "2a744b15bd7e5cba84acd7c1c952262eb0e0ad7d8ce51995c46319b1c6ad6d36"


@pytest.fixture(scope="module")
def default_sets():
    return load_digit_canvases()


def _same(a, b) -> bool:
    return (np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
            and all(np.array_equal(x, y) for x, y in zip(a.boxes, b.boxes))
            and all(np.array_equal(x, y) for x, y in zip(a.classes, b.classes))
            and all(np.array_equal(x, y) for x, y in zip(a.sources, b.sources)))


def test_same_seed_gives_identical_arrays_and_the_pinned_test_set(default_sets):
    train, test = default_sets
    assert (len(train), len(test)) == (2000, 500)
    assert test.fingerprint() == DEFAULT_TEST_FINGERPRINT
    train2, test2 = load_digit_canvases(n_train=40)  # the test set does not depend on n_train
    assert _same(test, test2) and test2.fingerprint() == DEFAULT_TEST_FINGERPRINT
    assert _same(train2, load_digit_canvases(n_train=40)[0])
    other_train, other_test = load_digit_canvases(n_train=40, n_test=50, seed=DEFAULT_SEED + 1)
    assert other_test.fingerprint() != load_digit_canvases(n_train=40, n_test=50)[1].fingerprint()


def test_split_by_source_digit(default_sets):
    train, test = default_sets
    train_src, test_src = split_sources(1797, seed=DEFAULT_SEED)
    assert len(test_src) == round(0.2 * 1797) and not set(train_src) & set(test_src)
    assert len(train_src) + len(test_src) == 1797
    assert train.source_set() <= set(train_src.tolist()) and test.source_set() <= set(test_src.tolist())
    assert not train.source_set() & test.source_set()


def test_every_record_holds_its_invariants(default_sets):
    digits, targets = load_source_digits()
    for part in default_sets:
        assert part.images.shape[1:] == (1, 32, 32) and part.images.dtype == np.float32
        assert part.images.min() >= 0.0 and part.images.max() <= 1.0
        for i in range(len(part)):
            box, cls, src = part.boxes[i], part.classes[i], part.sources[i]
            assert 2 <= len(box) <= 4 and len(cls) == len(src) == len(box)
            np.testing.assert_array_equal(cls, targets[src])  # each box's class is its source digit's
            assert set(np.flatnonzero(part.labels[i]).tolist()) == set(cls.tolist())
            covered = np.zeros((32, 32), dtype=bool)
            for (x0, y0, x1, y1), s in zip(box.astype(int), src):
                assert 0 <= x0 and x1 <= 32 and 0 <= y0 and y1 <= 32 and x1 - x0 == y1 - y0 == 8
                assert not covered[y0:y1, x0:x1].any()  # no two digits overlap
                covered[y0:y1, x0:x1] = True
                np.testing.assert_array_equal(part.images[i, 0, y0:y1, x0:x1], digits[s])  # the real digit
            assert not part.images[i, 0][~covered].any()  # nothing outside the boxes


def test_upscaled_digits_are_pixel_repeats():
    digits, targets = load_source_digits()
    rng = np.random.default_rng(5)
    cv = make_canvases(20, digits, targets, np.arange(100), rng, canvas_size=40, max_digits=3, scales=(1, 2))
    sizes = {int(b[2] - b[0]) for boxes in cv.boxes for b in boxes}
    assert sizes == {8, 16}
    for i in range(len(cv)):
        for (x0, y0, x1, y1), s in zip(cv.boxes[i].astype(int), cv.sources[i]):
            if x1 - x0 == 16:
                np.testing.assert_array_equal(cv.images[i, 0, y0:y1:2, x0:x1:2], digits[s])
    validate_records(cv.labels, cv.boxes, cv.classes, canvas_size=40)


def test_impossible_layout_is_refused():
    digits, targets = load_source_digits()
    with pytest.raises(KDForgeError, match="cannot fit on a 16x16 canvas"):
        make_canvases(1, digits, targets, np.arange(10), np.random.default_rng(0), canvas_size=16, max_digits=5)


def _one_good():
    labels = np.zeros((2, 10), dtype=np.float32)
    labels[0, [3, 7]] = 1
    labels[1, 1] = 1
    boxes = [np.array([[0, 0, 8, 8], [10, 10, 18, 18]], np.float32), np.array([[24, 24, 32, 32]], np.float32)]
    classes = [np.array([3, 7]), np.array([1])]
    return labels, boxes, classes


def test_validate_records_refusals_name_the_record():
    labels, boxes, classes = _one_good()
    validate_records(labels, boxes, classes, canvas_size=32)
    empty = labels.copy()
    empty[1] = 0
    outside = [boxes[0], np.array([[24, 24, 33, 32]], np.float32)]
    negative = [np.array([[-1, 0, 8, 8], [10, 10, 18, 18]], np.float32), boxes[1]]
    big_class = [classes[0], np.array([10])]
    cases = [
        (lambda: validate_records(empty, boxes, classes, canvas_size=32), "record 1: empty label set"),
        (lambda: validate_records(labels, outside, classes, canvas_size=32),
         r"record 1: box 0 \[24.0, 24.0, 33.0, 32.0\] lies outside the 32x32 canvas"),
        (lambda: validate_records(labels, negative, classes, canvas_size=32), "record 0: box 0 .* lies outside"),
        (lambda: validate_records(labels, boxes, big_class, canvas_size=32),
         "record 1: box 0 has class id 10, outside 0..9 of the 10-class head"),
        (lambda: validate_records(labels, boxes, [classes[0], np.array([2])], canvas_size=32),
         r"record 1: labels say classes \[1\] but the boxes hold \[2\]"),
        (lambda: validate_records(labels, [boxes[0], np.array([[5, 5, 5, 9]], np.float32)], classes),
         "record 1: box 0 .* has no area"),
        (lambda: validate_records(labels * 2, boxes, classes), "record 0: labels must be 0/1 multi-hot"),
        (lambda: validate_records(labels[:, :9]), r"labels must be \[N, 10\] multi-hot"),
    ]
    for fn, message in cases:
        with pytest.raises(KDForgeError, match=message) as e:
            fn()
        assert "\n" not in str(e.value)
    validate_records(empty[:1])  # labels alone: the first record is fine
