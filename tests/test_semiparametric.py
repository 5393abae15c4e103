"""Semiparametric KD (Dao et al., ICLR 2021): corrected logit losses and cross-fitted teachers.

References are plain-Python loops over a few small tensors; the identities are exact sums over the classes.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdforge.crossfit import crossfit_teacher_logits, stratified_folds, teacher_log_probs
from kdforge.errors import KDForgeError
from kdforge.losses import registry
from kdforge.losses.chunked import chunked_logit_loss
from kdforge.losses.logits import LOGIT_LOSSES, MSE_CORRECTIONS, forward_kl, logit_mse
from kdforge.losses.sparse import SparseLogits

N, C = 6, 4
MASK = torch.tensor([True, True, False, True, True, True])


def data(seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(N, C, generator=g, dtype=torch.float64) * scale
    zt = torch.randn(N, C, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, C, (N,), generator=g)
    return zs, zt, y


# --------------------------------------------------------------------------- plain-Python references


def softmax(z, T=1.0):
    m = max(x / T for x in z)
    e = [math.exp(x / T - m) for x in z]
    return [x / sum(e) for x in e]


def teacher_probs(zt, smoothing):
    return [(1 - smoothing) * p + smoothing / len(zt) for p in softmax(zt)]


def ref_orthogonal_kl(zs, zt, label, T, eps, smoothing):
    w, q = softmax(zt, T), softmax(zs, T)
    p = teacher_probs(zt, smoothing)
    r = [(1.0 if j == label else 0.0) / max(p[j], eps) - 1 for j in range(len(zt))]
    kl = sum(wj * math.log(wj / qj) for wj, qj in zip(w, q))
    rw = sum(rj * wj for rj, wj in zip(r, w))
    wlq = sum(wj * math.log(qj) for wj, qj in zip(w, q))
    rwlq = sum(rj * wj * math.log(qj) for rj, wj, qj in zip(r, w, q))
    return (kl + (rw * wlq - rwlq) / T) * T * T


def ref_logit_mse(zs, zt, label, correction, eps, smoothing):
    p = teacher_probs(zt, smoothing)
    y = [1.0 if j == label else 0.0 for j in range(len(zt))]
    delta = {
        None: [0.0] * len(zt),
        "orthogonal": [yj / max(pj, eps) - 1 for yj, pj in zip(y, p)],
        "gamma_one": [yj - pj for yj, pj in zip(y, p)],
        "gamma_one_minus_p": [(1 - pj) * (yj - pj) for yj, pj in zip(y, p)],
    }[correction]
    return sum((s - t - d) ** 2 for s, t, d in zip(zs, zt, delta)) / len(zt)


def reduce(rows, valid, reduction):
    rows = torch.tensor([r if v else 0.0 for r, v in zip(rows, valid)], dtype=torch.float64)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / max(sum(valid), 1)


# --------------------------------------------------------------------------- against the references


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_orthogonal_kl_matches_direct_computation(T, smoothing):
    zs, zt, y = data(seed=1, scale=3.0)  # some p̂ below eps, so the clamp is exercised
    eps = 0.05
    assert float(torch.softmax(zt, -1).min()) < eps
    rows = [ref_orthogonal_kl(zs[i].tolist(), zt[i].tolist(), int(y[i]), T, eps, smoothing) for i in range(N)]
    for reduction in ("mean", "sum", "none"):
        got = forward_kl(zs, zt, labels=y, mask=MASK, temperature=T, reduction=reduction,
                         correction="orthogonal", eps=eps, smoothing=smoothing)
        torch.testing.assert_close(got, reduce(rows, MASK.tolist(), reduction), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("correction", [None, *MSE_CORRECTIONS])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_logit_mse_matches_direct_computation(correction, smoothing):
    zs, zt, y = data(seed=2, scale=3.0)
    rows = [ref_logit_mse(zs[i].tolist(), zt[i].tolist(), int(y[i]), correction, 0.02, smoothing) for i in range(N)]
    for reduction in ("mean", "sum", "none"):
        for T in (1.0, 3.0):  # T²·((z_s - target)/T)² does not depend on T
            got = logit_mse(zs, zt, labels=y, mask=MASK, temperature=T, reduction=reduction,
                            correction=correction, eps=0.02, smoothing=smoothing)
            torch.testing.assert_close(got, reduce(rows, MASK.tolist(), reduction), rtol=1e-10, atol=1e-12)


def test_logit_mse_mean_is_the_mean_over_all_entries_and_a_sparse_teacher_uses_its_ids():
    zs, zt, _ = data(seed=3)
    torch.testing.assert_close(logit_mse(zs, zt), torch.nn.functional.mse_loss(zs, zt))
    sparse = SparseLogits.from_dense(zt, 2)
    want = ((zs.gather(-1, sparse.ids.long()) - sparse.logits) ** 2).mean(-1).mean()
    torch.testing.assert_close(logit_mse(zs, sparse, missing_mass="renormalize"), want)


def test_without_a_correction_labels_are_ignored_and_defaults_unchanged():
    zs, zt, y = data(seed=4)
    y[0] = -100
    for fn in (forward_kl, logit_mse):
        torch.testing.assert_close(fn(zs, zt, labels=y, temperature=2.0), fn(zs, zt, temperature=2.0))
    torch.testing.assert_close(forward_kl(zs, zt, temperature=2.0, correction=None), forward_kl(zs, zt, temperature=2.0))


def test_ignore_index_drops_positions_of_a_corrected_loss():
    zs, zt, y = data(seed=5)
    y2 = y.clone()
    y2[1] = -100
    keep = MASK.clone()
    keep[1] = False
    for fn, corr in ((forward_kl, "orthogonal"), (logit_mse, "gamma_one")):
        torch.testing.assert_close(fn(zs, zt, labels=y2, mask=MASK, correction=corr),
                                   fn(zs, zt, labels=y, mask=keep, correction=corr))


# --------------------------------------------------------------------------- identities


def test_corrections_vanish_when_the_teacher_is_the_one_hot_label():
    zs, _, y = data(seed=6)
    one_hot = torch.nn.functional.one_hot(y, C).double()
    # forward_kl: teacher log-probs log(one-hot) (-inf off the label): w is one-hot, so r·w = 0 exactly
    zt = one_hot.log()
    for T in (1.0, 3.0):
        plain = forward_kl(zs, zt, temperature=T, reduction="none")
        torch.testing.assert_close(forward_kl(zs, zt, temperature=T, reduction="none", labels=y,
                                              correction="orthogonal"), plain, rtol=0, atol=0)
    # logit_mse γ-corrections: finite logits whose softmax is exactly one-hot in float64, so y - p̂ = 0
    zt = (one_hot - 1.0) * 800.0
    assert torch.equal(torch.softmax(zt, -1), one_hot)
    for corr in ("gamma_one", "gamma_one_minus_p"):
        torch.testing.assert_close(logit_mse(zs, zt, labels=y, correction=corr), logit_mse(zs, zt), rtol=0, atol=0)
    # the "orthogonal" residual y/p̂ - 1 is 0 on the label and -1 off it, for every p̂ (the authors' form)
    got = logit_mse(zs, zt, labels=y, correction="orthogonal", reduction="none")
    torch.testing.assert_close(got, ((zs - zt + (1 - one_hot)) ** 2).mean(-1))


def _expectation(fn, zs, zt, **kw):
    """Σ_c p̂_c · loss(y = c) per position, exactly (p̂ = softmax(zt), smoothed like the loss)."""
    p = (1 - kw.get("smoothing", 0.0)) * torch.softmax(zt, -1) + kw.get("smoothing", 0.0) / C
    total = 0
    for c in range(C):
        labels = torch.full((N,), c)
        total = total + p[:, c] * fn(zs, zt, labels=labels, reduction="none", **kw)
    return total


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_orthogonal_kl_correction_has_zero_expectation_under_the_teacher(smoothing):
    zs, zt, _ = data(seed=7, scale=0.8)
    assert float(torch.softmax(zt, -1).min()) >= 1e-2  # the clamp is inactive
    for T in (1.0, 4.0):
        expected = _expectation(forward_kl, zs, zt, temperature=T, correction="orthogonal", smoothing=smoothing)
        torch.testing.assert_close(expected, forward_kl(zs, zt, temperature=T, reduction="none"),
                                   rtol=1e-10, atol=1e-12)


def test_the_eps_clamp_biases_the_expectation_by_p_over_eps_minus_one():
    """E[r_j] = p̂_j / max(p̂_j, eps) - 1: where p̂ < eps the corrected loss's expectation moves by exactly that."""
    zs, zt, _ = data(seed=8, scale=3.0)
    eps = 0.2
    p = torch.softmax(zt, -1)
    assert bool((p < eps).any())
    mean_r = p / p.clamp_min(eps) - 1
    T = 2.0
    w, log_q = torch.softmax(zt / T, -1), torch.log_softmax(zs / T, -1)
    bias = ((mean_r * w).sum(-1) * (w * log_q).sum(-1) - (mean_r * w * log_q).sum(-1)) / T * T * T
    expected = _expectation(forward_kl, zs, zt, temperature=T, correction="orthogonal", eps=eps)
    torch.testing.assert_close(expected - forward_kl(zs, zt, temperature=T, reduction="none"), bias)


@pytest.mark.parametrize("correction", MSE_CORRECTIONS)
def test_logit_mse_corrections_have_zero_expectation_in_the_student_gradient(correction):
    """E_y[(z_s - t - δ)²] = (z_s - t)² + E[δ²] when E[δ] = 0: same student gradient, a constant apart."""
    zs, zt, _ = data(seed=9, scale=0.8)
    p = torch.softmax(zt, -1)
    assert float(p.min()) >= 1e-2
    zs.requires_grad_()
    expected = _expectation(logit_mse, zs, zt, correction=correction)
    plain = logit_mse(zs, zt, reduction="none")
    second = 0
    for c in range(C):
        y = torch.nn.functional.one_hot(torch.full((N,), c), C).double()
        delta = {"orthogonal": y / p - 1, "gamma_one": y - p, "gamma_one_minus_p": (1 - p) * (y - p)}[correction]
        second = second + p[:, c] * (delta ** 2).mean(-1)
    torch.testing.assert_close(expected, plain + second, rtol=1e-10, atol=1e-12)
    (g_exp,) = torch.autograd.grad(expected.sum(), zs)
    (g_plain,) = torch.autograd.grad(plain.sum(), zs)
    torch.testing.assert_close(g_exp, g_plain, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- bad input: one line each


def _one_line(call, match):
    with pytest.raises((ValueError, KDForgeError), match=match) as e:
        call()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fn", [forward_kl, logit_mse])
def test_bad_corrected_inputs_are_one_line_errors(fn):
    zs, zt, y = data()
    corr = "orthogonal"
    for eps in (0.0, 1.0, -0.1, 1.5):
        _one_line(lambda: fn(zs, zt, labels=y, correction=corr, eps=eps), r"eps must be in \(0, 1\)")
    _one_line(lambda: fn(zs, zt, labels=y, correction=corr, smoothing=1.5), r"smoothing must be in \[0, 1\]")
    _one_line(lambda: fn(zs, zt, correction=corr), "needs labels=")
    _one_line(lambda: fn(zs, zt, labels=y, correction="orthogonl"), "unknown correction 'orthogonl'; valid: ")
    _one_line(lambda: fn(zs, zt, labels=torch.full((N,), C), correction=corr), r"class ids in \[0, 4\)")
    _one_line(lambda: fn(zs, SparseLogits.from_dense(zt, 2), labels=y, correction=corr), "needs dense teacher")
    _one_line(lambda: fn(zs, zt, labels=y, correction=corr, standardize=True), "needs standardize=False")


def test_forward_kl_has_only_the_orthogonal_correction_and_other_losses_none():
    zs, zt, y = data()
    _one_line(lambda: forward_kl(zs, zt, labels=y, correction="gamma_one"), "valid: orthogonal")
    for name in ("reverse_kl", "generalized_jsd", "total_variation", "decoupled_kd"):
        _one_line(lambda: registry.check_arguments(name, LOGIT_LOSSES[name], {"correction": "orthogonal"}),
                  f"loss '{name}' has no argument 'correction'")


# --------------------------------------------------------------------------- reachable from recipes


def test_correction_is_a_recipe_argument_and_the_distiller_passes_labels():
    from kdforge.distiller import Distiller

    for name in ("forward_kl", "logit_mse"):
        args = registry.keyword_arguments(LOGIT_LOSSES[name])
        assert {"correction", "eps", "smoothing"} <= set(args) and "labels" not in args
    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(5, C), torch.nn.Linear(5, C)
    x, y = torch.randn(8, 5), torch.randint(0, C, (8,))
    objective = [{"loss": "forward_kl", "correction": "orthogonal", "temperature": 2.0, "eps": 0.05},
                 {"loss": "logit_mse", "correction": "gamma_one_minus_p"}]
    d = Distiller(teacher, student, objective)
    total, values = d({"inputs": x, "labels": y})
    with torch.no_grad():
        zs, zt = student(x), teacher(x)
        kl = forward_kl(zs, zt, labels=y, temperature=2.0, correction="orthogonal", eps=0.05)
        mse = logit_mse(zs, zt, labels=y, correction="gamma_one_minus_p")
    torch.testing.assert_close(values["forward_kl"], kl)
    torch.testing.assert_close(values["logit_mse"], mse)
    torch.testing.assert_close(total.detach(), kl + mse)


def test_chunked_corrected_loss_equals_the_direct_one_and_needs_labels():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    weight = torch.randn(C, 3, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 5, C, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (2, 5), generator=g)
    for name, corr in (("forward_kl", "orthogonal"), ("logit_mse", "gamma_one")):
        kw = {"correction": corr, "temperature": 2.0}
        want = LOGIT_LOSSES[name](hidden @ weight.T, teacher, labels=labels, **kw)
        got = chunked_logit_loss(name, hidden, weight, teacher, labels=labels, chunk_size=3, **kw)
        torch.testing.assert_close(got, want)
        with pytest.raises(ValueError, match="needs labels="):
            chunked_logit_loss(name, hidden, weight, teacher, chunk_size=3, **kw)


# --------------------------------------------------------------------------- cross-fitting


class RecordingTeacher:
    """Fits nothing; remembers which rows it saw (X[:, 0] is the row index) and predicts the class frequencies."""

    fitted: list = []

    def fit(self, X, y):
        self.seen = set(int(i) for i in np.asarray(X)[:, 0])
        self.classes_ = np.unique(y)
        self.freq = np.bincount(y)[self.classes_] / len(y)
        RecordingTeacher.fitted.append(self)
        return self

    def predict_proba(self, X):
        self.asked = set(int(i) for i in np.asarray(X)[:, 0])
        return np.tile(self.freq, (len(X), 1))


def _toy(n_per_class=(7, 5, 9), seed=0):
    y = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])
    y = np.random.default_rng(seed).permutation(y)
    X = np.stack([np.arange(len(y)), np.random.default_rng(seed + 1).normal(size=len(y))], axis=1)
    return X, y


def test_crossfit_logits_are_out_of_fold():
    X, y = _toy()
    RecordingTeacher.fitted = []
    cf = crossfit_teacher_logits(X, y, RecordingTeacher, n_folds=4, seed=3)
    assert len(cf.teachers) == 4 and len(RecordingTeacher.fitted) == 5  # + the full-data teacher
    folds = cf.folds.numpy()
    for k, t in enumerate(cf.teachers):
        held = set(np.flatnonzero(folds == k))
        assert t.seen == set(range(len(y))) - held  # teacher k never saw fold k
        assert t.asked == held  # and labels exactly fold k
    assert cf.full_teacher.seen == set(range(len(y)))
    assert cf.logits.shape == (len(y), 3) and cf.logits.dtype == torch.float32
    for i in range(len(y)):  # row i is the prediction of its fold's teacher
        want = np.log(cf.teachers[folds[i]].freq)
        np.testing.assert_allclose(cf.logits[i].numpy(), want, rtol=1e-6)


def test_folds_are_stratified_and_deterministic_by_seed():
    _, y = _toy((7, 5, 9))
    a, b, c = (stratified_folds(y, 5, seed=s) for s in (11, 11, 12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    for cls, n in enumerate((7, 5, 9)):
        per_fold = np.bincount(a.numpy()[y == cls], minlength=5)
        assert per_fold.min() >= n // 5 and per_fold.max() <= -(-n // 5)
    sizes = np.bincount(a.numpy(), minlength=5)
    assert sizes.max() - sizes.min() <= 1
    X, y = _toy()
    one = crossfit_teacher_logits(X, y, RecordingTeacher, n_folds=3, seed=5)
    two = crossfit_teacher_logits(X, y, RecordingTeacher, n_folds=3, seed=5)
    assert torch.equal(one.logits, two.logits) and torch.equal(one.folds, two.folds)


def test_crossfit_with_a_scikit_learn_teacher():
    sklearn = pytest.importorskip("sklearn.linear_model")
    X, y = _toy((12, 10, 14))
    cf = crossfit_teacher_logits(X[:, 1:], y, lambda: sklearn.LogisticRegression(), n_folds=3, seed=0)
    torch.testing.assert_close(cf.logits.exp().sum(-1), torch.ones(len(y)))
    torch.testing.assert_close(cf.full_logits, teacher_log_probs(cf.full_teacher, X[:, 1:], 3))


def test_bad_folds_are_one_line_errors():
    X, y = _toy((7, 5, 9))
    for k in (1, 0, -2, 2.5, True, "3"):
        _one_line(lambda: crossfit_teacher_logits(X, y, RecordingTeacher, n_folds=k), "n_folds must be an integer >= 2")
    _one_line(lambda: stratified_folds(y, 6), r"n_folds=6 exceeds the smallest class count \(class 1 has 5 examples\)")
    _one_line(lambda: crossfit_teacher_logits(X[:-1], y, RecordingTeacher), "X has 20 rows but y has 21 labels")
    _one_line(lambda: crossfit_teacher_logits(X, y - 1, RecordingTeacher), "class ids >= 0")
    _one_line(lambda: crossfit_teacher_logits(X, y.reshape(3, 7), RecordingTeacher), "1-D array of class ids")
