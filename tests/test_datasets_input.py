"""`datasets` corpora (save_to_disk folders, parquet) and data.validation_split."""
from __future__ import annotations

import pytest

datasets = pytest.importorskip("datasets")

from kdforge.data.corpus import load_corpus  # noqa: E402
from kdforge.errors import KDForgeError  # noqa: E402
from kdforge.recipe import DataSpec, parse_recipe  # noqa: E402

DOCS = [f"document {i}: the king doth speak of night and day." for i in range(40)]


def _saved(tmp_path, rows: dict, name: str = "saved"):
    folder = tmp_path / name
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder))
    return folder


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_a_saved_dataset_with_a_validation_split(tmp_path):
    folder = _saved(tmp_path, {"text": DOCS, "id": list(range(40))})
    spec = DataSpec(corpus=str(folder), validation_split=0.1, split_seed=3)
    corpus = load_corpus(spec)
    assert len(corpus.validation) == 4 and len(corpus.train) == 36
    assert sorted(corpus.train + corpus.validation) == sorted(DOCS), "every row once, by document"
    assert corpus.train == [d for d in DOCS if d not in corpus.validation], "corpus order kept"
    again = load_corpus(spec)
    assert again.validation == corpus.validation, "the same seed draws the same documents"
    other = load_corpus(spec.model_copy(update={"split_seed": 4}))
    assert other.validation != corpus.validation


def test_parquet_file_and_parquet_folder(tmp_path):
    datasets.Dataset.from_dict({"body": DOCS[:30]}).to_parquet(str(tmp_path / "train.parquet"))
    (tmp_path / "val").mkdir()
    datasets.Dataset.from_dict({"body": DOCS[30:35]}).to_parquet(str(tmp_path / "val" / "part-0.parquet"))
    datasets.Dataset.from_dict({"body": DOCS[35:]}).to_parquet(str(tmp_path / "val" / "part-1.parquet"))
    corpus = load_corpus(DataSpec(corpus=str(tmp_path / "train.parquet"), text_field="body",
                                  validation=[str(tmp_path / "val")]))
    assert corpus.train == DOCS[:30]
    assert corpus.validation == DOCS[30:], "a parquet folder expands to its files, in name order"
    globbed = load_corpus(DataSpec(corpus=str(tmp_path / "val" / "*.parquet"), text_field="body",
                                   validation_split=0.2))
    assert len(globbed.train) == 8 and len(globbed.validation) == 2


def test_text_files_split_by_file(tiny_assets, tmp_path):
    for i in range(5):
        (tmp_path / f"doc{i}.txt").write_text(DOCS[i])
    corpus = load_corpus(DataSpec(corpus=str(tmp_path), validation_split=0.2))
    assert len(corpus.train) == 4 and len(corpus.validation) == 1


def test_recipe_split_seed_is_the_recipe_seed_and_validation_is_not_required(tiny_recipe, tmp_path):
    folder = _saved(tmp_path, {"text": DOCS})
    data = {"corpus": str(folder), "validation_split": 0.05, "seq_len": 32}
    recipe = parse_recipe({**tiny_recipe, "seed": 7, "data": data})
    assert recipe.data.split_seed == 7
    assert parse_recipe(recipe.model_dump(mode="json")).data.split_seed == 7, "a manifest's recipe re-parses"
    assert load_corpus(recipe.data).validation == load_corpus(recipe.data.model_copy()).validation
    fixed = parse_recipe({**tiny_recipe, "seed": 8, "data": {**data, "split_seed": 7}})
    assert load_corpus(fixed.data).validation == load_corpus(recipe.data).validation
    with pytest.raises(KDForgeError, match="not both"):
        parse_recipe({**tiny_recipe, "data": {**data, "validation": [str(folder)]}})
    with pytest.raises(KDForgeError, match="corpus of your own"):
        parse_recipe({**tiny_recipe, "data": {"validation_split": 0.1}})
    with pytest.raises(KDForgeError, match="validation_split"):
        parse_recipe({**tiny_recipe, "data": {**data, "validation_split": 1.5}})


def test_tokenize_corpus_reads_a_dataset(tiny_assets, tiny_recipe, tmp_path):
    from transformers import AutoTokenizer

    from kdforge.train import tokenize_corpus

    folder = _saved(tmp_path, {"text": [tiny_assets["train"].read_text()[i * 2000:(i + 1) * 2000] for i in range(10)]})
    recipe = parse_recipe({**tiny_recipe, "data": {"corpus": str(folder), "validation_split": 0.2, "seq_len": 32}})
    train, val = tokenize_corpus(recipe, AutoTokenizer.from_pretrained(tiny_assets["teacher"]))
    assert len(train.ids) > len(val.ids) > 0


def test_missing_field_empty_dataset_and_empty_split_are_one_line(tmp_path):
    folder = _saved(tmp_path, {"content": DOCS[:3]})
    with pytest.raises(KDForgeError) as err:
        load_corpus(DataSpec(corpus=str(folder), validation_split=0.5))
    assert "no column 'text' (has content); set data.text_field" in _one_line(err)

    features = datasets.Features({"text": datasets.Value("string")})
    empty = datasets.Dataset.from_dict({"text": []}, features=features)
    empty.save_to_disk(str(tmp_path / "empty"))
    empty.to_parquet(str(tmp_path / "empty.parquet"))
    for path in (tmp_path / "empty", tmp_path / "empty.parquet"):
        with pytest.raises(KDForgeError) as err:
            load_corpus(DataSpec(corpus=str(path), validation_split=0.5))
        assert "has no rows" in _one_line(err)

    with pytest.raises(KDForgeError) as err:
        load_corpus(DataSpec(corpus=str(folder), text_field="content", validation_split=0.05))
    assert "validation_split 0.05 of 3 documents holds out none; raise it to at least 0.167" in _one_line(err)
    with pytest.raises(KDForgeError) as err:
        load_corpus(DataSpec(corpus=str(_saved(tmp_path, {"text": ["one"]}, "single")), validation_split=0.6))
    assert "leaves none to train on" in _one_line(err)


def test_structured_fields_are_refused_not_stringified(tmp_path):
    ids = _saved(tmp_path, {"text": [[1, 2, 3]] * 4}, "ids")
    with pytest.raises(KDForgeError) as err:
        load_corpus(DataSpec(corpus=str(ids), validation_split=0.5))
    assert "field 'text' is a list, not text" in _one_line(err)
    rows = _saved(tmp_path, {"text": [{"a": "b"}] * 4}, "dicts")
    with pytest.raises(KDForgeError) as err:
        load_corpus(DataSpec(corpus=str(rows), validation_split=0.5))
    assert "field 'text' is a dict, not text" in _one_line(err)
    chat = _saved(tmp_path, {"messages": [[{"role": "user", "content": "hi"}]] * 4}, "chat")
    with pytest.raises(KDForgeError) as err:
        load_corpus(DataSpec(corpus=str(chat), text_field="messages", validation_split=0.5))
    assert "no chat template" in _one_line(err)


def test_a_dataset_dict_folder_and_a_mixed_folder_are_refused(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS})}).save_to_disk(str(folder))
    with pytest.raises(KDForgeError) as err:
        load_corpus(DataSpec(corpus=str(folder), validation_split=0.1))
    assert "DatasetDict with splits train; point data.corpus at one split's folder" in _one_line(err)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    datasets.Dataset.from_dict({"text": DOCS}).to_parquet(str(mixed / "a.parquet"))
    (mixed / "b.txt").write_text("x")
    with pytest.raises(KDForgeError) as err:
        load_corpus(DataSpec(corpus=str(mixed), validation_split=0.1))
    assert "both parquet and text files" in _one_line(err)
