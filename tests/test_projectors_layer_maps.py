"""Projectors, frequency attention (FAM) and layer maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdforge.align.frequency import (
    FrequencyAttention,
    SequenceFrequencyAttention,
    highpass_mask_1d,
    highpass_mask_2d,
)
from kdforge.align.layer_maps import LearnedLayerMap, build_layer_map, format_layer_map
from kdforge.align.projectors import PROJECTOR_INITS, PROJECTOR_KINDS, build_projector


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def kw_for(kind):
    return {"fam": dict(height=6, width=6), "fam_seq": dict(max_len=16)}.get(kind, {})


def input_for(kind, d, seed=0):
    if kind in ("conv1x1", "fam"):
        return rand(2, d, 6, 6, seed=seed)
    return rand(2, 5, d, seed=seed)


# --------------------------------------------------------------------------- projectors


@pytest.mark.parametrize("kind", PROJECTOR_KINDS)
def test_projector_output_shapes(kind):
    d_in, d_out = (8, 8) if kind == "identity" else (8, 12)
    proj = build_projector(kind, d_in, d_out, **kw_for(kind))
    x = input_for(kind, d_in)
    y = proj(x)
    expected = (2, d_out, 6, 6) if kind in ("conv1x1", "fam") else (2, 5, d_out)
    assert tuple(y.shape) == expected


@pytest.mark.parametrize("kind", ["linear", "mlp", "orthogonal"])
def test_linear_projectors_accept_any_leading_shape(kind):
    proj = build_projector(kind, 8, 4)
    assert proj(rand(2, 3, 4, 8)).shape == (2, 3, 4, 4)
    assert proj(rand(8)).shape == (4,)


@pytest.mark.parametrize("kind", ["linear", "mlp", "conv1x1", "fam", "fam_seq"])
def test_zero_init_gives_zero_output_but_trains(kind):
    proj = build_projector(kind, 8, 12, init="zero", **kw_for(kind))
    x = input_for(kind, 8, seed=1)
    y = proj(x)
    assert torch.count_nonzero(y) == 0
    (y - 1.0).pow(2).mean().backward()
    grads = [p.grad for p in proj.parameters() if p.grad is not None]
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", ["linear", "orthogonal", "conv1x1", "fam", "fam_seq"])
def test_identity_init_reproduces_input(kind):
    proj = build_projector(kind, 8, 8, init="identity", **kw_for(kind))
    x = input_for(kind, 8, seed=2)
    torch.testing.assert_close(proj(x), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "orthogonal"])
def test_identity_init_non_square_is_eye_like(kind):
    x = rand(3, 8, seed=3)
    up = build_projector(kind, 8, 12, init="identity")(x)
    torch.testing.assert_close(up[:, :8], x, rtol=1e-5, atol=1e-5)
    assert torch.allclose(up[:, 8:], torch.zeros(3, 4), atol=1e-6)
    down = build_projector(kind, 8, 5, init="identity")(x)
    torch.testing.assert_close(down, x[:, :5], rtol=1e-5, atol=1e-5)


def test_xavier_and_kaiming_inits_follow_their_distributions():
    fan = 512
    xav = build_projector("linear", fan, fan, init="xavier").weight
    bound = math.sqrt(6.0 / (2 * fan))
    assert xav.abs().max() <= bound + 1e-7 and xav.abs().max() > 0.95 * bound
    kai = build_projector("linear", fan, fan, init="kaiming").weight
    assert kai.std().item() == pytest.approx(1.0 / math.sqrt(fan), rel=0.05)
    assert kai.abs().max() > bound  # normal, not bounded like xavier / torch's default uniform
    assert torch.count_nonzero(build_projector("linear", 4, 4).bias) == 0


def test_identity_kind_needs_equal_dims():
    assert isinstance(build_projector("identity", 8, 8), torch.nn.Identity)
    with pytest.raises(ValueError, match="in_dim == out_dim, got 8 -> 12"):
        build_projector("identity", 8, 12)


def test_unknown_kind_and_init_list_valid_names():
    with pytest.raises(ValueError) as e:
        build_projector("transformer", 4, 4)
    assert all(k in str(e.value) for k in PROJECTOR_KINDS)
    with pytest.raises(ValueError) as e:
        build_projector("linear", 4, 4, init="normal")
    assert all(i in str(e.value) for i in PROJECTOR_INITS)


def test_impossible_combinations_raise():
    with pytest.raises(ValueError, match="mlp"):
        build_projector("mlp", 4, 4, init="identity")
    with pytest.raises(ValueError, match="orthogonal"):
        build_projector("orthogonal", 4, 4, init="zero")
    with pytest.raises(ValueError, match="height"):
        build_projector("fam", 4, 4)
    with pytest.raises(ValueError, match="max_len"):
        build_projector("fam_seq", 4, 4)


def test_mlp_structure_and_hidden_dim():
    proj = build_projector("mlp", 6, 10, hidden_dim=32)
    layers = list(proj)
    assert isinstance(layers[1], torch.nn.GELU)
    assert layers[0].weight.shape == (32, 6) and layers[2].weight.shape == (10, 32)


def _assert_semi_orthogonal(w):
    small = min(w.shape)
    gram = w @ w.T if w.shape[0] == small else w.T @ w
    torch.testing.assert_close(gram, torch.eye(small), rtol=0, atol=1e-5)


@pytest.mark.parametrize("d_in,d_out", [(8, 8), (8, 12), (12, 8)])
def test_orthogonal_stays_orthogonal_after_optimizer_step(d_in, d_out):
    torch.manual_seed(0)
    proj = build_projector("orthogonal", d_in, d_out)
    _assert_semi_orthogonal(proj.weight.detach())
    before = proj.weight.detach().clone()
    opt = torch.optim.Adam(proj.parameters(), lr=0.1)
    for step in range(3):
        loss = (proj(rand(16, d_in, seed=step)) - rand(16, d_out, seed=10 + step)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = proj.weight.detach()
    assert not torch.allclose(before, after, atol=1e-3)
    _assert_semi_orthogonal(after)


# --------------------------------------------------------------------------- FAM (feature maps)


def _numpy_highpass(x, rh, rw):
    """Full complex FFT reference: zero |ky| <= rh and |kx| <= rw, back to space."""
    spec = np.fft.fft2(x, norm="ortho")
    h, w = x.shape[-2:]
    ky = np.abs(np.fft.fftfreq(h) * h).round()
    kx = np.abs(np.fft.fftfreq(w) * w).round()
    low = (ky[:, None] <= rh) & (kx[None, :] <= rw)
    spec[..., low] = 0
    return np.fft.ifft2(spec, norm="ortho").real


def test_fam_output_shape_and_size_check():
    fam = FrequencyAttention(3, 5, 8, 10)
    assert fam(rand(2, 3, 8, 10)).shape == (2, 5, 8, 10)
    with pytest.raises(ValueError, match="spatial size"):
        fam(rand(2, 3, 8, 8))


def test_fam_highpass_removes_constant_input():
    fam = FrequencyAttention(2, 3, 8, 8)
    const = torch.full((2, 2, 8, 8), 3.7)
    assert fam.global_branch(const).abs().max() < 1e-5
    assert fam.global_branch(rand(2, 2, 8, 8, seed=5)).abs().max() > 1e-3


def test_highpass_band_sizes():
    m = highpass_mask_2d(56, 56, 0.1)  # half-width int(0.1 * 28) = 2
    assert m.shape == (56, 29)
    assert (~m).sum() == 5 * 3  # |ky| <= 2 (5 rows) x kx <= 2 (3 cols)
    assert not m[0, 0] and not m[-2, 2] and m[3, 0] and m[0, 3]
    assert (~highpass_mask_2d(8, 8, 0.1)).sum() == 1  # only DC, never an empty band
    assert highpass_mask_1d(40, 0.1).tolist() == [False, False, False] + [True] * 18


@pytest.mark.parametrize("size,cutoff", [((8, 8), 0.1), ((20, 12), 0.3), ((9, 7), 0.5)])
def test_fam_global_branch_matches_numpy(size, cutoff):
    h, w = size
    fam = FrequencyAttention(2, 3, h, w, cutoff=cutoff)
    mix = rand(2, 3, seed=6)
    with torch.no_grad():  # frequency-flat real channel mixing -> mix of high-passed channels
        fam.global_filter.zero_()
        fam.global_filter[..., 0] = mix[:, :, None, None]
    x = rand(2, 2, h, w, seed=7)
    hp = _numpy_highpass(x.double().numpy(), int(cutoff * (h // 2)), int(cutoff * (w // 2)))
    expected = np.einsum("bihw,io->bohw", hp, mix.double().numpy())
    np.testing.assert_allclose(fam.global_branch(x).detach().numpy(), expected, atol=1e-5)


def test_fam_output_mixes_branches_with_learnable_rates():
    fam = FrequencyAttention(2, 2, 6, 6)
    x = rand(1, 2, 6, 6, seed=8)
    expected = 0.5 * fam.global_branch(x) + 0.5 * fam.local(x)
    torch.testing.assert_close(fam(x), expected)


def test_fam_gradients_reach_complex_filter():
    fam = FrequencyAttention(3, 4, 8, 8)
    fam(rand(2, 3, 8, 8, seed=9)).pow(2).mean().backward()
    g = fam.global_filter.grad
    assert g is not None and torch.isfinite(g).all()
    assert g[..., 0].abs().sum() > 0 and g[..., 1].abs().sum() > 0  # real and imaginary parts
    assert fam.rate_global.grad.abs() > 0 and fam.local.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- FAM (sequences)


@pytest.mark.parametrize("t", [3, 7, 16])
def test_sequence_fam_shapes_for_short_and_full_sequences(t):
    fam = SequenceFrequencyAttention(8, 12, max_len=16)
    assert fam(rand(2, t, 8, seed=t)).shape == (2, t, 12)
    assert fam(rand(4, 2, t, 8, seed=t)).shape == (4, 2, t, 12)


def test_sequence_fam_rejects_longer_than_max_len():
    with pytest.raises(ValueError, match="exceeds max_len=16"):
        SequenceFrequencyAttention(8, 8, max_len=16)(rand(1, 17, 8))


@pytest.mark.parametrize("t", [5, 12, 16])
def test_sequence_fam_global_branch_is_highpass_of_input(t):
    fam = SequenceFrequencyAttention(4, 4, max_len=16, cutoff=0.3)
    with torch.no_grad():
        fam.mix.weight.copy_(torch.eye(4))  # filter starts all-pass -> global = high-passed x
    x = rand(2, t, 4, seed=11)
    spec = np.fft.fft(x.double().numpy(), axis=1, norm="ortho")
    k = np.abs(np.fft.fftfreq(t) * t).round()
    spec[:, k <= int(0.3 * (t // 2)), :] = 0
    expected = np.fft.ifft(spec, axis=1, norm="ortho").real
    np.testing.assert_allclose(fam.global_branch(x).detach().numpy(), expected, atol=1e-5)
    const = torch.full((2, t, 4), -2.0)
    assert fam.global_branch(const).abs().max() < 1e-5


def test_sequence_fam_filter_interpolation_for_short_sequences():
    fam = SequenceFrequencyAttention(3, 3, max_len=16)
    with torch.no_grad():
        fam.global_filter.copy_(rand(9, 3, 2, seed=12))
    full = torch.view_as_complex(fam.global_filter.detach().contiguous())
    torch.testing.assert_close(fam.filter_for(16), full)
    torch.testing.assert_close(fam.filter_for(8), full[::2])  # bins k/8 = (2k)/16 exactly
    torch.testing.assert_close(fam.filter_for(5)[1], 0.8 * full[3] + 0.2 * full[4])  # 1/5 -> bin 3.2


def test_sequence_fam_mask_blocks_padding_garbage_and_grads_reach_filter():
    fam = SequenceFrequencyAttention(4, 6, max_len=8)
    x = rand(2, 8, 4, seed=13)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    clean = fam(x.masked_fill(~mask[..., None], 0.0), mask=mask)
    dirty = x.clone()
    dirty[~mask] = 1e4
    out = fam(dirty, mask=mask)
    torch.testing.assert_close(out[mask], clean[mask])
    out.pow(2).mean().backward()
    assert fam.global_filter.grad is not None and fam.global_filter.grad.abs().sum() > 0


# --------------------------------------------------------------------------- layer maps


def test_layer_maps_for_4_student_30_teacher():
    assert build_layer_map("uniform", 4, 30) == [(0, 7), (1, 14), (2, 22), (3, 29)]
    assert build_layer_map("skip", 4, 30) == [(0, 6), (1, 13), (2, 20), (3, 27)]  # k = 30 // 4
    assert build_layer_map("skip", 4, 30, k=5) == [(0, 4), (1, 9), (2, 14), (3, 19)]
    assert build_layer_map("last", 4, 30) == [(3, 29)]
    assert build_layer_map("last_k", 4, 30, k=3) == [(1, 27), (2, 28), (3, 29)]
    assert build_layer_map("explicit", 4, 30, pairs=[(0, 0), (-1, -1), (2, -10)]) == [(0, 0), (3, 29), (2, 20)]


def test_uniform_map_other_depths():
    assert build_layer_map("uniform", 6, 6) == [(i, i) for i in range(6)]
    assert build_layer_map("uniform", 6, 12) == [(i, 2 * i + 1) for i in range(6)]
    assert build_layer_map("uniform", 4, 2) == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert build_layer_map("uniform", 3, 1) == [(0, 0), (1, 0), (2, 0)]


def test_layer_map_range_errors_name_both_depths():
    with pytest.raises(ValueError) as e:
        build_layer_map("explicit", 4, 30, pairs=[(0, 40)])
    assert str(e.value) == "layer map asks for teacher layer 40 but the teacher has 30 layers (0..29)"
    with pytest.raises(ValueError, match=r"student layer 4 but the student has 4 layers \(0..3\)"):
        build_layer_map("explicit", 4, 30, pairs=[(4, 0)])
    with pytest.raises(ValueError, match=r"teacher layer -31 but the teacher has 30 layers"):
        build_layer_map("explicit", 4, 30, pairs=[(0, -31)])
    with pytest.raises(ValueError, match=r"teacher layer 31 but the teacher has 30 layers \(0..29\)"):
        build_layer_map("skip", 4, 30, k=8)
    with pytest.raises(ValueError, match="k=5 but the student has 4 layers and the teacher has 30"):
        build_layer_map("last_k", 4, 30, k=5)


def test_layer_map_bad_arguments():
    with pytest.raises(ValueError) as e:
        build_layer_map("random", 4, 30)
    assert all(s in str(e.value) for s in ("uniform", "skip", "last", "last_k", "explicit"))
    with pytest.raises(ValueError, match="pairs"):
        build_layer_map("explicit", 4, 30)
    with pytest.raises(ValueError, match="k must be"):
        build_layer_map("last_k", 4, 30)
    with pytest.raises(ValueError, match="n_teacher"):
        build_layer_map("uniform", 4, 0)


def test_format_layer_map():
    assert format_layer_map([(0, 7), (1, 14)]) == "layer map (2 pairs): s0->t7, s1->t14"
    assert format_layer_map([(3, 29)]) == "layer map (1 pair): s3->t29"


def test_learned_layer_map_starts_uniform_and_learns():
    torch.manual_seed(0)
    lm = LearnedLayerMap(2, 4, dim=3)
    teachers = [rand(2, 5, 3, seed=20 + j) for j in range(4)]
    torch.testing.assert_close(lm.weights(), torch.full((2, 4), 0.25))
    mixed = lm(teachers)
    assert len(mixed) == 2
    torch.testing.assert_close(mixed[0], torch.stack(teachers).mean(0))

    # student layer 1 "looks like" teacher layer 2 -> the map should move there
    opt = torch.optim.SGD(lm.parameters(), lr=5.0)
    for _ in range(50):
        loss = (lm(teachers)[1] - teachers[2]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert lm.weights()[1].argmax().item() == 2 and lm.weights()[1, 2] > 0.5
    assert lm.hard_map()[1] == (1, 2)


def test_learned_layer_map_describe_and_checks():
    lm = LearnedLayerMap(3, 5, dim=4)
    with torch.no_grad():
        lm.logits[0, 4] = 10.0
    text = lm.describe()
    assert text.splitlines()[0].startswith("learned layer map (3 student <- 5 teacher")
    assert "s0 <- t4:1.00" in text and "s2 <-" in text
    with pytest.raises(ValueError, match="expected 5 teacher layers"):
        lm([rand(1, 4)] * 4)
    with pytest.raises(ValueError, match="width 6"):
        lm([rand(1, 6)] * 5)


@pytest.mark.parametrize("strategy", ["skip", "uniform", "last", {"strategy": "last_k", "k": 2}, [[0, 1], [-1, -1]]])
@pytest.mark.parametrize("student_tap", ["hidden_states", "model.layers.*"])
@pytest.mark.parametrize("teacher_tap", ["hidden_states", "model.layers.*"])
def test_layer_maps_name_the_same_blocks_whichever_tap_form(strategy, student_tap, teacher_tap):
    """Issue 10: `hidden_states` taps counted the embedding output as layer 0, so skip paired student block 1 with
    teacher block 1 of 4 (with model.layers.* taps: teacher block 3). Block indices now mean blocks on every tap form,
    and the term's value is the mean loss over exactly those blocks' outputs."""
    from kdforge.distiller import Distiller
    from kdforge.losses.features import hidden_mse
    from kdforge.models import tiny_llama

    teacher, student = tiny_llama(layers=4, seed=1), tiny_llama(layers=2, seed=2)
    d = Distiller(teacher, student, [{"loss": "hidden_mse", "student": student_tap, "teacher": teacher_tap,
                                      "layer_map": strategy}])
    term = d.feature_terms["0"]
    n_s, n_t = 2, 4
    if isinstance(strategy, list):
        expected = [(0, 1), (1, 3)]
    else:
        spec = strategy if isinstance(strategy, dict) else {"strategy": strategy}
        expected = build_layer_map(spec["strategy"], n_s, n_t, **{k: v for k, v in spec.items() if k != "strategy"})
    assert term.block_pairs == expected
    if strategy == "skip":
        assert expected == [(0, 1), (1, 3)]  # the last student block learns from the teacher's last block

    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        s_out = student(input_ids=ids, output_hidden_states=True).hidden_states
        t_out = teacher(input_ids=ids, output_hidden_states=True).hidden_states
        _, values = d(batch)
    # block b's output: hidden_states[b + 1] (the last one after the final norm, as HF returns it); a module tap
    # sees the block's raw output, equal to hidden_states[b + 1] for every block but the last
    def block(out, b, n, tap):
        if tap == "model.layers.*" and b == n - 1:
            return None
        return out[b + 1]

    refs = []
    counted = torch.ones_like(ids, dtype=torch.bool)
    counted[:, -1] = False  # the distiller counts the positions that have a next-token target
    for i, j in expected:
        s, t = block(s_out, i, n_s, student_tap), block(t_out, j, n_t, teacher_tap)
        if s is None or t is None:
            return  # a last block through a module tap has no norm applied: checked by the pairs above
        refs.append(hidden_mse(s, t, mask=counted))
    torch.testing.assert_close(values["hidden_mse"], torch.stack(refs).mean())


def test_embedding_outputs_are_paired_only_on_request():
    from kdforge.distiller import Distiller
    from kdforge.errors import KDForgeError
    from kdforge.models import tiny_llama

    teacher, student = tiny_llama(layers=4, seed=1), tiny_llama(layers=2, seed=2)
    d = Distiller(teacher, student, [{"loss": "hidden_mse", "student": "hidden_states", "teacher": "hidden_states",
                                      "layer_map": {"strategy": "skip", "embeddings": True}}])
    assert d.feature_terms["0"].pairs == [(0, 0), (1, 2), (2, 4)]  # embeddings, then blocks (0,1), (1,3)
    with pytest.raises(KDForgeError, match="embeddings: true"):
        Distiller(teacher, student, [{"loss": "hidden_mse", "student": "model.layers.*", "teacher": "hidden_states",
                                      "layer_map": {"strategy": "skip", "embeddings": True}}])


def test_a_learned_layer_map_over_hidden_states_mixes_blocks_only():
    from kdforge.distiller import Distiller
    from kdforge.models import tiny_llama

    teacher, student = tiny_llama(layers=4, seed=1), tiny_llama(layers=2, seed=2)
    d = Distiller(teacher, student, [{"loss": "hidden_mse", "student": "hidden_states", "teacher": "hidden_states",
                                      "layer_map": "learned"}])
    term = d.feature_terms["0"]
    assert (term.learned.n_student, term.learned.n_teacher) == (2, 4)
    assert term.pairs == [(1, 0), (2, 1)]


def test_a_student_made_of_teacher_blocks_learns_from_its_source_blocks_by_default():
    """Issue 16: student layers [0, 2, 3] of a 4-block teacher with the default (uniform) map paired student block 0
    (a copy of teacher block 0) with teacher block 1. Without a layer_map each block now learns from its source."""
    from kdforge.distiller import Distiller
    from kdforge.models import student_from_teacher_layers, tiny_llama

    teacher = tiny_llama(layers=4, seed=1)
    student = student_from_teacher_layers(teacher, [0, 2, -1])
    for tap in ("model.layers.*", "hidden_states"):
        d = Distiller(teacher, student, [{"loss": "hidden_mse", "student": tap, "teacher": tap}])
        assert d.feature_terms["0"].block_pairs == [(0, 0), (1, 2), (2, 3)]
    chosen = Distiller(teacher, student, [{"loss": "hidden_mse", "student": "model.layers.*",
                                           "teacher": "model.layers.*", "layer_map": "uniform"}])
    assert chosen.feature_terms["0"].block_pairs == build_layer_map("uniform", 3, 4)


def test_an_unknown_layer_map_lists_every_strategy_learned_included():
    from kdforge.distiller import Distiller
    from kdforge.errors import KDForgeError
    from kdforge.models import tiny_llama

    with pytest.raises(KDForgeError, match="unknown layer_map strategy 'uniformm'; valid: uniform, skip, last, "
                                           "last_k, learned, or explicit"):
        Distiller(tiny_llama(layers=4), tiny_llama(layers=2), [{"loss": "hidden_mse", "student": "model.layers.*",
                                                               "teacher": "model.layers.*", "layer_map": "uniformm"}])
