"""CAM losses (kdforge.losses.cam): CAT-KD, multi-label class-wise CAM KD and per-class binary KD, each pinned on a
small case computed by hand and by explicit loops, their identities, gradients and one-line refusals."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from kdforge.errors import KDForgeError
from kdforge.losses import registry
from kdforge.losses.cam import binary_kd, cat_kd, class_activation_maps, classwise_cam_kd


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- loop references (no torch maths)


def _pool(m, r):
    """Average-pool an H x W list-of-lists map into r x r equal blocks (H, W divisible by r)."""
    h, w = len(m), len(m[0])
    bh, bw = h // r, w // r
    return [[sum(m[i * bh + a][j * bw + b] for a in range(bh) for b in range(bw)) / (bh * bw) for j in range(r)]
            for i in range(r)]


def _unit(cells):
    n = math.sqrt(sum(c * c for c in cells))
    return [c / n for c in cells]


def _cat_reference(s, t, r, normalize, authors):
    """CAT-KD per the definition, loops only: s, t are [B][K][H][W] lists."""
    per_sample = []
    for sb, tb in zip(s, t):
        per_class = []
        for sk, tk in zip(sb, tb):
            ps = [c for row in _pool(sk, r) for c in row]
            pt = [c for row in _pool(tk, r) for c in row]
            if normalize:
                ps, pt = _unit(ps), _unit(pt)
            sq = sum((a - b) ** 2 for a, b in zip(ps, pt))
            per_class.append(sq / (r * r) if authors else sq)
        per_sample.append(sum(per_class) / len(per_class))
    return sum(per_sample) / len(per_sample)


def _bernoulli_kl(zt, zs, temp):
    p = 1 / (1 + math.exp(-zt / temp))
    q = 1 / (1 + math.exp(-zs / temp))
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


# --------------------------------------------------------------------------- class activation maps


def test_cams_average_to_the_gap_linear_logits():
    feats, fc = rand(2, 5, 3, 4, seed=1), torch.nn.Linear(5, 7)
    cams = class_activation_maps(feats, fc.weight)
    assert cams.shape == (2, 7, 3, 4)
    torch.testing.assert_close(cams.mean(dim=(2, 3)) + fc.bias, fc(feats.mean(dim=(2, 3))))
    for b, k, y, x in [(0, 0, 0, 0), (1, 6, 2, 3), (1, 3, 1, 2)]:  # one position by hand
        expected = sum(fc.weight[k, c].item() * feats[b, c, y, x].item() for c in range(5))
        assert cams[b, k, y, x].item() == pytest.approx(expected, rel=1e-5)
    conv_weight = fc.weight.detach().view(7, 5, 1, 1)  # the authors' converted 1x1 conv
    torch.testing.assert_close(class_activation_maps(feats, conv_weight), F.conv2d(feats, conv_weight))


def test_cams_refuse_a_channel_mismatch_naming_both():
    with pytest.raises(KDForgeError, match="expects 6 channels but the features have 5") as e:
        class_activation_maps(rand(1, 5, 2, 2), rand(3, 6))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- CAT-KD


def _cat_hand_case():
    # class 0: the teacher's 4x4 map averages to 1 in the top-left 2x2 block and 0 elsewhere -> unit [1, 0, 0, 0];
    # the student's averages to 1 in the top-right block only -> unit [0, 1, 0, 0]; squared distance 2.
    # class 1: teacher pools to all-1, student to all-2 -> both unit [.5, .5, .5, .5]; distance 0.
    zero_mean = [[1.0, -1.0], [-1.0, 1.0]]
    one_mean = [[2.0, 0.0], [0.0, 2.0]]

    def tile(blocks):  # 2x2 grid of 2x2 blocks -> 4x4
        return [[blocks[i // 2][j // 2][i % 2][j % 2] for j in range(4)] for i in range(4)]

    t0 = tile([[one_mean, zero_mean], [zero_mean, zero_mean]])
    s0 = tile([[zero_mean, one_mean], [zero_mean, zero_mean]])
    t1 = [[1.0] * 4 for _ in range(4)]
    s1 = [[2.0, 2.0, 3.0, 1.0], [2.0, 2.0, 1.0, 3.0], [0.0, 4.0, 2.0, 2.0], [4.0, 0.0, 2.0, 2.0]]
    return [[s0, s1]], [[t0, t1]]


def test_cat_kd_hand_case():
    s, t = _cat_hand_case()
    st, tt = torch.tensor(s), torch.tensor(t)
    # kdforge: (2 + 0) / 2 classes = 1; authors: also / (2*2 cells) = 0.25
    assert cat_kd(st, tt).item() == pytest.approx(1.0, abs=1e-6)
    assert cat_kd(st, tt, convention="authors").item() == pytest.approx(0.25, abs=1e-6)
    assert _cat_reference(s, t, 2, True, False) == pytest.approx(1.0)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("r", [1, 2, 4])
def test_cat_kd_matches_loops_on_random_maps(normalize, r):
    s, t = rand(3, 4, 8, 8, seed=2), rand(3, 4, 8, 8, seed=3) * 5
    for authors in (False, True):
        got = cat_kd(s, t, pool_size=r, normalize=normalize, convention="authors" if authors else "kdforge")
        assert got.item() == pytest.approx(_cat_reference(s.tolist(), t.tolist(), r, normalize, authors), rel=1e-5)


def test_cat_kd_authors_is_their_formula_and_the_factor_is_the_grid():
    # GzyAftermath/CAT-KD CAT_loss: adaptive_avg_pool2d to r x r, F.normalize over dims (2, 3), F.mse_loss
    s, t = rand(2, 10, 6, 6, seed=4), rand(2, 10, 6, 6, seed=5)
    for r, norm in [(2, True), (3, False), (4, True)]:
        ps, pt = F.adaptive_avg_pool2d(s, r), F.adaptive_avg_pool2d(t, r)
        if norm:
            ps, pt = F.normalize(ps, dim=(2, 3)), F.normalize(pt, dim=(2, 3))
        expected = F.mse_loss(ps, pt)
        au = cat_kd(s, t, pool_size=r, normalize=norm, convention="authors")
        assert au.item() == pytest.approx(expected.item(), rel=1e-5)
        kd = cat_kd(s, t, pool_size=r, normalize=norm, reduction="none")
        torch.testing.assert_close(kd, r * r * cat_kd(s, t, pool_size=r, normalize=norm, convention="authors",
                                                      reduction="none"))


def test_cat_kd_identities_zero_and_scale_invariance():
    t = rand(2, 5, 4, 4, seed=6)
    assert cat_kd(t.clone(), t).item() == pytest.approx(0.0, abs=1e-7)
    s = rand(2, 5, 4, 4, seed=7)
    base = cat_kd(s, t).item()
    scale = torch.rand(2, 5, 1, 1, generator=torch.Generator().manual_seed(8)) * 10 + 0.1  # per map, positive
    assert cat_kd(s * scale, t).item() == pytest.approx(base, rel=1e-5)
    assert cat_kd(s, t * 3.0).item() == pytest.approx(base, rel=1e-5)
    assert cat_kd(s * scale, t, normalize=False).item() != pytest.approx(cat_kd(s, t, normalize=False).item(), rel=1e-3)
    per = cat_kd(s, t, reduction="none")
    assert per.shape == (2,) and cat_kd(s, t, reduction="sum").item() == pytest.approx(per.sum().item(), rel=1e-6)
    assert per.max().item() <= 4.0  # unit maps: each class's squared distance lies in [0, 4]


def test_cat_kd_gradients_reach_the_student_only():
    s = rand(2, 3, 4, 4, seed=9).requires_grad_()
    t = rand(2, 3, 4, 4, seed=10).requires_grad_()
    cat_kd(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_cat_kd_through_a_classifier_weight():
    feats = rand(2, 6, 4, 4, seed=11).requires_grad_()
    fc = torch.nn.Linear(6, 3)
    t = rand(2, 3, 2, 2, seed=12)
    cat_kd(class_activation_maps(feats, fc.weight), t).backward()
    assert feats.grad.abs().sum() > 0 and fc.weight.grad.abs().sum() > 0


def test_cat_kd_pools_different_sizes_and_logs_it(caplog):
    s, t = rand(1, 3, 8, 8, seed=13), rand(1, 3, 4, 4, seed=14)
    with caplog.at_level(logging.INFO, logger="kdforge"):
        got = cat_kd(s, t, pool_size=2)
    assert "student maps 8x8 and teacher maps 4x4" in caplog.text and "adaptive-average-pooled to 2x2" in caplog.text
    assert got.item() == pytest.approx(_cat_reference(s.tolist(), t.tolist(), 2, True, False), rel=1e-5)


def test_cat_kd_refusals_are_one_line():
    cases = [
        (lambda: cat_kd(rand(2, 3, 4, 4), rand(2, 5, 4, 4)), "class counts differ, student 3 vs teacher 5"),
        (lambda: cat_kd(rand(2, 3, 4, 4), rand(3, 3, 4, 4)), "batch sizes differ, student 2 vs teacher 3"),
        (lambda: cat_kd(rand(2, 3, 16), rand(2, 3, 4, 4)), r"expected class activation maps \[B, K, H, W\]"),
        (lambda: cat_kd(rand(1, 3, 4, 4), rand(1, 3, 2, 2), pool_size=3), "pool_size must be an integer from 1 to 2"),
        (lambda: cat_kd(rand(1, 3, 4, 4), rand(1, 3, 4, 4), convention="paper"), "convention must be one of"),
        (lambda: cat_kd(rand(1, 3, 4, 4), rand(1, 3, 4, 4), reduction="avg"), "reduction must be one of"),
    ]
    for fn, message in cases:
        with pytest.raises(KDForgeError, match=message) as e:
            fn()
        assert "\n" not in str(e.value)


def test_cat_kd_is_a_registered_feature_loss_with_the_convention_keyword():
    kind, fn = registry.lookup("cat_kd")
    assert kind == "feature" and fn is cat_kd
    args = registry.keyword_arguments(fn)
    assert {"pool_size", "normalize", "convention"} <= set(args)
    registry.check_arguments("cat_kd", fn, {"convention": "authors", "pool_size": 4})
    assert registry.lookup("classwise_cam_kd") == ("feature", classwise_cam_kd)
    assert registry.lookup("binary_kd") == ("logit", binary_kd)


# --------------------------------------------------------------------------- class-wise CAM KD


def test_classwise_hand_case():
    # class 0: student [[1,0],[0,0]] vs teacher [[0,0],[0,3]]: orthogonal unit maps, distance 2.
    # class 1: student [[1,1],[0,0]] -> [1/sqrt2, 1/sqrt2, 0, 0] vs teacher [[1,0],[0,0]] -> [1, 0, 0, 0]:
    #          (1/sqrt2 - 1)^2 + 1/2 = 2 - sqrt2.
    s = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]]])
    t = torch.tensor([[[[0.0, 0.0], [0.0, 3.0]], [[1.0, 0.0], [0.0, 0.0]]]])
    r2 = math.sqrt(2.0)
    assert classwise_cam_kd(s, t).item() == pytest.approx((2 + 2 - r2) / 2, rel=1e-6)
    present = torch.tensor([[0, 1]])
    assert classwise_cam_kd(s, t, classes="present", labels=present).item() == pytest.approx(2 - r2, rel=1e-6)
    torch.testing.assert_close(classwise_cam_kd(s, t, reduction="none"), torch.tensor([[2.0, 2 - r2]]))


def test_classwise_is_two_minus_two_cosine_and_scale_invariant():
    s, t = rand(3, 4, 5, 5, seed=20), rand(3, 4, 5, 5, seed=21)
    cos = F.cosine_similarity(s.flatten(2), t.flatten(2), dim=2)
    torch.testing.assert_close(classwise_cam_kd(s, t, reduction="none"), 2 - 2 * cos, rtol=1e-5, atol=1e-6)
    assert classwise_cam_kd(t.clone(), t).item() == pytest.approx(0.0, abs=1e-7)
    scale = torch.rand(3, 4, 1, 1, generator=torch.Generator().manual_seed(22)) + 0.5
    assert classwise_cam_kd(s * scale, t / scale).item() == pytest.approx(classwise_cam_kd(s, t).item(), rel=1e-5)


def test_classwise_present_counts_only_labelled_maps():
    s, t = rand(3, 4, 5, 5, seed=23), rand(3, 4, 5, 5, seed=24)
    labels = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]])
    per = classwise_cam_kd(s, t, reduction="none")
    expected = (per[0, 0] + per[0, 3] + per[2, 1]) / 3  # the empty sample adds nothing
    got = classwise_cam_kd(s, t, classes="present", labels=labels)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    s2 = s.clone()
    s2[1] = 100.0 * torch.randn(4, 5, 5)  # an unlabelled sample's maps cannot change it
    assert classwise_cam_kd(s2, t, classes="present", labels=labels).item() == pytest.approx(got.item(), rel=1e-6)
    none = classwise_cam_kd(s, t, classes="present", labels=torch.zeros(3, 4))
    assert none.item() == 0.0


def test_classwise_gradients_reach_the_student_only():
    s = rand(2, 3, 4, 4, seed=25).requires_grad_()
    t = rand(2, 3, 4, 4, seed=26).requires_grad_()
    classwise_cam_kd(s, t, classes="present", labels=torch.tensor([[1, 0, 1], [0, 1, 0]])).backward()
    assert torch.isfinite(s.grad).all() and s.grad[0, 0].abs().sum() > 0 and t.grad is None
    assert s.grad[0, 1].abs().sum() == 0  # class 1 is absent in sample 0


def test_classwise_spatial_mismatch_refused_or_resized_with_the_mode_logged(caplog):
    s, t = rand(1, 2, 8, 8, seed=27), rand(1, 2, 4, 4, seed=28)
    with pytest.raises(KDForgeError, match=r"spatial sizes differ, student \(8, 8\) vs teacher \(4, 4\)") as e:
        classwise_cam_kd(s, t)
    assert "\n" not in str(e.value) and "resize='bilinear'" in str(e.value)
    with caplog.at_level(logging.INFO, logger="kdforge"):
        got = classwise_cam_kd(s, t, resize="area")
    assert "resized to the teacher's with mode 'area'" in caplog.text
    # area interpolation by 2 is the 2x2 block mean: the same as pooling the student to 4x4
    assert got.item() == pytest.approx(classwise_cam_kd(F.avg_pool2d(s, 2), t).item(), rel=1e-6)
    pooled = classwise_cam_kd(s, t, pool_size=2)
    assert pooled.item() == pytest.approx(
        classwise_cam_kd(F.adaptive_avg_pool2d(s, 2), F.adaptive_avg_pool2d(t, 2)).item(), rel=1e-6)


def test_classwise_refusals_are_one_line():
    x = rand(2, 3, 4, 4)
    cases = [
        (lambda: classwise_cam_kd(x, rand(2, 4, 4, 4)), "class counts differ, student 3 vs teacher 4"),
        (lambda: classwise_cam_kd(x, x, classes="present"), "classes='present' needs labels="),
        (lambda: classwise_cam_kd(x, x, classes="present", labels=torch.ones(2, 4)),
         r"labels shape \(2, 4\) does not match the maps' \[B, K\] = \(2, 3\)"),
        (lambda: classwise_cam_kd(x, x, classes="predicted"), "classes must be one of"),
        (lambda: classwise_cam_kd(x, x, resize="cubic"), "resize must be one of"),
    ]
    for fn, message in cases:
        with pytest.raises(KDForgeError, match=message) as e:
            fn()
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- binary KD


def test_binary_kd_hand_case():
    # teacher p = sigmoid([0, ln 3]) = [1/2, 3/4]; student q = [1/2, 1/2]:
    # class 0 contributes 0; class 1: 3/4 ln(3/2) + 1/4 ln(1/2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert expected == pytest.approx(0.1308120, abs=1e-7)
    zt = torch.tensor([[0.0, math.log(3.0)]])
    zs = torch.zeros(1, 2)
    assert binary_kd(zs, zt).item() == pytest.approx(expected, rel=1e-6)
    # at T = 2 the same probabilities come from doubled logits, and the T^2 factor multiplies by 4
    assert binary_kd(zs, 2 * zt, temperature=2.0).item() == pytest.approx(4 * expected, rel=1e-6)


def test_binary_kd_matches_loops_with_a_mask():
    zs, zt = rand(2, 3, 5, seed=30) * 3, rand(2, 3, 5, seed=31) * 3
    mask = torch.tensor([[True, False, True], [True, True, False]])
    for temp in (1.0, 3.0):
        rows = [(b, p) for b in range(2) for p in range(3) if mask[b, p]]
        per = {r: temp**2 * sum(_bernoulli_kl(zt[r][k].item(), zs[r][k].item(), temp) for k in range(5))
               for r in rows}
        got = binary_kd(zs, zt, mask=mask, temperature=temp)
        assert got.item() == pytest.approx(sum(per.values()) / len(rows), rel=1e-5)
        none = binary_kd(zs, zt, mask=mask, temperature=temp, reduction="none")
        assert none[0, 1].item() == 0.0 and none[1, 1].item() == pytest.approx(per[(1, 1)], rel=1e-5)


def test_binary_kd_identities_and_gradients():
    z = rand(4, 10, seed=32) * 20  # saturated logits stay finite
    assert binary_kd(z.clone(), z).item() == pytest.approx(0.0, abs=1e-6)
    zs = rand(4, 10, seed=33).requires_grad_()
    zt = rand(4, 10, seed=34).requires_grad_()
    value = binary_kd(zs, zt, temperature=2.0)
    assert value.item() > 0
    value.backward()
    assert torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0 and zt.grad is None
    # garbage at masked positions changes neither value nor gradient
    bad = zs.detach().clone()
    bad[0] = float("nan")
    bad.requires_grad_()
    m = torch.tensor([False, True, True, True])
    out = binary_kd(bad, zt, mask=m)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(bad.grad).all()


def test_binary_kd_refusals_are_one_line():
    cases = [
        (lambda: binary_kd(rand(2, 10), rand(2, 9)), r"student logits \(2, 10\) and teacher logits \(2, 9\) differ"),
        (lambda: binary_kd(rand(2, 10), rand(2, 10), temperature=0.0), "temperature must be > 0"),
        (lambda: binary_kd(rand(2, 10), rand(2, 10), mask=torch.ones(3, dtype=torch.bool)), "mask shape"),
        (lambda: binary_kd(rand(2, 10), object()), "needs the teacher's dense per-class logits"),
    ]
    for fn, message in cases:
        with pytest.raises(KDForgeError, match=message) as e:
            fn()
        assert "\n" not in str(e.value)
