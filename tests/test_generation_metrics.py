"""Generation evaluation (kdforge.evaluate.generation_metrics): ROUGE-L and distinct-n on hand-made texts against
direct computations, and held-out prompts answered and scored on tiny models."""
from __future__ import annotations

import re

import pytest

from kdforge.errors import KDForgeError
from kdforge.evaluate.generation_metrics import distinct_n, evaluate_prompt_generations, rouge_l


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _direct_rouge_l(pred: str, ref: str) -> float:
    """Lin (2004) ROUGE-L F1 on rouge-score's tokens (lowercased runs of [a-z0-9])."""
    p, r = re.findall(r"[a-z0-9]+", pred.lower()), re.findall(r"[a-z0-9]+", ref.lower())
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def test_rouge_l_equals_a_direct_lcs_computation():
    pairs = [("The king is dead, long live the king!", "the KING hath died; long live the queen"),
             ("O Romeo, Romeo, wherefore art thou Romeo?", "Wherefore art thou, Romeo"),
             ("to be or not to be", "to be or not to be"),
             ("nothing alike here", "completely different words")]
    for pred, ref in pairs:
        assert rouge_l([pred], [ref]) == pytest.approx(_direct_rouge_l(pred, ref), abs=1e-9)
    # "the king is dead long live the king" vs "the king hath died long live the queen": LCS "the king long live the"
    assert _direct_rouge_l(*pairs[0]) == pytest.approx(2 * (5 / 8) * (5 / 8) / (5 / 8 + 5 / 8))
    assert rouge_l([pairs[2][0]], [pairs[2][1]]) == 1.0 and rouge_l([pairs[3][0]], [pairs[3][1]]) == 0.0
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    assert rouge_l(preds, refs) == pytest.approx(sum(_direct_rouge_l(p, r) for p, r in pairs) / 4, abs=1e-9)
    with pytest.raises(KDForgeError, match="one reference per prediction"):
        rouge_l(["a"], [])


def test_distinct_n_counts_distinct_ngrams_over_all_texts():
    texts = ["the cat sat on the mat", "The cat ran"]
    # unigrams: the cat sat on the mat the cat ran -> 9, distinct {the, cat, sat, on, mat, ran} = 6
    assert distinct_n(texts, 1) == pytest.approx(6 / 9)
    # bigrams: (the cat)(cat sat)(sat on)(on the)(the mat) + (the cat)(cat ran) -> 7, distinct 6
    assert distinct_n(texts, 2) == pytest.approx(6 / 7)
    assert distinct_n(["a a a a"], 1) == pytest.approx(1 / 4)
    assert distinct_n(["one"], 2) == 0.0
    with pytest.raises(KDForgeError):
        distinct_n(texts, 0)


def test_held_out_prompts_are_answered_and_scored(tiny_assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.data.prompts import PromptRecord

    tok = AutoTokenizer.from_pretrained(tiny_assets["teacher"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"])
    records = [PromptRecord(str(i), f"The king {w} ", f"{w} the queen of the sea.") for i, w in
               enumerate(["hath", "doth", "speak", "love", "sword"])]
    res = evaluate_prompt_generations(records, teacher, tok, teacher=teacher, teacher_tokenizer=tok,
                                      max_new_tokens=6, batch_size=2)
    assert len(res["student"]) == len(res["teacher"]) == 5
    assert res["student"] == res["teacher"]  # the same greedy model: its answers match the teacher's exactly
    s = res["figures"]["student"]
    # identical answers score 1 unless they hold no word (rouge-score keeps [a-z0-9] runs only): then 0
    assert s["rougeL_teacher"] == pytest.approx(sum(_direct_rouge_l(a, a) for a in res["student"]) / 5)
    assert s["rougeL_teacher"] == pytest.approx(sum(bool(re.search(r"[a-z0-9]", a.lower())) for a in res["student"]) / 5)
    assert s["rougeL_reference"] == pytest.approx(rouge_l(res["student"], res["references"]))
    assert s["distinct_2"] == pytest.approx(distinct_n(res["student"], 2))
    assert 0 < s["mean_response_tokens"] <= 6
    assert res["figures"]["teacher"]["rougeL_reference"] == pytest.approx(s["rougeL_reference"])
    with pytest.raises(KDForgeError, match="no held-out prompt has a response"):
        evaluate_prompt_generations([PromptRecord("x", "p", None)], teacher, tok)


def _prompt_recipe(tiny_recipe, tmp_path, **student):
    import json

    from conftest import make_text

    rows = []
    for i in range(14):
        text = make_text(30, i).replace("\n", " ")
        rows.append({"prompt": text[:40], "response": text[40:120]})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[10:]))
    return {**tiny_recipe, "student": {**tiny_recipe["student"], **student},
            "data": {"prompts": str(tmp_path / "train.jsonl"), "validation": [str(tmp_path / "val.jsonl")],
                     "seq_len": 48},
            "train": {**tiny_recipe["train"], "steps": 2, "save_every": 2}}


QUICK = {"ood": None, "speed": False, "cka": False, "prompt_new_tokens": 8, "new_tokens": 4}


def test_kdforge_eval_and_report_score_generations_on_held_out_prompts(tiny_recipe, tmp_path):
    import json

    from kdforge.evaluate.suite import run_eval
    from kdforge.recipe import EvalSpec, parse_recipe
    from kdforge.report.build import build_report
    from kdforge.train import train

    run = train(parse_recipe(_prompt_recipe(tiny_recipe, tmp_path)), progress=False)
    res = run_eval(run, spec=EvalSpec(**QUICK))
    pg = res["prompt_generation"]
    assert len(pg["prompts"]) == len(pg["student"]) == len(pg["teacher"]) == 4
    fig = pg["figures"]["student"]
    assert fig["rougeL_reference"] == pytest.approx(rouge_l(pg["student"], pg["references"]))
    assert fig["rougeL_teacher"] == pytest.approx(rouge_l(pg["student"], pg["teacher"]))
    assert fig["distinct_1"] == pytest.approx(distinct_n(pg["student"], 1))
    for key in ("rougeL_reference", "rougeL_teacher", "distinct_1", "distinct_2", "mean_response_tokens"):
        assert res["summary"][key] == fig[key]
    assert "top1_agreement" in res["heldout"]["student"]  # perplexity / agreement on the response tokens, as before
    assert json.loads((run / "eval.json").read_text())["prompt_generation"]["student"] == pg["student"]
    html, _, _ = build_report(run)
    page = html.read_text()
    assert "Generations on held-out prompts" in page and "ROUGE-L vs teacher" in page
    assert "real continuation" in page
    from typer.testing import CliRunner

    from kdforge.cli import app

    cli = CliRunner().invoke(app, ["eval", str(run), "--ood", "none", "--no-cka", "--new-tokens", "4",
                                   "--prompt-generations", "2", "--out", str(tmp_path / "e2")])
    assert cli.exit_code == 0, cli.output
    assert len(json.loads((tmp_path / "e2" / "eval.json").read_text())["prompt_generation"]["student"]) == 2


def test_kdforge_eval_of_a_student_with_its_own_tokenizer(tiny_recipe, tmp_path):
    import json

    from kdforge.evaluate.suite import run_eval
    from kdforge.recipe import EvalSpec, parse_recipe
    from kdforge.train import train

    recipe = _prompt_recipe(tiny_recipe, tmp_path, tokenizer="bpe:320")
    run = train(parse_recipe({**recipe, "objective": [{"loss": "cross_entropy"}, {"loss": "uld"}]}), progress=False)
    res = run_eval(run, spec=EvalSpec(**QUICK))
    held = res["heldout"]
    assert held["student"]["bits_per_char"] > 0 and held["teacher"]["bits_per_char"] > 0
    assert "top1_agreement" not in held["student"] and "cka" not in res
    final = json.loads((run / "final.json").read_text())  # the same blocks of each model as final.json measured
    assert held["teacher"]["perplexity"] == pytest.approx(final["teacher"]["perplexity"], rel=1e-5)
    assert held["student"]["perplexity"] == pytest.approx(final["student"]["perplexity"], rel=1e-5)
    pg = res["prompt_generation"]
    assert len(pg["teacher"]) == len(pg["student"]) == 4 and "rougeL_teacher" in pg["figures"]["student"]
    assert any("its own tokenizer" in n for n in res["notes"])


def test_bench_tables_add_the_generation_table_for_prompt_response_matrices():
    from kdforge.bench import results_tables

    def cell(**m):
        return {"seeds": 2, "failed": 0, "metrics": {k: {"mean": v, "std": 0.01, "n": 2} for k, v in m.items()}}

    summary = {"default": {"ce": cell(perplexity=300.0, rougeL_reference=0.12, rougeL_teacher=0.2, distinct_1=0.5,
                                      distinct_2=0.8, mean_response_tokens=40.0),
                           "kd": cell(perplexity=280.0, rougeL_reference=0.15, rougeL_teacher=0.3, distinct_1=0.45,
                                      distinct_2=0.75, mean_response_tokens=42.0)}}
    tables = {title: (header, rows) for title, header, rows in results_tables(summary, "ce")}
    header, rows = tables["default: generation on held-out prompts"]
    assert header[2:] == ["ROUGE-L vs real", "ROUGE-L vs teacher", "distinct-1", "distinct-2", "mean length (tokens)"]
    assert rows[1][:4] == ["kd", "2/2", "0.15 ± 0.01", "0.3 ± 0.01"]
    plain = {"default": {"ce": cell(perplexity=300.0)}}
    assert all("generation" not in title for title, _, _ in results_tables(plain, "ce"))
