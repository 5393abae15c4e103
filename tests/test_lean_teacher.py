"""The leaner live teacher (issue #14): weights held in bf16 for teacher.dtype bfloat16, a forward without autograd
bookkeeping, the teacher's logits made chunk by chunk from its hidden states, chunked losses on by default for causal
LMs (and silently off for a model they cannot chunk).

conftest pins `auto` to float32; these tests ask for bfloat16 explicitly."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from kdforge.distiller import Distiller
from kdforge.errors import KDForgeError
from kdforge.losses.chunked import HeadLogits, check_head_of_hidden, chunked_logit_terms
from kdforge.models import load_teacher, teacher_weight_dtype, tiny_llama
from kdforge.recipe import ModelSpec, auto_logit_chunk_size, parse_recipe
from kdforge.teachers.live import LiveTeacher

OBJECTIVE = [{"loss": "cross_entropy", "weight": 0.5}, {"loss": "forward_kl", "weight": 0.5, "temperature": 2.0}]


def _batch(vocab: int = 128, b: int = 3, t: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0  # a padded row: masked positions must not count
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def _floating_dtypes(model: nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.is_floating_point()}


def test_bf16_teacher_is_held_in_bf16_with_the_fp32_weights_rounded(tiny_assets, monkeypatch):
    """load_teacher: bf16 parameters for dtype bfloat16 (and for auto where auto means bf16), fp32 for float32; the
    bf16 weights are exactly the stored fp32 weights rounded to bf16 (every tensor read, tied head kept tied)."""
    from kdforge import precision

    folder = str(tiny_assets["teacher"])
    t32 = load_teacher(ModelSpec(model=folder, dtype="float32"))
    t16 = load_teacher(ModelSpec(model=folder, dtype="bfloat16"))
    assert _floating_dtypes(t32) == {torch.float32}
    assert _floating_dtypes(t16) == {torch.bfloat16}
    assert not any(p.requires_grad for p in t16.parameters()) and not t16.training
    ref = dict(t32.named_parameters())
    for name, p in t16.named_parameters():
        assert torch.equal(p, ref[name].to(torch.bfloat16)), name
    assert (t16.lm_head.weight.data_ptr() == t16.model.embed_tokens.weight.data_ptr()) == (
        t32.lm_head.weight.data_ptr() == t32.model.embed_tokens.weight.data_ptr())

    monkeypatch.setenv("KDFORGE_AUTO_PRECISION", "bfloat16")
    precision.auto_precision.cache_clear()
    try:
        assert teacher_weight_dtype(ModelSpec(model=folder, dtype="auto")) == torch.bfloat16
        assert _floating_dtypes(load_teacher(ModelSpec(model=folder, dtype="auto"))) == {torch.bfloat16}
        assert _floating_dtypes(load_teacher(ModelSpec(model=folder, dtype="bfloat16"), torch.float32)) == {
            torch.float32}  # an explicit dtype wins (a student copying the teacher's weights needs fp32)
    finally:
        precision.auto_precision.cache_clear()


def test_teacher_outputs_need_no_grad_and_run_without_autograd():
    """No tensor the teacher hands over requires grad. With nothing tapped the forward runs under inference mode;
    with taps under no_grad, so feature terms may save the tapped tensors for their backward."""
    from kdforge.taps import Taps

    model = tiny_llama(vocab_size=128, hidden=32, layers=2, seed=1).to(torch.bfloat16)
    live = LiveTeacher(model, "bfloat16")
    batch = _batch()
    out = live(batch)
    assert out.logits.dtype == torch.bfloat16 and not out.logits.requires_grad and out.logits.is_inference()
    head = live(batch, hidden_only=True).logits
    assert isinstance(head, HeadLogits) and not head.hidden.requires_grad and head.hidden.is_inference()
    assert head.shape == out.logits.shape
    rows = head.flatten().rows(slice(0, 10))
    assert rows.dtype == torch.float32 and not rows.requires_grad
    # the chunk's logits are the model's own bf16 logits, upcast: the same bf16 matmul, not a re-computation in fp32
    assert torch.equal(rows, out.logits.reshape(-1, 128)[:10].float())

    taps = Taps(model, {"h": "model.layers.0"})
    tapped = live(batch, taps)
    assert not tapped.logits.is_inference() and not tapped.features["h"].is_inference()
    assert not tapped.features["h"].requires_grad
    # a tapped feature can be saved for a backward pass (an inference tensor could not)
    proj = nn.Linear(32, 32).to(torch.bfloat16)
    (proj(tapped.features["h"]) * tapped.features["h"]).sum().backward()
    assert proj.weight.grad is not None


def test_fp32_teacher_asked_for_bf16_runs_under_autocast_unchanged():
    """A user's fp32 model wrapped with dtype bfloat16 is not converted (it is theirs); its forward is autocast."""
    model = tiny_llama(vocab_size=128, hidden=32, layers=2, seed=1)
    out = LiveTeacher(model, "bfloat16")(_batch())
    assert _floating_dtypes(model) == {torch.float32} and out.logits.dtype == torch.bfloat16


@pytest.mark.parametrize("chunk", [None, 16, "auto"])
def test_bf16_teacher_trains_the_student_like_the_fp32_teacher(chunk):
    """Loss and student gradients with a bf16-held teacher are within bf16 rounding of an fp32 teacher's (stated
    tolerance: loss to 1e-3 relative, every gradient entry to 1e-2 of the largest), unchunked and chunked."""
    teacher = tiny_llama(vocab_size=128, hidden=48, layers=3, seed=1)
    student = tiny_llama(vocab_size=128, hidden=32, layers=2, seed=2)
    batch = _batch()
    results = {}
    for dtype in ("float32", "bfloat16"):
        t = copy.deepcopy(teacher).to(getattr(torch, dtype))
        s = copy.deepcopy(student)
        d = Distiller(t, s, OBJECTIVE, teacher_dtype=dtype, logit_chunk_size=chunk)
        total, values = d(batch)
        total.backward()
        results[dtype] = (total.detach(), values, [p.grad.clone() for p in s.parameters()], d)
    (l32, v32, g32, d32), (l16, v16, g16, d16) = results["float32"], results["bfloat16"]
    assert d16.teacher_head_chunked is (chunk is not None)  # chunked: the teacher's logits are made chunk by chunk
    assert torch.allclose(l16, l32, rtol=1e-3), (float(l16), float(l32))
    for name in v32:
        assert torch.allclose(v16[name], v32[name], rtol=1e-3, atol=1e-5), name
    for a, b in zip(g16, g32):
        assert torch.allclose(a, b, rtol=0, atol=1e-2 * float(b.abs().max()) + 1e-8)
    # and chunked equals unchunked for the same bf16 teacher (the losses read the same logits)
    if chunk is not None:
        s = copy.deepcopy(student)
        plain = Distiller(copy.deepcopy(teacher).to(torch.bfloat16), s, OBJECTIVE, teacher_dtype="bfloat16")
        total, _ = plain(batch)
        assert torch.allclose(total.detach(), l16, rtol=1e-5)


def test_chunked_losses_take_a_bf16_head_and_do_their_math_in_float32():
    """HeadLogits with bf16 hidden states and head: the same value and gradient as the losses on the dense bf16
    logits (upcast to float32), to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    t_hidden = torch.randn(2, 7, 24, generator=g).bfloat16()
    t_weight = torch.randn(50, 24, generator=g).bfloat16()
    dense = (t_hidden @ t_weight.T).float()
    from kdforge.losses.logits import forward_kl

    want = forward_kl(hidden @ weight.T, dense, temperature=2.0)
    (gh, gw) = torch.autograd.grad(want, (hidden, weight))
    total, _ = chunked_logit_terms([("forward_kl", 1.0, {"temperature": 2.0})], hidden, weight,
                                   HeadLogits(t_hidden, t_weight), chunk_size=3)
    (ch, cw) = torch.autograd.grad(total, (hidden, weight))
    assert total.dtype == torch.float32
    assert torch.allclose(total, want, rtol=1e-5)
    assert torch.allclose(ch, gh, atol=1e-6) and torch.allclose(cw, gw, atol=1e-6)
    with pytest.raises(ValueError, match="do not match the student's"):
        chunked_logit_terms([("forward_kl", 1.0, {})], hidden, weight, HeadLogits(t_hidden, t_weight[:40]))


def test_head_check_passes_for_a_bf16_model_and_still_refuses_a_wrong_transform():
    model = tiny_llama(vocab_size=128, hidden=32, layers=2, seed=1).to(torch.bfloat16)
    assert check_head_of_hidden(model).is_identity
    model.config.logit_scale = 4.0  # a scale the Llama forward does not apply: refused at bf16 tolerance too
    with pytest.raises(KDForgeError, match="does not compute its logits as 4 · lm_head"):
        check_head_of_hidden(model)


class NoLinearHead(nn.Module):
    """A causal LM whose logits come from a tied matmul, not an nn.Linear head: the chunked losses cannot use it."""

    def __init__(self, vocab: int = 128, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, input_ids, attention_mask=None, **_):
        return torch.tanh(self.mix(self.embed(input_ids))) @ self.embed.weight.T

    def get_output_embeddings(self):
        return self.embed


def test_chunking_is_on_by_default_for_causal_lms_and_silently_off_otherwise(caplog):
    """Recipe default auto: chunked (auto_logit_chunk_size of the vocabulary) for a causal LM with a linear head;
    unchunked with only a debug line for a model without one, where an explicit size is refused in one line."""
    assert parse_recipe({"teacher": {"model": "m", "dtype": "float32"}}).train.logit_chunk_size == "auto"
    assert [auto_logit_chunk_size(v) for v in (128, 32000, 49152, 152064)] == [256, 128, 64, 16]
    teacher = tiny_llama(vocab_size=128, hidden=32, layers=2, seed=1)
    d = Distiller(teacher, tiny_llama(vocab_size=128, hidden=16, layers=1, seed=2), OBJECTIVE, logit_chunk_size="auto")
    assert d.logit_chunk_size == 256 and d.teacher_head_chunked

    with caplog.at_level(logging.DEBUG, logger="kdforge"):
        d = Distiller(teacher, NoLinearHead(), OBJECTIVE, logit_chunk_size="auto")
    assert d.logit_chunk_size is None and not d.teacher_head_chunked
    assert any("logit_chunk_size auto: unchunked" in r.getMessage() and r.levelno == logging.DEBUG
               for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    total, _ = d(_batch())
    total.backward()  # the unchunked path trains it
    with pytest.raises(KDForgeError, match="needs a Hugging Face causal LM with a linear lm head"):
        Distiller(teacher, NoLinearHead(), OBJECTIVE, logit_chunk_size=16)


def test_a_teacher_without_a_linear_head_hands_over_dense_logits():
    """The student chunks; a teacher whose logits cannot be made from its hidden states gives its [B, T, V] logits,
    and the result equals the unchunked one."""
    student = tiny_llama(vocab_size=128, hidden=16, layers=1, seed=2)
    teacher = NoLinearHead()
    d = Distiller(teacher, copy.deepcopy(student), OBJECTIVE, logit_chunk_size=8)
    assert d.logit_chunk_size == 8 and not d.teacher_head_chunked
    plain = Distiller(teacher, copy.deepcopy(student), OBJECTIVE)
    batch = _batch()
    assert torch.allclose(d(batch)[0], plain(batch)[0], rtol=1e-5)


def test_auto_keeps_old_recipe_hashes_and_is_off_for_image_classification(tiny_recipe):
    """A recipe without logit_chunk_size (now auto) hashes as it did when the default was null; image
    classification resolves auto to off and still refuses an explicit size."""
    auto = parse_recipe(tiny_recipe)
    null = parse_recipe({**tiny_recipe, "train": {**tiny_recipe["train"], "logit_chunk_size": None}})
    sized = parse_recipe({**tiny_recipe, "train": {**tiny_recipe["train"], "logit_chunk_size": 64}})
    assert auto.train.logit_chunk_size == "auto" and auto.hash() == null.hash() != sized.hash()
    image = {"task": "image_classification", "teacher": {"model": "cnn"}}
    assert parse_recipe(image).train.logit_chunk_size is None
    with pytest.raises(KDForgeError, match="logit_chunk_size chunks a language model's vocabulary"):
        parse_recipe({**image, "train": {"logit_chunk_size": 64}})
    with pytest.raises(KDForgeError, match="logit_chunk_size"):
        parse_recipe({**tiny_recipe, "train": {**tiny_recipe["train"], "logit_chunk_size": 0}})


def test_a_recipe_run_holds_the_teacher_in_bf16_and_copies_exact_weights_into_a_student(tiny_recipe):
    """kdforge.train.prepare with teacher.dtype bfloat16: the teacher's weights are bf16 in memory, the student is
    float32, and a student made of teacher layers starts from the exact fp32 weights (the teacher is cast after)."""
    from kdforge.train import prepare

    recipe = {**tiny_recipe, "teacher": {**tiny_recipe["teacher"], "dtype": "bfloat16"}}
    setup = prepare(parse_recipe(recipe))
    assert _floating_dtypes(setup.teacher) == {torch.bfloat16}
    assert _floating_dtypes(setup.student) == {torch.float32}
    assert setup.distiller.logit_chunk_size == auto_logit_chunk_size(128) and setup.distiller.teacher_head_chunked

    layered = {**recipe, "student": {"init": "from_teacher", "layers": [0, 2]}}
    setup = prepare(parse_recipe(layered))
    assert _floating_dtypes(setup.teacher) == {torch.bfloat16}
    fp32 = load_teacher(ModelSpec(model=tiny_recipe["teacher"]["model"], dtype="float32"))
    assert torch.equal(setup.student.model.layers[1].mlp.up_proj.weight, fp32.model.layers[2].mlp.up_proj.weight)
    assert _floating_dtypes(setup.student) == {torch.float32}


def test_auto_leaves_an_objective_with_a_whole_sequence_loss_unchunked():
    """minillm_policy's returns run over later tokens, so auto does not chunk its objective (an explicit size is
    refused by kdforge.onpolicy instead)."""
    teacher = tiny_llama(vocab_size=128, hidden=32, layers=2, seed=1)
    student = tiny_llama(vocab_size=128, hidden=16, layers=1, seed=2)
    d = Distiller(teacher, student, [{"loss": "minillm_policy"}], logit_chunk_size="auto")
    assert d.logit_chunk_size is None and not d.teacher_head_chunked
