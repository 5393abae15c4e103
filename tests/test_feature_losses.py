"""Feature, attention and relational losses against direct float64 computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdforge.losses.attention import (
    attention_transfer,
    minilm_loss,
    minilm_relation_kl,
    minilm_v1_loss,
    self_attention_relation_kl,
    tinybert_attention_mse,
)
from kdforge.losses.features import (
    cka_loss,
    distilbert_cosine,
    fitnets_hint,
    hidden_cosine,
    hidden_mse,
    linear_cka,
    pkd_patient,
)
from kdforge.losses.relations import (
    contrastive_representation,
    rkd_angle,
    rkd_distance,
    rkd_loss,
    similarity_preserving,
)

B, T, D = 3, 6, 8


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def pad_mask():
    m = torch.ones(B, T, dtype=torch.bool)
    m[1, 4:] = False
    m[2, 2:] = False
    return m


def valid_tokens(mask):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def huber(x):
    x = abs(x)
    return 0.5 * x * x if x < 1.0 else x - 0.5


TOKEN_LOSSES = {
    "mse": hidden_mse,
    "mse_ln": lambda s, t, **kw: hidden_mse(s, t, layer_norm=True, **kw),
    "cosine": hidden_cosine,
    "fitnets": fitnets_hint,
    "pkd": pkd_patient,
}


# --------------------------------------------------------------------------- token losses vs loops


def _ref_token(fn, s, t, mask):
    vals = [fn(s[b, i].double(), t[b, i].double()) for b, i in valid_tokens(mask)]
    return sum(vals) / len(vals)


def _ln(x):
    mu = sum(x.tolist()) / len(x)
    var = sum((v - mu) ** 2 for v in x.tolist()) / len(x)
    return torch.tensor([(v - mu) / math.sqrt(var + 1e-5) for v in x.tolist()], dtype=torch.float64)


REFS = {
    "mse": lambda a, b: sum((x - y) ** 2 for x, y in zip(a.tolist(), b.tolist())) / len(a),
    "mse_ln": lambda a, b: sum((x - y) ** 2 for x, y in zip(_ln(a).tolist(), _ln(b).tolist())) / len(a),
    "cosine": lambda a, b: 1 - float(a @ b) / math.sqrt(float(a @ a) * float(b @ b)),
    "fitnets": lambda a, b: 0.5 * sum((x - y) ** 2 for x, y in zip(a.tolist(), b.tolist())),
    "pkd": lambda a, b: sum((x / a.norm().item() - y / b.norm().item()) ** 2 for x, y in zip(a.tolist(), b.tolist())),
}


@pytest.mark.parametrize("name", list(TOKEN_LOSSES))
def test_token_loss_matches_loop(name):
    s, t, m = rand(B, T, D, seed=1), rand(B, T, D, seed=2) * 2 + 0.3, pad_mask()
    got = TOKEN_LOSSES[name](s, t, mask=m)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_ref_token(REFS[name], s, t, m), rel=1e-5)


@pytest.mark.parametrize("name", list(TOKEN_LOSSES))
def test_token_loss_reductions(name):
    s, t, m = rand(B, T, D, seed=3), rand(B, T, D, seed=4), pad_mask()
    fn = TOKEN_LOSSES[name]
    per = fn(s, t, mask=m, reduction="none")
    assert per.shape == (B, T)
    assert torch.all(per[~m] == 0)
    assert torch.all(per[m] > 0)
    assert fn(s, t, mask=m, reduction="sum").item() == pytest.approx(per.sum().item(), rel=1e-6)
    assert fn(s, t, mask=m).item() == pytest.approx(per.sum().item() / m.sum().item(), rel=1e-6)
    assert fn(s, t).item() == pytest.approx(fn(s, t, reduction="none").mean().item(), rel=1e-6)


@pytest.mark.parametrize("name", list(TOKEN_LOSSES))
def test_token_loss_zero_on_identical(name):
    s = rand(B, T, D, seed=5)
    assert TOKEN_LOSSES[name](s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", list(TOKEN_LOSSES))
def test_padding_garbage_is_ignored_values_and_grads(name):
    s, t, m = rand(B, T, D, seed=6), rand(B, T, D, seed=7), pad_mask()
    fn = TOKEN_LOSSES[name]
    clean = fn(s, t, mask=m)
    s2, t2 = s.clone(), t.clone()
    s2[~m] = float("nan")
    t2[~m] = float("inf")
    s2.requires_grad_(True)
    dirty = fn(s2, t2, mask=m)
    dirty.backward()
    assert dirty.item() == pytest.approx(clean.item(), rel=1e-6)
    assert torch.isfinite(s2.grad).all()
    assert torch.all(s2.grad[~m] == 0)


@pytest.mark.parametrize("name", list(TOKEN_LOSSES))
def test_no_valid_token_gives_zero_not_nan(name):
    s, t = rand(B, T, D, seed=8), rand(B, T, D, seed=9)
    out = TOKEN_LOSSES[name](s, t, mask=torch.zeros(B, T, dtype=torch.bool))
    assert out.item() == 0.0


@pytest.mark.parametrize("name", list(TOKEN_LOSSES))
def test_width_mismatch_error_names_shapes_and_projector(name):
    with pytest.raises(ValueError) as e:
        TOKEN_LOSSES[name](rand(B, T, 8), rand(B, T, 16))
    msg = str(e.value)
    assert "(3, 6, 8)" in msg and "(3, 6, 16)" in msg and "projector" in msg and "\n" not in msg


def test_bf16_inputs_computed_in_float32():
    s, t = rand(B, T, D, seed=10), rand(B, T, D, seed=11)
    sb, tb = s.bfloat16(), t.bfloat16()
    got = hidden_mse(sb, tb)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(hidden_mse(sb.float(), tb.float()).item(), rel=1e-6)


def test_teacher_is_detached():
    s = rand(B, T, D, seed=12).requires_grad_(True)
    t = rand(B, T, D, seed=13).requires_grad_(True)
    (hidden_mse(s, t) + cka_loss(s, t) + rkd_loss(s, t) + fitnets_hint(s, t)).backward()
    assert s.grad is not None and t.grad is None


def test_distilbert_cosine_alias():
    assert distilbert_cosine is hidden_cosine


def test_bad_reduction_rejected():
    with pytest.raises(ValueError, match="reduction"):
        hidden_mse(rand(B, T, D), rand(B, T, D), reduction="avg")
    with pytest.raises(ValueError, match="none"):
        cka_loss(rand(B, T, D), rand(B, T, D), reduction="none")


# --------------------------------------------------------------------------- CKA


def _ref_cka(x, y):
    """Gram (N x N) HSIC form in float64 -- a different route than the code's."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    hsic = lambda a, b: (a * b).sum()
    return (hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l))).item()


def test_cka_matches_gram_form_with_different_widths():
    x, y = rand(40, 7, seed=20), rand(40, 13, seed=21)
    y = y + 0.5 * (x @ rand(7, 13, seed=22))
    assert linear_cka(x, y).item() == pytest.approx(_ref_cka(x, y), rel=1e-4)


def test_cka_self_is_one_and_in_unit_interval():
    x = rand(30, 9, seed=23)
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-5)
    for seed in range(5):
        v = linear_cka(rand(30, 9, seed=100 + seed), rand(30, 4, seed=200 + seed)).item()
        assert 0.0 <= v <= 1.0


def test_cka_invariant_to_orthogonal_transform_and_isotropic_scale():
    x, y = rand(50, 6, seed=24), rand(50, 10, seed=25)
    y = y + x @ rand(6, 10, seed=26)
    q, _ = torch.linalg.qr(rand(6, 6, seed=27).double())
    base = linear_cka(x, y).item()
    assert linear_cka((x.double() @ q).float(), y).item() == pytest.approx(base, rel=1e-4)
    assert linear_cka(x * 7.5, y).item() == pytest.approx(base, rel=1e-4)
    assert linear_cka(x, y * 0.01).item() == pytest.approx(base, rel=1e-4)


def test_cka_token_level_uses_only_valid_tokens():
    s, t, m = rand(B, T, D, seed=28), rand(B, T, 5, seed=29), pad_mask()
    rows = valid_tokens(m)
    xs = torch.stack([s[b, i] for b, i in rows])
    xt = torch.stack([t[b, i] for b, i in rows])
    expected = 1.0 - _ref_cka(xs, xt)
    assert cka_loss(s, t, mask=m).item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    t2 = t.clone()
    t2[~m] = 1e6
    assert cka_loss(s, t2, mask=m).item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_cka_batch_level_pools_valid_tokens():
    b = 5
    s, t = rand(b, T, D, seed=30), rand(b, T, 4, seed=31)
    m = torch.ones(b, T, dtype=torch.bool)
    m[0, 3:] = False
    m[4, 1:] = False

    def pool(x):
        return torch.stack([sum(x[i, j] for j in range(T) if m[i, j]) / int(m[i].sum()) for i in range(b)])

    expected = 1.0 - _ref_cka(pool(s), pool(t))
    assert cka_loss(s, t, mask=m, level="batch").item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_cka_loss_zero_on_identical():
    s, m = rand(4, T, D, seed=32), torch.ones(4, T, dtype=torch.bool)
    assert cka_loss(s, s.clone(), mask=m).item() == pytest.approx(0.0, abs=1e-5)
    assert cka_loss(s, s.clone(), level="batch").item() == pytest.approx(0.0, abs=1e-5)


def test_cka_feature_space_form_handles_many_rows():
    # N = 40k rows: the N x N Gram would need 6 GB; the D x D form is instant.
    x = rand(40_000, 16, seed=33)
    assert linear_cka(x, 2 * x).item() == pytest.approx(1.0, abs=1e-4)


def test_cka_constant_input_is_safe():
    x = torch.ones(10, 4, requires_grad=True)
    v = linear_cka(x, rand(10, 3))
    v.backward()
    assert v.item() == 0.0 and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- TinyBERT


def _ref_tinybert(s, t, mask):
    b, h, n, _ = s.shape
    # TinyBERT's code: torch.where(att <= -1e2, 0, att)
    clean = lambda v: 0.0 if (not math.isfinite(v) or v <= -1e2) else v
    per_q = []
    for bi in range(b):
        for q in range(n):
            if mask is not None and not mask[bi, q]:
                continue
            keys = [k for k in range(n) if mask is None or mask[bi, k]]
            tot = sum((clean(s[bi, hh, q, k].item()) - clean(t[bi, hh, q, k].item())) ** 2 for hh in range(h) for k in keys)
            per_q.append(tot / (h * len(keys)))
    return sum(per_q) / len(per_q)


@pytest.mark.parametrize("kind", ["scores", "probs"])
def test_tinybert_matches_loop(kind):
    s, t, m = rand(B, 2, T, T, seed=40), rand(B, 2, T, T, seed=41), pad_mask()
    if kind == "probs":
        s, t = s.softmax(-1), t.softmax(-1)
    got = tinybert_attention_mse(s, t, mask=m, kind=kind)
    assert got.item() == pytest.approx(_ref_tinybert(s, t, m), rel=1e-5)


def test_tinybert_zeroes_masked_scores():
    s, t = rand(B, 2, T, T, seed=42), rand(B, 2, T, T, seed=43)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    s = s.masked_fill(future, float("-inf"))
    t = t.masked_fill(future, -1e9)
    got = tinybert_attention_mse(s, t)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(_ref_tinybert(s, t, None), rel=1e-5)
    lower = ((s - t).masked_fill(future, 0) ** 2).sum() / (B * 2 * T * T)
    assert got.item() == pytest.approx(lower.item(), rel=1e-5)


@pytest.mark.parametrize("fill", [-10000.0, torch.finfo(torch.float32).min, float("-inf")])
def test_tinybert_bert_mask_smallest_case_is_zero(fill):
    # B = H = 1, T = 2, second key padded: raw student scores [[0, 1], [0, 1]], teacher 0, both after the
    # additive mask. TinyBERT's code zeroes both masked scores (<= -1e2) and gives 0; -1e4 as the cut-off gave 0.5.
    add = torch.tensor([0.0, fill])
    s = (torch.tensor([[0.0, 1.0], [0.0, 1.0]]) + add).view(1, 1, 2, 2)
    t = (torch.zeros(2, 2) + add).view(1, 1, 2, 2)
    for convention in ("kdforge", "authors"):
        assert tinybert_attention_mse(s, t, convention=convention).item() == 0.0
        m = torch.tensor([[True, False]])
        assert tinybert_attention_mse(s, t, mask=m, convention=convention).item() == 0.0


@pytest.mark.parametrize("fill", [-10000.0, torch.finfo(torch.float32).min, float("-inf")])
def test_tinybert_additive_mask_without_mask_arg_matches_masked_call(fill):
    s, t, m = rand(B, 2, T, T, seed=45), rand(B, 2, T, T, seed=46), pad_mask()
    add = torch.zeros(B, 1, 1, T).masked_fill(~m[:, None, None, :], fill)
    # only the padded keys carry the mask value; no mask argument, so all query rows count
    got = tinybert_attention_mse(s + add, t + add)
    assert got.item() == pytest.approx(_ref_tinybert(s + add, t + add, None), rel=1e-5)
    expected = ((s - t).masked_fill(~m[:, None, None, :], 0) ** 2).sum() / (B * 2 * T * T)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_tinybert_zero_on_identical_and_head_mismatch_error():
    s = rand(B, 2, T, T, seed=44)
    assert tinybert_attention_mse(s, s.clone(), mask=pad_mask()).item() == 0.0
    with pytest.raises(ValueError, match="2 heads but teacher has 4"):
        tinybert_attention_mse(s, rand(B, 4, T, T))


# --------------------------------------------------------------------------- MiniLM


def _softmax(vals):
    mx = max(vals)
    e = [math.exp(v - mx) for v in vals]
    z = sum(e)
    return [v / z for v in e]


def _ref_relation(sa, sb, ta, tb, mask, heads, causal):
    """Loop over batch, relation head, query; KL over valid (and past) keys."""
    b, n, ds = sa.shape
    dt = ta.shape[-1]
    rs, rt = ds // heads, dt // heads
    per_q = []
    for bi in range(b):
        for q in range(n):
            if mask is not None and not mask[bi, q]:
                continue
            keys = [k for k in range(n) if (mask is None or mask[bi, k]) and (not causal or k <= q)]
            kl = 0.0
            for a in range(heads):
                s_sc = [float(sa[bi, q, a * rs:(a + 1) * rs].double() @ sb[bi, k, a * rs:(a + 1) * rs].double()) / math.sqrt(rs) for k in keys]
                t_sc = [float(ta[bi, q, a * rt:(a + 1) * rt].double() @ tb[bi, k, a * rt:(a + 1) * rt].double()) / math.sqrt(rt) for k in keys]
                ps, pt = _softmax(s_sc), _softmax(t_sc)
                kl += sum(p * (math.log(p) - math.log(r)) for p, r in zip(pt, ps))
            per_q.append(kl / heads)
    return sum(per_q) / len(per_q)


@pytest.mark.parametrize("causal", [False, True])
def test_relation_kl_matches_loop_with_different_widths(causal):
    s, t, m = rand(B, T, 8, seed=50), rand(B, T, 12, seed=51), pad_mask()
    got = self_attention_relation_kl(s, t, mask=m, num_relation_heads=4, causal=causal)
    assert got.item() == pytest.approx(_ref_relation(s, s, t, t, m, 4, causal), rel=1e-4)


def test_relation_kl_zero_on_identical_and_padding_garbage_ignored():
    s, m = rand(B, T, 8, seed=52), pad_mask()
    assert self_attention_relation_kl(s, s.clone(), mask=m, num_relation_heads=2).item() == pytest.approx(0.0, abs=1e-6)
    t = rand(B, T, 8, seed=53)
    clean = self_attention_relation_kl(s, t, mask=m, num_relation_heads=2)
    s2 = s.clone()
    s2[~m] = float("nan")
    s2.requires_grad_(True)
    dirty = self_attention_relation_kl(s2, t, mask=m, num_relation_heads=2)
    dirty.backward()
    assert dirty.item() == pytest.approx(clean.item(), rel=1e-6)
    assert torch.isfinite(s2.grad).all()


def test_relation_heads_must_divide_widths():
    with pytest.raises(ValueError, match="teacher width 12 is not divisible by num_relation_heads=8"):
        self_attention_relation_kl(rand(B, T, 16), rand(B, T, 12), num_relation_heads=8)


def test_minilm_loss_sums_relations_and_supports_cross_relations():
    m = pad_mask()
    sq = {k: rand(B, T, 8, seed=60 + i) for i, k in enumerate("qkv")}
    tq = {k: rand(B, T, 12, seed=70 + i) for i, k in enumerate("qkv")}
    total = minilm_loss(sq, tq, mask=m, num_relation_heads=4, causal=True)
    parts = sum(self_attention_relation_kl(sq[c], tq[c], mask=m, num_relation_heads=4, causal=True) for c in "qkv")
    assert total.item() == pytest.approx(parts.item(), rel=1e-6)
    assert minilm_relation_kl(sq, tq, mask=m, num_relation_heads=4, causal=True).item() == pytest.approx(total.item())
    qk = minilm_loss(sq, tq, mask=m, num_relation_heads=2, relations=("qk",))
    assert qk.item() == pytest.approx(_ref_relation(sq["q"], sq["k"], tq["q"], tq["k"], m, 2, False), rel=1e-4)
    with pytest.raises(ValueError, match="value vectors under key 'v'"):
        minilm_loss({"q": sq["q"]}, tq, num_relation_heads=2, relations=("vv",))


def test_minilm_v1_matches_loop():
    m = pad_mask()
    keep = m[:, None, None, :] & torch.ones(T, T, dtype=torch.bool).tril()
    s_p = rand(B, 2, T, T, seed=80).masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num()
    t_p = rand(B, 2, T, T, seed=81).masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num()
    sv, tv = rand(B, T, 8, seed=82), rand(B, T, 16, seed=83)
    got = minilm_v1_loss(s_p, t_p, sv, tv, mask=m, causal=True)
    att = []
    for bi, q in valid_tokens(m):
        kl = 0.0
        for h in range(2):
            for k in range(T):
                p, r = t_p[bi, h, q, k].item(), s_p[bi, h, q, k].item()
                if p > 0:
                    kl += p * (math.log(p) - math.log(r))
        att.append(kl / 2)
    expected = sum(att) / len(att) + _ref_relation(sv, sv, tv, tv, m, 2, True)
    assert got.item() == pytest.approx(expected, rel=1e-4)
    assert minilm_v1_loss(s_p, s_p.clone(), sv, sv.clone(), mask=m, causal=True).item() == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- AT


def _ref_at(s, t, p, squared):
    out = []
    for b in range(s.shape[0]):
        a_s = s[b].double().abs().pow(p).mean(0).flatten()
        a_t = t[b].double().abs().pow(p).mean(0).flatten()
        a_s, a_t = a_s / a_s.norm(), a_t / a_t.norm()
        d = a_s - a_t
        out.append((d**2).mean().item() if squared else d.norm().item())
    return sum(out) / len(out)


@pytest.mark.parametrize("p,squared", [(2, False), (1, False), (2, True)])
def test_attention_transfer_matches_loop_with_different_channels(p, squared):
    s, t = rand(2, 3, 5, 4, seed=90), rand(2, 7, 5, 4, seed=91)
    got = attention_transfer(s, t, p=p, squared=squared)
    assert got.item() == pytest.approx(_ref_at(s, t, p, squared), rel=1e-5)
    assert attention_transfer(s, t, p=p, reduction="none", squared=squared).shape == (2,)


def test_attention_transfer_zero_on_identical_and_spatial_mismatch():
    s = rand(2, 3, 5, 5, seed=92)
    assert attention_transfer(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="resize=True"):
        attention_transfer(rand(2, 3, 4, 4), rand(2, 3, 8, 8))
    small = rand(2, 3, 4, 4, seed=93)
    big = F.interpolate(small, size=(8, 8), mode="nearest")
    assert attention_transfer(small, big, resize=True).item() < attention_transfer(small, rand(2, 3, 8, 8, seed=94), resize=True).item()


# --------------------------------------------------------------------------- RKD


def _ref_rkd_distance(s, t):
    def norm_d(x):
        n = x.shape[0]
        d = [[(x[i].double() - x[j].double()).norm().item() for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mean for v in row] for row in d]

    ds, dt = norm_d(s), norm_d(t)
    n = s.shape[0]
    return sum(huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2


def _ref_rkd_angle(s, t):
    def cos(x, i, j, k):
        u, v = x[j].double() - x[i].double(), x[k].double() - x[i].double()
        if u.norm() == 0 or v.norm() == 0:
            return 0.0
        return (u @ v / (u.norm() * v.norm())).item()

    n = s.shape[0]
    idx = [(i, j, k) for i in range(n) for j in range(n) for k in range(n)]
    return sum(huber(cos(s, *ijk) - cos(t, *ijk)) for ijk in idx) / n**3


def test_rkd_matches_loops_and_combines_with_published_weights():
    s, t = rand(6, 5, seed=100), rand(6, 9, seed=101) * 3
    d, a = rkd_distance(s, t), rkd_angle(s, t)
    assert d.item() == pytest.approx(_ref_rkd_distance(s, t), rel=1e-4)
    assert a.item() == pytest.approx(_ref_rkd_angle(s, t), rel=1e-4)
    assert rkd_loss(s, t).item() == pytest.approx(25 * d.item() + 50 * a.item(), rel=1e-5)


def test_rkd_invariances():
    s, t = rand(7, 5, seed=102), rand(7, 4, seed=103)
    d0, a0 = rkd_distance(s, t).item(), rkd_angle(s, t).item()
    shift = rand(1, 5, seed=104) * 10
    assert rkd_distance(s + shift, t).item() == pytest.approx(d0, rel=1e-4, abs=1e-6)
    assert rkd_angle(s + shift, t).item() == pytest.approx(a0, rel=1e-4, abs=1e-6)
    assert rkd_distance(s * 13.0, t * 0.1).item() == pytest.approx(d0, rel=1e-4, abs=1e-6)
    assert rkd_loss(s, s.clone() + 3.0).item() == pytest.approx(0.0, abs=1e-5)
    assert rkd_distance(s, 2.5 * s.clone()).item() == pytest.approx(0.0, abs=1e-5)


def test_rkd_pools_tokens_with_mask_and_tiny_batches():
    s, t, m = rand(B, T, D, seed=105), rand(B, T, 4, seed=106), pad_mask()
    pool = lambda x: torch.stack([x[b][m[b]].mean(0) for b in range(B)])
    assert rkd_loss(s, t, mask=m).item() == pytest.approx(rkd_loss(pool(s), pool(t)).item(), rel=1e-5)
    one = rand(1, 4).requires_grad_(True)
    out = rkd_loss(one, rand(1, 3))
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(one.grad).all()


# --------------------------------------------------------------------------- SP


def _ref_sp(s, t):
    b = s.shape[0]
    fs, ft = s.reshape(b, -1).double(), t.reshape(b, -1).double()

    def g(f):
        rows = []
        for i in range(b):
            row = [float(f[i] @ f[j]) for j in range(b)]
            nrm = math.sqrt(sum(v * v for v in row))
            rows.append([v / nrm for v in row])
        return rows

    gs, gt = g(fs), g(ft)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_similarity_preserving_matches_loop_and_is_scale_invariant():
    s, t = rand(4, 3, 5, 5, seed=110), rand(4, 8, 2, 2, seed=111)
    got = similarity_preserving(s, t)
    assert got.item() == pytest.approx(_ref_sp(s, t), rel=1e-4)
    assert similarity_preserving(s * 50.0, t * 0.2).item() == pytest.approx(got.item(), rel=1e-4)
    assert similarity_preserving(s, s.clone() * 3).item() == pytest.approx(0.0, abs=1e-6)


def test_similarity_preserving_mask_zeroes_padding():
    s, t, m = rand(B, T, D, seed=112), rand(B, T, 4, seed=113), pad_mask()
    s2 = s.clone()
    s2[~m] = 123.0
    expected = _ref_sp(s.masked_fill(~m[..., None], 0), t.masked_fill(~m[..., None], 0))
    assert similarity_preserving(s2, t, mask=m).item() == pytest.approx(expected, rel=1e-4)


# --------------------------------------------------------------------------- CRD


def test_contrastive_matches_loop():
    s, t = rand(5, 6, seed=120), rand(5, 6, seed=121)
    tau = 0.1
    sn, tn = F.normalize(s.double(), dim=-1), F.normalize(t.double(), dim=-1)
    logits = sn @ tn.T / tau
    ce = lambda lg, i: -(lg[i] - torch.logsumexp(lg, 0)).item()
    fwd = [ce(logits[i], i) for i in range(5)]
    bwd = [ce(logits[:, i], i) for i in range(5)]
    assert contrastive_representation(s, t, temperature=tau).item() == pytest.approx(sum(fwd) / 5, rel=1e-5)
    sym = contrastive_representation(s, t, temperature=tau, symmetric=True)
    assert sym.item() == pytest.approx(sum(f + b for f, b in zip(fwd, bwd)) / 10, rel=1e-5)
    assert contrastive_representation(s, t, temperature=tau, reduction="none").shape == (5,)


def test_contrastive_prefers_matching_pairs_and_needs_equal_widths():
    e = torch.eye(8) * 5 + 0.01 * rand(8, 8, seed=122)
    matched = contrastive_representation(e, e.clone())
    shuffled = contrastive_representation(e, e[torch.randperm(8, generator=torch.Generator().manual_seed(0))])
    assert matched.item() < 0.01 < shuffled.item()
    with pytest.raises(ValueError, match="projector"):
        contrastive_representation(rand(4, 6), rand(4, 7))


# --------------------------------------------------------------------------- gradients


ALL_LOSSES = {
    "mse": lambda s, t, m: hidden_mse(s, t, mask=m),
    "cos": lambda s, t, m: hidden_cosine(s, t, mask=m),
    "fitnets": lambda s, t, m: fitnets_hint(s, t, mask=m),
    "pkd": lambda s, t, m: pkd_patient(s, t, mask=m),
    "cka": lambda s, t, m: cka_loss(s, t, mask=m),
    "cka_batch": lambda s, t, m: cka_loss(s, t, mask=m, level="batch"),
    "relation": lambda s, t, m: self_attention_relation_kl(s, t, mask=m, num_relation_heads=2, causal=True),
    "rkd": lambda s, t, m: rkd_loss(s, t, mask=m),
    "sp": lambda s, t, m: similarity_preserving(s, t, mask=m),
    "crd": lambda s, t, m: contrastive_representation(s, t, mask=m, symmetric=True),
}


@pytest.mark.parametrize("name", list(ALL_LOSSES))
@pytest.mark.parametrize("identical", [False, True])
def test_gradients_finite(name, identical):
    s = rand(B, T, D, seed=130).requires_grad_(True)
    t = s.detach().clone() if identical else rand(B, T, D, seed=131)
    loss = ALL_LOSSES[name](s, t, pad_mask())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("identical", [False, True])
def test_attention_losses_gradients_finite(identical):
    s_at = rand(B, 2, T, T, seed=132).requires_grad_(True)
    t_at = s_at.detach().clone() if identical else rand(B, 2, T, T, seed=133)
    fm = rand(2, 3, 4, 4, seed=134).requires_grad_(True)
    t_fm = fm.detach().clone() if identical else rand(2, 5, 4, 4, seed=135)
    loss = (
        tinybert_attention_mse(s_at, t_at, mask=pad_mask())
        + attention_transfer(fm, t_fm)
        + minilm_v1_loss(s_at.softmax(-1), t_at.softmax(-1), rand(B, T, 4), rand(B, T, 4), mask=pad_mask())
    )
    loss.backward()
    assert torch.isfinite(s_at.grad).all() and torch.isfinite(fm.grad).all()
