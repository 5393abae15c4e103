"""Logit-distillation losses checked against plain-Python float64 references and KL identities."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdforge.losses.logits import (
    LABEL_LOSSES,
    LOGIT_LOSSES,
    correlation_aware_kd,
    cross_entropy,
    decoupled_kd,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from kdforge.losses.sparse import SparseLogits, aligned_log_probs, densify_teacher

B, L, V = 2, 3, 5
POINTWISE = ["forward_kl", "reverse_kl", "generalized_jsd", "skew_forward_kl", "skew_reverse_kl", "total_variation"]
ALL = POINTWISE + ["decoupled_kd", "correlation_aware_kd"]
# non-default knobs so the references have to get them right too
KWARGS = {
    "generalized_jsd": {"beta": 0.3},
    "skew_forward_kl": {"alpha": 0.2},
    "skew_reverse_kl": {"alpha": 0.25},
    "decoupled_kd": {"alpha": 0.7, "beta": 2.0, "warmup": 0.5},
    "correlation_aware_kd": {"strong_k": 2, "w_binary": 0.5, "w_strong": 2.0, "w_weak": 3.0},
}



# --------------------------------------------------------------------------- plain-Python references


def ref_softmax(z, T=1.0):
    z = [x / T for x in z]
    m = max(z)
    e = [0.0 if x == -math.inf else math.exp(x - m) for x in z]
    total = sum(e)
    return [x / total for x in e]


def ref_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def ref_zscore(z):
    n = len(z)
    mean = sum(z) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in z) / (n - 1))
    return [(x - mean) / (std + 1e-7) for x in z]


def ref_pointwise(name, ps, pt, beta=0.5, alpha=0.1):
    """Divergence between student probs ps and teacher probs pt (lists), without T²."""
    if name == "forward_kl":
        return ref_kl(pt, ps)
    if name == "reverse_kl":
        return ref_kl(ps, pt)
    if name == "generalized_jsd":
        if beta == 0:
            return ref_kl(pt, ps)
        if beta == 1:
            return ref_kl(ps, pt)
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
        return beta * ref_kl(pt, m) + (1 - beta) * ref_kl(ps, m)
    if name == "skew_forward_kl":
        return ref_kl(pt, [alpha * a + (1 - alpha) * b for a, b in zip(pt, ps)])
    if name == "skew_reverse_kl":
        return ref_kl(ps, [alpha * b + (1 - alpha) * a for a, b in zip(pt, ps)])
    if name == "total_variation":
        return 0.5 * sum(abs(a - b) for a, b in zip(pt, ps))
    raise KeyError(name)


def ref_dkd(ps, pt, y, alpha=1.0, beta=8.0, warmup=1.0):
    tckd = ref_kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
    others = [i for i in range(len(ps)) if i != y]
    nckd = ref_kl([pt[i] / (1 - pt[y]) for i in others], [ps[i] / (1 - ps[y]) for i in others])
    return warmup * (alpha * tckd + beta * nckd)


def ref_cakd(ps, pt, strong_k=10, w_binary=1.0, w_strong=1.0, w_weak=1.0):
    order = sorted(range(len(pt)), key=lambda i: -pt[i])
    strong, weak = order[:strong_k], order[strong_k:]
    t_s, s_s = sum(pt[i] for i in strong), sum(ps[i] for i in strong)
    bcd = ref_kl([t_s, 1 - t_s], [s_s, 1 - s_s])
    scd = ref_kl([pt[i] / t_s for i in strong], [ps[i] / s_s for i in strong])
    wcd = ref_kl([pt[i] / (1 - t_s) for i in weak], [ps[i] / (1 - s_s) for i in weak]) if weak else 0.0
    return w_binary * bcd + w_strong * t_s * scd + w_weak * (1 - t_s) * wcd


def ref_any(name, ps, pt, label=None, **kw):
    if name == "decoupled_kd":
        return ref_dkd(ps, pt, label, **kw)
    if name == "correlation_aware_kd":
        return ref_cakd(ps, pt, **kw)
    return ref_pointwise(name, ps, pt, **kw)


def ref_reduce(values, valid, reduction):
    """values, valid: nested [B][L] lists."""
    if reduction == "none":
        return torch.tensor(values, dtype=torch.float64)
    total = sum(v for row_v, row_ok in zip(values, valid) for v, ok in zip(row_v, row_ok) if ok)
    if reduction == "sum":
        return torch.tensor(total, dtype=torch.float64)
    n = sum(ok for row in valid for ok in row)
    return torch.tensor(total / n if n else 0.0, dtype=torch.float64)


def ref_loss(name, zs, zt, valid, T, reduction, standardize=False, labels=None, **kw):
    values = []
    for b in range(zs.shape[0]):
        row = []
        for t in range(zs.shape[1]):
            if not valid[b][t]:
                row.append(0.0)
                continue
            s, tt = zs[b, t].tolist(), zt[b, t].tolist()
            if standardize:
                s, tt = ref_zscore(s), ref_zscore(tt)
            label = None if labels is None else int(labels[b, t])
            row.append(ref_any(name, ref_softmax(s, T), ref_softmax(tt, T), label, **kw) * T * T)
        values.append(row)
    return ref_reduce(values, valid, reduction)


# --------------------------------------------------------------------------- fixtures


def make_data(seed=0, scale=2.0, shape=(B, L, V), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(*shape, generator=g, dtype=dtype) * scale
    zt = torch.randn(*shape, generator=g, dtype=dtype) * scale
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return zs, zt, labels


MASK = torch.tensor([[True, True, False], [True, False, True]])


def call(name, zs, zt, labels=None, **kw):
    fn = LOGIT_LOSSES[name]
    extra = dict(KWARGS.get(name, {}))
    if name == "decoupled_kd":
        extra["labels"] = labels
    extra.update(kw)
    return fn(zs, zt, **extra)


def make_sparse(zt, k, T, seed=0, with_lse=True):
    """Top-k of a dense teacher in a shuffled order, built without SparseLogits.from_dense."""
    g = torch.Generator().manual_seed(seed)
    top = zt.argsort(dim=-1, descending=True)[..., :k]
    perm = torch.rand(top.shape, generator=g).argsort(dim=-1)
    ids = torch.gather(top, -1, perm)
    lse = torch.logsumexp(zt / T, dim=-1) if with_lse else None
    return SparseLogits(ids=ids.to(torch.int32), logits=torch.gather(zt, -1, ids), logsumexp=lse, lse_temperature=T)


# --------------------------------------------------------------------------- against the references


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("name", ALL)
def test_matches_reference(name, T, standardize):
    zs, zt, labels = make_data(seed=1)
    valid = MASK.tolist()
    for reduction in ("mean", "sum", "none"):
        got = call(name, zs, zt, labels, mask=MASK, temperature=T, reduction=reduction, standardize=standardize)
        want = ref_loss(name, zs, zt, valid, T, reduction, standardize, labels, **KWARGS.get(name, {}))
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_decoupled_kd_ignore_index_drops_positions():
    zs, zt, labels = make_data(seed=2)
    labels[0, 1] = -100
    valid = [[True, False, False], [True, False, True]]
    got = decoupled_kd(zs, zt, labels=labels, mask=MASK, temperature=2.0, reduction="mean")
    torch.testing.assert_close(got, ref_loss("decoupled_kd", zs, zt, valid, 2.0, "mean", labels=labels))


def test_cross_entropy_matches_reference_and_torch():
    zs, _, labels = make_data(seed=3)
    labels[1, 2] = -100
    valid = [[True, True, False], [True, False, False]]
    want = [[-math.log(ref_softmax(zs[b, t].tolist())[labels[b, t]]) if valid[b][t] else 0.0 for t in range(L)]
            for b in range(B)]
    for reduction in ("mean", "sum", "none"):
        got = cross_entropy(zs, labels, mask=MASK, reduction=reduction)
        torch.testing.assert_close(got, ref_reduce(want, valid, reduction))
    # without a mask it is torch's mean-over-non-ignored cross-entropy
    torch.testing.assert_close(cross_entropy(zs, labels), F.cross_entropy(zs.reshape(-1, V), labels.reshape(-1)))


def test_registries():
    assert set(LOGIT_LOSSES) == set(ALL) | {"logit_mse"}  # logit_mse: tests/test_semiparametric.py
    assert LABEL_LOSSES == {"cross_entropy": cross_entropy}


# --------------------------------------------------------------------------- identities


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_zero_when_student_equals_teacher(name, standardize):
    zs, _, labels = make_data(seed=4, dtype=torch.float32)
    for T in (0.5, 1.0, 3.0):
        loss = call(name, zs, zs.clone(), labels, temperature=T, standardize=standardize, reduction="none")
        assert loss.abs().max() < 1e-6


def test_divergences_are_nonnegative():
    zs, zt, labels = make_data(seed=5, shape=(64, 4, 7), dtype=torch.float64)
    for name in ALL:
        assert call(name, zs, zt, labels, temperature=1.5, reduction="none").min() >= -1e-12, name
    assert forward_kl(zs, zt, reduction="none").min() > 0


@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
def test_dkd_decomposes_classic_kd(T):
    zs, zt, labels = make_data(seed=6, shape=(4, 6, 9))
    parts = decoupled_kd(zs, zt, labels=labels, alpha=1.0, beta=1.0, temperature=T, reduction="none", return_parts=True)
    kd = forward_kl(zs, zt, temperature=T, reduction="none")
    torch.testing.assert_close(kd, parts["tckd"] + (1 - parts["teacher_target_prob"]) * parts["nckd"])
    # and the weighted loss is exactly warmup·(alpha·TCKD + beta·NCKD)
    weighted = decoupled_kd(zs, zt, labels=labels, alpha=0.3, beta=5.0, warmup=0.25, temperature=T, reduction="none")
    torch.testing.assert_close(weighted, 0.25 * (0.3 * parts["tckd"] + 5.0 * parts["nckd"]))


@pytest.mark.parametrize("strong_k", [1, 2, 5, 9, 50])
def test_cakd_unit_weights_is_forward_kl(strong_k):
    zs, zt, _ = make_data(seed=7, shape=(4, 6, 9))
    for T in (0.5, 2.0):
        cakd = correlation_aware_kd(zs, zt, strong_k=strong_k, temperature=T, reduction="none")
        torch.testing.assert_close(cakd, forward_kl(zs, zt, temperature=T, reduction="none"))


def test_cakd_parts_and_unscaled_weights():
    zs, zt, _ = make_data(seed=8, shape=(4, 6, 9))
    parts = correlation_aware_kd(zs, zt, strong_k=3, temperature=2.0, reduction="none", return_parts=True)
    mass = parts["teacher_strong_mass"]
    torch.testing.assert_close(parts["loss"], parts["bcd"] + mass * parts["scd"] + (1 - mass) * parts["wcd"])
    unscaled = correlation_aware_kd(
        zs, zt, strong_k=3, temperature=2.0, reduction="none",
        scale_by_teacher_mass=False, w_binary=0.5, w_strong=2.0, w_weak=4.0,
    )
    torch.testing.assert_close(unscaled, 0.5 * parts["bcd"] + 2.0 * parts["scd"] + 4.0 * parts["wcd"])
    assert (mass > 0).all() and (mass < 1).all()


def test_jsd_endpoints_are_trl_special_cases_and_limits_are_scaled():
    zs, zt, _ = make_data(seed=9)
    fkl = forward_kl(zs, zt, reduction="none", temperature=2.0)
    rkl = reverse_kl(zs, zt, reduction="none", temperature=2.0)
    torch.testing.assert_close(generalized_jsd(zs, zt, beta=0.0, reduction="none", temperature=2.0), fkl)
    torch.testing.assert_close(generalized_jsd(zs, zt, beta=1.0, reduction="none", temperature=2.0), rkl)
    # the endpoints are a jump: near them the mixture form vanishes, and it is JSD/beta that tends to KL
    eps = 1e-6
    near0 = generalized_jsd(zs, zt, beta=eps, reduction="none", temperature=2.0)
    near1 = generalized_jsd(zs, zt, beta=1 - eps, reduction="none", temperature=2.0)
    assert near0.max() < 1e-4 and near1.max() < 1e-4
    torch.testing.assert_close(near0 / eps, fkl, rtol=1e-4, atol=0)
    torch.testing.assert_close(near1 / eps, rkl, rtol=1e-4, atol=0)
    # beta = 0.5 is the classic Jensen-Shannon divergence, bounded by log 2 (times T²)
    assert generalized_jsd(zs, zt, beta=0.5, reduction="none").max() <= math.log(2)


def test_skew_alpha_endpoints():
    zs, zt, _ = make_data(seed=10)
    for T in (1.0, 3.0):
        kw = dict(temperature=T, reduction="none")
        torch.testing.assert_close(skew_forward_kl(zs, zt, alpha=0.0, **kw), forward_kl(zs, zt, **kw))
        torch.testing.assert_close(skew_reverse_kl(zs, zt, alpha=0.0, **kw), reverse_kl(zs, zt, **kw))
        assert skew_forward_kl(zs, zt, alpha=1.0, **kw).abs().max() == 0
        assert (skew_forward_kl(zs, zt, alpha=0.5, **kw) < forward_kl(zs, zt, **kw)).all()


def test_temperature_squared_scaling_is_visible():
    zs, zt, _ = make_data(seed=11)
    T = 3.0
    plain_kl = F.kl_div(F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(forward_kl(zs, zt, temperature=T, reduction="none"), T * T * plain_kl)
    tv = 0.5 * (F.softmax(zs / T, -1) - F.softmax(zt / T, -1)).abs().sum(-1)
    torch.testing.assert_close(total_variation(zs, zt, temperature=T, reduction="none"), T * T * tv)


# --------------------------------------------------------------------------- reductions and masking


@pytest.mark.parametrize("name", ALL)
def test_mean_divides_by_valid_positions_and_ignores_padding(name):
    zs, zt, labels = make_data(seed=12)
    n_valid = int(MASK.sum())
    total = call(name, zs, zt, labels, mask=MASK, reduction="sum", temperature=2.0)
    mean = call(name, zs, zt, labels, mask=MASK, reduction="mean", temperature=2.0)
    torch.testing.assert_close(mean, total / n_valid)
    assert not torch.isclose(mean, total / MASK.numel())
    # garbage in the padding changes nothing
    dirty_s, dirty_t = zs.clone(), zt.clone()
    dirty_s[~MASK] = float("nan")
    dirty_t[~MASK] = float("inf")
    torch.testing.assert_close(call(name, dirty_s, dirty_t, labels, mask=MASK, temperature=2.0), mean)
    none = call(name, dirty_s, dirty_t, labels, mask=MASK, temperature=2.0, reduction="none")
    assert none.shape == MASK.shape and (none[~MASK] == 0).all()


@pytest.mark.parametrize("name", ALL)
def test_empty_mask_gives_zero_without_nan(name):
    zs, zt, labels = make_data(seed=13)
    zs.requires_grad_(True)
    empty = torch.zeros(B, L, dtype=torch.bool)
    loss = call(name, zs, zt, labels, mask=empty)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(zs.grad, torch.zeros_like(zs))


# --------------------------------------------------------------------------- gradients


def _garbage_inputs(seed):
    zs, zt, labels = make_data(seed=seed)
    zs[..., 2] = -math.inf  # a vocabulary slot both models rule out
    zt[..., 2] = -math.inf
    labels[labels == 2] = 0
    zs[~MASK] = float("nan")
    zs[0, 2, 0] = math.inf
    zt[~MASK] = float("inf")
    return zs, zt, labels


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_gradients_finite_with_neg_inf_slots_and_garbage_padding(name, standardize):
    zs, zt, labels = _garbage_inputs(seed=14)
    zs.requires_grad_(True)
    loss = call(name, zs, zt, labels, mask=MASK, temperature=2.0, standardize=standardize)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(zs.grad).all()
    assert (zs.grad[~MASK] == 0).all() and (zs.grad[..., 2] == 0).all()
    assert zs.grad[MASK].abs().sum() > 0


@pytest.mark.parametrize("missing_mass", ["bucket", "renormalize"])
@pytest.mark.parametrize("name", ALL)
def test_gradients_finite_with_sparse_teacher_and_garbage_padding(name, missing_mass):
    zs, zt, labels = make_data(seed=15)
    sparse = make_sparse(zt, k=3, T=2.0)
    if not (name == "decoupled_kd" and missing_mass == "bucket"):  # that one densifies: see its docstring
        zs.scatter_(-1, zt.argmin(dim=-1, keepdim=True), -math.inf)  # a slot outside the teacher's top-k
    zs[~MASK] = float("nan")
    sparse.ids[~MASK] = 10**6  # out-of-range ids, NaN logits and logsumexp in the padding
    sparse.logits[~MASK] = float("nan")
    sparse.logsumexp[~MASK] = float("nan")
    zs.requires_grad_(True)
    loss = call(name, zs, sparse, labels, mask=MASK, temperature=2.0, missing_mass=missing_mass)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()
    assert (zs.grad[~MASK] == 0).all()


def test_garbage_at_ignored_labels_without_mask():
    zs, zt, labels = make_data(seed=16)
    labels[1, 1] = -100
    zs[1, 1] = float("nan")
    zs.requires_grad_(True)
    for loss in (decoupled_kd(zs, zt, labels=labels), cross_entropy(zs, labels)):
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()


# --------------------------------------------------------------------------- standardization


@pytest.mark.parametrize("name", ALL)
def test_standardize_is_invariant_to_shift_and_positive_scale(name):
    zs, zt, labels = make_data(seed=17, shape=(3, 4, 8))
    g = torch.Generator().manual_seed(0)

    def affine(z):
        scale = torch.rand(*z.shape[:-1], 1, generator=g, dtype=z.dtype) * 5 + 0.2
        shift = torch.randn(*z.shape[:-1], 1, generator=g, dtype=z.dtype) * 10
        return z * scale + shift

    zs2, zt2 = affine(zs), affine(zt)
    for T in (1.0, 2.0):
        base = call(name, zs, zt, labels, standardize=True, temperature=T, reduction="none")
        moved = call(name, zs2, zt2, labels, standardize=True, temperature=T, reduction="none")
        torch.testing.assert_close(moved, base, rtol=1e-5, atol=1e-7)
        raw = call(name, zs2, zt2, labels, standardize=False, temperature=T, reduction="none")
        assert (raw - call(name, zs, zt, labels, temperature=T, reduction="none")).abs().max() > 1e-3


def test_standardize_refuses_sparse_teacher():
    zs, zt, _ = make_data(seed=18)
    with pytest.raises(ValueError, match="standardize=True needs the full teacher logits"):
        forward_kl(zs, make_sparse(zt, 3, 1.0), standardize=True)


# --------------------------------------------------------------------------- sparse teachers


@pytest.mark.parametrize("missing_mass", ["bucket", "renormalize", "uniform"])
@pytest.mark.parametrize("name", ALL)
def test_sparse_with_all_ids_equals_dense(name, missing_mass):
    zs, zt, labels = make_data(seed=19)
    for T in (0.5, 2.0):
        sparse = make_sparse(zt, k=V, T=T, seed=3)
        got = call(name, zs, sparse, labels, mask=MASK, temperature=T, missing_mass=missing_mass, reduction="none")
        want = call(name, zs, zt, labels, mask=MASK, temperature=T, reduction="none")
        torch.testing.assert_close(got, want)


def _bucket_refs(zs, zt, sparse, T):
    """Per-position (student, teacher) probabilities coarsened to top-k ids + one bucket."""
    out = []
    for b in range(B):
        for t in range(L):
            ps, pt = ref_softmax(zs[b, t].tolist(), T), ref_softmax(zt[b, t].tolist(), T)
            ids = sparse.ids[b, t].tolist()
            cs, ct = [ps[i] for i in ids], [pt[i] for i in ids]
            out.append(((b, t), cs + [1 - sum(cs)], ct + [1 - sum(ct)]))
    return out


@pytest.mark.parametrize("name", POINTWISE)
def test_sparse_bucket_is_the_coarsened_divergence(name):
    zs, zt, _ = make_data(seed=20)
    kw = KWARGS.get(name, {})
    for T in (0.7, 2.0):
        sparse = make_sparse(zt, k=2, T=T, seed=5)
        got = call(name, zs, sparse, temperature=T, reduction="none")
        dense = call(name, zs, zt, temperature=T, reduction="none")
        for (b, t), cs, ct in _bucket_refs(zs, zt, sparse, T):
            assert got[b, t].item() == pytest.approx(ref_pointwise(name, cs, ct, **kw) * T * T, rel=1e-9, abs=1e-12)
        assert (got <= dense + 1e-12).all()  # data-processing inequality
        assert (got < dense).any()


@pytest.mark.parametrize("name", POINTWISE)
def test_sparse_renormalize_matches_reference(name):
    zs, zt, _ = make_data(seed=21)
    kw = KWARGS.get(name, {})
    T = 1.5
    sparse = make_sparse(zt, k=3, T=T, seed=6, with_lse=False)  # renormalize needs no logsumexp
    got = call(name, zs, sparse, temperature=T, reduction="none", missing_mass="renormalize")
    for b in range(B):
        for t in range(L):
            ids = sparse.ids[b, t].tolist()
            ps = ref_softmax([zs[b, t, i].item() for i in ids], T)
            pt = ref_softmax([zt[b, t, i].item() for i in ids], T)
            assert got[b, t].item() == pytest.approx(ref_pointwise(name, ps, pt, **kw) * T * T, rel=1e-9, abs=1e-12)


def _uniform_densified(zt, sparse, T):
    """Teacher probabilities: exact at the cached ids, the remaining mass spread evenly."""
    dense = torch.empty_like(zt)
    for b in range(B):
        for t in range(L):
            pt = ref_softmax(zt[b, t].tolist(), T)
            ids = sparse.ids[b, t].tolist()
            rest = (1 - sum(pt[i] for i in ids)) / (V - len(ids))
            for i in range(V):
                dense[b, t, i] = pt[i] if i in ids else rest
    return dense


@pytest.mark.parametrize("name", ALL)
def test_sparse_uniform_is_dense_loss_on_densified_teacher(name):
    zs, zt, labels = make_data(seed=22)
    T = 2.0
    sparse = make_sparse(zt, k=2, T=T, seed=7)
    q = _uniform_densified(zt, sparse, T)
    got = call(name, zs, sparse, labels, mask=MASK, temperature=T, missing_mass="uniform", reduction="none")
    # same as the dense loss on a teacher whose tempered softmax is q ...
    torch.testing.assert_close(got, call(name, zs, T * q.log(), labels, mask=MASK, temperature=T, reduction="none"))
    torch.testing.assert_close(densify_teacher(sparse, V, temperature=T), q.log())
    # ... and as the plain-Python reference on q
    for b in range(B):
        for t in range(L):
            if MASK[b, t]:
                ps = ref_softmax(zs[b, t].tolist(), T)
                want = ref_any(name, ps, q[b, t].tolist(), int(labels[b, t]), **KWARGS.get(name, {})) * T * T
                assert got[b, t].item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_dkd_sparse_rules():
    """DKD densifies: bucket behaves as uniform; renormalize gives the tail zero mass."""
    zs, zt, labels = make_data(seed=23)
    T = 2.0
    sparse = make_sparse(zt, k=3, T=T, seed=8)
    kw = dict(labels=labels, mask=MASK, temperature=T, reduction="none")
    bucket = decoupled_kd(zs, sparse, missing_mass="bucket", **kw)
    torch.testing.assert_close(bucket, decoupled_kd(zs, sparse, missing_mass="uniform", **kw))
    zero_tail = torch.full_like(zt, -math.inf).scatter(-1, sparse.ids.long(), sparse.logits)
    renorm = decoupled_kd(zs, sparse, missing_mass="renormalize", **kw)
    torch.testing.assert_close(renorm, decoupled_kd(zs, zero_tail, **kw))
    assert torch.isfinite(renorm).all() and (renorm[MASK] > 0).all()


@pytest.mark.parametrize("missing_mass", ["bucket", "renormalize", "uniform"])
def test_cakd_sparse_recombines_to_forward_kl_of_the_same_policy(missing_mass):
    zs, zt, _ = make_data(seed=27, shape=(3, 4, 12))
    T = 1.5
    sparse = make_sparse(zt, k=4, T=T, seed=9)
    kw = dict(temperature=T, reduction="none", missing_mass=missing_mass)
    fkl = forward_kl(zs, sparse, **kw)
    for strong_k in (1, 3, 4, 20):
        torch.testing.assert_close(correlation_aware_kd(zs, sparse, strong_k=strong_k, **kw), fkl)
    if missing_mass == "bucket":  # the bucket is never strong: with strong_k = k the strong group is the k ids
        parts = correlation_aware_kd(zs, sparse, strong_k=4, return_parts=True, **kw)
        top_mass = torch.exp(torch.logsumexp(sparse.logits / T, -1) - sparse.logsumexp)
        torch.testing.assert_close(parts["teacher_strong_mass"], top_mass)


def test_sparse_policy_errors():
    zs, zt, _ = make_data(seed=24)
    no_lse = make_sparse(zt, 3, 1.0, with_lse=False)
    for policy in ("bucket", "uniform"):
        with pytest.raises(ValueError, match='missing_mass="renormalize"'):
            forward_kl(zs, no_lse, missing_mass=policy)
    with pytest.raises(ValueError, match="temperature 1.0 but the loss uses 2.0"):
        forward_kl(zs, make_sparse(zt, 3, 1.0), temperature=2.0)
    with pytest.raises(ValueError, match="missing_mass must be one of"):
        forward_kl(zs, zt, missing_mass="drop")
    with pytest.raises(ValueError, match="reduction must be one of"):
        forward_kl(zs, zt, reduction="batchmean")


def test_from_dense_and_aligned_support_shapes():
    zs, zt, _ = make_data(seed=25)
    sparse = SparseLogits.from_dense(zt, 2, lse_temperature=1.0)
    assert sparse.k == 2
    policies = ("bucket", "renormalize", "uniform")
    shapes = {p: aligned_log_probs(zs, sparse, missing_mass=p)[0].shape[-1] for p in policies}
    assert shapes == {"bucket": 3, "renormalize": 2, "uniform": V}
    for log_p in aligned_log_probs(zs, sparse):  # both bucket distributions are normalised
        torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(B, L, dtype=torch.float64))
    torch.testing.assert_close(forward_kl(zs, sparse), forward_kl(zs, make_sparse(zt, 2, 1.0)))


@pytest.mark.parametrize("missing_mass", ["bucket", "renormalize", "uniform"])
def test_bf16_inputs(missing_mass):
    zs32, zt32, labels = make_data(seed=26, shape=(2, 3, 64), dtype=torch.float32)
    zs, zt = zs32.bfloat16(), zt32.bfloat16()
    lse = torch.logsumexp(zt.float() / 2.0, dim=-1)
    top, ids = zt.topk(8, dim=-1)
    sparse = SparseLogits(ids=ids, logits=top, logsumexp=lse, lse_temperature=2.0)
    sparse32 = SparseLogits(ids=ids, logits=top.float(), logsumexp=lse, lse_temperature=2.0)
    for name in ALL:
        student = zs.clone().requires_grad_(True)
        kw = dict(mask=MASK, temperature=2.0, missing_mass=missing_mass)
        loss = call(name, student, sparse, labels, **kw)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss), name
        assert student.grad.dtype == torch.bfloat16 and torch.isfinite(student.grad.float()).all()
        torch.testing.assert_close(loss, call(name, zs.float(), sparse32, labels, **kw))
        dense = call(name, zs, zt, labels, mask=MASK, temperature=2.0)
        assert dense.dtype == torch.float32 and torch.isfinite(dense)
