"""``convention="authors"`` against direct computations of each authors' formula, the stated factor between the
conventions, and the ``kdforge.losses`` exports."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kdforge.losses as losses
from kdforge.losses import registry
from kdforge.losses.attention import (
    attention_transfer,
    minilm_loss,
    minilm_relation_kl,
    self_attention_relation_kl,
    tinybert_attention_mse,
)
from kdforge.losses.features import fitnets_hint, pkd_patient


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def lengths_mask(lengths, t):
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]


# --------------------------------------------------------------------------- FitNets


def test_fitnets_authors_is_mse_loss_over_all_elements():
    # RepDistiller / torchdistill HintLoss: nn.MSELoss()(f_s, f_t)
    s, t = rand(3, 5, 8, seed=1), rand(3, 5, 8, seed=2)
    expected = torch.nn.MSELoss()(s.double(), t.double())
    assert fitnets_hint(s, t, convention="authors").item() == pytest.approx(expected.item(), rel=1e-6)


def test_fitnets_authors_with_padding_averages_valid_elements():
    s, t, m = rand(3, 5, 8, seed=3), rand(3, 5, 8, seed=4), lengths_mask([5, 2, 4], 5)
    expected = F.mse_loss(s[m].double(), t[m].double())
    assert fitnets_hint(s, t, mask=m, convention="authors").item() == pytest.approx(expected.item(), rel=1e-6)


def test_fitnets_factor_is_half_the_width():
    d = 12
    s, t, m = rand(2, 6, d, seed=5), rand(2, 6, d, seed=6), lengths_mask([6, 3], 6)
    for mask in (None, m):
        kd = fitnets_hint(s, t, mask=mask)
        au = fitnets_hint(s, t, mask=mask, convention="authors")
        assert kd.item() == pytest.approx(d / 2 * au.item(), rel=1e-6)


# --------------------------------------------------------------------------- PKD


def _pkd_authors(teacher_patience, student_patience, normalized):
    """intersun/PKD-for-BERT-Model-Compression patience_loss, written out: [B, n_layers, D] [CLS] states."""
    if normalized:
        teacher_patience = teacher_patience / teacher_patience.norm(dim=2, keepdim=True)
        student_patience = student_patience / student_patience.norm(dim=2, keepdim=True)
    return ((teacher_patience - student_patience) ** 2).sum() / teacher_patience.numel()


@pytest.mark.parametrize("normalize", [True, False])
def test_pkd_authors_matches_patience_loss(normalize):
    # one [CLS] per mapped layer, stacked as the authors do: [B, n_layers, D]; kdforge sees it as [B, T, D]
    s, t = rand(4, 3, 16, seed=7), rand(4, 3, 16, seed=8) * 3
    expected = _pkd_authors(t.double(), s.double(), normalize)
    got = pkd_patient(s, t, normalize=normalize, convention="authors")
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_pkd_authors_with_padding_and_factor_is_width():
    d = 16
    s, t, m = rand(3, 5, d, seed=9), rand(3, 5, d, seed=10), lengths_mask([5, 1, 3], 5)
    expected = _pkd_authors(t[m].double()[None], s[m].double()[None], True)
    assert pkd_patient(s, t, mask=m, convention="authors").item() == pytest.approx(expected.item(), rel=1e-6)
    for normalize in (True, False):
        kd = pkd_patient(s, t, mask=m, normalize=normalize)
        au = pkd_patient(s, t, mask=m, normalize=normalize, convention="authors")
        assert kd.item() == pytest.approx(d * au.item(), rel=1e-6)


# --------------------------------------------------------------------------- AT


def _at_authors(x, y):
    """szagoruyko/attention-transfer: at(x) = normalize(x.pow(2).mean(1).view(B, -1)); (at(x) - at(y)).pow(2).mean()."""
    def at(z):
        a = z.pow(2).mean(1).reshape(z.shape[0], -1)
        return a / a.norm(dim=1, keepdim=True)

    return (at(x) - at(y)).pow(2).mean()


def test_attention_transfer_authors_matches_at_loss():
    s, t = rand(3, 4, 6, 5, seed=11), rand(3, 9, 6, 5, seed=12)
    expected = _at_authors(s.double(), t.double())
    assert attention_transfer(s, t, convention="authors").item() == pytest.approx(expected.item(), rel=1e-6)
    assert attention_transfer(s, t, squared=True).item() == pytest.approx(expected.item(), rel=1e-6)


def test_attention_transfer_factor_is_square_over_positions():
    s, t = rand(3, 4, 6, 5, seed=13), rand(3, 2, 6, 5, seed=14)
    kd = attention_transfer(s, t, reduction="none")
    au = attention_transfer(s, t, reduction="none", convention="authors")
    torch.testing.assert_close(au, kd.pow(2) / (6 * 5), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- TinyBERT


def _tinybert_authors(s_scores, t_scores):
    """huawei-noah TinyBERT: torch.where(att <= -1e2, 0, att) on both sides, then nn.MSELoss over [B, H, T, T]."""
    s = torch.where(s_scores <= -1e2, torch.zeros_like(s_scores), s_scores)
    t = torch.where(t_scores <= -1e2, torch.zeros_like(t_scores), t_scores)
    return torch.nn.MSELoss()(s, t)


def test_tinybert_authors_matches_reference_with_bert_mask_and_padded_rows():
    b, h, n = 3, 2, 6
    m = lengths_mask([6, 4, 2], n)
    ext = (1.0 - m.double())[:, None, None, :] * -10000.0  # BERT's extended attention mask
    s_raw, t_raw = rand(b, h, n, n, seed=15).double() * 3, rand(b, h, n, n, seed=16).double() * 3
    s, t = s_raw + ext, t_raw + ext  # padded query rows keep their (finite) scores, as in BERT
    expected = _tinybert_authors(s, t)
    for mask in (m, None):  # the authors' code sees no mask, only the -10000 entries
        got = tinybert_attention_mse(s.float(), t.float(), mask=mask, convention="authors")
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    rows = tinybert_attention_mse(s.float(), t.float(), mask=m, convention="authors", reduction="none")
    assert rows.shape == (b, n)
    assert rows.mean().item() == pytest.approx(expected.item(), rel=1e-5)
    assert rows[~m].abs().sum() > 0  # padded query rows count, as in the authors' MSE


def test_tinybert_conventions_factor():
    b, h, n = 2, 3, 8
    s, t = rand(b, h, n, n, seed=17), rand(b, h, n, n, seed=18)
    # no padding: identical
    assert tinybert_attention_mse(s, t, convention="authors").item() == pytest.approx(
        tinybert_attention_mse(s, t).item(), rel=1e-6)
    # every sequence has k valid tokens and the padded query rows agree: authors = kdforge * k^2 / T^2
    k = 5
    m = lengths_mask([k, k], n)
    t_same_pad_rows = torch.where(m[:, None, :, None], t, s)
    kd = tinybert_attention_mse(s, t_same_pad_rows, mask=m)
    au = tinybert_attention_mse(s, t_same_pad_rows, mask=m, convention="authors")
    assert au.item() == pytest.approx(kd.item() * k**2 / n**2, rel=1e-5)


# --------------------------------------------------------------------------- MiniLM v2


def _minilm_authors_per_sequence(sa, sb, ta, tb, lengths, heads):
    """The MiniLMv2 relation loss per sequence: 1/(A_r |x|) sum_a sum_t KL(R_T || R_S), |x| = its own length."""
    out = []
    for i, n in enumerate(lengths):
        def rel(a, b):
            a, b = a[i, :n].double(), b[i, :n].double()
            dr = a.shape[-1] // heads
            a = a.reshape(n, heads, dr).transpose(0, 1)
            b = b.reshape(n, heads, dr).transpose(0, 1)
            return (a @ b.transpose(-1, -2) / math.sqrt(dr)).softmax(-1)  # [heads, n, n]

        rt, rs = rel(ta, tb), rel(sa, sb)
        kl = (rt * (rt.log() - rs.log())).sum()
        out.append(kl.item() / (heads * n))
    return out


@pytest.mark.parametrize("relation", ["qq", "qk"])
def test_minilm_authors_matches_per_sequence_formula(relation):
    lengths, n, heads = [7, 3, 5], 7, 4
    m = lengths_mask(lengths, n)
    sq = {c: rand(3, n, 8, seed=20 + i) for i, c in enumerate("qkv")}
    tq = {c: rand(3, n, 12, seed=30 + i) for i, c in enumerate("qkv")}
    a, b = relation
    per_seq = _minilm_authors_per_sequence(sq[a], sq[b], tq[a], tq[b], lengths, heads)
    got = minilm_loss(sq, tq, mask=m, num_relation_heads=heads, relations=(relation,), convention="authors")
    assert got.item() == pytest.approx(sum(per_seq) / len(per_seq), rel=1e-5)
    total = minilm_loss(sq, tq, mask=m, num_relation_heads=heads, relations=(relation,), convention="authors",
                        reduction="sum")
    assert total.item() == pytest.approx(sum(per_seq), rel=1e-5)
    # stated relation between the conventions: kdforge weighs each sequence by its valid length
    kd = minilm_loss(sq, tq, mask=m, num_relation_heads=heads, relations=(relation,))
    weighted = sum(nb * v for nb, v in zip(lengths, per_seq)) / sum(lengths)
    assert kd.item() == pytest.approx(weighted, rel=1e-5)
    assert abs(kd.item() - got.item()) > 1e-3 * got.item()  # unequal lengths: the conventions really differ


def test_minilm_conventions_agree_without_padding_or_with_equal_lengths():
    n, heads = 6, 2
    s, t = rand(3, n, 8, seed=40), rand(3, n, 4, seed=41)
    for mask in (None, lengths_mask([4, 4, 4], n)):
        kd = self_attention_relation_kl(s, t, mask=mask, num_relation_heads=heads, causal=True)
        au = self_attention_relation_kl(s, t, mask=mask, num_relation_heads=heads, causal=True, convention="authors")
        assert au.item() == pytest.approx(kd.item(), rel=1e-6)
    qkv_s = {c: s for c in "qkv"}
    qkv_t = {c: t for c in "qkv"}
    assert minilm_relation_kl(qkv_s, qkv_t, num_relation_heads=heads, convention="authors").item() == pytest.approx(
        3 * self_attention_relation_kl(s, t, num_relation_heads=heads).item(), rel=1e-6)


# --------------------------------------------------------------------------- option plumbing


CONVENTION_LOSSES = ["fitnets_hint", "pkd_patient", "tinybert_attention", "minilm_relations", "attention_transfer"]


@pytest.mark.parametrize("name", CONVENTION_LOSSES)
def test_convention_is_a_recipe_keyword(name):
    _, fn = registry.lookup(name)
    assert "convention" in registry.keyword_arguments(fn)
    registry.check_arguments(name, fn, {"convention": "authors"})


def test_bad_convention_is_a_one_line_error():
    x = rand(2, 3, 4)
    for call in (
        lambda: fitnets_hint(x, x, convention="paper"),
        lambda: pkd_patient(x, x, convention="paper"),
        lambda: tinybert_attention_mse(rand(1, 1, 3, 3), rand(1, 1, 3, 3), convention="paper"),
        lambda: self_attention_relation_kl(x, x, num_relation_heads=2, convention="paper"),
        lambda: attention_transfer(rand(1, 2, 3, 3), rand(1, 2, 3, 3), convention="paper"),
    ):
        with pytest.raises(ValueError, match=r"convention must be one of \['kdforge', 'authors'\]") as e:
            call()
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- exports


def test_every_registered_loss_is_exported_from_kdforge_losses():
    names = registry.all_loss_names()
    assert sorted(losses.__all__) == names
    for name in names:
        assert getattr(losses, name) is registry.lookup(name)[1], name
    ns: dict = {}
    exec("from kdforge.losses import forward_kl, tinybert_attention, block_kd", ns)
    assert ns["block_kd"] is registry.STEPPING_STONE_LOSSES["block_kd"]
    with pytest.raises(AttributeError):
        losses.not_a_loss  # noqa: B018


@pytest.mark.parametrize("code", [
    "import kdforge; from kdforge.losses import forward_kl, block_kd, cka, rkd",
    "from kdforge.losses import chunked",
    "import kdforge.teachers.stepping_stones; from kdforge.losses import *; tinybert_attention, block_kd",
    "from kdforge.losses import block_kd",
])
def test_exports_import_without_cycle_in_a_fresh_interpreter(code):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
