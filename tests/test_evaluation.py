"""kdforge eval's metrics: calibration, forward/reverse KL, greedy agreement, CKA, out-of-domain text, the suite."""
from __future__ import annotations

import json
import math
import mmap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from evalkit import recipe_dict
from kdforge.cli import app
from kdforge.data.packing import TokenBlocks, pack, tokenize_documents
from kdforge.evaluate import suite
from kdforge.evaluate.cka import cka_matrix, hidden_states, layer_cka, linear_cka, write_cka
from kdforge.evaluate.generation import generation_agreement, greedy_generate
from kdforge.evaluate.metrics import evaluate_models, expected_calibration_error
from kdforge.evaluate.speed import peak_rss_bytes, reset_peak_rss, rss_kib
from kdforge.evaluate.suite import Evaluator, load_ood_documents, split_fortunes
from kdforge.models import load_teacher, load_tokenizer, tiny_llama
from kdforge.recipe import EvalSpec, ModelSpec, parse_recipe


@pytest.fixture(scope="module")
def tiny(tiny_assets):
    spec = ModelSpec(model=str(tiny_assets["teacher"]))
    teacher, tok = load_teacher(spec), load_tokenizer(spec)
    val = pack(*tokenize_documents(tok, [tiny_assets["val"].read_text()]), 32, 512)
    return {"teacher": teacher, "tok": tok, "val": val, "student": tiny_llama(vocab_size=len(tok), hidden=32)}


# --------------------------------------------------------------------------- calibration and KL


def test_ece_matches_a_hand_computation():
    conf = torch.tensor([0.95, 0.95, 0.95, 0.95, 0.55, 0.55, 0.05, 1.0])
    correct = torch.tensor([1, 1, 1, 0, 1, 0, 0, 1])
    # bins of width 1/15: {0.95 x4, 1.0} share bin 14, the two 0.55 share bin 8, 0.05 is alone in bin 0
    bin14 = abs((0.95 * 4 + 1.0) / 5 - 4 / 5) * 5
    bin8 = abs(0.55 - 0.5) * 2
    bin0 = abs(0.05 - 0.0) * 1
    assert expected_calibration_error(conf, correct) == pytest.approx((bin14 + bin8 + bin0) / 8)
    assert expected_calibration_error(torch.full((10,), 0.7), torch.tensor([1] * 7 + [0] * 3)) == \
        pytest.approx(0, abs=1e-6)
    # a bin edge belongs to the lower bin: (lo, hi]
    edge = torch.tensor([1 / 15, 1 / 15 + 1e-6], dtype=torch.float64)
    assert expected_calibration_error(edge, torch.tensor([0, 1])) == pytest.approx((1 / 15 + (1 - 1 / 15 - 1e-6)) / 2)


def test_evaluate_models_reports_forward_reverse_kl_and_ece_exactly():
    torch.manual_seed(0)
    ids = torch.randint(0, 16, (3, 9))
    blocks = TokenBlocks(ids, torch.full((3,), 20))
    a, b = tiny_llama(vocab_size=16, hidden=16, seed=1), tiny_llama(vocab_size=16, hidden=16, seed=2)
    res = evaluate_models({"s": a, "t": b}, blocks, reference="t", batch_size=2)
    with torch.no_grad():
        ls = F.log_softmax(a(input_ids=ids).logits[:, :-1], -1)
        lt = F.log_softmax(b(input_ids=ids).logits[:, :-1], -1)
    fwd = (lt.exp() * (lt - ls)).sum(-1).mean()
    rev = (ls.exp() * (ls - lt)).sum(-1).mean()
    assert res["s"]["kl_teacher_student"] == pytest.approx(float(fwd), rel=1e-5)
    assert res["s"]["kl_student_teacher"] == pytest.approx(float(rev), rel=1e-5)
    assert res["s"]["kl_teacher_student"] != pytest.approx(res["s"]["kl_student_teacher"], rel=1e-3)
    conf, pred = ls.exp().max(-1)
    assert res["s"]["ece"] == pytest.approx(expected_calibration_error(conf, pred == ids[:, 1:]), rel=1e-6)
    assert "ece" in res["t"] and "kl_teacher_student" not in res["t"]


def test_fidelity_over_a_shared_vocabulary_renormalises_both_distributions():
    """Issue 10: with truncate_to_shared_vocab the teacher's softmax was cut to the shared ids without renormalising:
    KL -0.00307 where the KL over the shared vocabulary (the training loss's definition) is 0.01251."""
    from kdforge.distiller import Distiller

    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 16))
    student, teacher = tiny_llama(vocab_size=128, seed=2), tiny_llama(vocab_size=130, seed=1)
    res = evaluate_models({"student": student, "teacher": teacher}, TokenBlocks(ids, torch.full((2,), 40)),
                          reference="teacher")["student"]
    with torch.no_grad():
        ls = F.log_softmax(student(input_ids=ids).logits[:, :-1], -1)
        lt = F.log_softmax(teacher(input_ids=ids).logits[:, :-1, :128], -1)  # shared ids, renormalised
    fwd = float((lt.exp() * (lt - ls)).sum(-1).mean())
    assert fwd == pytest.approx(0.01251, abs=5e-6)
    assert res["kl_teacher_student"] == pytest.approx(fwd, rel=1e-5)
    assert res["kl_student_teacher"] == pytest.approx(float((ls.exp() * (ls - lt)).sum(-1).mean()), rel=1e-5)
    assert res["top1_agreement"] == pytest.approx(float((ls.argmax(-1) == lt.argmax(-1)).double().mean()))
    # the same number the training loss gives: forward KL of the Distiller with truncate_to_shared_vocab
    d = Distiller(teacher, student, [{"loss": "forward_kl"}], truncate_to_shared_vocab=True)
    with torch.no_grad():
        _, values = d({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert float(values["forward_kl"]) == pytest.approx(fwd, rel=1e-4)


# --------------------------------------------------------------------------- generation


def test_greedy_generation_with_cache_equals_recomputing_everything(tiny):
    model, tok = tiny["teacher"], tiny["tok"]
    gen = greedy_generate(model, tok, ["the king", "O lady"], new_tokens=6)
    for prompt, new in zip(["the king", "O lady"], gen.tokens):
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        for _ in range(6):
            with torch.no_grad():
                nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
        assert new == ids[0, -6:].tolist()
    assert all(len(t) == 6 for t in gen.tokens) and gen.decode_tokens == 10 and gen.generation_tokens_per_s > 0


def test_generation_agreement_counts_positions_and_exact_matches():
    got = generation_agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 3, 4], [5, 0, 7, 0]])
    assert got == {"token_agreement": 6 / 8, "exact_match": 0.5}
    with pytest.raises(ValueError):
        generation_agreement([[1]], [[1], [2]])


# --------------------------------------------------------------------------- CKA


def _direct_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """HSIC with N x N Gram matrices and the centring matrix H (Kornblith et al., 2019, Eq. 2 with linear kernels)."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    hsic = lambda a, b: (a * b).sum()  # noqa: E731  tr(KHLH) with K, L already centred
    return float(hsic(k, l_) / math.sqrt(hsic(k, k) * hsic(l_, l_)))


def test_cka_matrix_matches_direct_gram_computation_and_the_shared_helper():
    torch.manual_seed(0)
    s = [torch.randn(50, 8), torch.randn(50, 5)]
    t = [torch.randn(50, 12), s[0] @ torch.randn(8, 8), torch.randn(50, 3)]
    m = cka_matrix(s, t)
    assert m.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert float(m[i, j]) == pytest.approx(_direct_cka(s[i], t[j]), rel=1e-4)
            assert float(m[i, j]) == pytest.approx(float(linear_cka(s[i], t[j])), rel=1e-4)
    q, _ = torch.linalg.qr(torch.randn(8, 8))  # CKA is invariant to rotation and isotropic scaling
    assert float(cka_matrix([s[0]], [3.0 * s[0] @ q])[0, 0]) == pytest.approx(1.0, abs=1e-5)


def test_layer_cka_of_a_model_with_itself_has_a_unit_diagonal_and_writes_png_and_json(tiny, tmp_path):
    m = layer_cka(tiny["teacher"], tiny["teacher"], tiny["val"], max_tokens=128)
    assert m.shape == (4, 4)  # embeddings + 3 blocks
    torch.testing.assert_close(torch.diagonal(m), torch.ones(4), atol=1e-4, rtol=0)
    states = hidden_states(tiny["student"], tiny["val"], max_tokens=128)
    assert len(states) == 3 and states[0].shape == (128, 32)
    data = write_cka(layer_cka(tiny["student"], tiny["teacher"], tiny["val"], max_tokens=128), tmp_path)
    assert json.loads((tmp_path / "cka.json").read_text())["matrix"] == data["matrix"]
    assert len(data["matrix"]) == 3 and len(data["matrix"][0]) == 4 and data["teacher_layers"][0] == "emb"
    assert (tmp_path / "cka.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- out-of-domain text


def test_fortune_files_split_on_percent_lines():
    text = "A penny saved.\n%\nTwo lines\nof wisdom.\n%\n%\nLast one\n"
    assert split_fortunes(text) == ["A penny saved.", "Two lines\nof wisdom.", "Last one"]


def test_ood_absent_gives_a_note_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "FORTUNES_DIR", tmp_path / "nowhere")
    docs, desc, note = load_ood_documents("auto", 1000)
    assert docs == [] and "apt-get install -y fortunes" in note
    docs, _, note = load_ood_documents(str(tmp_path / "missing.txt"), 1000)
    assert docs == [] and "not found" in note
    assert load_ood_documents(None, 1000)[2] == "out-of-domain evaluation turned off"


def test_ood_from_a_user_file_and_from_debian_fortunes(tmp_path):
    f = tmp_path / "quotes"
    f.write_text("one quote here\n%\nanother quote\n%\n")
    docs, desc, note = load_ood_documents(str(f), 1000)
    assert docs == ["one quote here", "another quote"] and note is None and str(f) in desc
    if not suite.FORTUNES_DIR.is_dir():
        pytest.skip("Debian's fortunes package is not installed (apt-get install -y fortunes)")
    docs, desc, note = load_ood_documents("auto", 5000)
    assert note is None and "fortunes" in desc and 5000 <= sum(map(len, docs)) < 5000 + 5000


# --------------------------------------------------------------------------- the suite


def test_evaluator_teacher_against_itself_is_perfectly_faithful(tiny, tmp_path):
    ood = tmp_path / "ood.txt"
    ood.write_text("Completely different words: quantum, pizza, xylophone, zebra crossing.\n" * 40)
    ev = Evaluator(tiny["tok"], tiny["teacher"], tiny["val"], EvalSpec(ood=str(ood), cka_tokens=128, new_tokens=5))
    res = ev.evaluate(tiny["teacher"], out_dir=tmp_path)
    s = res["summary"]
    assert s["top1_agreement"] == 1.0 and s["kl_teacher_student"] == pytest.approx(0, abs=1e-6)
    assert s["kl_student_teacher"] == pytest.approx(0, abs=1e-6)
    assert s["gen_token_agreement"] == 1.0 and s["gen_exact_match"] == 1.0
    assert s["cka_last_to_last"] == pytest.approx(1.0, abs=1e-4)
    assert s["ood_perplexity"] == pytest.approx(res["ood"]["teacher"]["perplexity"])
    assert s["prefill_tokens_per_s"] > 0 and s["generation_tokens_per_s"] > 0 and s["peak_rss_bytes"] > 2**20
    assert "ru_maxrss" in res["memory"]["method"]
    assert (tmp_path / "cka.png").is_file() and len(res["generation"]["teacher"]) == 8
    other = ev.evaluate(tiny["student"])["summary"]
    assert other["top1_agreement"] < 1 and other["kl_teacher_student"] > 0.001 and other["gen_token_agreement"] < 1


def test_eval_command_on_a_run_directory_uses_its_manifest_and_writes_eval_json(tiny_assets, tmp_path):
    from kdforge.train import train

    run = train(parse_recipe(recipe_dict(tiny_assets, tmp_path / "run")), progress=False)
    res = CliRunner().invoke(app, ["eval", str(run), "--ood", "none", "--new-tokens", "4"])
    assert res.exit_code == 0, res.output
    # a table of the headline figures on screen (rich box lines), not a JSON dump; all of it is in eval.json
    assert "{" not in res.output and "held-out" in res.output and "━" in res.output
    for row in ("student", "teacher", "generation token agreement", f"all results: {run / 'eval.json'}"):
        assert row in res.output, res.output
    ev = json.loads((run / "eval.json").read_text())
    assert {"perplexity", "ece", "kl_student_teacher", "gen_token_agreement"} <= set(ev["summary"])
    assert ev["teacher"]["model"] == str(tiny_assets["teacher"]) and ev["ood"]["skipped"]
    assert (run / "cka.png").is_file() and ev["size"]["student"]["safetensors_bytes"] > 0
    # the held-out figures equal the run's own final evaluation (same data, same model)
    final = json.loads((run / "final.json").read_text())
    assert ev["heldout"]["student"]["perplexity"] == pytest.approx(final["student"]["perplexity"], rel=1e-6)
    bad = CliRunner().invoke(app, ["eval", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "not found" in bad.output


def _resident_block(size: int) -> mmap.mmap:
    """`size` bytes of anonymous memory, every page written so it is resident; close() returns it to the OS
    (an mmap, not a tensor: malloc may keep freed blocks and hand them back without the RSS moving)."""
    block = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    return block


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the peak reset needs Linux's /proc")
def test_peak_rss_reset_forgets_an_earlier_allocation_and_the_peak_then_tracks_new_ones():
    big = 256 * 2**20
    _resident_block(big).close()
    assert peak_rss_bytes() >= big
    assert reset_peak_rss()
    reset_at = peak_rss_bytes()
    assert reset_at < rss_kib("VmRSS") * 1024 + big // 2, (reset_at, rss_kib("VmRSS"))  # the freed block is forgotten
    before = rss_kib("VmRSS") * 1024
    block = _resident_block(big)
    assert peak_rss_bytes() >= before + big * 0.9, (peak_rss_bytes(), before)
    block.close()
