"""Corpora: the embedded Shakespeare works or users' text files / globs / JSONL, split into train and held-out docs."""
from __future__ import annotations

import glob
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import KDForgeError
from ..recipe import DataSpec

log = logging.getLogger("kdforge")
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of each byte that did not decode


@dataclass
class Corpus:
    train: list[str]
    validation: list[str]
    train_names: list[str]
    validation_names: list[str]


def _expand(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".jsonl", ".md"} and p.is_file())
        if not found:
            raise KDForgeError(f"data folder '{pattern}' holds no .txt, .jsonl or .md file; put the text there or "
                               "name the files (a glob such as 'data/*.text')")
        return found
    if any(c in pattern for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not found:
            raise KDForgeError(f"data glob '{pattern}' matches no file; check the path (relative paths start from "
                               f"{Path.cwd()})")
        return found
    if path.is_file():
        return [path]
    raise KDForgeError(f"data file '{pattern}' not found; give a text file, a glob such as 'data/*.txt', or a .jsonl")


def read_text(path: Path, encoding: str = "utf-8", max_undecodable: float = 0.001) -> str:
    """A corpus file's text. Bytes that do not decode read as U+FFFD; their share is logged when any, and a file
    with more than ``max_undecodable`` of them (random bytes, a Latin-1 file read as UTF-8) is refused."""
    data = path.read_bytes()
    try:
        text = data.decode(encoding, errors="surrogateescape")
    except LookupError:
        raise KDForgeError(f"data.encoding '{encoding}' is not a known text encoding; use e.g. utf-8, latin-1, cp1252") from None
    bad = len(_UNDECODABLE.findall(text))
    if bad:
        share = bad / max(len(data), 1)
        first = _UNDECODABLE.search(text).start()
        where = f"{path}: {bad} of {len(data)} bytes ({share:.2%}) are not valid {encoding}"
        if share > max_undecodable:
            raise KDForgeError(f"{where}; is it a text file in another encoding? set data.encoding (e.g. latin-1, "
                               f"cp1252), or raise data.max_undecodable (now {max_undecodable:g}) to train on it with "
                               "those bytes replaced")
        log.warning("%s (first near character %d); they read as U+FFFD", where, first)
        text = _UNDECODABLE.sub("\ufffd", text)
    return text


def is_chat(value: Any) -> bool:
    """Whether a value is a list of chat messages (``[{"role": ..., "content": ...}, ...]``)."""
    return bool(isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                          for m in value))


def render_document(value: Any, where: str, tokenizer=None, generation_prompt: bool = False) -> str:
    """A record's text field as training text. A string is taken as it is; a list of chat messages
    (``[{"role": ..., "content": ...}, ...]``, TRL's ``messages`` records) is rendered with the tokenizer's chat
    template (``generation_prompt``: followed by the template's opening of an assistant turn, the prompt of a
    prompt–response record); anything else (other lists, dicts, numbers) is refused, never stringified into Python
    reprs."""
    if isinstance(value, str):
        return value
    if is_chat(value):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise KDForgeError(f"{where} holds chat messages but the tokenizer has no chat template to render them; "
                               "use a teacher whose tokenizer has one, or give plain text in data.text_field")
        extra = {"add_generation_prompt": True} if generation_prompt else {}
        return tokenizer.apply_chat_template(value, tokenize=False, **extra)
    raise KDForgeError(f"{where} is a {type(value).__name__}, not text; point data.text_field at a string field "
                       "(or a list of chat messages with role and content)")


def _records(path: Path, text: str) -> list[tuple[str, Any]]:
    """(where, record) for each object of a .jsonl file (one per line) or a .json file (an array of them)."""
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise KDForgeError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}); a .json corpus must be one "
                               "array of objects") from None
        if not isinstance(rows, list):
            raise KDForgeError(f"{path} holds a JSON {type(rows).__name__}; a .json corpus must be an array of objects")
        return [(f"{path}[{i}]", row) for i, row in enumerate(rows)]
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{i}", json.loads(line)))
        except json.JSONDecodeError:
            raise KDForgeError(f"{path}:{i} is not valid JSON; each line of a .jsonl must be one object") from None
    return records


def read_documents(path: Path, text_field: str, encoding: str = "utf-8", max_undecodable: float = 0.001,
                   tokenizer=None) -> list[str]:
    """A corpus file's documents: the whole text of a text file, or each record's ``text_field`` of a .jsonl / .json
    file (chat messages rendered with ``tokenizer``'s chat template, see :func:`render_document`)."""
    text = read_text(path, encoding, max_undecodable)
    if path.suffix not in (".jsonl", ".json"):
        return [text]
    docs = []
    for where, row in _records(path, text):
        if not isinstance(row, dict):
            raise KDForgeError(f"{where} is a JSON {type(row).__name__}; each record must be an object with a "
                               f"'{text_field}' field")
        if text_field not in row:
            raise KDForgeError(f"{where} has no field '{text_field}' (has {', '.join(row)}); set data.text_field")
        docs.append(render_document(row[text_field], f"{where} field '{text_field}'", tokenizer))
    return docs


def load_corpus(spec: DataSpec, tokenizer=None) -> Corpus:
    """The train and held-out documents the spec names; ``tokenizer`` renders chat-message records (its chat
    template)."""
    if spec.corpus == "shakespeare":
        from .shakespeare import shakespeare_dir

        folder = shakespeare_dir()
        works = {p.stem: p for p in sorted(folder.glob("*.txt"))}
        unknown = [w for w in spec.validation if w not in works]
        if unknown:
            raise KDForgeError(f"unknown held-out work '{unknown[0]}'; choose from: {', '.join(works)}")
        held = set(spec.validation)
        train = [n for n in works if n not in held]
        return Corpus(
            train=[works[n].read_text(encoding="utf-8") for n in train],
            validation=[works[n].read_text(encoding="utf-8") for n in spec.validation],
            train_names=train,
            validation_names=list(spec.validation),
        )
    split = spec.validation_split
    if split is None and (not spec.validation or spec.validation == ["lear", "tempest"]):
        raise KDForgeError("data.validation must list held-out text files when data.corpus is not 'shakespeare' "
                           "(or set data.validation_split, e.g. 0.05, to hold out a fraction of the corpus)")
    read = dict(text_field=spec.text_field, encoding=spec.encoding, max_undecodable=spec.max_undecodable,
                tokenizer=tokenizer)
    train, train_names = _read_source(spec.corpus, read)
    if split is not None:
        from .datasets_input import split_documents

        seed = spec.split_seed or 0
        train, validation = split_documents(train, split, seed)
        return Corpus(train, validation, train_names, [f"validation_split {split:g} (seed {seed}) of the corpus"])
    validation, val_names = [], []
    for pattern in spec.validation:
        docs, names = _read_source(pattern, read)
        validation += docs
        val_names += names
    return Corpus(train, validation, train_names, val_names)


def _read_source(pattern: str, read: dict) -> tuple[list[str], list[str]]:
    """The documents and file names of one corpus entry: a dataset (kdforge.data.datasets_input) or text/JSON files."""
    from .datasets_input import dataset_source, read_dataset

    source = dataset_source(pattern)
    if source is not None:
        return read_dataset(source, read["text_field"], read["tokenizer"]), [str(p) for p in source.paths]
    paths = _expand(pattern)
    return [d for p in paths for d in read_documents(p, **read)], [str(p) for p in paths]
