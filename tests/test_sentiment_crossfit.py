"""Cross-fitted teachers for task sequence_classification (issue 13; Dao et al., ICLR 2021): `teacher.crossfit`
fine-tunes K teachers, teacher k without fold k of the training texts, caches them like the single teacher, and
every training text's logits and tapped features come from the teacher that never saw it. A tiny random BERT
(tests/text_assets.py) and a 150-row CSV made here keep every test to seconds."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from kdforge.cli import app
from kdforge.crossfit import stratified_folds
from kdforge.errors import KDForgeError
from kdforge.recipe import parse_recipe
from kdforge.tasks import sequence_classification as sc
from kdforge.train import prepare

from text_assets import tiny_bert

K, SEED = 3, 7
WORDS = {"negative": "hate awful sad bad terrible angry worst broken".split(),
         "neutral": "today meeting bus report weather monday office train".split(),
         "positive": "love great happy awesome good best lovely fun".split()}
FILLER = "the a my this our your is was so very and with at".split()


def tweets(n_per_class: int = 50) -> list[tuple[str, str]]:
    """(text, label) rows: each text is filler words around three words of its class, all distinct."""
    rng = random.Random(0)
    rows, seen = [], set()
    for label, words in WORDS.items():
        while sum(r[1] == label for r in rows) < n_per_class:
            text = " ".join(rng.choice(words if j % 2 else FILLER) for j in range(rng.randint(4, 9)))
            if text not in seen:
                seen.add(text)
                rows.append((text, label))
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sentiment_crossfit")
    rows = tweets()
    csv = root / "tweets.csv"
    csv.write_text("text,sentiment\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return {"root": root, "cache": root / "cache", "csv": csv,
            "encoder": tiny_bert(root / "tiny_bert", [t for t, _ in rows], layers=3, hidden=32)}


@pytest.fixture(autouse=True)
def _cache_env(assets, monkeypatch):
    monkeypatch.setenv("KDFORGE_CACHE", str(assets["cache"]))


def recipe_dict(assets, out: Path, *, crossfit: dict | None = {"folds": K, "seed": SEED}, objective=None,
                **train) -> dict:
    teacher = {"model": str(assets["encoder"]), "dtype": "float32",
               "config": {"epochs": 2, "lr": 3e-3, "batch_size": 16}}
    if crossfit is not None:
        teacher["crossfit"] = crossfit
    return {"name": "crossfit", "task": "sequence_classification", "seed": 0, "output_dir": str(out),
            "teacher": teacher, "student": {"init": "from_teacher", "layers": [0, 2]},
            "data": {"corpus": str(assets["csv"]), "text_field": "text", "label_field": "sentiment",
                     "validation_split": 0.2, "seq_len": 16},
            "objective": objective or [{"loss": "cross_entropy", "weight": 0.5},
                                       {"loss": "forward_kl", "weight": 0.5, "temperature": 2.0}],
            "train": {"steps": 6, "batch_size": 16, "lr": 1e-3, "warmup_steps": 1, "save_every": 3, "log_every": 2,
                      **train}}


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_every_training_text_gets_the_outputs_of_the_fold_teacher_that_never_saw_it(tmp_path, assets):
    from transformers import AutoModelForSequenceClassification

    objective = [{"loss": "forward_kl", "temperature": 2.0},
                 {"loss": "hidden_mse", "student": "bert.encoder.layer.*", "teacher": "bert.encoder.layer.*",
                  "projector": "linear"}]
    setup = prepare(parse_recipe(recipe_dict(assets, tmp_path / "run", objective=objective)))
    train = setup.train_blocks
    source = setup.distiller.teacher_source
    assert isinstance(source, sc.FoldRoutedTeacher) and source.model is setup.teacher
    folds = stratified_folds(train.labels.numpy(), K, seed=SEED)  # the folds, drawn independently
    assert torch.equal(source.folds, folds)
    info = setup.task.crossfit
    assert info["fold_sizes"] == torch.bincount(folds).tolist() and len(info["fold_teachers"]) == K
    # each fold teacher saw exactly the training texts outside its fold, and no text of its fold
    direct = []
    for k, folder in enumerate(info["fold_teachers"]):
        saw = json.loads((Path(folder) / sc.TEACHER_INFO).read_text())
        outside = (folds != k).nonzero().flatten()
        assert saw["data_fingerprint"] == sc.fingerprint(train.subset(outside))
        assert saw["train_texts"] == len(outside) and saw["crossfit"] == {"fold": k, "folds": K, "seed": SEED}
        assert not {train.texts[i] for i in outside} & {train.texts[i] for i in (folds == k).nonzero().flatten()}
        direct.append(AutoModelForSequenceClassification.from_pretrained(folder).eval())
    assert len({Path(f).name for f in info["fold_teachers"]} | {sc.teacher_cache_folder(setup.recipe, train).name}) \
        == K + 1
    # the routed outputs of shuffled, padded batches equal each text's own fold teacher run on that text alone
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))
    for start in range(0, len(train), 16):
        batch = setup.task.make_batch(train, order[start: start + 16])
        assert len(folds[batch["index"]].unique()) > 1
        out = source(batch, setup.distiller.teacher_taps)
        layers = out.features[next(iter(out.features))]
        assert out.logits.shape == (len(batch["index"]), 3) and len(layers) == 3
        for row, i in enumerate(batch["index"].tolist()):
            ids = torch.tensor([train.ids[i]])
            with torch.no_grad():
                own = direct[int(folds[i])](ids, output_hidden_states=True)
            torch.testing.assert_close(out.logits[row], own.logits[0], atol=1e-5, rtol=1e-5)
            n = ids.shape[1]
            for j, layer in enumerate(layers):
                torch.testing.assert_close(layer[row, :n], own.hidden_states[j + 1][0], atol=1e-5, rtol=1e-5)
    # a training step goes through the routed teacher; held-out figures use the teacher fine-tuned on everything
    loss, values = setup.distiller(setup.task.make_batch(train, torch.arange(16)))
    assert torch.isfinite(loss) and set(values) == {"forward_kl", "hidden_mse"}
    whole = sc.finetuned_teacher(setup.recipe, train, setup.tokenizer)[0]
    torch.testing.assert_close(sc.predict(setup.teacher, setup.val_blocks)[0], sc.predict(whole, setup.val_blocks)[0])


def test_finetune_teacher_caches_the_k_teachers_and_later_runs_reuse_them(tmp_path, assets, monkeypatch):
    path = write(tmp_path / "r.yaml", recipe_dict(assets, tmp_path / "run", crossfit={"folds": 2, "seed": 3}))
    res = CliRunner().invoke(app, ["finetune-teacher", str(path), "--no-progress"])
    assert res.exit_code == 0, res.output
    full = Path(res.output.split("teacher: ")[1].split()[0])
    recipe = parse_recipe(yaml.safe_load(path.read_text()))
    plain = parse_recipe(recipe_dict(assets, tmp_path / "run", crossfit=None))
    train, _, _ = sc.SequenceClassification().data(recipe)
    assert full == sc.teacher_cache_folder(plain, train), "the full teacher is the plain recipe's cached teacher"
    folds = sc.crossfit_folds(train, 2, 3)
    cached = sc.fold_teachers(recipe, train, folds, sc.load_tokenizer(assets["encoder"]))
    assert all(f.parent == full.parent and (f / sc.TEACHER_INFO).is_file() for _, f in cached)
    assert not [p for p in full.parent.iterdir() if p.name.startswith(".")], "a temporary folder was left"
    monkeypatch.setattr(sc, "finetune", lambda *a, **k: pytest.fail("a cached teacher was fine-tuned again"))
    setup = prepare(recipe)
    assert setup.task.crossfit["fold_teachers"] == [str(f) for _, f in cached]
    res = CliRunner().invoke(app, ["finetune-teacher", str(path), "--no-progress"])
    assert res.exit_code == 0 and Path(res.output.split("teacher: ")[1].split()[0]) == full
    other = parse_recipe(recipe_dict(assets, tmp_path / "run", crossfit={"folds": 2, "seed": 4}))
    assert sc._cache_folder(other, train.subset([0]), {"fold": 0, "folds": 2, "seed": 4}) != \
        sc._cache_folder(recipe, train.subset([0]), {"fold": 0, "folds": 2, "seed": 3})


def test_bad_crossfit_settings_are_one_line_refusals(tmp_path, assets):
    train, _, _ = sc.SequenceClassification().data(parse_recipe(recipe_dict(assets, tmp_path / "r")))
    smallest = int(torch.bincount(train.labels).min())
    path = write(tmp_path / "big.yaml", recipe_dict(assets, tmp_path / "run", crossfit={"folds": smallest + 1}))
    for command in ("distill", "finetune-teacher"):
        res = CliRunner().invoke(app, [command, str(path), "--no-progress"])
        assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
        assert f"teacher.crossfit.folds={smallest + 1} exceeds the smallest class count" in res.output
        assert f"use 2..{smallest}" in res.output
    sliced = recipe_dict(assets, tmp_path / "run", crossfit={"folds": 5})
    sliced["data"]["max_train_examples"] = 9  # the count is of the texts the recipe trains on
    with pytest.raises(KDForgeError, match=r"folds=5 exceeds .* of the 9 training texts used"):
        prepare(parse_recipe(sliced))
    with pytest.raises(KDForgeError, match="teacher.crossfit.folds must be an integer from 2"):
        parse_recipe(recipe_dict(assets, tmp_path / "run", crossfit={"folds": 1}))
    from transformers import AutoModelForSequenceClassification

    classifier = tmp_path / "classifier"  # a teacher already fine-tuned (on every fold) cannot be cross-fitted
    AutoModelForSequenceClassification.from_pretrained(
        str(assets["encoder"]), num_labels=3, id2label=dict(enumerate(train.label_names)),
        label2id={n: i for i, n in enumerate(train.label_names)}).save_pretrained(classifier)
    sc.load_tokenizer(assets["encoder"]).save_pretrained(classifier)
    r = recipe_dict(assets, tmp_path / "run")
    r["teacher"]["model"] = str(classifier)
    with pytest.raises(KDForgeError, match="already is a classifier of these classes") as err:
        prepare(parse_recipe(r))
    assert "\n" not in str(err.value)


def test_a_crossfit_recipe_distils_and_evaluates_from_the_command_line(tmp_path, assets):
    path = write(tmp_path / "r.yaml", recipe_dict(assets, tmp_path / "run"))
    res = CliRunner().invoke(app, ["distill", str(path), "--no-progress"])
    assert res.exit_code == 0, res.output
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    cf = final["teacher_crossfit"]
    assert (cf["folds"], cf["seed"], len(cf["fold_teachers"])) == (K, SEED, K)
    assert sum(cf["fold_sizes"]) == sum(final["data"]["train_balance"].values())
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    evaluated = json.loads((tmp_path / "run" / "eval.json").read_text())["heldout"]
    for key in ("accuracy", "nll", "top1_agreement", "kl_teacher_student"):  # both against the full teacher
        assert evaluated["student"][key] == pytest.approx(final["student"][key], abs=1e-5)
    assert evaluated["teacher"]["nll"] == pytest.approx(final["teacher"]["nll"], abs=1e-5)


def test_the_semiparametric_sentiment_matrix_resolves_its_five_arms(tmp_path):
    from kdforge.bench import load_matrix, plan_cells

    spec, base = load_matrix(Path(__file__).resolve().parents[1] / "benchmarks" / "sentiment_semiparametric.yaml")
    cells, baseline = plan_cells(spec, base, tmp_path / "plan")
    assert baseline == "ce" and len(cells) == 5 * 5, [c.error for c in cells if c.recipe is None]
    crossfit = {c.method: (c.recipe["teacher"].get("crossfit") or {}).get("folds") for c in cells}
    assert crossfit == {"ce": None, "kd": None, "crossfit_kd": 3, "kd_orthogonal": None, "crossfit_orthogonal": 3}
