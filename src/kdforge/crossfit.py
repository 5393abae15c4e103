"""Cross-fitted teachers: out-of-fold soft labels for every training example.

Dao, Kamath, Syrgkanis, Mackey, "Knowledge Distillation as Semiparametric
Inference" (ICLR 2021, arXiv 2104.09732), Section 4: a teacher fitted on the
same examples it labels overfits them, and its soft labels carry that bias into
the student. Cross-fitting splits the training set into K folds, fits teacher k
on every fold but k, and labels fold k with teacher k, so no example's soft
label comes from a teacher that saw it. (The authors' tabular runs use
``split_mode: crossfit`` with 10 folds; microsoft/semiparametric-distillation.)

Causal LMs (issue 13: "for causal LMs where a user supplies K teachers"): the unit of a fold is a training block
(data.seq_len packed tokens, what a student step and the offline teacher cache index). :func:`block_folds` deals
the blocks into K seeded folds; :func:`write_crossfit_split` (``kdforge crossfit-split``) writes the text each
teacher may be fine-tuned on (every block but its fold's), and ``kdforge cache-teacher`` on a recipe with
``teacher.crossfit.models`` caches every block's top-k (or samples) from the teacher of its fold
(:mod:`kdforge.teachers.cache`). kdforge departs from the classification setting on purpose here: it does not
train the K teachers (a user fine-tunes them with any trainer), and folds are by block, not by document, so a
document longer than a block spreads over folds (each block the student trains on is still unseen by its teacher).

The classification teacher is anything with the scikit-learn classifier protocol:
``fit(X, y)`` and ``predict_proba(X) -> [n, classes]`` (``predict_log_proba``
is used when present). A torch model fits the protocol through a small wrapper
whose ``fit`` trains it and whose ``predict_proba`` returns softmax outputs.
The returned teacher logits are log-probabilities, ready for the logit losses
of :mod:`kdforge.losses.logits` (``forward_kl``, ``logit_mse``, with or without
their ``correction``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["CrossFit", "block_folds", "crossfit_teacher_logits", "stratified_folds", "teacher_log_probs",
           "write_crossfit_split"]


@dataclass
class CrossFit:
    """What :func:`crossfit_teacher_logits` returns.

    logits: ``[N, C]`` float32 log-probabilities; row i comes from the teacher
        fitted without example i's fold.
    folds: ``[N]`` int64, the fold of each example (0..K-1).
    teachers: the K fitted teachers, teacher k fitted without fold k.
    full_teacher: a teacher fitted on all N examples (for test-time
        comparison), or None when ``fit_full=False``.
    full_logits: that teacher's in-sample log-probabilities ``[N, C]`` (the
        plain, not cross-fitted, soft labels), or None.
    """

    logits: torch.Tensor
    folds: torch.Tensor
    teachers: list[Any] = field(default_factory=list)
    full_teacher: Any | None = None
    full_logits: torch.Tensor | None = None


def _labels(y) -> np.ndarray:
    arr = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array of class ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.mod(arr, 1) == 0):
            raise ValueError(f"labels must be integer class ids, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise ValueError(f"labels must be class ids >= 0, got {int(arr.min())}")
    return arr.astype(np.int64)


def _check_folds(n_folds, counts: np.ndarray) -> int:
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    present = np.flatnonzero(counts)
    smallest = present[np.argmin(counts[present])]
    if n_folds > counts[smallest]:
        raise ValueError(f"n_folds={n_folds} exceeds the smallest class count (class {int(smallest)} has "
                         f"{int(counts[smallest])} examples); every fold must hold each class")
    return int(n_folds)


def stratified_folds(y, n_folds: int, *, seed: int = 0) -> torch.Tensor:
    """Seeded stratified fold ids ``[N]`` (int64, 0..K-1).

    Each class's examples are shuffled (numpy ``default_rng(seed)``) and dealt
    round-robin, continuing the deal across classes, so every fold holds
    ⌊n_c/K⌋ or ⌈n_c/K⌉ examples of each class c and the fold sizes differ by
    at most one. Raises ``ValueError`` (one line) for K < 2, a non-integer K,
    or K above the smallest class count.
    """
    y = _labels(y)
    counts = np.bincount(y)
    k = _check_folds(n_folds, counts)
    rng = np.random.default_rng(seed)
    folds = np.empty(len(y), dtype=np.int64)
    dealt = 0
    for c in np.flatnonzero(counts):
        idx = rng.permutation(np.flatnonzero(y == c))
        folds[idx] = (dealt + np.arange(len(idx))) % k
        dealt += len(idx)
    return torch.from_numpy(folds)


def label_folds(labels: torch.Tensor, n_folds: int, *, seed: int, where: str, unit: str = "examples",
                class_names=None, fix: str = "") -> torch.Tensor:
    """:func:`stratified_folds` of a task's training labels ``[N]`` behind ``teacher.crossfit``, refusing K above the
    smallest class count with a KDForgeError (one line) that names the class (``class_names[c]`` when given), its
    count of `unit` in `where` (e.g. "the training split (digits)") and the valid range, plus `fix` (e.g. ", or raise
    data.max_train_examples"). The recipe cannot check this: it does not know the counts."""
    from .errors import KDForgeError

    counts = torch.bincount(labels, minlength=len(class_names) if class_names is not None else 0)
    present = counts.nonzero().flatten()
    smallest = int(present[counts[present].argmin()])
    if n_folds > counts[smallest]:
        name = repr(class_names[smallest]) if class_names is not None else smallest
        raise KDForgeError(f"teacher.crossfit.folds={n_folds} exceeds the smallest class count of {where} (class "
                           f"{name} has {int(counts[smallest])} {unit}); use 2..{int(counts[smallest])}{fix}")
    return stratified_folds(labels, n_folds, seed=seed)


def block_folds(n_blocks: int, n_folds: int, *, seed: int = 0) -> torch.Tensor:
    """Seeded fold ids ``[n_blocks]`` (int64, 0..K-1) of a causal LM's training blocks.

    The blocks are shuffled (numpy ``default_rng(seed)``) and dealt round-robin, as :func:`stratified_folds` deals a
    single class: the folds partition the blocks, their sizes differ by at most one, and the assignment depends only
    on (n_blocks, K, seed), never on the batch size or where a run resumed. Raises ``KDForgeError`` (one line) for
    K < 2 or K above the number of blocks.
    """
    from .errors import KDForgeError

    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2 or n_folds > n_blocks:
        raise KDForgeError(f"teacher.crossfit.folds={n_folds!r} must be an integer from 2 up to the {n_blocks} "
                           "training blocks; lower folds or add training text")
    return stratified_folds(np.zeros(n_blocks, dtype=np.int64), int(n_folds), seed=seed)


def teacher_log_probs(teacher, X, num_classes: int, *, min_prob: float = 1e-12) -> torch.Tensor:
    """``[n, num_classes]`` float32 log-probabilities of a fitted classifier on X.

    Uses ``predict_log_proba`` when the teacher has it, else
    ``log(max(predict_proba, min_prob))`` (a probability of exactly 0 would be
    a -inf logit, which ``logit_mse`` cannot use). Columns follow the
    teacher's ``classes_`` when it has that attribute (a class the teacher
    never saw gets ``log(min_prob)``), else they must be the ``num_classes``
    classes in order.
    """
    if hasattr(teacher, "predict_log_proba"):
        out = np.asarray(teacher.predict_log_proba(X), dtype=np.float64)
    else:
        out = np.log(np.maximum(np.asarray(teacher.predict_proba(X), dtype=np.float64), min_prob))
    out = np.maximum(out, np.log(min_prob))
    classes = getattr(teacher, "classes_", None)
    if classes is None:
        if out.shape[1] != num_classes:
            raise ValueError(f"the teacher gave {out.shape[1]} columns for {num_classes} classes and has no classes_")
        return torch.from_numpy(out).float()
    full = np.full((out.shape[0], num_classes), np.log(min_prob))
    full[:, np.asarray(classes, dtype=np.int64)] = out
    return torch.from_numpy(full).float()


def _take(X, idx: np.ndarray):
    if isinstance(X, torch.Tensor):
        return X[torch.from_numpy(idx)]
    return X[idx] if isinstance(X, np.ndarray) else np.asarray(X)[idx]


def crossfit_teacher_logits(
    X,
    y,
    make_teacher: Callable[[], Any],
    *,
    n_folds: int = 5,
    seed: int = 0,
    num_classes: int | None = None,
    fit_full: bool = True,
) -> CrossFit:
    """Cross-fitted teacher log-probabilities ``[N, C]`` for a training set.

    X: ``[N, ...]`` features (numpy array or tensor; rows are indexed with
    integer arrays and passed to the teacher as they are). y: ``[N]`` class ids.
    ``make_teacher()`` returns a new unfitted teacher each call (see the module
    docstring for the protocol); it is called K times, plus once for the
    full-data teacher when ``fit_full``. Folds come from
    :func:`stratified_folds` (``seed``), teacher k is fitted on the examples
    outside fold k and labels fold k, so every row of ``logits`` is
    out-of-fold. ``num_classes`` defaults to max(y) + 1.

    Raises ``ValueError`` (one line) for a bad ``n_folds`` (below 2, not an
    integer, above the smallest class count), labels that are not 1-D class
    ids, or X and y of different lengths.
    """
    labels = _labels(y)
    if len(X) != len(labels):
        raise ValueError(f"X has {len(X)} rows but y has {len(labels)} labels")
    C = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if labels.max() >= C:
        raise ValueError(f"labels go up to {int(labels.max())} but num_classes={C}")
    folds = stratified_folds(labels, n_folds, seed=seed)
    fold_ids = folds.numpy()
    logits = torch.empty(len(labels), C, dtype=torch.float32)
    teachers = []
    for k in range(int(n_folds)):
        train, held = np.flatnonzero(fold_ids != k), np.flatnonzero(fold_ids == k)
        teacher = make_teacher()
        teacher.fit(_take(X, train), labels[train])
        logits[torch.from_numpy(held)] = teacher_log_probs(teacher, _take(X, held), C)
        teachers.append(teacher)
    full_teacher = full_logits = None
    if fit_full:
        full_teacher = make_teacher()
        full_teacher.fit(X, labels)
        full_logits = teacher_log_probs(full_teacher, X, C)
    return CrossFit(logits=logits, folds=folds, teachers=teachers, full_teacher=full_teacher,
                    full_logits=full_logits)


SPLIT_FORMAT = "kdforge-crossfit-split"


def write_crossfit_split(blocks_ids: torch.Tensor, folds: torch.Tensor, tokenizer, out, *,
                         info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the text each of K causal-LM teachers may be fine-tuned on; returns the manifest.

    blocks_ids: ``[N, T]`` training blocks (token ids); folds: ``[N]`` their fold ids (:func:`block_folds`). In
    ``out`` (built in a temporary folder, then swapped in whole): ``teacher_<k>.jsonl``, one ``{"text", "block"}``
    record per block outside fold k in block order (what teacher k may see), ``fold_<k>.jsonl``, fold k's blocks
    (what it must never see, e.g. its held-out set), and ``manifest.json``: folds, the fold sizes, each file's
    blocks, tokens and sha256, plus ``info`` (the recipe's seed, data fingerprint, tokenizer). The text is each
    block's tokens decoded (special tokens kept); a trainer re-tokenizes it, which may split a word cut at a block
    edge differently, but no character of fold k is ever in teacher k's file.

    Raises ``KDForgeError`` (one line) when ``out`` exists and is not an earlier split (it would be replaced).
    """
    import hashlib
    import json

    from .errors import KDForgeError
    from .io import atomic_write_dir

    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_split(out / "manifest.json"))):
        raise KDForgeError(f"--out '{out}' exists and is not a crossfit split (no {SPLIT_FORMAT} manifest.json); "
                           "it would be replaced: choose a new folder")
    fold_of = folds.tolist()
    k_folds = int(folds.max()) + 1
    texts = tokenizer.batch_decode(blocks_ids.tolist(), skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    lines = [json.dumps({"text": text, "block": i}, ensure_ascii=False) + "\n" for i, text in enumerate(texts)]
    manifest: dict[str, Any] = {"format": SPLIT_FORMAT, "version": 1, **(info or {}), "folds": k_folds,
                                "n_blocks": len(fold_of), "seq_len": int(blocks_ids.shape[1]),
                                "fold_sizes": [fold_of.count(k) for k in range(k_folds)], "files": {}}

    def fill(tmp: Path) -> None:
        for k in range(k_folds):
            for name, keep in ((f"teacher_{k}.jsonl", lambda f: f != k), (f"fold_{k}.jsonl", lambda f: f == k)):
                body = "".join(line for line, f in zip(lines, fold_of) if keep(f)).encode("utf-8")
                (tmp / name).write_bytes(body)
                blocks = sum(keep(f) for f in fold_of)
                manifest["files"][name] = {
                    "fold": k, "holds": f"every block but fold {k}" if name.startswith("teacher") else f"fold {k}",
                    "blocks": blocks, "tokens": blocks * int(blocks_ids.shape[1]),
                    "sha256": hashlib.sha256(body).hexdigest()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    atomic_write_dir(out, fill)
    return manifest


def check_split(folder, expected: dict[str, Any]) -> None:
    """Refuse (KDForgeError, one line) a ``kdforge crossfit-split`` folder whose manifest.json differs from
    ``expected`` on any of its keys (folds, seed, n_blocks, seq_len, data_sha256, tokenizer): fold teachers
    fine-tuned on that split saw other folds than the ones a cache built now would label, so teacher k could have
    seen blocks of fold k."""
    import json

    from .errors import KDForgeError

    path = Path(folder) / "manifest.json"
    if not _is_split(path):
        raise KDForgeError(f"teacher.crossfit.split '{folder}' holds no {SPLIT_FORMAT} manifest.json; give the folder "
                           "`kdforge crossfit-split RECIPE --out DIR` wrote, or remove teacher.crossfit.split")
    manifest = json.loads(path.read_text())
    differ = [f"{key} {manifest.get(key)!r} there, {value!r} now" for key, value in expected.items()
              if manifest.get(key) != value]
    if differ:
        raise KDForgeError(f"teacher.crossfit.split '{folder}' was written for other folds than the recipe's now "
                           f"({'; '.join(differ)}), so a fold teacher may have seen its own fold: restore the "
                           "recipe's data and crossfit settings, or rerun kdforge crossfit-split and fine-tune the "
                           "fold teachers again")


def _is_split(path: Path) -> bool:
    import json

    try:
        return json.loads(path.read_text()).get("format") == SPLIT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False
