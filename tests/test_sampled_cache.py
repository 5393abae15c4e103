"""The sampled teacher cache (Sparse Logit Sampling): draws, the forward-KL estimator (value and gradient, plain and
chunked) against direct computations and its expectation, storage round trip, reproducibility and refusals."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from evalkit import SyntheticTokenizer
from kdforge.errors import KDForgeError
from kdforge.losses.chunked import ChunkedTerm, chunked_logit_terms
from kdforge.losses.logits import forward_kl, reverse_kl
from kdforge.losses.sparse import SampledLogits
from kdforge.teachers import cache as cache_mod
from kdforge.teachers.cache import CacheOptions, CachedTeacher, build_cache, sample_teacher


def _entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p = torch.log_softmax(logits.double() / temperature, -1)
    return -torch.where(log_p > float("-inf"), log_p.exp() * log_p, 0.0).sum(-1)


def test_the_estimator_is_minus_entropy_minus_the_mean_log_q_of_the_draws():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    ids = torch.randint(0, 11, (2, 3, 5), generator=g)
    t = 2.0
    sampled = SampledLogits(ids, _entropy(teacher, t).float(), t)
    got = forward_kl(student, sampled, temperature=t, reduction="none")
    log_q = torch.log_softmax(student.double() / t, -1)
    for b in range(2):
        for p in range(3):
            direct = -_entropy(teacher[b, p], t) - sum(log_q[b, p, j] for j in ids[b, p].tolist()) / 5
            assert math.isclose(got[b, p].item(), t * t * direct.item(), rel_tol=1e-5, abs_tol=1e-5)
    # the draws as the whole distribution (N -> inf): the dense forward KL
    p = torch.softmax(teacher.double() / t, -1)
    exact = (-_entropy(teacher, t) - (p * log_q).sum(-1)) * t * t
    torch.testing.assert_close(exact, forward_kl(student.double(), teacher.double(), temperature=t, reduction="none"))


def test_draws_follow_the_teacher_and_the_estimate_is_unbiased():
    """200k draws of one distribution: their frequencies and the estimated forward KL and its gradient match the
    dense ones (iid and systematic), and a -inf logit is never drawn."""
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(1, 40, generator=g) * 2
    teacher[0, 7] = float("-inf")
    student = torch.randn(1, 40, generator=g, requires_grad=True)
    t, n = 1.5, 200_000
    p = torch.softmax(teacher.double() / t, -1)
    dense = forward_kl(student, teacher, temperature=t)
    (dense_grad,) = torch.autograd.grad(dense, student)
    for sampling in ("iid", "systematic"):
        opts = CacheOptions(mode="sampled", samples=n, sampling=sampling, temperature=t)
        ids, entropy = sample_teacher(teacher, cache_mod._uniforms(opts, [0], 1), t)
        assert bool((ids[0, 1:] >= ids[0, :-1]).all()) and 7 not in ids.tolist()[0]
        freq = torch.bincount(ids[0], minlength=40).double() / n
        tol = 1.0 / n if sampling == "systematic" else 4 * (p * (1 - p) / n).sqrt().max().item()
        assert (freq - p[0]).abs().max().item() <= tol + 1e-12
        torch.testing.assert_close(entropy.double(), _entropy(teacher, t), rtol=1e-5, atol=1e-6)
        est = forward_kl(student, SampledLogits(ids.unsqueeze(0)[0], entropy, t), temperature=t)
        (grad,) = torch.autograd.grad(est, student)
        assert abs(est.item() - dense.item()) < 5e-3
        assert (grad - dense_grad).abs().max().item() < 5e-3


def test_chunked_fast_path_equals_the_plain_loss_in_value_and_gradient():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, requires_grad=True)
    ids = torch.randint(0, 30, (2, 6, 4), generator=g).sort(-1).values
    teacher = SampledLogits(ids, torch.rand(2, 6, generator=g) * 3, 2.0)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    total, values = chunked_logit_terms([ChunkedTerm(forward_kl, 1.0, {"temperature": 2.0})], hidden, weight, teacher,
                                        mask=mask, chunk_size=5)
    grads = torch.autograd.grad(total, (hidden, weight))
    plain = forward_kl(hidden @ weight.T, teacher, mask=mask, temperature=2.0)
    ref_grads = torch.autograd.grad(plain, (hidden, weight))
    torch.testing.assert_close(total, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_losses_without_an_estimator_refuse_a_peaked_teacher():
    sampled = SampledLogits(torch.zeros(2, 3, dtype=torch.long), torch.ones(2), 1.0)
    with pytest.raises(ValueError, match="no estimator for a sampled teacher cache"):
        reverse_kl(torch.randn(2, 5), sampled)
    with pytest.raises(ValueError, match="no estimator"):
        forward_kl(torch.randn(2, 5), sampled, standardize=True)
    with pytest.raises(ValueError, match="temperature 2.0 on a teacher sampled at 1.0"):
        forward_kl(torch.randn(2, 5), sampled, temperature=2.0)


def _sampled(tmp, teacher, ids, **opts):
    options = CacheOptions(**{"mode": "sampled", "samples": 8, "temperature": 2.0, "batch_size": 4,
                              "shard_blocks": 4, **opts})
    return build_cache(teacher, SyntheticTokenizer(), ids, tmp, teacher_spec={"model": "synthetic"}, options=options)


def test_a_sampled_cache_stores_the_draws_and_the_entropy_and_reads_them_back(peaked_teacher, tmp_path):
    teacher, ids = peaked_teacher
    index = _sampled(tmp_path / "c", teacher, ids)
    opts = index["meta"]["options"]
    assert opts["mode"] == "sampled" and opts["samples"] == 8 and "values" not in opts
    assert index["bytes_per_token_parts"]["entropy"] == 4.0
    assert index["bytes_per_token_parts"]["ids"] == cache_mod.packed_id_bytes(300, 8)
    out = CachedTeacher(tmp_path / "c")(
        {"input_ids": ids[[4, 1]], "block_index": torch.tensor([4, 1])})
    with torch.no_grad():
        logits = teacher(input_ids=ids[[4, 1]]).logits
    uniforms = torch.cat([cache_mod._uniforms(CacheOptions(mode="sampled", samples=8), [b], 16) for b in (4, 1)])
    want_ids, want_entropy = sample_teacher(logits.reshape(32, 300), uniforms, 2.0)
    assert isinstance(out.logits, SampledLogits) and out.logits.temperature == 2.0
    assert torch.equal(out.logits.ids.reshape(32, 8), want_ids)
    torch.testing.assert_close(out.logits.entropy.reshape(32), want_entropy)
    torch.testing.assert_close(out.logits.entropy.reshape(32).double(), _entropy(logits.reshape(32, 300), 2.0),
                               rtol=1e-5, atol=1e-5)


def test_the_draws_do_not_depend_on_the_batch_size_or_a_resume(peaked_teacher, tmp_path):
    teacher, ids = peaked_teacher
    _sampled(tmp_path / "a", teacher, ids, batch_size=4)
    _sampled(tmp_path / "b", teacher, ids, batch_size=3)
    (tmp_path / "b" / "shard_00001.safetensors").unlink()  # as if killed before the last shard
    _sampled(tmp_path / "b", teacher, ids, batch_size=3)
    from safetensors.torch import load_file

    def shard(folder, name="shard_00000.safetensors"):
        return load_file(str(tmp_path / folder / name))

    for name in ("shard_00000.safetensors", "shard_00001.safetensors"):
        a, b = shard("a", name), shard("b", name)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    _sampled(tmp_path / "c", teacher, ids, seed=1)
    assert not torch.equal(shard("a")["ids"], shard("c")["ids"])


def test_a_top_k_cache_records_the_same_metadata_as_before_sampling_existed():
    meta = cache_mod.cache_meta({"model": "m"}, SyntheticTokenizer(), torch.zeros(2, 4, dtype=torch.long), 300,
                                CacheOptions(k=16))
    assert set(meta["options"]) == {"k", "values", "ids", "lse_dtype", "temperature", "features", "feature_dtype",
                                    "shard_blocks", "batch_size"}


@pytest.mark.parametrize("opts,message", [({"samples": 0}, "--samples must be >= 1, got 0"),
                                          ({"sampling": "stratified"}, "--sampling 'stratified' is not one of"),
                                          ({"mode": "topk"}, "--mode 'topk' is not one of top_k, sampled")])
def test_bad_sampling_options_are_refused_in_one_line(opts, message):
    with pytest.raises(KDForgeError, match=message):
        CacheOptions(**{"mode": "sampled", **opts}).check()


def test_training_terms_a_sampled_cache_cannot_serve_are_refused_naming_them(peaked_teacher, tmp_path):
    from kdforge.recipe import Term

    teacher, ids = peaked_teacher
    _sampled(tmp_path / "c", teacher, ids)
    cached = CachedTeacher(tmp_path / "c")
    cached.check_temperatures([Term(loss="forward_kl", temperature=2.0), Term(loss="cross_entropy")])
    with pytest.raises(KDForgeError, match=r"term 'reverse_kl' \(reverse_kl\) has no estimator for the sampled"):
        cached.check_temperatures([Term(loss="reverse_kl", temperature=2.0)])
    with pytest.raises(KDForgeError, match="uses temperature 1.0 but .* was sampled at temperature 2.0"):
        cached.check_temperatures([Term(loss="forward_kl")])


def test_training_from_a_sampled_cache_end_to_end(tiny_assets, tmp_path):
    """`kdforge cache-teacher --mode sampled`, then a chunked run from the cache: finite losses, a teacher loaded for
    evaluation only."""
    from kdforge.recipe import parse_recipe
    from kdforge.teachers.cache import cache_recipe_teacher
    from kdforge.train import train

    recipe = {
        "seed": 0, "output_dir": str(tmp_path / "run"), "teacher": {"model": str(tiny_assets["teacher"])},
        "student": {"init": "config", "config": {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64}},
        "data": {"corpus": str(tiny_assets["train"]), "validation": [str(tiny_assets["val"])], "seq_len": 32,
                 "max_train_tokens": 1024, "max_eval_tokens": 256},
        "objective": [{"loss": "cross_entropy", "weight": 0.5}, {"loss": "forward_kl", "weight": 0.5}],
        "train": {"steps": 3, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "save_every": 0, "log_every": 1,
                  "logit_chunk_size": 40},
    }
    path, index = cache_recipe_teacher(parse_recipe(recipe), out=tmp_path / "cache", options=CacheOptions(
        mode="sampled", samples=16, batch_size=8, shard_blocks=16))
    assert index["complete"]
    out = train(parse_recipe({**recipe, "teacher": {**recipe["teacher"], "kind": "cache", "path": str(path)}}),
                progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss/forward_kl"]) for r in rows)
