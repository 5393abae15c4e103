"""Label Assignment Distillation (kdforge.losses.lad): anchors, the box coder, the IoU baseline assignment, the
teacher-based (PAA) assignment on a hand-made case where it differs from the IoU one in a known way, PAA's GMM
split against scikit-learn's, and the detection loss pinned by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdforge.errors import KDForgeError
from kdforge.losses.lad import (
    Assignment,
    box_iou,
    decode_boxes,
    detection_loss,
    encode_boxes,
    flatten_head_outputs,
    generalized_iou,
    iou_assign,
    lad_assign,
    make_anchors,
    paa_split,
)

LN2 = math.log(2.0)

# Two ground-truth digits on a canvas and seven anchors (xyxy pixels).
GT = torch.tensor([[0.0, 0.0, 8.0, 8.0], [16.0, 16.0, 24.0, 24.0]])
GT_CLASSES = torch.tensor([0, 1])
ANCHORS = torch.tensor([
    [0, 0, 8, 8],     # a0: IoU 1 with GT0
    [2, 0, 10, 8],    # a1: IoU 48/80 = 0.6 with GT0
    [4, 0, 12, 8],    # a2: IoU 32/96 = 1/3 with GT0
    [16, 16, 24, 24],  # a3: IoU 1 with GT1
    [18, 16, 26, 24],  # a4: IoU 0.6 with GT1
    [20, 16, 28, 24],  # a5: IoU 1/3 with GT1
    [8, 8, 16, 16],   # a6: touches neither
], dtype=torch.float32)
LEVELS = torch.zeros(7, dtype=torch.int64)


def _hand_giou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    enclose = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (enclose - union) / enclose


def _hand_focal(z, target, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-z))
    if target:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p**gamma * math.log(1 - p)


def _teacher():
    """A teacher right at a2 (GT0, box exact) and a3 (GT1, box exact), wrong elsewhere: at a0, a1, a4, a5 it gives
    the box's class logit -4 and keeps the anchor itself as its box (deltas 0); -6 for every other class."""
    logits = torch.full((7, 2), -6.0)
    deltas = torch.zeros(7, 4)
    for a, g in ((0, 0), (1, 0), (4, 1), (5, 1)):
        logits[a, GT_CLASSES[g]] = -4.0
    for a, g in ((2, 0), (3, 1)):
        logits[a, GT_CLASSES[g]] = 6.0
        deltas[a] = encode_boxes(ANCHORS[a:a + 1], GT[g:g + 1])[0]
    return logits, deltas


# --------------------------------------------------------------------------- anchors and boxes


def test_make_anchors_by_hand():
    anchors, levels = make_anchors(32, strides=(8, 16), sizes=(16.0, 32.0), ratios=(1.0, 4.0))
    assert anchors.shape == (16 * 2 + 4 * 2, 4) and levels.tolist() == [0] * 32 + [1] * 8
    # level 0, cell (y=0, x=0), centre (4, 4): ratio 1 -> 16x16; ratio 4 (h/w) -> w 8, h 32
    torch.testing.assert_close(anchors[0], torch.tensor([-4.0, -4.0, 12.0, 12.0]))
    torch.testing.assert_close(anchors[1], torch.tensor([0.0, -12.0, 8.0, 20.0]))
    # level 0, cell (y=1, x=2): index (1 * 4 + 2) * 2 = 12, centre (20, 12)
    torch.testing.assert_close(anchors[12], torch.tensor([12.0, 4.0, 28.0, 20.0]))
    # level 1, first cell, centre (8, 8), 32x32
    torch.testing.assert_close(anchors[32], torch.tensor([-8.0, -8.0, 24.0, 24.0]))


def test_flatten_head_outputs_follows_the_anchor_order():
    # level 0: 2x2 grid, 2 anchors per cell, K = 3; each value encodes (level, y, x, anchor, class)
    b, k = 1, 3
    maps = []
    for level, n in ((0, 2), (1, 1)):
        m = torch.zeros(b, 2 * k, n, n)
        for y in range(n):
            for x in range(n):
                for a in range(2):
                    for c in range(k):
                        m[0, a * k + c, y, x] = 10000 * level + 1000 * y + 100 * x + 10 * a + c
        maps.append(m)
    flat = flatten_head_outputs(maps, k)
    assert flat.shape == (1, 2 * 2 * 2 + 1 * 1 * 2, 3)
    order = [(0, y, x, a) for y in range(2) for x in range(2) for a in range(2)] + [(1, 0, 0, a) for a in range(2)]
    for i, (level, y, x, a) in enumerate(order):
        assert flat[0, i].tolist() == [10000 * level + 1000 * y + 100 * x + 10 * a + c for c in range(k)]


def test_box_coder_round_trip_and_a_hand_value():
    anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0], [10.0, 4.0, 14.0, 20.0]])
    boxes = torch.tensor([[2.0, 0.0, 10.0, 8.0], [9.0, 6.0, 17.0, 10.0]])
    deltas = encode_boxes(anchors, boxes)
    # first: centre moves 2 px = 0.25 anchor widths, same size -> (0.25 / 0.1, 0, 0, 0)
    torch.testing.assert_close(deltas[0], torch.tensor([2.5, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(decode_boxes(anchors, deltas), boxes)


def test_iou_and_giou_by_hand():
    iou = box_iou(ANCHORS, GT)
    torch.testing.assert_close(iou[:, 0], torch.tensor([1.0, 0.6, 1 / 3, 0, 0, 0, 0]))
    torch.testing.assert_close(iou[:, 1], torch.tensor([0, 0, 0, 1.0, 0.6, 1 / 3, 0]))
    g = generalized_iou(ANCHORS[[0, 1, 2, 6]], GT[[0, 0, 0, 0]])
    expected = [_hand_giou(ANCHORS[a].tolist(), GT[0].tolist()) for a in (0, 1, 2, 6)]
    assert g.tolist() == pytest.approx(expected, abs=1e-6)
    assert expected[3] == pytest.approx(0 - (256 - 128) / 256)  # disjoint: -(C - U) / C


# --------------------------------------------------------------------------- assignments


def test_iou_assignment_rules():
    a = iou_assign(ANCHORS, GT, GT_CLASSES, 2)
    assert a.labels.tolist() == [0, 0, 2, 1, 1, 2, 2] and a.gt_index.tolist() == [0, 0, -1, 1, 1, -1, -1]
    # an IoU of 1/3 with neg_iou 0.3 falls in the ignore band; a box whose best anchor is weak still gets it
    b = iou_assign(ANCHORS, GT, GT_CLASSES, 2, pos_iou=0.7, neg_iou=0.3)
    assert b.labels.tolist() == [0, -1, -1, 1, -1, -1, 2]
    lone = torch.tensor([[5.0, 0.0, 13.0, 8.0]])  # IoU 24/104, 40/88, 56/72 with a0, a1, a2: all below 0.9
    c = iou_assign(ANCHORS, lone, torch.tensor([1]), 2, pos_iou=0.9, neg_iou=0.1)
    best = box_iou(ANCHORS, lone)[:, 0]
    assert c.positive.tolist() == (best == best.max()).tolist() and c.num_positive >= 1
    empty = iou_assign(ANCHORS, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 2)
    assert empty.labels.tolist() == [2] * 7


def test_lad_assignment_differs_from_iou_in_the_known_way():
    logits, deltas = _teacher()
    lad = lad_assign(ANCHORS, LEVELS, logits, deltas, GT, GT_CLASSES)
    iou = iou_assign(ANCHORS, GT, GT_CLASSES, 2)
    # candidates (IoU >= 0.1): a0, a1, a2 for GT0 and a3, a4, a5 for GT1; the teacher's costs by hand:
    gt_of = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
    for a, g in gt_of.items():
        box = decode_boxes(ANCHORS[a], deltas[a]).tolist()
        cls = sum(_hand_focal(logits[a, c].item(), c == GT_CLASSES[g].item()) for c in range(2))
        cost = cls + 1.3 * (1 - _hand_giou(box, GT[g].tolist()))
        assert lad.cost[a].item() == pytest.approx(cost, rel=1e-4, abs=1e-6), a
    assert math.isnan(lad.cost[6].item())
    # a0 (IoU 1) costs 0.969 + 0 and a1 (IoU 0.6) 0.969 + 1.3 * 0.4, but a2, where the teacher is right, ~0
    assert lad.cost[0].item() == pytest.approx(0.25 * (1 - 1 / (1 + math.exp(4))) ** 2 * math.log(1 + math.exp(4)),
                                               rel=1e-4)
    # IoU: GT0 -> {a0, a1}, GT1 -> {a3, a4}.  LAD: GT0 -> {a2} only, GT1 -> {a3} only; the rest background.
    assert iou.labels.tolist() == [0, 0, 2, 1, 1, 2, 2]
    assert lad.labels.tolist() == [2, 2, 0, 1, 2, 2, 2]
    assert lad.gt_index.tolist() == [-1, -1, 0, 1, -1, -1, -1]


def test_lad_takes_the_topk_cheapest_candidates_per_level_into_the_split():
    logits, deltas = _teacher()
    levels = torch.tensor([0, 0, 1, 0, 0, 1, 0])
    full = lad_assign(ANCHORS, levels, logits, deltas, GT, GT_CLASSES)
    one = lad_assign(ANCHORS, levels, logits, deltas, GT, GT_CLASSES, topk=1)
    cost = full.cost
    for g, per_level in ((0, ([0, 1], [2])), (1, ([3, 4], [5]))):
        # topk=1: the cheapest candidate of each level enters PAA's split, nothing else
        entered = [min(ids, key=lambda a: cost[a].item()) for ids in per_level]
        split = paa_split(cost[entered])
        assert {a for a, keep in zip(entered, split.tolist()) if keep} == set(
            torch.nonzero(one.gt_index == g).flatten().tolist())
        # topk=9 >= candidates: all of them enter
        every = [a for ids in per_level for a in ids]
        split = paa_split(cost[every])
        assert {a for a, keep in zip(every, split.tolist()) if keep} == set(
            torch.nonzero(full.gt_index == g).flatten().tolist())


@pytest.mark.parametrize("seed", range(12))
def test_paa_split_matches_scikit_learns_gmm(seed):
    skm = pytest.importorskip("sklearn.mixture")
    g = torch.Generator().manual_seed(seed)
    n_low, n_high = int(torch.randint(1, 8, (1,), generator=g)), int(torch.randint(1, 10, (1,), generator=g))
    costs = torch.cat([torch.rand(n_low, generator=g) * 0.5, 1.0 + torch.rand(n_high, generator=g) * 2.0])
    costs = costs[torch.randperm(len(costs), generator=g)]
    ours = paa_split(costs)
    # PAA's code (mmdet PAAHead.paa_reassign + gmm_separation_scheme), with scikit-learn
    order = torch.argsort(costs)
    x = costs[order].double().numpy().reshape(-1, 1)
    gmm = skm.GaussianMixture(2, weights_init=np.array([0.5, 0.5]), means_init=np.array([[x.min()], [x.max()]]),
                              precisions_init=np.ones((2, 1)), covariance_type="diag")
    gmm.fit(x)
    fg = np.flatnonzero(gmm.predict(x) == 0)
    expected = torch.zeros(len(costs), dtype=torch.bool)
    if len(fg):
        peak = int(np.argmax(gmm.score_samples(x)[fg]))
        expected[order[torch.from_numpy(fg[: peak + 1])]] = True
    assert ours.tolist() == expected.tolist()
    assert ours.any()


def test_paa_split_edge_cases():
    assert paa_split(torch.tensor([])).tolist() == []
    assert paa_split(torch.tensor([3.0])).tolist() == [True]  # kdforge keeps a lone candidate (PAA would drop it)
    assert paa_split(torch.tensor([0.01, 5.0])).tolist() == [True, False]


# --------------------------------------------------------------------------- loss


def test_detection_loss_pinned_by_hand_on_both_assignments():
    logits, deltas = _teacher()
    lad = lad_assign(ANCHORS, LEVELS, logits, deltas, GT, GT_CLASSES)
    iou = iou_assign(ANCHORS, GT, GT_CLASSES, 2)
    # an untrained student: logits 0 (p = 1/2) and deltas 0 (its boxes are the anchors).
    # focal at p = 1/2: target 1 -> 0.25 * 0.25 * ln2, target 0 -> 0.75 * 0.25 * ln2
    pos_anchor, neg_anchor = (0.0625 + 0.1875) * LN2, 2 * 0.1875 * LN2
    zeros_cls, zeros_box = torch.zeros(1, 7, 2), torch.zeros(1, 7, 4)
    parts = detection_loss(zeros_cls, zeros_box, ANCHORS, [lad], [GT], return_parts=True)
    # LAD: positives a2, a3 (N = 2), five negatives; boxes: 1 - GIoU(a2, GT0) = 2/3, a3 exact
    assert parts["num_pos"].item() == 2
    assert parts["cls"].item() == pytest.approx((2 * pos_anchor + 5 * neg_anchor) / 2, rel=1e-6)
    assert parts["cls"].item() == pytest.approx(1.1875 * LN2, rel=1e-6)
    assert parts["box"].item() == pytest.approx((2 / 3) / 2, rel=1e-6)
    assert parts["total"].item() == pytest.approx(1.1875 * LN2 + 1.3 / 3, rel=1e-6)
    # IoU: positives a0, a1, a3, a4 (N = 4), three negatives; boxes 0, 0.4, 0, 0.4
    parts = detection_loss(zeros_cls, zeros_box, ANCHORS, [iou], [GT], return_parts=True)
    assert parts["cls"].item() == pytest.approx((4 * pos_anchor + 3 * neg_anchor) / 4, rel=1e-6)
    assert parts["box"].item() == pytest.approx(0.8 / 4, rel=1e-6)
    assert parts["total"].item() == pytest.approx(0.53125 * LN2 + 1.3 * 0.2, rel=1e-6)


def test_detection_loss_ignored_anchors_l1_boxes_batches_and_gradients():
    ign = iou_assign(ANCHORS, GT, GT_CLASSES, 2, pos_iou=0.7, neg_iou=0.3)  # a1, a2, a4, a5 ignored
    cls = torch.zeros(2, 7, 2, requires_grad=True)
    box = torch.zeros(2, 7, 4, requires_grad=True)
    lad = lad_assign(ANCHORS, LEVELS, *_teacher(), GT, GT_CLASSES)
    parts = detection_loss(cls, box, ANCHORS, [ign, lad], [GT, GT], box_loss="l1", return_parts=True)
    # image 0: 2 positives + 1 negative counted; image 1: 2 positives + 5 negatives; N = 4
    pos_anchor, neg_anchor = 0.25 * LN2, 0.375 * LN2
    assert parts["cls"].item() == pytest.approx((4 * pos_anchor + 6 * neg_anchor) / 4, rel=1e-6)
    # L1 of zero deltas against the encoded targets: a0 and a3 exact (0); a2 -> GT0 centre shift -4 px of 8 -> 5.0
    assert parts["box"].item() == pytest.approx(5.0 / 4, rel=1e-5)
    parts["total"].backward()
    assert cls.grad[0, 1].abs().sum() == 0  # an ignored anchor gets no gradient
    assert cls.grad[1, 2].abs().sum() > 0 and box.grad[1, 2].abs().sum() > 0 and box.grad[1, 0].abs().sum() == 0
    nothing = Assignment(torch.full((7,), 2), torch.full((7,), -1), 2)
    zero_box = detection_loss(cls, box, ANCHORS, [nothing, nothing], [GT[:0], GT[:0]], return_parts=True)
    assert zero_box["num_pos"].item() == 0 and zero_box["box"].item() == 0.0


def test_bad_input_is_refused_in_one_line():
    logits, deltas = _teacher()
    cases = [
        (lambda: iou_assign(ANCHORS, GT, torch.tensor([0, 10]), 10),
         "class id 10 is outside the head's 0..9"),
        (lambda: iou_assign(ANCHORS, GT, torch.tensor([0]), 2), "2 ground-truth boxes but class ids of shape"),
        (lambda: iou_assign(ANCHORS, GT[:, :3], GT_CLASSES, 2), r"must be \[n, 4\] xyxy"),
        (lambda: lad_assign(ANCHORS, LEVELS, logits[:5], deltas, GT, GT_CLASSES),
         "teacher class logits cover 5 anchors but there are 7 anchors"),
        (lambda: lad_assign(ANCHORS, LEVELS, logits, deltas, GT, torch.tensor([0, 2])),
         "class id 2 is outside the head's 0..1"),
        (lambda: detection_loss(torch.zeros(1, 6, 2), torch.zeros(1, 6, 4), ANCHORS, [], []),
         r"expected class logits \[B, A, K\]"),
        (lambda: detection_loss(torch.zeros(1, 7, 2), torch.zeros(1, 7, 4), ANCHORS, [], []),
         "1 images but 0 assignments"),
        (lambda: make_anchors(32, strides=(4, 8), sizes=(8.0,)), "one size per stride"),
    ]
    for fn, message in cases:
        with pytest.raises(KDForgeError, match=message) as e:
            fn()
        assert "\n" not in str(e.value)
