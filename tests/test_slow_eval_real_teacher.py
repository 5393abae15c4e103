"""Slow: the evaluation suite on the real SmolLM2-135M-Instruct teacher (30 layers) and held-out Shakespeare."""
from __future__ import annotations

import pytest

from kdforge.data.corpus import load_corpus
from kdforge.data.packing import pack, tokenize_documents
from kdforge.evaluate.suite import Evaluator
from kdforge.models import load_teacher, load_tokenizer, student_from_teacher_layers
from kdforge.recipe import DataSpec, EvalSpec, ModelSpec

pytestmark = pytest.mark.slow


def test_real_teacher_layer_cka_generation_and_fidelity():
    spec = ModelSpec(model="smollm2-135m", dtype="bfloat16")
    teacher, tok = load_teacher(spec), load_tokenizer(spec)
    docs = load_corpus(DataSpec()).validation
    val = pack(*tokenize_documents(tok, [docs[0][:20_000]]), 64, 256)
    # student block 0 IS teacher block 0, so embeddings and the first hidden state match exactly
    student = student_from_teacher_layers(teacher, [0, 15, 29])
    ev = Evaluator(tok, teacher, val, EvalSpec(ood=None, prompts=["To be, or not to be,", "KING LEAR. Where"],
                                               new_tokens=6, cka_tokens=128, batch_size=2))
    res = ev.evaluate(student)
    m = res["cka"]["matrix"]
    assert len(m) == 4 and len(m[0]) == 31
    assert m[0][0] == pytest.approx(1.0, abs=1e-3) and m[1][1] == pytest.approx(1.0, abs=0.01)
    s = res["summary"]
    assert 0 <= s["gen_token_agreement"] <= 1 and s["kl_teacher_student"] > 0 and s["ece"] >= 0
    assert res["heldout"]["teacher"]["perplexity"] < res["heldout"]["student"]["perplexity"]
    assert all(isinstance(t, str) and t for t in res["generation"]["teacher"])
