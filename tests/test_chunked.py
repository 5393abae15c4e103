"""Chunked logit losses equal the unchunked ones in value and gradient, for every loss, teacher kind and mask."""
from __future__ import annotations

import pytest
import torch

from kdforge.losses.chunked import ChunkedTerm, chunked_logit_loss, chunked_logit_terms
from kdforge.losses.logits import LOGIT_LOSSES, cross_entropy
from kdforge.losses.sparse import SparseLogits

B, T, D, V, K = 2, 7, 6, 11, 4
FAST = ("forward_kl", "reverse_kl", "generalized_jsd", "skew_forward_kl", "skew_reverse_kl", "total_variation",
        "decoupled_kd", "correlation_aware_kd", "cross_entropy")  # closed-form gradients for dense teachers; forward KL also for bucket/renormalize
KWARGS = {
    "generalized_jsd": {"beta": 0.3},
    "skew_forward_kl": {"alpha": 0.2},
    "skew_reverse_kl": {"alpha": 0.25},
    "decoupled_kd": {"alpha": 0.7, "beta": 2.0, "warmup": 0.5},
    "correlation_aware_kd": {"strong_k": 3, "w_binary": 0.5, "w_strong": 2.0, "w_weak": 3.0},
}



def _inputs(dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(V, D, generator=g, dtype=dtype).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=dtype) * 0.5).requires_grad_() if bias else None
    teacher = torch.randn(B, T, V, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 2] = -100
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[:, -1] = False  # like the distiller: the last position predicts nothing
    return hidden, weight, b, teacher, labels, mask


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


def _check(dtype, name, teacher_kind, temperature, chunk, fast=True):
    hidden, weight, b, dense, labels, mask = _inputs(dtype)
    kwargs = dict(KWARGS.get(name, {}))
    if name != "cross_entropy":
        kwargs["temperature"] = temperature
    if teacher_kind == "dense":
        teacher = dense
    else:
        teacher = SparseLogits.from_dense(dense, K, lse_temperature=temperature)
        kwargs["missing_mass"] = teacher_kind
    logits = hidden @ weight.T + b
    if name == "cross_entropy":
        ref = cross_entropy(logits, labels, mask=mask)
        got = chunked_logit_loss(name, hidden, weight, bias=b, mask=mask, labels=labels, chunk_size=chunk, fast=fast)
    else:
        fn = LOGIT_LOSSES[name]
        extra = {"labels": labels} if name == "decoupled_kd" else {}
        ref = fn(logits, teacher, mask=mask, **extra, **kwargs)
        got = chunked_logit_loss(name, hidden, weight, teacher, bias=b, mask=mask, chunk_size=chunk,
                                 labels=labels if extra else None, fast=fast, **kwargs)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, ref.to(got.dtype), **tol)
    for a, r in zip(_grads(got, hidden, weight, b), _grads(ref, hidden, weight, b)):
        torch.testing.assert_close(a, r, **tol)


@pytest.mark.parametrize("name", [*LOGIT_LOSSES, "cross_entropy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_teacher_equals_unchunked(name, dtype):
    for temperature, chunk in ((1.0, 3), (2.5, 5)):
        _check(dtype, name, "dense", temperature, chunk)
    if name in FAST:  # the closed-form gradient and the generic autograd path agree with the reference
        _check(dtype, name, "dense", 2.5, 5, fast=False)


@pytest.mark.parametrize("name", list(LOGIT_LOSSES))
@pytest.mark.parametrize("missing_mass", ["bucket", "renormalize", "uniform"])
def test_sparse_teacher_equals_unchunked(name, missing_mass):
    _check(torch.float64, name, missing_mass, 2.0, 4)
    _check(torch.float32, name, missing_mass, 1.0, 64)  # one chunk bigger than the batch
    if name in FAST:
        _check(torch.float64, name, missing_mass, 2.0, 4, fast=False)


def test_fast_path_hands_unusual_inputs_to_the_generic_path():
    """-inf vocabulary slots, standardize and a teacher tail the student rules out still match the reference."""
    hidden, weight, b, teacher, labels, mask = _inputs(torch.float64)
    teacher = teacher.clone()
    teacher[..., 3] = float("-inf")
    for kwargs in ({}, {"standardize": True, "temperature": 2.0}):
        ref = LOGIT_LOSSES["forward_kl"](hidden @ weight.T, teacher, mask=mask, **kwargs)
        got = chunked_logit_loss("forward_kl", hidden, weight, teacher, mask=mask, chunk_size=4, **kwargs)
        torch.testing.assert_close(got, ref)
        for a, r in zip(_grads(got, hidden, weight), _grads(ref, hidden, weight)):
            torch.testing.assert_close(a, r)
    sparse = SparseLogits.from_dense(teacher, K)
    with pytest.raises(ValueError, match="cached at temperature"):
        chunked_logit_loss("forward_kl", hidden, weight, sparse, mask=mask, temperature=2.0)


# Each closed-form path with the options that change its formula; the generic path is made to fail, so a silent
# fallback cannot pass for a closed form.
FAST_CASES = [
    ("forward_kl", {"standardize": True}),
    ("reverse_kl", {}),
    ("reverse_kl", {"standardize": True}),
    ("generalized_jsd", {"beta": 0.3}),
    ("generalized_jsd", {"beta": 0.0}),
    ("generalized_jsd", {"beta": 1.0}),
    ("generalized_jsd", {"beta": 0.7, "standardize": True}),
    ("skew_forward_kl", {"alpha": 0.2}),
    ("skew_forward_kl", {"alpha": 0.0}),
    ("skew_forward_kl", {"alpha": 0.6, "standardize": True}),
    ("skew_reverse_kl", {"alpha": 0.25}),
    ("skew_reverse_kl", {"alpha": 0.0}),
    ("skew_reverse_kl", {"alpha": 0.6, "standardize": True}),
    ("total_variation", {}),
    ("total_variation", {"standardize": True}),
    ("decoupled_kd", {"alpha": 0.7, "beta": 2.0, "warmup": 0.5}),
    ("decoupled_kd", {"standardize": True}),
    ("correlation_aware_kd", {"strong_k": 3, "w_binary": 0.5, "w_strong": 2.0, "w_weak": 3.0}),
    ("correlation_aware_kd", {"strong_k": 1, "scale_by_teacher_mass": False, "w_strong": 2.0, "w_weak": 3.0}),
    ("correlation_aware_kd", {"strong_k": 4, "standardize": True}),
]


@pytest.mark.parametrize("name,kwargs", FAST_CASES, ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k in FAST_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_closed_form_gradients_equal_unchunked_without_the_generic_path(name, kwargs, dtype, monkeypatch):
    """Masked rows, an ignore_index label, T = 1 and 2.5, chunks of 3 and 5 rows (14 rows: uneven splits)."""
    from kdforge.losses import chunked

    hidden, weight, b, teacher, labels, mask = _inputs(dtype)
    extra = {"labels": labels} if name == "decoupled_kd" else {}
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for temperature, chunk in ((1.0, 3), (2.5, 5)):
        kw = {**kwargs, "temperature": temperature}
        ref = LOGIT_LOSSES[name](hidden @ weight.T + b, teacher, mask=mask, **extra, **kw)
        generic = chunked_logit_loss(name, hidden, weight, teacher, bias=b, mask=mask, chunk_size=chunk, fast=False,
                                     **extra, **kw)
        with monkeypatch.context() as m:
            m.setattr(chunked._Plan, "_generic", lambda *a: pytest.fail(f"{name} {kw} fell back to the generic path"))
            got = chunked_logit_loss(name, hidden, weight, teacher, bias=b, mask=mask, chunk_size=chunk, **extra, **kw)
        for other in (ref, generic):
            torch.testing.assert_close(got, other.to(got.dtype), **tol)
        expected = _grads(ref, hidden, weight, b)
        for a, g, r in zip(_grads(got, hidden, weight, b), _grads(generic, hidden, weight, b), expected):
            torch.testing.assert_close(a, r, **tol)
            torch.testing.assert_close(g, r, **tol)


@pytest.mark.parametrize("name", FAST[:-1])
def test_closed_forms_hand_edge_cases_to_the_generic_path(name):
    """-inf teacher and student slots, a teacher sure of the label (DKD) or of its strong group (CAKD), strong_k >= V,
    and chunks where a term counts no row: all equal the unchunked loss, through a closed form or the generic path."""
    hidden, weight, b, teacher, labels, mask = _inputs(torch.float64)
    kwargs = dict(KWARGS.get(name, {}), temperature=1.5)
    labels = labels.clone()
    labels[0, :5] = -100  # with chunk 2: chunks in which DKD counts no row while a forward KL term does
    sure = teacher.clone()
    sure.scatter_(-1, labels.clamp_min(0).unsqueeze(-1), 1e4)  # p_label = 1: no mass off the label
    peaked = teacher.clone()
    peaked.scatter_(-1, labels.clamp_min(0).unsqueeze(-1), 200.0)  # 1 - p_label ~ e^-200: no cancellation allowed
    inf_teacher = teacher.clone()
    inf_teacher[..., 3] = float("-inf")
    neg_bias = b.detach().clone()
    neg_bias[5] = float("-inf")  # a student slot that is ruled out where the teacher also is (below)
    inf_both = inf_teacher.clone()
    inf_both[..., 5] = float("-inf")
    cases = [(teacher, b, kwargs), (sure, b, kwargs), (peaked, b, kwargs), (inf_teacher, b, kwargs), (inf_both, neg_bias, kwargs),
             (teacher, b, {**kwargs, "standardize": True})]
    if name == "correlation_aware_kd":
        cases += [(teacher, b, {**kwargs, "strong_k": V}), (teacher, b, {**kwargs, "strong_k": V + 3})]
    if name == "generalized_jsd":
        cases += [(inf_teacher, b, {**kwargs, "beta": 0.0}), (inf_both, neg_bias, {**kwargs, "beta": 1.0})]
    if name.startswith("skew"):
        cases += [(teacher, b, {**kwargs, "alpha": 1.0}), (inf_both, neg_bias, {**kwargs, "alpha": 0.0})]
    for t, bias, kw in cases:
        extra = {"labels": labels} if name == "decoupled_kd" else {}
        terms = [ChunkedTerm(name, 1.0, kw), ChunkedTerm("cross_entropy", 0.5)]
        total, _ = chunked_logit_terms(terms, hidden, weight, t, bias=bias, mask=mask, labels=labels, chunk_size=2)
        logits = hidden @ weight.T + bias
        ref = LOGIT_LOSSES[name](logits, t, mask=mask, **extra, **kw) + 0.5 * cross_entropy(logits, labels, mask=mask)
        torch.testing.assert_close(total, ref)
        if torch.isfinite(ref):
            for a, r in zip(_grads(total, hidden, weight), _grads(ref, hidden, weight)):
                torch.testing.assert_close(a, r)


def test_terms_with_different_closed_forms_share_the_chunk_softmaxes():
    """Eleven terms at two temperatures, standardized or not, in one pass: fast equals generic equals unchunked."""
    hidden, weight, b, teacher, labels, mask = _inputs(torch.float64)
    specs = [("cross_entropy", 0.3, {}), ("forward_kl", 0.7, {"temperature": 2.0}),
             ("forward_kl", 0.2, {"temperature": 2.0, "standardize": True}),
             ("reverse_kl", 0.1, {"temperature": 2.0}), ("generalized_jsd", 0.4, {"beta": 0.4, "temperature": 2.0}),
             ("total_variation", 0.6, {"standardize": True, "temperature": 2.0}),
             ("decoupled_kd", 0.1, {"temperature": 2.0, "warmup": 0.3}),
             ("correlation_aware_kd", 0.5, {"strong_k": 2, "standardize": True}),
             ("skew_forward_kl", 0.2, {"temperature": 2.0}), ("skew_reverse_kl", 0.3, {"alpha": 0.4}),
             ("forward_kl", 0.2, {"missing_mass": "uniform"})]  # a dense teacher ignores the policy
    terms = [ChunkedTerm(n, w, kw) for n, w, kw in specs]
    logits = hidden @ weight.T + b
    parts = [cross_entropy(logits, labels, mask=mask) if n == "cross_entropy" else
             LOGIT_LOSSES[n](logits, teacher, mask=mask, **({"labels": labels} if n == "decoupled_kd" else {}), **kw)
             for n, _, kw in specs]
    ref = sum(w * v for (_, w, _), v in zip(specs, parts))
    expected = _grads(ref, hidden, weight, b)
    for fast in (True, False):
        total, values = chunked_logit_terms(terms, hidden, weight, teacher, bias=b, mask=mask, labels=labels,
                                            chunk_size=4, fast=fast)
        torch.testing.assert_close(total, ref)
        torch.testing.assert_close(values, torch.stack(parts).detach())
        for a, r in zip(_grads(total, hidden, weight, b), expected):
            torch.testing.assert_close(a, r)


def test_several_terms_share_one_pass_and_report_unweighted_values():
    hidden, weight, _, teacher, labels, mask = _inputs(torch.float64, bias=False)
    terms = [ChunkedTerm("cross_entropy", 0.3), ChunkedTerm("forward_kl", 0.7, {"temperature": 2.0}),
             ChunkedTerm("decoupled_kd", 0.1)]
    total, values = chunked_logit_terms(terms, hidden, weight, teacher, mask=mask, labels=labels, chunk_size=4)
    logits = hidden @ weight.T
    ce = cross_entropy(logits, labels, mask=mask)
    kl = LOGIT_LOSSES["forward_kl"](logits, teacher, mask=mask, temperature=2.0)
    dkd = LOGIT_LOSSES["decoupled_kd"](logits, teacher, mask=mask, labels=labels)
    ref = 0.3 * ce + 0.7 * kl + 0.1 * dkd
    torch.testing.assert_close(values, torch.stack([ce, kl, dkd]).detach())
    assert not values.requires_grad
    torch.testing.assert_close(total, ref)
    for a, r in zip(_grads(total, hidden, weight), _grads(ref, hidden, weight)):
        torch.testing.assert_close(a, r)


def test_sum_reduction_views_and_empty_mask():
    hidden, weight, b, teacher, labels, mask = _inputs(torch.float64)
    shared = 8  # a truncated shared vocabulary: views of weight and teacher, no copies needed
    ref = LOGIT_LOSSES["reverse_kl"]((hidden @ weight[:shared].T), teacher[..., :shared], mask=mask,
                                     reduction="sum")
    got = chunked_logit_loss("reverse_kl", hidden, weight[:shared], teacher[..., :shared], mask=mask,
                             reduction="sum", chunk_size=2)
    torch.testing.assert_close(got, ref)
    for a, r in zip(_grads(got, hidden, weight), _grads(ref, hidden, weight)):
        torch.testing.assert_close(a, r)
    none = torch.zeros_like(mask)
    zero = chunked_logit_loss("forward_kl", hidden, weight, teacher, mask=none)
    assert zero.item() == 0.0
    gh, gw = _grads(zero, hidden, weight)
    assert gh.abs().sum() == 0 and gw.abs().sum() == 0


def test_no_grad_and_frozen_inputs_skip_the_gradient_work():
    hidden, weight, b, teacher, labels, mask = _inputs(torch.float32)
    ref = LOGIT_LOSSES["forward_kl"](hidden @ weight.T + b, teacher, mask=mask)
    with torch.no_grad():
        got = chunked_logit_loss("forward_kl", hidden, weight, teacher, bias=b, mask=mask, chunk_size=3)
    assert not got.requires_grad
    torch.testing.assert_close(got, ref.detach())
    frozen = chunked_logit_loss("forward_kl", hidden.detach(), weight.detach(), teacher, bias=b.detach(), mask=mask)
    assert not frozen.requires_grad
    only_hidden = chunked_logit_loss("forward_kl", hidden, weight.detach(), teacher, mask=mask)
    (gh,) = torch.autograd.grad(only_hidden * 3.0, hidden)  # the incoming grad_output scales the stored gradient
    (rh,) = torch.autograd.grad(LOGIT_LOSSES["forward_kl"](hidden @ weight.T, teacher, mask=mask) * 3.0, hidden)
    torch.testing.assert_close(gh, rh)


def test_bad_inputs_are_refused():
    hidden, weight, b, teacher, labels, mask = _inputs(torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        chunked_logit_loss("forward_kl", hidden, weight, teacher, reduction="none")
    with pytest.raises(ValueError, match="needs labels"):
        chunked_logit_loss("cross_entropy", hidden, weight)
    with pytest.raises(ValueError, match="unknown logit loss"):
        chunked_logit_loss("nope", hidden, weight, teacher)
    with pytest.raises(ValueError, match="do not match"):
        chunked_logit_loss("forward_kl", hidden, weight, teacher[:, :-1])
    with pytest.raises(ValueError, match="lm_head_weight"):
        chunked_logit_loss("forward_kl", hidden, weight.T, teacher)


def test_distiller_with_logit_chunk_size_equals_the_plain_step(tiny_recipe):
    """Same loss, per-term values and student gradients; the student's full logits are never computed."""
    from kdforge.errors import KDForgeError
    from kdforge.distiller import Distiller
    from kdforge.recipe import parse_recipe
    from kdforge.train import prepare

    objective = [{"loss": "cross_entropy", "weight": 0.3}, {"loss": "forward_kl", "weight": 0.4, "temperature": 2.0},
                 {"loss": "reverse_kl", "weight": 0.3}, {"loss": "decoupled_kd", "weight": 0.1, "warmup_steps": 4}]
    plain = prepare(parse_recipe({**tiny_recipe, "objective": objective}))
    chunked = prepare(parse_recipe({**tiny_recipe, "objective": objective,
                                    "train": {**tiny_recipe["train"], "logit_chunk_size": 13}}),
                      teacher=plain.teacher, tokenizer=plain.tokenizer)
    ids = plain.train_blocks.ids[:3]
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    head = chunked.student.get_output_embeddings()
    head.register_forward_hook(lambda *a: pytest.fail("the lm head ran on the whole batch"))
    results = []
    for setup in (plain, chunked):
        total, values = setup.distiller(batch, num_tokens=50.0, step=1)
        total.backward()
        results.append((total, values, [p.grad for p in setup.student.parameters()]))
    (t0, v0, g0), (t1, v1, g1) = results
    torch.testing.assert_close(t1, t0)
    assert list(v1) == list(v0)
    torch.testing.assert_close(torch.stack(list(v1.values())), torch.stack(list(v0.values())))
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b)
    with pytest.raises(KDForgeError, match="logit_chunk_size needs a Hugging Face causal LM"):
        Distiller(None, torch.nn.Linear(4, 4), [{"loss": "cross_entropy"}], logit_chunk_size=8)


@pytest.mark.parametrize("sparse", [False, True])
def test_terms_sharing_one_softmax_equal_the_generic_path(sparse):
    """CE and forward KL at the same temperature share the chunk's softmax and gradient buffer."""
    hidden, weight, b, teacher, labels, mask = _inputs(torch.float64)
    if sparse:
        teacher = SparseLogits.from_dense(teacher, K)
    terms = [ChunkedTerm("cross_entropy", 0.3), ChunkedTerm("forward_kl", 0.7),
             ChunkedTerm("forward_kl", 0.2, {"missing_mass": "renormalize"} if sparse else {"temperature": 2.0}),
             ChunkedTerm("reverse_kl", 0.1)]
    results = []
    for fast in (True, False):
        total, values = chunked_logit_terms(terms, hidden, weight, teacher, bias=b, mask=mask, labels=labels,
                                            chunk_size=5, fast=fast)
        results.append((total, values, _grads(total, hidden, weight, b)))
    (t1, v1, g1), (t0, v0, g0) = results
    torch.testing.assert_close(t1, t0)
    torch.testing.assert_close(v1, v0)
    for a, r in zip(g1, g0):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("transform", [dict(softcap=3.0), dict(scale=0.25), dict(scale=2.0, softcap=1.5)])
@pytest.mark.parametrize("name", ["cross_entropy", *FAST[:-1]])
def test_a_logit_transform_is_applied_in_every_chunk(transform, name):
    """Soft-capped / scaled logits, fast and generic paths: value and gradients equal the direct computation."""
    from kdforge.lm_head import LogitTransform

    hidden, weight, b, teacher, labels, mask = _inputs(torch.float64)
    tf = LogitTransform(**transform)
    logits = hidden @ weight.T + b
    if "softcap" in transform:  # direct: cap · tanh(scale · z / cap)
        logits = transform["softcap"] * torch.tanh(transform.get("scale", 1.0) * logits / transform["softcap"])
    else:
        logits = transform["scale"] * logits
    if name == "cross_entropy":
        ref = cross_entropy(logits, labels, mask=mask)
        got = chunked_logit_loss(name, hidden, weight, bias=b, mask=mask, labels=labels, chunk_size=3,
                                 logit_transform=tf)
    else:
        extra = {"labels": labels} if name == "decoupled_kd" else {}
        ref = LOGIT_LOSSES[name](logits, teacher, mask=mask, **extra, **KWARGS.get(name, {}))
        got = chunked_logit_loss(name, hidden, weight, teacher, bias=b, mask=mask, chunk_size=3, logit_transform=tf,
                                 **extra, **KWARGS.get(name, {}))
    torch.testing.assert_close(got, ref)
    for a, r in zip(_grads(got, hidden, weight, b), _grads(ref, hidden, weight, b)):
        torch.testing.assert_close(a, r)


def _tiny_gemma2(seed):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=30.0)
    return Gemma2ForCausalLM(config)


def test_distiller_chunks_apply_gemma2_soft_capping_once_logits_grow():
    """Issue 10: the chunked CE on a soft-capped student once its logits are large (23.436 before, the model's 19.552)."""
    from kdforge.distiller import Distiller

    teacher, student = _tiny_gemma2(0), _tiny_gemma2(1)
    chunked = Distiller(teacher, student, [{"loss": "cross_entropy"}, {"loss": "forward_kl"}], logit_chunk_size=4)
    plain = Distiller(teacher, student, [{"loss": "cross_entropy"}, {"loss": "forward_kl"}])
    with torch.no_grad():
        student.model.embed_tokens.weight.mul_(40)  # logits grow past the cap, as in training
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        assert float(student(input_ids=ids).logits.abs().max()) > 15  # the cap matters here
    results = []
    for distiller in (chunked, plain):
        student.zero_grad()
        total, values = distiller(batch)
        total.backward()
        results.append((total, values, [p.grad.clone() for p in student.parameters() if p.grad is not None]))
    (t1, v1, g1), (t0, v0, g0) = results
    torch.testing.assert_close(t1, t0)
    torch.testing.assert_close(torch.stack(list(v1.values())), torch.stack(list(v0.values())))
    for a, r in zip(g1, g0):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_an_unknown_logit_transform_is_refused_whatever_the_logits_magnitude():
    """A model that caps its logits without saying so in its config: refused although today's logits are tiny."""
    from transformers import LlamaForCausalLM

    from kdforge.distiller import Distiller
    from kdforge.errors import KDForgeError
    from kdforge.models import tiny_llama

    class CappedLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 50.0 * torch.tanh(out.logits / 50.0)
            return out

    plain = tiny_llama(vocab_size=64, hidden=32, layers=2, heads=4, seed=0)
    capped = CappedLlama(plain.config)
    capped.load_state_dict(plain.state_dict())
    ids = torch.arange(8).unsqueeze(0)
    torch.testing.assert_close(capped(input_ids=ids).logits, plain(input_ids=ids).logits)  # indistinguishable today
    with pytest.raises(KDForgeError, match="does not compute its logits as lm_head"):
        Distiller(None, capped, [{"loss": "cross_entropy"}], logit_chunk_size=4)
    Distiller(None, plain, [{"loss": "cross_entropy"}], logit_chunk_size=4)  # a plain Llama passes


def test_logit_transform_is_read_from_the_config():
    from types import SimpleNamespace

    from kdforge.lm_head import LogitTransform, logit_transform

    def model(**config):
        return SimpleNamespace(config=SimpleNamespace(**config))

    assert logit_transform(model(final_logit_softcapping=30.0)) == LogitTransform(1.0, 30.0)
    assert logit_transform(model(final_logit_softcapping=None)) == LogitTransform()
    assert logit_transform(model(logit_scale=0.0625)) == LogitTransform(0.0625)  # Cohere multiplies
    assert logit_transform(model(logits_scaling=8.0, model_type="granite")) == LogitTransform(0.125)  # Granite divides
    assert logit_transform(model(logits_scaling=8.0, model_type="hyperclovax")) == LogitTransform(8.0)
    assert logit_transform(model(text_config=SimpleNamespace(final_logit_softcapping=10.0))).softcap == 10.0
