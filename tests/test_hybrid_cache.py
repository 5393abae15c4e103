"""The hybrid teacher cache (exact top-K head + N draws from the tail): the forward-KL estimator against a direct
computation and its expectation (value and gradient, iid and systematic), its two limits (K = 0: the sampled
estimator; no tail mass: the exact top-K KL), chunked = plain, storage round trip, reproducibility, resume, and the
one-line refusals."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from evalkit import SyntheticTokenizer
from kdforge.errors import KDForgeError
from kdforge.losses import chunked as chunked_mod
from kdforge.losses.chunked import ChunkedTerm, chunked_logit_terms
from kdforge.losses.logits import LOGIT_LOSSES, forward_kl
from kdforge.losses.sparse import HybridLogits, SampledLogits, SparseLogits
from kdforge.teachers import cache as cache_mod
from kdforge.teachers.cache import CacheOptions, CachedTeacher, build_cache, sample_teacher, top_k_log_probs

NEG_INF = float("-inf")


def _entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p = torch.log_softmax(logits.double() / temperature, -1)
    return -torch.where(log_p > NEG_INF, log_p.exp() * log_p, 0.0).sum(-1)


def _hybrid_of(logits: torch.Tensor, k: int, n: int, temperature: float, sampling: str = "iid",
               seed: int = 0) -> HybridLogits:
    """The exact (unquantised) hybrid teacher of dense logits [M, V], built with the cache's own functions."""
    log_p, ids, _, log_rest = top_k_log_probs(logits, k, temperature)
    opts = CacheOptions(mode="hybrid", k=k, samples=n, sampling=sampling, seed=seed, temperature=temperature)
    tail, entropy = sample_teacher(logits, cache_mod._uniforms(opts, [0], logits.shape[0]), temperature,
                                   exclude=ids)
    return HybridLogits(ids, log_p, log_rest, tail, entropy, temperature)


def test_the_estimator_is_minus_entropy_minus_the_head_minus_the_scaled_tail_draws():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    t, k, n = 2.0, 3, 5
    log_p = torch.log_softmax(teacher.double() / t, -1)
    head_lp, head = log_p.topk(k, -1)
    tail_lm = torch.logsumexp(log_p.scatter(-1, head, NEG_INF), -1)
    tail = torch.randint(0, 11, (2, 3, n), generator=g)  # any ids: the formula, not the draws, is under test
    hybrid = HybridLogits(head, head_lp.float(), tail_lm.float(), tail, _entropy(teacher, t).float(), t)
    got = forward_kl(student, hybrid, temperature=t, reduction="none")
    log_q = torch.log_softmax(student.double() / t, -1)
    for b in range(2):
        for p in range(3):
            direct = -_entropy(teacher[b, p], t)
            direct -= sum(log_p[b, p, i].exp() * log_q[b, p, i] for i in head[b, p].tolist())
            direct -= tail_lm[b, p].exp() * sum(log_q[b, p, j] for j in tail[b, p].tolist()) / n
            assert math.isclose(got[b, p].item(), t * t * direct.item(), rel_tol=1e-5, abs_tol=1e-5)


@pytest.mark.parametrize("sampling", ["iid", "systematic"])
def test_with_many_draws_the_value_and_gradient_match_the_dense_forward_kl(sampling):
    """100k tail draws of one distribution: never a head id or a -inf id; their frequencies follow the tail
    distribution (p / m outside the head); value and gradient match the dense forward KL."""
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(1, 40, generator=g) * 2
    teacher[0, 7] = NEG_INF
    student = torch.randn(1, 40, generator=g, requires_grad=True)
    t, k, n = 1.5, 5, 100_000
    hybrid = _hybrid_of(teacher, k, n, t, sampling)
    head, tail = hybrid.ids[0].tolist(), hybrid.tail_ids[0]
    assert not set(tail.tolist()) & set(head) and 7 not in tail.tolist()
    p = torch.softmax(teacher.double() / t, -1)[0]
    m = p.sum() - p[head].sum()
    assert math.isclose(hybrid.tail_log_mass.exp().item(), m.item(), rel_tol=1e-4)
    freq = torch.bincount(tail, minlength=40).double() / n
    want = p.clone()
    want[head] = 0
    want /= m
    tol = 1.0 / n if sampling == "systematic" else 4 * (want * (1 - want) / n).sqrt().max().item()
    assert (freq - want).abs().max().item() <= tol + 1e-7
    dense = forward_kl(student, teacher, temperature=t)
    (dense_grad,) = torch.autograd.grad(dense, student)
    est = forward_kl(student, hybrid, temperature=t)
    (grad,) = torch.autograd.grad(est, student)
    # Monte-Carlo error of the tail term: iid within 5 standard deviations; systematic within its rounding of
    # each count to floor or ceil of N·p (|error| <= 1/N per id)
    log_q = torch.log_softmax(student.detach().double() / t, -1)[0]
    mass = want > 0
    if sampling == "iid":
        spread = (want[mass] * (log_q[mass] - (want[mass] * log_q[mass]).sum()) ** 2).sum().sqrt().item()
        value_tol, grad_tol = 5 * t * t * m.item() * spread / math.sqrt(n), 5 * t * m.item() * tol / 4
    else:
        value_tol, grad_tol = t * t * m.item() * log_q[mass].abs().sum().item() / n, t * m.item() / n
    assert abs(est.item() - dense.item()) <= value_tol + 1e-5
    assert (grad - dense_grad).abs().max().item() <= grad_tol + 1e-5
    assert value_tol < 0.02  # and the test has teeth


def test_with_no_head_it_is_the_sampled_estimator():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(2, 4, 13, generator=g, requires_grad=True)
    draws = torch.randint(0, 13, (2, 4, 6), generator=g)
    entropy = torch.rand(2, 4, generator=g)
    empty = torch.zeros(2, 4, 0)
    hybrid = HybridLogits(empty.long(), empty, torch.zeros(2, 4), draws, entropy, 1.5)
    sampled = SampledLogits(draws, entropy, 1.5)
    a, b = forward_kl(student, hybrid, temperature=1.5), forward_kl(student, sampled, temperature=1.5)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, student)[0], torch.autograd.grad(b, student)[0])


def test_with_no_tail_mass_it_is_the_exact_top_k_forward_kl():
    """A teacher whose mass lies on K ids: the cache's functions give log_rest = -inf, the tail draws get weight 0
    (even where the student puts -inf), and the estimate equals the top-K cache's KL and the dense one."""
    g = torch.Generator().manual_seed(4)
    teacher = torch.full((3, 20), NEG_INF)
    teacher[:, :4] = torch.randn(3, 4, generator=g)
    student = torch.randn(3, 20, generator=g)
    student[:, 19] = NEG_INF  # a draw of a row with no tail may land here: weight 0, no NaN
    student.requires_grad_(True)
    hybrid = _hybrid_of(teacher, 4, 6, 2.0)
    assert bool(torch.isneginf(hybrid.tail_log_mass).all())
    values = [forward_kl(student, hybrid, temperature=2.0),
              forward_kl(student, SparseLogits.from_dense(teacher, 4, lse_temperature=2.0), temperature=2.0),
              forward_kl(student, teacher, temperature=2.0)]
    grads = [torch.autograd.grad(v, student)[0] for v in values]
    for v, gr in zip(values[1:], grads[1:]):
        torch.testing.assert_close(values[0], v)
        torch.testing.assert_close(grads[0], gr)


@pytest.mark.parametrize("sampling", ["iid", "systematic"])
def test_the_chunked_closed_form_equals_the_plain_loss(sampling, monkeypatch):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, requires_grad=True)
    teacher = _hybrid_of(torch.randn(12, 30, generator=g) * 3, 3, 5, 2.0, sampling)
    teacher = HybridLogits(*(x.reshape(2, 6, *x.shape[1:]) for x in (
        teacher.ids, teacher.log_probs, teacher.tail_log_mass, teacher.tail_ids, teacher.entropy)), 2.0)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False

    def no_generic(*args, **kwargs):
        raise AssertionError("the hybrid forward KL fell back on the generic path")

    monkeypatch.setattr(chunked_mod._Plan, "_generic", no_generic)
    total, _ = chunked_logit_terms([ChunkedTerm(forward_kl, 1.0, {"temperature": 2.0})], hidden, weight, teacher,
                                   mask=mask, chunk_size=5)
    grads = torch.autograd.grad(total, (hidden, weight))
    plain = forward_kl(hidden @ weight.T, teacher, mask=mask, temperature=2.0)
    ref_grads = torch.autograd.grad(plain, (hidden, weight))
    torch.testing.assert_close(total, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_losses_without_an_estimator_refuse_a_hybrid_teacher():
    hybrid = _hybrid_of(torch.randn(4, 9), 2, 3, 1.0)
    student, labels = torch.randn(4, 9), torch.zeros(4, dtype=torch.long)
    for name, fn in LOGIT_LOSSES.items():
        if fn is forward_kl:
            continue
        with pytest.raises(ValueError, match="no estimator for a hybrid teacher cache"):
            fn(student, hybrid, labels=labels) if name == "decoupled_kd" else fn(student, hybrid)
    with pytest.raises(ValueError, match="no estimator for a hybrid teacher cache"):
        forward_kl(student, hybrid, standardize=True)
    with pytest.raises(ValueError, match="temperature 2.0 on a teacher sampled at 1.0: rebuild the cache with"):
        forward_kl(student, hybrid, temperature=2.0)


def _hybrid_cache(tmp, teacher, blocks, **opts):
    options = CacheOptions(**{"mode": "hybrid", "k": 4, "samples": 8, "temperature": 2.0, "batch_size": 4,
                              "shard_blocks": 4, **opts})
    return build_cache(teacher, SyntheticTokenizer(), blocks, tmp, teacher_spec={"model": "synthetic"}, options=options)


@pytest.mark.parametrize("id_format", ["packed", "plain"])
def test_a_hybrid_cache_stores_the_head_the_tail_draws_and_the_entropy(peaked_teacher, tmp_path, id_format):
    teacher, ids = peaked_teacher
    index = _hybrid_cache(tmp_path / "c", teacher, ids, ids=id_format)
    opts = index["meta"]["options"]
    assert opts["mode"] == "hybrid" and (opts["k"], opts["samples"], opts["values"]) == (4, 8, "int6")
    assert "lse_dtype" not in opts
    parts = index["bytes_per_token_parts"]
    assert "logsumexp" not in parts and parts["entropy"] == 4.0 and parts["log_rest"] == 2.0
    if id_format == "packed":
        assert parts["ids"] == cache_mod.packed_id_bytes(300, 4)
        assert parts["tail_ids"] == cache_mod.packed_id_bytes(300, 8)
    assert index["bytes_per_token"] >= sum(parts.values())  # the payload + each shard's safetensors header
    out = CachedTeacher(tmp_path / "c")({"input_ids": ids[[4, 1]], "block_index": torch.tensor([4, 1])}).logits
    assert isinstance(out, HybridLogits) and out.temperature == 2.0
    with torch.no_grad():
        logits = teacher(input_ids=ids[[4, 1]]).logits.reshape(32, 300)
    log_p, want_head, _, log_rest = top_k_log_probs(logits, 4, 2.0)
    uniforms = torch.cat([cache_mod._uniforms(CacheOptions(mode="hybrid", samples=8), [b], 16) for b in (4, 1)])
    want_tail, want_entropy = sample_teacher(logits, uniforms, 2.0, exclude=want_head)
    head = out.ids.reshape(32, 4)
    order = head.argsort(-1)
    assert torch.equal(head.sort(-1).values, want_head.sort(-1).values)
    exact = torch.log_softmax(logits.double() / 2.0, -1)
    assert (out.log_probs.reshape(32, 4).double().exp() - exact.gather(-1, head).exp()).abs().max() < 0.02
    total = out.log_probs.exp().sum(-1) + out.tail_log_mass.exp()  # the head rescaled to 1 - tail mass
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.tail_log_mass.reshape(32), log_rest, rtol=2e-3, atol=2e-3)
    assert torch.equal(out.tail_ids.reshape(32, 8), want_tail)
    torch.testing.assert_close(out.entropy.reshape(32), want_entropy)
    for row in range(32):
        assert not set(want_tail[row].tolist()) & set(head[row, order[row]].tolist())


def test_the_draws_do_not_depend_on_the_batch_size_or_a_resume(peaked_teacher, tmp_path):
    teacher, ids = peaked_teacher
    from safetensors.torch import load_file

    for sampling in ("iid", "systematic"):
        a, b = tmp_path / f"a_{sampling}", tmp_path / f"b_{sampling}"
        _hybrid_cache(a, teacher, ids, batch_size=4, sampling=sampling)
        _hybrid_cache(b, teacher, ids, batch_size=3, sampling=sampling)
        (b / "shard_00001.safetensors").unlink()  # as if killed before the last shard
        index = _hybrid_cache(b, teacher, ids, batch_size=3, sampling=sampling)
        assert index["complete"] and len(index["shards"]) == 2
        for name in ("shard_00000.safetensors", "shard_00001.safetensors"):
            x, y = load_file(str(a / name)), load_file(str(b / name))
            assert x.keys() == y.keys() and all(torch.equal(x[key], y[key]) for key in x)
    _hybrid_cache(tmp_path / "c", teacher, ids, seed=1)
    first = load_file(str(tmp_path / "a_iid" / "shard_00000.safetensors"))
    other = load_file(str(tmp_path / "c" / "shard_00000.safetensors"))
    assert torch.equal(first["ids"], other["ids"]) and not torch.equal(first["tail_ids"], other["tail_ids"])
    with pytest.raises(KDForgeError, match=r"holds a teacher cache of something else: seed \(cache 1, this run 0\)"):
        _hybrid_cache(tmp_path / "c", teacher, ids)


def test_top_k_and_sampled_caches_record_the_same_metadata_as_before_the_hybrid():
    def options(**kw):
        return set(cache_mod.cache_meta({"model": "m"}, SyntheticTokenizer(), torch.zeros(2, 4, dtype=torch.long), 300,
                                        CacheOptions(**kw))["options"])

    base = {"ids", "temperature", "features", "feature_dtype", "shard_blocks", "batch_size"}
    assert options(k=16) == base | {"k", "values", "lse_dtype"}
    assert options(mode="sampled") == base | {"mode", "samples", "sampling", "seed"}
    assert options(mode="hybrid") == base | {"k", "values", "mode", "samples", "sampling", "seed"}


@pytest.mark.parametrize("opts,message", [
    ({"k": 0}, r"^--top-k must be >= 1 with --mode hybrid, got 0 \(no head: use --mode sampled\)$"),
    ({"samples": 0}, r"^--samples must be >= 1 with --mode hybrid, got 0 \(no tail draws: use --mode top_k\)$"),
    ({"sampling": "stratified"}, r"^--sampling 'stratified' is not one of iid, systematic$"),
    ({"mode": "mixed"}, r"^--mode 'mixed' is not one of top_k, sampled, hybrid$")])
def test_bad_hybrid_options_are_refused_in_one_line(opts, message):
    with pytest.raises(KDForgeError, match=message):
        CacheOptions(**{"mode": "hybrid", **opts}).check()


def test_training_terms_a_hybrid_cache_cannot_serve_are_refused_naming_them(peaked_teacher, tmp_path):
    from kdforge.recipe import Term

    teacher, ids = peaked_teacher
    _hybrid_cache(tmp_path / "c", teacher, ids)
    cached = CachedTeacher(tmp_path / "c")
    cached.check_temperatures([Term(loss="forward_kl", temperature=2.0), Term(loss="cross_entropy")])
    refusals = [
        ([Term(loss="reverse_kl", temperature=2.0)],
         r"term 'reverse_kl' \(reverse_kl\) has no estimator for the hybrid teacher cache .*use forward_kl or build "
         r"a top-k cache \(kdforge cache-teacher --mode top_k\)"),
        ([Term(loss="forward_kl", temperature=2.0, standardize=True)], "has no estimator for the hybrid"),
        ([Term(loss="forward_kl")],
         r"uses temperature 1.0 but .* was sampled at temperature 2.0; rebuild it with --temperature 1.0"),
    ]
    for terms, message in refusals:
        with pytest.raises(KDForgeError, match=message) as err:
            cached.check_temperatures(terms)
        assert "\n" not in str(err.value)


def test_cache_teacher_mode_hybrid_then_training_from_it(tiny_assets, tmp_path):
    """`kdforge cache-teacher --mode hybrid --top-k 4 --samples 8`, then a chunked run from the cache: finite
    losses, and the refusal of a reverse-KL term at start-up."""
    from typer.testing import CliRunner

    from kdforge.cli import app
    from kdforge.recipe import parse_recipe
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
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    path = tmp_path / "cache"
    result = CliRunner().invoke(app, ["cache-teacher", str(tmp_path / "r.yaml"), "--mode", "hybrid", "--top-k", "4",
                                      "--samples", "8", "--sampling", "systematic", "--out", str(path)])
    assert result.exit_code == 0 and "top-4 head with int6 values + 8 systematic tail samples" in result.output, \
        result.output
    index = json.loads((path / "index.json").read_text())
    assert index["complete"] and index["meta"]["options"]["mode"] == "hybrid" and index["bytes_per_token"] > 0
    cached = {**recipe, "teacher": {**recipe["teacher"], "kind": "cache", "path": str(path)}}
    out = train(parse_recipe(cached), progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss/forward_kl"]) for r in rows)
    reverse = {**cached, "output_dir": str(tmp_path / "run2"), "objective": [{"loss": "reverse_kl"}]}
    with pytest.raises(KDForgeError, match="no estimator for the hybrid teacher cache"):
        train(parse_recipe(reverse), progress=False)
