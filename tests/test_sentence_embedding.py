"""task sentence_embedding: mean pooling as sentence-transformers computes it, the embedding losses and metrics pinned
against direct computations, every recipes/embedding_*.yaml through the Distiller, a run through `kdforge distill` /
`kdforge eval` whose exported folder SentenceTransformer loads, and bad input refused in one line. The teacher is a
tiny random BERT laid out as all-MiniLM-L6-v2 ships (modules.json, 1_Pooling; tests/text_assets.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from kdforge.cli import app
from kdforge.data import sentiment
from kdforge.errors import KDForgeError
from kdforge.losses.registry import lookup
from kdforge.recipe import parse_recipe
from kdforge.tasks import sentence_embedding as se
from kdforge.train import prepare

from text_assets import seed_wheel, tiny_bert

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
EMBEDDING = sorted(RECIPES.glob("embedding_*.yaml"))
DATA = {"corpus": "tweets", "max_train_examples": 600, "max_eval_examples": 120, "seq_len": 40}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embedding")
    seed_wheel(root / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDFORGE_CACHE", str(root / "cache"))
        texts = sentiment.load_labelled(sentiment.TWEETS).texts[::20]
    encoder = tiny_bert(root / "tiny_st", texts, layers=3, hidden=32, sentence_transformers_files=True)
    return {"root": root, "cache": root / "cache", "encoder": encoder}


@pytest.fixture(autouse=True)
def _cache_env(assets, monkeypatch):
    monkeypatch.setenv("KDFORGE_CACHE", str(assets["cache"]))


def embedding_recipe(name: str, encoder: Path, out: Path, **train) -> dict:
    r = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    r["teacher"] = {"model": str(encoder), "dtype": "float32"}
    r["student"] = {"init": "from_teacher", "layers": [0, 2]}
    r["data"] = dict(DATA)
    r["output_dir"] = str(out)
    for term in r["objective"]:
        if "num_relation_heads" in term:  # 12 relation heads of 32 dims in MiniLM's 384; 4 of 8 in the tiny 32
            term["num_relation_heads"] = 4
    r["train"].update({"steps": 30, "batch_size": 16, "lr": 2e-3, "warmup_steps": 3, "save_every": 15,
                       "log_every": 5, **train})
    return r


def test_mean_pooling_and_normalisation_are_sentence_transformers(assets):
    encoder = se.load_encoder(assets["encoder"])
    assert encoder.normalize.enabled, "modules.json lists Normalize"
    ids = torch.tensor([[2, 40, 41, 42, 3], [2, 50, 3, 0, 0]])
    mask = (ids != 0).long()
    out = encoder(ids, attention_mask=mask)
    hidden = encoder.transformer(ids, attention_mask=mask).last_hidden_state
    direct = torch.stack([hidden[0, :5].mean(0), hidden[1, :3].mean(0)])  # padding left out of the mean
    torch.testing.assert_close(out.logits, F.normalize(direct, dim=-1))
    st = pytest.importorskip("sentence_transformers")
    texts = ["the car drives itself", "i would never ride in one", "ok"]
    reference = st.SentenceTransformer(str(assets["encoder"]), device="cpu").encode(texts, convert_to_tensor=True)
    from kdforge.tasks.text_encoders import TextSet, tokenize

    tokenizer = se.load_tokenizer(assets["encoder"])
    data = TextSet(texts, tokenize(tokenizer, texts, 64), torch.zeros(3, dtype=torch.long), torch.arange(3), "t", [])
    ours, _ = se.encode(encoder, data)
    torch.testing.assert_close(ours, reference.float(), atol=1e-5, rtol=1e-4)


def test_embedding_mse_and_cosine_are_the_direct_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    torch.testing.assert_close(lookup("hidden_mse")[1](s, t), ((s - t) ** 2).mean())
    torch.testing.assert_close(lookup("hidden_cosine")[1](s, t), (1 - F.cosine_similarity(s, t, dim=-1)).mean())


def test_spearman_neighbour_overlap_and_cosine_metrics_by_hand():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, generator=g), torch.randn(40, generator=g)
    b[5:9] = b[4]  # ties share their mean rank
    assert se.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    assert se.average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]
    t = torch.randn(30, 8, generator=g)
    same = se.embedding_metrics(t * 3.0, t)  # a scaled copy: the same cosines and neighbours
    assert same["spearman_cosine"] == pytest.approx(1.0) and same["top10_overlap"] == 1.0
    assert same["teacher_cosine"] == pytest.approx(1.0)
    other = se.embedding_metrics(torch.randn(30, 4, generator=g), t)
    assert -1 <= other["spearman_cosine"] < 0.5 and 0 <= other["top10_overlap"] < 1 and "teacher_cosine" not in other
    # top-k overlap by hand: 4 points on a line, k = 1 (each one's nearest by cosine, itself excluded)
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])  # rows 1 and 2 swapped
    # teacher nearest: 0->1, 1->0, 2->3, 3->2; student nearest: 0->2, 1->3, 2->0, 3->1: no pair agrees
    assert se.embedding_metrics(student, teacher, k=1)["top1_overlap"] == 0.0
    assert se.embedding_metrics(teacher, teacher, k=1)["top1_overlap"] == 1.0
    with pytest.raises(KDForgeError, match="too few for top-10"):
        se.embedding_metrics(t[:5], t[:5])


def test_shakespeare_sentences_drop_speakers_and_stage_directions():
    sentences = se.shakespeare_sentences()
    assert len(sentences) > 40000
    assert all(se.MIN_WORDS <= len(s.split()) <= se.MAX_WORDS for s in sentences[::97])
    assert not any("[" in s or s.split()[0].isupper() and len(s.split()[0]) > 2 for s in sentences[::97])
    assert "Do you doubt that?" in sentences and "Oph." not in sentences  # a one-line speech, its speaker dropped
    assert any(s.startswith("My necessaries are embark'd") for s in sentences)


def test_every_embedding_recipe_distils_through_the_shared_distiller(tmp_path, assets):
    assert {p.stem for p in EMBEDDING} == {f"embedding_{m}" for m in ("mse", "cosine", "minilm", "cka", "rkd", "sp")}
    teacher = None
    for path in EMBEDDING:
        recipe = embedding_recipe(path.stem, assets["encoder"], tmp_path / path.stem)
        recipe["student"] = {"init": "config", "config": {"num_hidden_layers": 2}}  # fresh: far from the teacher
        recipe = parse_recipe(recipe)
        setup = prepare(recipe, teacher=teacher)
        teacher = setup.teacher
        assert isinstance(setup.student, se.SentenceEncoder) and setup.student.config.num_hidden_layers == 2
        opt = torch.optim.AdamW(setup.distiller.parameters(), lr=1e-3)
        setup.distiller.train(False)  # no dropout: the same batch gives the same loss until the weights move
        batch = setup.task.make_batch(setup.train_blocks, torch.arange(16))
        losses = []
        for _ in range(4):
            loss, values = setup.distiller(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            assert set(values) == {t.label for t in recipe.objective} and all(torch.isfinite(v) for v in values.values())
        assert losses[-1] < losses[0], f"{path.stem}: the loss on a repeated batch does not fall: {losses}"


def test_distill_eval_and_the_exported_folder_from_the_command_line(tmp_path, assets):
    path = tmp_path / "cosine.yaml"
    recipe = embedding_recipe("embedding_cosine", assets["encoder"], tmp_path / "run", eval_every=15)
    recipe["student"] = {"init": "config", "config": {"num_hidden_layers": 2}}  # fresh: far from the teacher
    path.write_text(yaml.safe_dump(recipe))
    before = prepare(parse_recipe(recipe))  # the same seed: the run's student before its first step
    untrained = se.embedding_metrics(se.encode(before.student, before.val_blocks)[0],
                                     se.encode(before.teacher, before.val_blocks)[0])
    res = CliRunner().invoke(app, ["distill", str(path), "--no-progress"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[-1]["tokens"] == 30 * 16
    assert train_rows[-1]["loss"] < train_rows[0]["loss"], "the student moves towards the teacher's embeddings"
    assert [r["step"] for r in rows if "eval/spearman_cosine" in r] == [15]
    final = json.loads((run / "final.json").read_text())
    s = final["student"]
    assert final["heldout_setup"]["sentences"] == 120 and final["heldout_setup"]["pairs"] == 120 * 119 // 2
    assert -1 <= s["spearman_cosine"] <= 1 and 0 <= s["top10_overlap"] <= 1
    assert untrained["teacher_cosine"] < s["teacher_cosine"] <= 1, "held out, the student's embeddings moved to the "\
        "teacher's (what the cosine term trains)"
    assert s["sentences_per_s"] > 0 and s["parameters"] < final["teacher"]["parameters"]
    res = CliRunner().invoke(app, ["eval", str(run)])
    assert res.exit_code == 0, res.output
    assert "Spearman" in res.output and "120 held-out sentences" in res.output
    evaluated = json.loads((run / "eval.json").read_text())["heldout"]["student"]
    for key in ("spearman_cosine", "top10_overlap", "teacher_cosine"):
        assert evaluated[key] == pytest.approx(s[key], abs=1e-6)
    folder = run / "student"
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    st = pytest.importorskip("sentence_transformers")
    texts = ["self-driving cars are the future", "no way i am getting in one"]
    reference = st.SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)
    from kdforge.tasks.text_encoders import TextSet, tokenize

    data = TextSet(texts, tokenize(se.load_tokenizer(folder), texts, 64), torch.zeros(2, dtype=torch.long),
                   torch.arange(2), "t", [])
    torch.testing.assert_close(se.encode(se.load_encoder(folder), data)[0], reference.float(), atol=1e-5, rtol=1e-4)


def test_bad_input_is_refused_in_one_line(tmp_path, assets):
    recipe = embedding_recipe("embedding_cosine", assets["encoder"], tmp_path / "run")
    recipe["objective"] = [{"loss": "forward_kl"}]
    with pytest.raises(KDForgeError, match="term 'forward_kl' compares class logits") as err:
        prepare(parse_recipe(recipe))
    assert "\n" not in str(err.value)
    bad = tmp_path / "lines.csv"
    bad.write_text("sentence\nhello there\n")
    recipe = embedding_recipe("embedding_cosine", assets["encoder"], tmp_path / "run2")
    recipe["data"]["corpus"] = str(bad)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["distill", str(path), "--no-progress"])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert "no column 'text' (its columns: 'sentence'); set data.text_field" in res.output
    cls_pooled = tmp_path / "cls"
    cls_pooled.mkdir()
    (cls_pooled / "1_Pooling").mkdir()
    (cls_pooled / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                     "pooling_mode_mean_tokens": False}))
    with pytest.raises(KDForgeError, match="asks for pooling_mode_cls_token"):
        se.pooling_settings(cls_pooled)
    with pytest.raises(KDForgeError, match="task sentence_embedding reads only texts"):
        parse_recipe({**recipe, "data": {**recipe["data"], "label_field": "sentiment"}})


def test_an_embedding_bench_has_the_untrained_student_as_its_reference_row(tmp_path, assets):
    """No labels, so no cross-entropy baseline is added: the matrix's first method is the reference row, and a
    zero-weight term without weight decay (benchmarks/embedding_matrix.yaml's before_training) leaves the copied
    layers as they were; the tables show the embedding metrics."""
    from kdforge.bench import run_bench

    base = embedding_recipe("embedding_cosine", assets["encoder"], tmp_path / "unused", steps=2, save_every=0)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    cosine = [{"loss": "hidden_cosine", "name": "embedding_cosine", "student": "normalize", "teacher": "normalize"}]
    matrix = {"name": "emb", "base": "base.yaml", "seeds": [0, 1], "methods": {
        "before_training": {"objective": [{**cosine[0], "weight": 0.0}], "train.steps": 1, "train.warmup_steps": 0,
                            "train.weight_decay": 0.0},
        "embedding_cosine": {"objective": cosine}}}
    (tmp_path / "matrix.yaml").write_text(yaml.safe_dump(matrix))
    data = run_bench(tmp_path / "matrix.yaml", tmp_path / "out")
    assert data["baseline"] == "before_training" and not data["failed"]
    assert data["methods"] == ["before_training", "embedding_cosine"]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| before_training (reference) | 2/2 |" in md and "Spearman (cosines)" in md and "top-10 overlap" in md
    copied = prepare(parse_recipe({**base, "objective": cosine})).student
    exported = se.load_encoder(tmp_path / "out" / "cells" / "default" / "before_training" / "seed0" / "student")
    for (name, a), b in zip(copied.state_dict().items(), exported.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
