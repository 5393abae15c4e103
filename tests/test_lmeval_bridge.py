"""The lm-evaluation-harness bridge on a local, offline perplexity task (skipped without the lmeval extra)."""
from __future__ import annotations

import math

import pytest

from kdforge.evaluate.lmeval import split_documents, write_perplexity_task

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'kdforge[lmeval]')")


def test_local_task_files(tmp_path):
    path = write_perplexity_task(tmp_path, ["a b c", "  ", "d e"], name="mytask")
    assert "output_type: loglikelihood_rolling" in path.read_text()
    assert len((tmp_path / "mytask.jsonl").read_text().splitlines()) == 2
    pieces = split_documents(["line one\nline two\nline three"], max_chars=12)
    assert pieces == ["line one", "line two", "line three"]


def test_student_perplexity_through_lm_eval_matches_kdforge(tiny_assets):
    """lm-eval's bits/byte on the held-out text agrees with kdforge's own bits/char (ASCII text: byte == char)."""
    from kdforge.data.packing import pack, tokenize_documents
    from kdforge.evaluate.lmeval import run_lm_eval
    from kdforge.evaluate.metrics import evaluate_models
    from kdforge.models import load_teacher, load_tokenizer
    from kdforge.recipe import ModelSpec

    spec = ModelSpec(model=str(tiny_assets["teacher"]))
    model, tok = load_teacher(spec), load_tokenizer(spec)
    docs = [tiny_assets["val"].read_text()[:3000]]
    res = run_lm_eval(model, tok, ["kdforge_heldout"], heldout_documents=docs, batch_size=4)
    got = res["kdforge_heldout"]
    assert set(got) >= {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert got["byte_perplexity"] == pytest.approx(2 ** got["bits_per_byte"], rel=1e-6)
    assert math.isfinite(got["word_perplexity"])
    ids, chars = tokenize_documents(tok, docs)
    ours = evaluate_models({"m": model}, pack(ids, chars, len(ids) - 1))["m"]["bits_per_char"]
    assert got["bits_per_byte"] == pytest.approx(ours, rel=0.01)
