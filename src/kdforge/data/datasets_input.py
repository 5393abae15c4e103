"""Corpora stored as Hugging Face datasets (a `Dataset.save_to_disk` folder, parquet files), and the held-out split a
recipe can ask for instead of held-out files (`data.validation_split`)."""
from __future__ import annotations

import glob
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import KDForgeError

_TEXT_SUFFIXES = {".txt", ".jsonl", ".md"}  # what a corpus folder is read for (kdforge.data.corpus)


@dataclass
class DatasetSource:
    kind: str  # "saved" (a save_to_disk folder) | "parquet"
    paths: list[Path]


def dataset_source(pattern: str) -> DatasetSource | None:
    """The dataset a `data.corpus` / `data.validation` entry names, or None when it names text or JSON files.

    A folder with `dataset_info.json` / `state.json` is a `save_to_disk` folder; a `.parquet` file, a folder holding
    `.parquet` files (searched recursively), or a glob matching only `.parquet` files is parquet.
    Raises KDForgeError for a `DatasetDict` folder and for a folder or glob mixing parquet with text files.
    """
    path = Path(pattern).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise KDForgeError(f"'{pattern}' is a DatasetDict with splits {', '.join(splits)}; point data.corpus at "
                               f"one split's folder, e.g. {path / (splits[0] if splits else 'train')}")
        if (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
            return DatasetSource("saved", [path])
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif any(c in pattern for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    else:
        return DatasetSource("parquet", [path]) if path.suffix == ".parquet" and path.is_file() else None
    parquet = [p for p in files if p.suffix == ".parquet"]
    if not parquet:
        return None
    text = [p for p in files if p.suffix in _TEXT_SUFFIXES]
    if text:
        raise KDForgeError(f"'{pattern}' holds both parquet and text files ({parquet[0].name}, {text[0].name}); "
                           "point data.corpus at one kind (a glob such as 'data/*.parquet')")
    return DatasetSource("parquet", parquet)


def read_dataset(source: DatasetSource, text_field: str, tokenizer=None) -> list[str]:
    """Each row's `text_field` as one document (row order kept). A string column is taken as it is; chat messages
    are rendered with the tokenizer's chat template (kdforge.data.corpus.render_document); anything else is refused.

    Raises KDForgeError (one line) for a missing column, an empty dataset, or a row whose field is not text.
    """
    import datasets

    from .corpus import render_document

    name = source_name(source)
    datasets.disable_progress_bars()
    if _is_empty(source):  # datasets itself fails on these with an IndexError / "corresponds to no data"
        raise KDForgeError(f"dataset '{name}' has no rows; give a dataset with documents in column '{text_field}'")
    ds = open_dataset(source, name)
    if text_field not in ds.column_names:
        raise KDForgeError(f"dataset '{name}' has no column '{text_field}' (has {', '.join(ds.column_names)}); set "
                           "data.text_field")
    if len(ds) == 0:
        raise KDForgeError(f"dataset '{name}' has no rows; give a dataset with documents in column '{text_field}'")
    return [render_document(value, f"dataset '{name}' row {i} field '{text_field}'", tokenizer)
            for i, value in enumerate(ds[text_field])]


def source_name(source: DatasetSource) -> str:
    """How messages name a dataset: its one path, or the folder and number of its parquet files."""
    return str(source.paths[0]) if len(source.paths) == 1 else f"{source.paths[0].parent} ({len(source.paths)} files)"


def open_dataset(source: DatasetSource, name: str | None = None):
    """The `datasets.Dataset` a source names (a save_to_disk folder, or parquet files read by `datasets`).

    Raises KDForgeError (one line) when it cannot be read or is a DatasetDict.
    """
    import datasets

    name = name or source_name(source)
    datasets.disable_progress_bars()
    try:
        if source.kind == "saved":
            ds = datasets.load_from_disk(str(source.paths[0]))
        else:
            ds = datasets.Dataset.from_parquet([str(p) for p in source.paths])
    except Exception as err:  # datasets/pyarrow raise many types; the user needs the path and the reason
        raise KDForgeError(f"cannot read dataset '{name}': {str(err).splitlines()[0] if str(err) else type(err).__name__}"
                           "; is it a Dataset.save_to_disk folder or valid parquet?") from None
    if isinstance(ds, datasets.DatasetDict):
        raise KDForgeError(f"'{name}' is a DatasetDict with splits {', '.join(ds)}; point data.corpus at one split's "
                           "folder")
    return ds


def dataset_is_empty(source: DatasetSource) -> bool:
    """Whether a dataset holds no row (read from its metadata; `datasets` itself fails on such datasets)."""
    return _is_empty(source)


def _is_empty(source: DatasetSource) -> bool:
    """Whether a dataset holds no row, from its metadata (no shard of a saved dataset, parquet footers)."""
    try:
        if source.kind == "saved":
            state = source.paths[0] / "state.json"
            return state.is_file() and json.loads(state.read_text()).get("_data_files") == []
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(p).metadata.num_rows for p in source.paths) == 0
    except Exception:  # unreadable metadata: let the reader report it
        return False


def split_documents(docs: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out): round(fraction x len(docs)) documents drawn with `seed` are held out; both keep the corpus
    order. The same documents, fraction and seed give the same split.

    Raises KDForgeError when the split holds out no document or leaves none to train on.
    """
    n = len(docs)
    n_held = int(fraction * n + 0.5)
    if n_held == 0:
        raise KDForgeError(f"data.validation_split {fraction:g} of {n} documents holds out none; raise it to at "
                           f"least {0.5 / n:.3g}, or list held-out files in data.validation")
    if n_held >= n:
        raise KDForgeError(f"data.validation_split {fraction:g} of {n} documents leaves none to train on; lower it, "
                           "or list held-out files in data.validation")
    held = set(random.Random(seed).sample(range(n), n_held))
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]
