"""Offline teacher cache: run the teacher once, store its top-k logits (or samples of its distribution) per token, train
many students from disk.

Layout of a cache folder::

    index.json                 what was cached and from what (see `cache_meta`), the shard list with a sha256 each,
                               "complete", and the measured bytes per token
    shard_00000.safetensors    blocks [0, shard_blocks), then the next range, ... in the order of TokenBlocks

Per token (one position of one packed block) a shard holds

* ``ids``: the teacher's top-k token ids. ``"packed"`` (default): Elias-Fano coded, a fixed
  ``ceil((k·l + k + ((V-1) >> l)) / 8)`` bytes with ``l = floor(log2(V/k))`` (92 bytes for k=64, V=49152, against 128
  as uint16): the ids are sorted and their high parts written in unary, their low l bits verbatim. ``"plain"``: the
  smallest unsigned dtype that holds V (uint8 / uint16 / int32).
* ``values``: the teacher's log-probabilities ``log p = logits/T - logsumexp(logits/T)`` of those ids at the cache
  temperature T, in id order. ``"fp16"``: as float16. ``"int8" | "int6" | "int4"``: ``y = sqrt(-log p)`` quantised
  uniformly to 8/6/4 bits between the token's own min and max y, with ``scale`` = (offset, step) per token in
  float16. The square root spends more codes near p = 1, where an error in log p costs the most probability mass
  (with y in [0, Y], a probability's error is at most ~0.43·Y/(2^bits-1), against 0.5·Y²/(2^bits-1) when log p is
  coded linearly: ~5x smaller for a typical Y of 4.5). Measured on
  random peaked distributions the largest probability error is ~0.003 (int8), ~0.016 (int6), ~0.07 (int4); fp16
  ~2e-4.
* ``logsumexp``: of the FULL logit vector at temperature T (float16 by default, or float32): with the log-probs it
  gives back the raw logits ``T·(log p + logsumexp)`` (so "renormalize" works at any temperature).
* ``log_rest``: log of the exact probability mass outside the top-k (float16), summed over the other ids at cache
  time. Reading rescales the decoded top-k probabilities to exactly ``1 - exp(log_rest)``, so the "bucket" and
  "uniform" policies see the true tail mass whatever the value coding, and rounding can never leave a zero tail.
* ``block_hash`` (per block, 16 bytes): blake2b of the block's token ids; every batch read is checked against it.

A sampled cache (``mode: "sampled"``, ``kdforge cache-teacher --mode sampled --samples N``; Anshumann et al., "Sparse
Logit Sampling", ACL 2025) holds instead, per token, ``ids``: N ids drawn from the teacher's distribution at the cache
temperature (sorted, an id drawn c times stored c times; Elias-Fano packed like the top-k ids, which allows repeats:
26 bytes for N=16, V=49152), and ``entropy``: the distribution's entropy (float32). The draws' frequencies are an
unbiased estimate of the distribution, so forward KL trains on them without the top-k cache's bias (see
:class:`kdforge.losses.sparse.SampledLogits`); other logit losses have no such estimator and are refused. Draws come
from inverse-transform sampling of sorted uniforms, generated per block from the cache seed and the block's index:
the same cache whatever the batch size or where a build resumed. ``sampling: "systematic"`` uses one uniform offset
per token ((j + U) / N), so each id's count is the floor or ceiling of N·p: still unbiased, with less variance.

A hybrid cache (``mode: "hybrid"``, ``kdforge cache-teacher --mode hybrid --top-k K --samples N``) holds both, per
token: the top-K ``ids``, ``values`` (+ ``scale``) and ``log_rest`` coded exactly as a top-k cache codes them (no
``logsumexp``: a hybrid cache serves forward KL at its own temperature only), ``tail_ids``: N ids drawn, as above, from
the TAIL distribution (p_T restricted to the ids outside the top K, renormalised; Elias-Fano packed), and
``entropy`` (float32) of the whole distribution. The exact head plus the tail's frequencies scaled by the tail mass
estimate the distribution without bias and with less variance than draws alone (see
:class:`kdforge.losses.sparse.HybridLogits`). The tail draws are seeded per block as in a sampled cache (``sampling``
iid or systematic); reading rescales the decoded head probabilities to exactly ``1 - exp(log_rest)``. At V=49152,
K=8 and N=8 with int6 values a token takes 15 + 10 + 2 + 15 + 4 = 46 bytes (+ the block hash's 16 per block).
* optional ``feature.<i>``: a tapped teacher tensor ``[T, ...]`` per block (float16 by default), spec strings in the
  index.

Bytes per token at k=64, V=49152 (the measured figure is in index.json, "bytes_per_token"; per tensor in
"bytes_per_token_parts"): packed + int6 = 148.1 (the default, within 150); packed + int8 = 164.1; plain (uint16) +
int8 = 200.1; plain + fp16 = 260.1 (each with a float16 logsumexp; float32 adds 2). (uint16 ids alone take 128 bytes at k=64, which is why the default packs them.)

A cross-fitted cache (a recipe with ``teacher.crossfit.models``, task causal_lm; Dao et al. 2021, kdforge.crossfit)
is one such folder per fold, ``fold_<k>/``, a complete cache of teacher k over the blocks of fold k (in block order),
under a top-level ``index.json`` whose meta adds ``crossfit`` (folds, seed, the K teachers, the fold sizes) and which
lists each block's fold (``block_folds``); :class:`CachedTeacher` reads block i from its fold's folder, so every
training block gets the outputs of the teacher that never saw it, at the cost of a plain cache read.

Writing is atomic and resumable: each shard is written to a temporary file, fsync'd and renamed, and only then listed
in the index (itself rewritten atomically), so a killed or out-of-disk run leaves only valid shards behind and a rerun
skips them. Reading refuses a cache that is incomplete, whose shard checksums or sizes do not match, or that was built
for other data / another tokenizer / another sequence length, naming what differs.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import KDForgeError
from ..io import atomic_write_bytes, atomic_write_json, remove_temporaries
from ..losses.sparse import HybridLogits, SampledLogits, SparseLogits, log1mexp
from . import native
from .live import LiveTeacher, TeacherOutput

log = logging.getLogger("kdforge")

FORMAT = "kdforge-teacher-cache"
VERSION = 1
INDEX = "index.json"
VALUE_FORMATS = ("fp16", "int8", "int6", "int4")
ID_FORMATS = ("packed", "plain")
_BITS = {"int8": 8, "int6": 6, "int4": 4}
MODES = ("top_k", "sampled", "hybrid")
SAMPLINGS = ("iid", "systematic")
_SAMPLED_ONLY = ("samples", "sampling", "seed")  # options that exist only in sampled caches' metadata
_MAX_NEG_LOG_P = 80.0  # -log p is clamped here (p = 2e-35): a -inf logit in the top-k stays finite


# --------------------------------------------------------------------------- codecs (pure functions)


def pack_bits(values: np.ndarray, width: int) -> np.ndarray:
    """[M, n] unsigned ints < 2**width -> [M, ceil(n·width/8)] uint8, MSB first."""
    m, n = values.shape
    if width == 8:
        return values.astype(np.uint8)
    as_bytes = values.astype(">u4").view(np.uint8).reshape(m, n, 4)
    bits = np.unpackbits(as_bytes, axis=-1)[..., 32 - width:]
    return np.packbits(bits.reshape(m, n * width), axis=-1)


def unpack_bits(packed: np.ndarray, n: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: [M, nbytes] uint8 -> [M, n] int64."""
    if width == 8:
        return packed.astype(np.int64)
    m = packed.shape[0]
    bits = np.unpackbits(packed, axis=-1, count=n * width).reshape(m, n, width).astype(np.int64)
    return bits @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))


def _ef_low_bits(vocab_size: int, k: int) -> int:
    return max(0, (vocab_size // k).bit_length() - 1)


def packed_id_bytes(vocab_size: int, k: int) -> int:
    low = _ef_low_bits(vocab_size, k)
    return math.ceil((k * low + ((vocab_size - 1) >> low) + k) / 8)


def encode_ids(ids: torch.Tensor, vocab_size: int) -> tuple[np.ndarray, torch.Tensor]:
    """Elias-Fano code distinct ids [M, k] in [0, V): (packed [M, nbytes] uint8, the sort permutation [M, k])."""
    sorted_ids, order = ids.long().sort(dim=-1)
    a = sorted_ids.numpy()
    m, k = a.shape
    low_bits = _ef_low_bits(vocab_size, k)
    n_high = ((vocab_size - 1) >> low_bits) + k
    low = pack_bits(a & ((1 << low_bits) - 1), low_bits) if low_bits else np.zeros((m, 0), np.uint8)
    low_bitstr = np.unpackbits(low, axis=-1, count=k * low_bits)
    high = np.zeros((m, n_high), dtype=np.uint8)
    np.put_along_axis(high, (a >> low_bits) + np.arange(k), 1, axis=-1)
    return np.packbits(np.concatenate([low_bitstr, high], axis=-1), axis=-1), order


def decode_ids(packed: np.ndarray, k: int, vocab_size: int) -> torch.Tensor:
    """Inverse of :func:`encode_ids`: [M, nbytes] uint8 -> sorted ids [M, k] int64."""
    m = packed.shape[0]
    low_bits = _ef_low_bits(vocab_size, k)
    n_high = ((vocab_size - 1) >> low_bits) + k
    bits = np.unpackbits(packed, axis=-1, count=k * low_bits + n_high)
    if low_bits:
        low = unpack_bits(np.packbits(bits[:, : k * low_bits], axis=-1), k, low_bits)
    else:
        low = np.zeros((m, k), np.int64)
    rows, cols = np.nonzero(bits[:, k * low_bits:])
    if rows.size != m * k:
        raise KDForgeError("teacher cache ids are corrupt (Elias-Fano stream has the wrong number of entries)")
    high = cols.reshape(m, k) - np.arange(k)
    return torch.from_numpy((high << low_bits) | low)


def encode_values(log_probs: torch.Tensor, fmt: str) -> dict[str, np.ndarray]:
    """Teacher log-probs [M, k] -> {"values": ..., "scale": ...} (see the module docstring).

    Quantised formats code y = sqrt(-log p) as ``offset + q·step``, q in [0, 2^bits), with (offset, step) per token
    in float16 (``scale`` [M, 2]): the codes cover exactly the token's own range of y.
    """
    if fmt == "fp16":
        return {"values": log_probs.clamp_min(-_MAX_NEG_LOG_P).to(torch.float16).numpy()}
    bits = _BITS[fmt]
    top = (1 << bits) - 1
    y = (-log_probs.float()).clamp(0.0, _MAX_NEG_LOG_P).sqrt()
    offset = y.amin(dim=-1).to(torch.float16)
    step = ((y.amax(dim=-1) - offset.float()) / top).clamp_min(1e-4).to(torch.float16)
    q = torch.round((y - offset.float().unsqueeze(-1)) / step.float().unsqueeze(-1)).clamp(0, top).to(torch.int64)
    return {"values": pack_bits(q.numpy(), bits), "scale": torch.stack([offset, step], dim=-1).numpy()}


def decode_values(values: np.ndarray, scale: np.ndarray | None, k: int, fmt: str) -> torch.Tensor:
    """Inverse of :func:`encode_values`: float32 log-probs [M, k]."""
    if fmt == "fp16":
        return torch.from_numpy(values.astype(np.float32))
    q = torch.from_numpy(unpack_bits(values, k, _BITS[fmt])).float()
    scale = torch.from_numpy(scale.astype(np.float32))
    y = scale[:, :1] + q * scale[:, 1:]
    return -(y * y)


def block_hash(ids: torch.Tensor) -> bytes:
    return hashlib.blake2b(ids.detach().cpu().to(torch.int64).contiguous().numpy().tobytes(), digest_size=16).digest()


def data_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.detach().cpu().to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
    return {"name": str(getattr(tokenizer, "name_or_path", "")), "size": len(tokenizer), "sha256": digest}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- writing


@dataclass
class CacheOptions:
    """How a cache is written. Defaults meet <= 150 bytes/token at k = 64 for a 49,152-token vocabulary."""

    k: int = 64
    values: str = "int6"
    ids: str = "packed"
    lse_dtype: str = "float16"
    temperature: float = 1.0
    features: list[str] = field(default_factory=list)
    feature_dtype: str = "float16"
    shard_blocks: int = 256
    batch_size: int = 8
    mode: str = "top_k"
    samples: int = 16
    sampling: str = "iid"
    seed: int = 0

    def check(self) -> None:
        if self.mode not in MODES:
            raise KDForgeError(f"--mode '{self.mode}' is not one of {', '.join(MODES)}")
        if self.mode == "hybrid":
            if self.k < 1:
                raise KDForgeError(f"--top-k must be >= 1 with --mode hybrid, got {self.k} (no head: use --mode "
                                   "sampled)")
            if self.samples < 1:
                raise KDForgeError(f"--samples must be >= 1 with --mode hybrid, got {self.samples} (no tail draws: use "
                                   "--mode top_k)")
        if self.mode in ("sampled", "hybrid"):
            if self.samples < 1:
                raise KDForgeError(f"--samples must be >= 1, got {self.samples}")
            if self.sampling not in SAMPLINGS:
                raise KDForgeError(f"--sampling '{self.sampling}' is not one of {', '.join(SAMPLINGS)}")
        if self.k < 1:
            raise KDForgeError(f"--k must be >= 1, got {self.k}")
        if self.values not in VALUE_FORMATS:
            raise KDForgeError(f"values format '{self.values}' is not one of {', '.join(VALUE_FORMATS)}")
        if self.ids not in ID_FORMATS:
            raise KDForgeError(f"ids format '{self.ids}' is not one of {', '.join(ID_FORMATS)}")
        if self.lse_dtype not in ("float32", "float16"):
            raise KDForgeError(f"lse_dtype must be float32 or float16, got '{self.lse_dtype}'")
        if self.feature_dtype not in ("float16", "bfloat16", "float32"):
            raise KDForgeError(f"feature_dtype must be float16, bfloat16 or float32, got '{self.feature_dtype}'")
        if not self.temperature > 0:
            raise KDForgeError(f"temperature must be > 0, got {self.temperature}")
        if self.shard_blocks < 1 or self.batch_size < 1:
            raise KDForgeError("shard_blocks and batch_size must be >= 1")


def cache_meta(teacher_spec: Mapping[str, Any], tokenizer, blocks_ids: torch.Tensor, vocab_size: int,
               options: CacheOptions) -> dict[str, Any]:
    """Everything that identifies a cache's contents; a resumed or reading run must match it."""
    k = min(options.k, vocab_size)
    return {
        "teacher": {key: teacher_spec.get(key) for key in ("model", "gguf_file", "dtype")},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "vocab_size": int(vocab_size),
        "data": {"n_blocks": int(blocks_ids.shape[0]), "seq_len": int(blocks_ids.shape[1]),
                 "sha256": data_sha256(blocks_ids)},
        "options": _meta_options(options, k),
    }


def _meta_options(options: CacheOptions, k: int) -> dict[str, Any]:
    """The options a cache's metadata records: a top-k cache's as before sampled caches existed (so older caches
    still resume and read); a sampled cache's without the top-k value coding, which it does not use; a hybrid
    cache's all but the logsumexp's dtype (it stores none)."""
    opts = {**asdict(options), "k": k}
    if options.mode == "top_k":
        for key in ("mode", *_SAMPLED_ONLY):
            opts.pop(key)
    elif options.mode == "sampled":
        for key in ("k", "values", "lse_dtype"):
            opts.pop(key)
    else:
        opts.pop("lse_dtype")
    return opts


def _differences(cached: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable names of what differs, most telling first."""
    out = []
    if cached.get("crossfit") != current.get("crossfit"):
        out.append(f"teacher.crossfit (cache {describe_crossfit(cached.get('crossfit'))}, this run "
                   f"{describe_crossfit(current.get('crossfit'))})")
    ct, rt = cached.get("tokenizer", {}), current.get("tokenizer", {})
    if ct.get("sha256") != rt.get("sha256") or ct.get("size") != rt.get("size"):
        out.append(f"tokenizer (cache: '{ct.get('name')}' with {ct.get('size')} tokens, "
                   f"this run: '{rt.get('name')}' with {rt.get('size')} tokens)")
    cd, rd = cached.get("data", {}), current.get("data", {})
    if cd.get("seq_len") != rd.get("seq_len"):
        out.append(f"data.seq_len (cache {cd.get('seq_len')}, this run {rd.get('seq_len')})")
    elif cd.get("n_blocks") != rd.get("n_blocks"):
        out.append(f"training data ({cd.get('n_blocks')} blocks cached, this run has {rd.get('n_blocks')})")
    elif cd.get("sha256") != rd.get("sha256"):
        out.append("training data (same size, different tokens or order)")
    if cached.get("vocab_size") != current.get("vocab_size"):
        out.append(f"vocabulary size (cache {cached.get('vocab_size')}, this run {current.get('vocab_size')})")
    for key in ("teacher", "options"):
        for sub in sorted(set(cached.get(key, {})) | set(current.get(key, {}))):
            a, b = cached.get(key, {}).get(sub), current.get(key, {}).get(sub)
            if a != b:
                out.append(f"{'teacher.' if key == 'teacher' else ''}{sub} (cache {a!r}, this run {b!r})")
    return out


def describe_crossfit(crossfit: Mapping[str, Any] | None) -> str:
    """A cache's or a recipe's cross-fitting in words: 'none', or its folds, seed and teachers."""
    if not crossfit:
        return "none"
    return (f"{{folds: {crossfit['folds']}, seed: {crossfit['seed']}, models: "
            f"[{', '.join(map(str, crossfit['models']))}]}}")


def _read_index(out: Path) -> dict[str, Any] | None:
    path = out / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise KDForgeError(f"{path} is not valid JSON; delete the cache folder and rebuild it") from None
    if index.get("format") != FORMAT:
        raise KDForgeError(f"{path} is not a kdforge teacher cache index")
    if index.get("version") != VERSION:
        raise KDForgeError(f"teacher cache {out} has format version {index.get('version')}, this kdforge reads "
                           f"{VERSION}; rebuild it with kdforge cache-teacher")
    return index


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KDForgeError(f"cannot create cache folder '{out}' ({err.strerror}); choose another with --out") from None


def _existing_index(out: Path, meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The index of the cache already in ``out`` (None: there is none), refused (one line, naming what differs) when
    it was built for something else than ``meta`` says."""
    index = _read_index(out)
    if index is not None and index["meta"] != meta:
        diff = _differences(index["meta"], meta)
        raise KDForgeError(f"cache folder '{out}' holds a teacher cache of something else: "
                           f"{'; '.join(diff) or 'settings differ'}; use another --out or delete it")
    return index


def _shard_ok(out: Path, entry: Mapping[str, Any], check_sha: bool = True) -> str | None:
    """None if the shard file matches its index entry, else why not."""
    path = out / entry["file"]
    if not path.is_file():
        return f"shard {entry['file']} is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"shard {entry['file']} has {size} bytes, the index says {entry['bytes']} (truncated or overwritten)"
    if check_sha and _file_sha256(path) != entry["sha256"]:
        return f"shard {entry['file']} fails its sha256 check (corrupt)"
    return None


_LOG2E = 1.0 / math.log(2.0)
_CHUNK_BYTES = 1 << 21  # rows of logits worked on at a time: small enough to stay in the CPU's cache


def _top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k of each row of x [r, n]: (values, descending [r, k]; their columns [r, k]), as ``x.topk(k)`` (up to
    the order of equal values), in a fraction of the time for n >> k.

    The columns are dealt into g = 64k strided groups {j, j + g, j + 2g, ...} (the last n mod g columns kept aside).
    The k groups with the largest maxima hold every top-k value, as those k maxima are all >= the k-th largest value;
    so the search goes on over those groups and the columns kept aside, until few columns are left.
    """
    r = x.shape[0]
    groups = 64 * k
    cols = None  # x's columns in the original row (None: x is the original row)
    while x.shape[1] > 2 * groups:
        n = x.shape[1]
        width = n // groups
        best = x[:, :width * groups].view(r, width, groups).amax(dim=1).topk(k, dim=-1, sorted=False).indices
        pick = (best.unsqueeze(-1) + groups * torch.arange(width)).reshape(r, -1)
        pick = torch.cat([pick, torch.arange(width * groups, n).expand(r, -1)], dim=1)
        x = x.gather(-1, pick)
        cols = pick if cols is None else cols.gather(-1, pick)
    values, pos = x.topk(k, dim=-1)
    return values, (pos if cols is None else cols.gather(-1, pos))


def top_k_log_probs(logits: torch.Tensor, k: int, temperature: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [M, V] -> float32 (top-k log-probs [M, k] in rank order, their ids [M, k], logsumexp [M], log_rest [M])
    at ``temperature``: ``log p = logits/T - logsumexp(logits/T)``; ``log_rest`` is the log of the probability mass
    outside the top k, summed over the other ids (no 1 - x cancellation, so the tail mass stays exact).

    Works through a few rows at a time (see :func:`chunked_top_k_log_probs`).
    """
    m, vocab = logits.shape
    # the kernel streams rows itself: one call, unless the rows need converting to float32 (then a chunk at a time)
    whole = 4 * logits.numel() if native.available() and logits.dtype == torch.float32 else None
    return chunked_top_k_log_probs(lambda r0, r1: logits[r0:r1], m, vocab, k, temperature, whole)


def chunked_top_k_log_probs(logits_of: Callable[[int, int], torch.Tensor], m: int, vocab: int, k: int,
                            temperature: float = 1.0, chunk_bytes: int | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`top_k_log_probs` of M rows of logits that ``logits_of(r0, r1)`` gives a few rows [r1 - r0, V] at a time
    (a slice of a logits tensor, or logits computed just now from hidden states: the fused cache build never holds
    more than one chunk of a batch's logits).

    Each chunk of ``chunk_bytes`` (as float32; default ``_CHUNK_BYTES``) goes to the native kernel
    (:mod:`kdforge.teachers.native`: two passes over each row) where it is built; else, in torch, it is worked on in
    one reused buffer that stays in the CPU's cache (no full-size temporaries): the top k by :func:`_top_k`, and each
    logit exponentiated once for both sums, as ``2 ** ((x - max)·log2 e)`` (torch's exp2 is several times faster
    than its exp on CPU). Both agree with ``torch.logsumexp`` and ``torch.topk`` to float32 rounding (up to the
    order of equal logits).
    """
    k = min(k, vocab)
    log_p, ids = torch.empty(m, k), torch.empty(m, k, dtype=torch.int64)
    lse, log_rest = torch.empty(m), torch.empty(m)
    if native.available():
        r0 = 0
        while r0 < m:
            x = logits_of(r0, min(r0 + max(1, (chunk_bytes or _CHUNK_BYTES) // (4 * vocab)), m))
            r1 = r0 + x.shape[0]
            if x.dtype != torch.float32 or x.stride(-1) != 1:
                x = x.float().contiguous()
            native.top_k_logsumexp(x, k, temperature, log_p[r0:r1], ids[r0:r1], lse[r0:r1], log_rest[r0:r1])
            bad = (~torch.isfinite(lse[r0:r1]) | log_rest[r0:r1].isnan()).nonzero().squeeze(-1)
            if bad.numel():  # non-finite logits, or a tail that may have underflowed: recomputed in torch
                redo = _torch_top_k_log_probs(lambda a, b: x[bad[a:b]], bad.numel(), vocab, k, temperature,
                                              chunk_bytes)
                for dst, src in zip((log_p, ids, lse, log_rest), redo):
                    dst[r0 + bad] = src
            r0 = r1
        return log_p, ids, lse, log_rest
    return _torch_top_k_log_probs(logits_of, m, vocab, k, temperature, chunk_bytes)


def _torch_top_k_log_probs(logits_of: Callable[[int, int], torch.Tensor], m: int, vocab: int, k: int,
                           temperature: float, chunk_bytes: int | None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`chunked_top_k_log_probs` in torch operations (without the native kernel, and for non-finite rows)."""
    rows = max(1, min(m, (chunk_bytes or _CHUNK_BYTES) // (4 * vocab)))
    buf = torch.empty(rows, vocab)
    log_p, ids = torch.empty(m, k), torch.empty(m, k, dtype=torch.int64)
    lse, log_rest = torch.empty(m), torch.empty(m)
    for r0 in range(0, m, rows):
        x = logits_of(r0, min(r0 + rows, m))
        r = x.shape[0]
        scaled = buf[:r].copy_(x)  # as float32
        if temperature != 1.0:
            scaled.div_(temperature)
        top_vals, top_ids = _top_k(scaled, k)
        shift = top_vals[:, 0].masked_fill(top_vals[:, 0].isinf(), 0.0)  # the row max (0 if infinite)
        p = scaled.sub_(shift.unsqueeze(-1)).mul_(_LOG2E).exp2_()
        row_lse = p.sum(dim=-1).log_().add_(shift)
        rest = p.scatter_(-1, top_ids, 0.0).sum(dim=-1)
        row_rest = rest.log() + shift - row_lse
        tiny = (rest < 1e-25).nonzero().squeeze(-1)  # terms may have underflowed: sum those rows' tails exactly
        if tiny.numel():
            tail = (x[tiny].float() / temperature).scatter_(-1, top_ids[tiny], float("-inf"))
            row_rest[tiny] = torch.logsumexp(tail, dim=-1) - row_lse[tiny]
        log_p[r0:r0 + r] = top_vals - row_lse.unsqueeze(-1)
        ids[r0:r0 + r], lse[r0:r0 + r], log_rest[r0:r0 + r] = top_ids, row_lse, row_rest
    return log_p, ids, lse, log_rest


def encode_block_outputs(logits: torch.Tensor, features: Mapping[str, torch.Tensor], ids: torch.Tensor,
                         options: CacheOptions, first_block: int = 0,
                         block_numbers: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Teacher logits [n, T, V] (+ features) of the n blocks from ``first_block`` on -> the arrays of a shard (numpy,
    safetensors-ready): the top k (``options.mode`` "top_k"), samples of the distribution ("sampled"), or the top k
    and samples of the rest ("hybrid"), a block's draws seeded by its number (``block_numbers[i]`` for block i,
    default i)."""
    n, seq, vocab = logits.shape
    numbers = range(first_block, first_block + n) if block_numbers is None else \
        block_numbers[first_block:first_block + n]
    if options.mode == "hybrid":
        flat = logits.reshape(n * seq, vocab)
        stats = top_k_log_probs(flat, min(options.k, vocab), options.temperature)
        tail, entropy = sample_teacher(flat, _uniforms(options, numbers, seq), options.temperature, exclude=stats[1])
        arrays = encode_top_k(stats, vocab, features, ids, options)
        del arrays["logsumexp"]
        arrays["tail_ids"] = _encode_id_array(tail, vocab, options).reshape(n, seq, -1)
        arrays["entropy"] = entropy.reshape(n, seq).numpy()
        return arrays
    if options.mode == "sampled":
        drawn, entropy = sample_teacher(logits.reshape(n * seq, vocab), _uniforms(options, numbers, seq),
                                        options.temperature)
        arrays = {"ids": _encode_id_array(drawn, vocab, options).reshape(n, seq, -1),
                  "entropy": entropy.reshape(n, seq).numpy()}
        return {**arrays, **_block_arrays(features, ids, options)}
    stats = top_k_log_probs(logits.reshape(n * seq, vocab), min(options.k, vocab), options.temperature)
    return encode_top_k(stats, vocab, features, ids, options)


def _uniforms(options: CacheOptions, numbers: Sequence[int], seq: int) -> torch.Tensor:
    """[n·T, N] sorted uniforms in [0, 1) for the T positions of each of n blocks, each block's from its own
    generator seeded by the cache seed and the block's number (its index in the training blocks), so a build gives
    the same samples whatever its batch size and wherever it resumed. "iid": N independent draws; "systematic": one
    offset U, (j + U) / N for j < N (each id's count is then floor or ceil of N·p: unbiased with less variance)."""
    out = []
    for block in numbers:
        g = torch.Generator().manual_seed((options.seed * 1_000_003 + block) % (1 << 63))
        if options.sampling == "systematic":
            u = (torch.arange(options.samples, dtype=torch.float64) + torch.rand(seq, 1, generator=g,
                                                                              dtype=torch.float64)) / options.samples
        else:
            u = torch.rand(seq, options.samples, generator=g, dtype=torch.float64).sort(dim=-1).values
        out.append(u)
    return torch.cat(out)


def sample_teacher(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float,
                   rows_per_chunk: int = 64, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ids from softmax(logits / T) by inverse transform: logits [M, V], sorted uniforms [M, N] in [0, 1) ->
    (sorted ids [M, N] int64, with repeats; the distribution's entropy [M] float32, in nats). An id of probability
    0 (a -inf logit) is never drawn.

    ``exclude`` [M, K] int64 (a hybrid cache's top-K ids): draw from the distribution restricted to the other ids
    and renormalised (its probabilities taken in float64, so a tail of mass 1e-30 is still drawn from); the entropy
    is still the whole distribution's. A row whose other ids have no mass at all draws id V - 1 (its draws get
    weight 0: the tail mass)."""
    m, vocab = logits.shape
    ids = torch.empty(uniforms.shape, dtype=torch.int64)
    entropy = torch.empty(m)
    for r0 in range(0, m, rows_per_chunk):
        z = logits[r0:r0 + rows_per_chunk].float() / temperature
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        log_p = z - lse
        p = log_p.exp()
        entropy[r0:r0 + rows_per_chunk] = -torch.where(p > 0, p * log_p, 0.0).sum(-1)
        if exclude is None:
            cdf = p.double().cumsum_(-1)
        else:
            cdf = log_p.double().exp_().scatter_(-1, exclude[r0:r0 + rows_per_chunk], 0.0).cumsum_(-1)
        u = uniforms[r0:r0 + rows_per_chunk] * cdf[:, -1:]
        ids[r0:r0 + rows_per_chunk] = torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1)
    return ids, entropy


def _encode_id_array(ids: torch.Tensor, vocab: int, options: CacheOptions) -> np.ndarray:
    """Ids [M, n] (top-k ids, or sampled ids with repeats) as stored: Elias-Fano packed, or the smallest dtype."""
    if options.ids == "packed":
        return encode_ids(ids, vocab)[0]
    dtype = np.uint8 if vocab <= 256 else np.uint16 if vocab <= 65536 else np.int32
    return ids.numpy().astype(dtype)


def _block_arrays(features: Mapping[str, torch.Tensor], ids: torch.Tensor, options: CacheOptions
                  ) -> dict[str, np.ndarray]:
    """The arrays every shard has besides the teacher's distribution: the blocks' hashes and the cached features."""
    n = ids.shape[0]
    arrays = {"block_hash": np.frombuffer(b"".join(block_hash(row) for row in ids), dtype=np.uint8).reshape(n, 16)}
    for i, spec in enumerate(options.features):
        arrays[f"feature.{i}"] = features[spec]
    return arrays


def encode_top_k(stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], vocab: int,
                 features: Mapping[str, torch.Tensor], ids: torch.Tensor, options: CacheOptions
                 ) -> dict[str, np.ndarray]:
    """:func:`top_k_log_probs` of n blocks' n·T tokens (+ features) -> the arrays of a shard."""
    log_p, top_ids, lse, log_rest = stats
    n, seq = ids.shape
    k = top_ids.shape[-1]
    lse, log_rest = lse.reshape(n, seq), log_rest.reshape(n, seq)
    arrays: dict[str, np.ndarray] = {}
    if options.ids == "packed":
        packed, order = encode_ids(top_ids, vocab)
        log_p = log_p.gather(-1, order)
        arrays["ids"] = packed.reshape(n, seq, -1)
    else:
        arrays["ids"] = _encode_id_array(top_ids, vocab, options).reshape(n, seq, k)
    for name, arr in encode_values(log_p, options.values).items():
        arrays[name] = arr.reshape(n, seq, *arr.shape[1:])
    arrays["logsumexp"] = lse.to(torch.float16 if options.lse_dtype == "float16" else torch.float32).numpy()
    arrays["log_rest"] = log_rest.to(torch.float16).numpy()
    return {**arrays, **_block_arrays(features, ids, options)}


# The fused build's tiles of logits: rows x vocabulary columns made by one lm-head product and reduced at once.
# 32 x 8192 float32 logits (1 MiB) stay in a core's L2 between the product and the reduction; measured on the
# benchmark's d=64 teacher (AVX512), tiles of this size run the head 2-3x faster than one [B*T, V] product, whose
# output goes to memory. Without the native kernel, rows are reduced a chunk at a time instead (_FUSED_CHUNKS
# chunks per head call: a call per 10-row chunk lost more to re-reading the head weight than it gained).
_TILE_ROWS, _TILE_COLS = 256, 4096
_FUSED_CHUNKS = 6
# Taps the base model's forward fills: hooks on its own modules, and these fields of its output.
_BASE_OUTPUT_TAPS = ("hidden_states", "attentions")


def _fused_head(teacher: torch.nn.Module, taps) -> tuple[torch.nn.Module, torch.nn.Module, Any] | None:
    """(base model, lm head, logit transform) when the cache can be built from the teacher's last hidden states
    (a causal LM on the CPU whose logits are ``transform(head(h))``, every tap filled by the base model's forward),
    else None: the teacher's full logits are post-processed instead."""
    from ..losses.chunked import causal_lm_head, check_head_of_hidden

    try:
        if next(teacher.parameters()).device.type != "cpu":
            return None  # the chunks' work is sized for a CPU's cache; a GPU teacher's logits go through as they are
        base, head = causal_lm_head(teacher)
        transform = check_head_of_hidden(teacher)
    except (KDForgeError, StopIteration) as err:
        log.debug("teacher cache: post-processing the teacher's full logits (%s)", err)
        return None
    if taps is not None:
        inside = {id(m) for m in base.modules()}
        if any(s.source == "hf" and s.path not in _BASE_OUTPUT_TAPS for s in taps.specs.values()) or any(
                id(m) not in inside for target in taps._targets for _, m in target.modules):
            return None
    return base, head, transform


@torch.no_grad()
def fused_teacher_top_k(live: LiveTeacher, fused: tuple[torch.nn.Module, torch.nn.Module, Any],
                        batch: Mapping[str, torch.Tensor], taps, k: int, temperature: float
                        ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], dict[str, Any]]:
    """The teacher's :func:`top_k_log_probs` for every token of ``batch`` (and its tapped features), from the base
    model's last hidden states, without making the batch's [B, T, V] logits: with the native kernel, tiles of
    ``transform(head(h))`` (:func:`_tiled_top_k`); without it, chunks of rows (``_FUSED_CHUNKS`` chunks, and >= D
    rows, per head call), each reduced while in the CPU's cache."""
    from ..batches import model_inputs

    base, head, transform = fused
    live.model.eval()
    args, kwargs = model_inputs(batch)
    features: dict[str, Any] = {}
    with live.autocast():
        if taps is None:
            out = base(*args, **kwargs)
        else:
            with taps.capture() as features:
                out = base(*args, **kwargs, **taps.needs_hf_outputs())
            taps.collect_outputs(features, out)
    hidden = out.last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    vocab = head.weight.shape[0]
    if native.available():
        return _tiled_top_k(live, head, transform, hidden, min(k, vocab), temperature), features
    rows = max(1, _CHUNK_BYTES // (4 * vocab))  # the rows reduced at a time, in L2
    chunks = max(_FUSED_CHUNKS, -(-hidden.shape[-1] // rows))  # >= D rows per call: the weight read is amortised
    block = {"start": 0, "logits": hidden[:0]}  # the rows made by the last head call: a whole number of chunks

    def logits_of(r0: int, r1: int) -> torch.Tensor:
        if r1 > block["start"] + block["logits"].shape[0]:
            with live.autocast():
                block["start"], block["logits"] = r0, transform(head(hidden[r0:r0 + rows * chunks]))
        return block["logits"][r0 - block["start"]:r1 - block["start"]]

    return chunked_top_k_log_probs(logits_of, hidden.shape[0], vocab, k, temperature, rows * 4 * vocab), features


def _tiled_top_k(live: LiveTeacher, head: torch.nn.Module, transform, hidden: torch.Tensor, k: int,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`top_k_log_probs` of the logits ``transform(head(hidden))`` [M, V] of hidden states [M, D], made a tile
    of ``_TILE_ROWS`` x ``_TILE_COLS`` at a time and reduced by the native kernel (:class:`native.TopKStream`) while
    in the CPU's cache. Rows the kernel cannot finish (non-finite logits, a tail that may have underflowed) are
    recomputed whole in torch."""
    m, vocab = hidden.shape[0], head.weight.shape[0]
    rows = _TILE_ROWS * max(1, torch.get_num_threads())  # the kernel splits a tile's rows over the threads
    weight, bias = head.weight, head.bias
    log_p, ids = torch.empty(m, k), torch.empty(m, k, dtype=torch.int64)
    lse, log_rest = torch.empty(m), torch.empty(m)
    tile = torch.empty(rows, min(_TILE_COLS, vocab))
    for r0 in range(0, m, rows):
        h = hidden[r0:r0 + rows]
        stream = native.TopKStream(h.shape[0], k, temperature)
        for c0 in range(0, vocab, _TILE_COLS):
            c1 = min(c0 + _TILE_COLS, vocab)
            with live.autocast():
                z = transform(torch.nn.functional.linear(h, weight[c0:c1], None if bias is None else bias[c0:c1]))
            out = tile[:h.shape[0], :c1 - c0]
            stream.update(out.copy_(z) if z.dtype != torch.float32 or z.stride(-1) != 1 else z, c0)
        r1 = r0 + h.shape[0]
        stream.finish(log_p[r0:r1], ids[r0:r1], lse[r0:r1], log_rest[r0:r1])
    bad = (~torch.isfinite(lse) | log_rest.isnan()).nonzero().squeeze(-1)
    if bad.numel():
        with live.autocast():
            z = transform(head(hidden[bad]))
        redo = _torch_top_k_log_probs(lambda a, b: z[a:b], bad.numel(), vocab, k, temperature, None)
        for dst, src in zip((log_p, ids, lse, log_rest), redo):
            dst[bad] = src
    return log_p, ids, lse, log_rest


def _feature_tensor(value: Any, spec: str, n: int, seq: int, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim < 2 or tuple(value.shape[:2]) != (n, seq):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise KDForgeError(f"feature '{spec}' is {shape}, not a tensor [batch, seq_len, ...]; cache only per-token "
                           "tensors (e.g. hidden_states.3, model.layers.2)")
    return value.detach().to(dtype).cpu().contiguous()


def _save_shard(arrays: Mapping[str, Any], meta: Mapping[str, str]) -> bytes:
    from safetensors.torch import save

    tensors = {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v)))
               for k, v in arrays.items()}
    return save(tensors, metadata=dict(meta))


def build_cache(teacher: torch.nn.Module, tokenizer, blocks_ids: torch.Tensor, out: str | Path, *,
                teacher_spec: Mapping[str, Any], options: CacheOptions | None = None,
                progress: Callable[[str], None] | None = None, fuse: bool = True,
                block_numbers: Sequence[int] | None = None) -> dict[str, Any]:
    """Run ``teacher`` over ``blocks_ids`` [N, T] and write (or finish) the cache in ``out``. Returns the index.

    ``block_numbers`` [N]: what seeds each block's draws in a sampled cache (default: its row here); a fold of a
    cross-fitted cache passes its blocks' rows in the whole training set, so no two folds share random numbers.

    ``fuse`` (the default): where the teacher allows it (see :func:`fused_teacher_top_k`), run its base model and
    make its logits a tile at a time, each reduced while in the CPU's cache, never holding a batch's [B, T, V]
    logits; else post-process each batch's full logits. The cache's contents are the same either way, up to float32
    rounding. benchmarks/cache_build.py measures both against the teacher's own forward.
    """
    from ..taps import Taps

    options = options or CacheOptions()
    options.check()
    out = Path(out)
    _make_folder(out)
    from ..models import vocab_size as model_vocab

    vocab = model_vocab(teacher)
    meta = cache_meta(teacher_spec, tokenizer, blocks_ids, vocab, options)
    index = _existing_index(out, meta)
    remove_temporaries(out)  # shards and index a killed build was writing
    n_blocks = blocks_ids.shape[0]
    ranges = [(s, min(s + options.shard_blocks, n_blocks)) for s in range(0, n_blocks, options.shard_blocks)]
    done: dict[int, dict[str, Any]] = {}
    if index is not None:
        for entry in index["shards"]:
            why = _shard_ok(out, entry)
            if why is None:
                done[entry["shard"]] = entry
            else:
                log.info("%s; it will be rewritten", why)
    index = {"format": FORMAT, "version": VERSION, "meta": meta, "complete": False,
             "shards": sorted(done.values(), key=lambda e: e["shard"])}
    atomic_write_json(out / INDEX, index)

    live = LiveTeacher(teacher, str(teacher_spec.get("dtype") or "float32"))
    taps = Taps(teacher, {spec: spec for spec in options.features}) if options.features else None
    fused = _fused_head(teacher, taps) if fuse and options.mode == "top_k" else None
    feat_dtype = getattr(torch, options.feature_dtype)
    seq = blocks_ids.shape[1]
    say = progress or (lambda msg: log.debug("%s", msg))
    from ..progress import Progress

    bar = Progress("caching teacher outputs", n_blocks, unit="block",
                   start=sum(e["stop"] - e["start"] for e in done.values()))
    for shard_no, (start, stop) in enumerate(ranges):
        if shard_no in done:
            continue
        parts: list[dict[str, np.ndarray]] = []
        for b0 in range(start, stop, options.batch_size):
            ids = blocks_ids[b0:min(b0 + options.batch_size, stop)]
            batch = {"input_ids": ids.to(next(teacher.parameters()).device), "attention_mask": torch.ones_like(ids)}
            batch["attention_mask"] = batch["attention_mask"].to(batch["input_ids"].device)
            if fused is None:
                result: TeacherOutput = live(batch, taps)
                raw_feats = result.features
            else:
                stats, raw_feats = fused_teacher_top_k(live, fused, batch, taps, options.k, options.temperature)
            feats = {spec: _feature_tensor(raw_feats.get(spec), spec, ids.shape[0], seq, feat_dtype)
                     for spec in options.features}
            if fused is None:
                parts.append(encode_block_outputs(result.logits.detach().cpu(), feats, ids, options, first_block=b0,
                                                  block_numbers=block_numbers))
            else:
                parts.append(encode_top_k(stats, vocab, feats, ids, options))
            bar.update(bar.done + ids.shape[0])
        arrays = {}
        for key in parts[0]:
            vals = [p[key] for p in parts]
            arrays[key] = torch.cat(vals) if isinstance(vals[0], torch.Tensor) else np.concatenate(vals)
        name = f"shard_{shard_no:05d}.safetensors"
        data = _save_shard(arrays, {"start": str(start), "stop": str(stop)})
        try:
            atomic_write_bytes(out / name, data)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise KDForgeError(f"disk full while writing {out / name}; the {len(done)} finished shard(s) are "
                                   "kept: free space and rerun the same command to resume") from None
            raise
        done[shard_no] = {"shard": shard_no, "file": name, "start": start, "stop": stop, "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()}
        index["shards"] = sorted(done.values(), key=lambda e: e["shard"])
        atomic_write_json(out / INDEX, index)
        say(f"cached shard {shard_no + 1}/{len(ranges)} (blocks {start}..{stop - 1})")

    bar.close()
    total_bytes = sum(e["bytes"] for e in index["shards"])
    tokens = n_blocks * seq
    index["complete"] = True
    index["bytes_per_token"] = total_bytes / tokens
    index["bytes_per_token_parts"] = _payload_bytes(out / index["shards"][0]["file"], index["shards"][0], seq)
    atomic_write_json(out / INDEX, index)
    return index


def _payload_bytes(path: Path, entry: Mapping[str, Any], seq: int) -> dict[str, float]:
    """Bytes per token of each stored tensor (from the first shard's header)."""
    from safetensors import safe_open

    tokens = (entry["stop"] - entry["start"]) * seq
    out: dict[str, float] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            nbytes = math.prod(sl.get_shape()) * torch.empty((), dtype=_st_dtype(sl.get_dtype())).element_size()
            out[key] = nbytes / tokens
    return out


def _st_dtype(name: str) -> torch.dtype:
    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "U8": torch.uint8,
            "U16": torch.uint16, "I32": torch.int32, "I64": torch.int64}[name]


# --------------------------------------------------------------------------- reading


class CachedTeacher:
    """A teacher read from an offline cache; same call interface as :class:`LiveTeacher`.

    Needs the batch's block indices (``batch["block_index"]``, added by :func:`kdforge.data.packing.make_batch`);
    every row's token ids are checked against the cache's per-block hash. Returns, with the cached features asked
    for by ``taps``: from a top-k cache :class:`SparseLogits` [B, T, k] with the logsumexp at ``temperature`` (the
    cache temperature); from a sampled cache :class:`SampledLogits` [B, T, N]; from a hybrid cache
    :class:`HybridLogits` (head [B, T, K], tail draws [B, T, N]). Raises KDForgeError (one line) for an incomplete,
    corrupt or mismatched cache and for a batch whose tokens are not the cached blocks'.
    """

    def __init__(self, path: str | Path, *, blocks_ids: torch.Tensor | None = None, tokenizer=None,
                 vocab_size: int | None = None, verify: bool = True):
        self.path = Path(path)
        index = _read_index(self.path)
        if index is None:
            raise KDForgeError(f"no teacher cache at '{self.path}' ({INDEX} missing); build it with "
                               "`kdforge cache-teacher RECIPE.yaml`")
        if not index.get("complete"):
            done = "not every fold cached" if "folds" in index else f"{len(index['shards'])} shard(s) written"
            raise KDForgeError(f"teacher cache '{self.path}' is incomplete ({done}); rerun `kdforge cache-teacher` "
                               "to finish it")
        self.index = index
        meta = index["meta"]
        self.meta = meta
        opts = meta["options"]
        self.mode = opts.get("mode", "top_k")
        self.temperature = float(opts["temperature"])
        self.k = int(opts["samples"] if self.mode == "sampled" else opts["k"])  # ids stored per position
        self.samples = int(opts["samples"]) if self.mode == "hybrid" else None  # a hybrid cache's tail draws
        self.values_format, self.ids_format = opts.get("values"), opts["ids"]
        self.feature_specs: list[str] = list(opts.get("features", []))
        self.vocab_size = int(meta["vocab_size"])
        self.seq_len, self.n_blocks = int(meta["data"]["seq_len"]), int(meta["data"]["n_blocks"])
        self.shard_blocks = int(opts["shard_blocks"])
        self.shards = sorted(index["shards"], key=lambda e: e["start"])
        self._parts: list[CachedTeacher] | None = None  # a cross-fitted cache: one cache per fold
        if meta.get("crossfit") is not None:
            self._open_folds(verify)
        expected = 0 if self._parts is not None else math.ceil(self.n_blocks / self.shard_blocks)
        if len(self.shards) != expected or any(e["start"] != i * self.shard_blocks for i, e in enumerate(self.shards)):
            raise KDForgeError(f"teacher cache '{self.path}' lists {len(self.shards)} shards, expected {expected}; "
                               "rebuild it with kdforge cache-teacher")
        for entry in self.shards:
            why = _shard_ok(self.path, entry, check_sha=verify)
            if why:
                raise KDForgeError(f"teacher cache '{self.path}': {why}; rerun `kdforge cache-teacher` to rebuild it")
        if blocks_ids is not None or tokenizer is not None or vocab_size is not None:
            self.check_matches(blocks_ids=blocks_ids, tokenizer=tokenizer, vocab_size=vocab_size)
        self._files: dict[int, Any] = {}

    def _open_folds(self, verify: bool) -> None:
        """A cross-fitted cache: open each fold's cache and map every block to (its fold, its place in that fold)."""
        folds = torch.tensor(self.index.get("block_folds", []), dtype=torch.int64)
        entries = self.index.get("folds", [])
        if folds.numel() != self.n_blocks or len(entries) != self.meta["crossfit"]["folds"]:
            raise KDForgeError(f"teacher cache '{self.path}' lists {folds.numel()} block folds for {self.n_blocks} "
                               f"blocks and {len(entries)} fold caches; rebuild it with kdforge cache-teacher")
        self._parts, self._local = [], torch.empty_like(folds)
        for k, entry in enumerate(entries):
            part = CachedTeacher(self.path / entry["dir"], verify=verify)
            mine = (folds == k).nonzero().squeeze(-1)
            if part.n_blocks != mine.numel() or part.meta["options"] != self.meta["options"]:
                raise KDForgeError(f"teacher cache '{self.path}': fold {k}'s cache ({entry['dir']}) holds "
                                   f"{part.n_blocks} blocks for {mine.numel()} in the fold, or other options; "
                                   "rebuild it with kdforge cache-teacher")
            self._local[mine] = torch.arange(mine.numel())
            self._parts.append(part)
        self._fold_of = folds.tolist()

    def check_matches(self, *, blocks_ids: torch.Tensor | None = None, tokenizer=None,
                      vocab_size: int | None = None) -> None:
        """Refuse (one line, naming what differs) a cache built for another tokenizer, data or vocabulary."""
        current: dict[str, Any] = {}
        cached: dict[str, Any] = {}
        if tokenizer is not None:
            current["tokenizer"], cached["tokenizer"] = tokenizer_fingerprint(tokenizer), self.meta["tokenizer"]
        if blocks_ids is not None:
            current["data"] = {"n_blocks": int(blocks_ids.shape[0]), "seq_len": int(blocks_ids.shape[1]),
                               "sha256": data_sha256(blocks_ids)}
            cached["data"] = self.meta["data"]
        if vocab_size is not None:
            current["vocab_size"], cached["vocab_size"] = int(vocab_size), self.vocab_size
        diff = _differences(cached, current)
        if diff:
            raise KDForgeError(f"teacher cache '{self.path}' does not match this run: {'; '.join(diff)}; rebuild it "
                               "with `kdforge cache-teacher RECIPE.yaml` or point teacher.path at the right cache")

    def _file(self, shard: int):
        from safetensors import safe_open

        if shard not in self._files:
            self._files[shard] = safe_open(str(self.path / self.shards[shard]["file"]), framework="pt")
        return self._files[shard]

    def _read(self, block: int, names: list[str]) -> dict[str, torch.Tensor]:
        if not 0 <= block < self.n_blocks:
            raise KDForgeError(f"block index {block} is outside the cache's {self.n_blocks} blocks")
        if self._parts is not None:  # cross-fitted: the block's outputs come from its fold's teacher
            return self._parts[self._fold_of[block]]._read(int(self._local[block]), names)
        shard, local = divmod(block, self.shard_blocks)
        f = self._file(shard)
        return {name: f.get_slice(name)[local:local + 1] for name in names}

    def __call__(self, batch: Mapping[str, torch.Tensor], taps=None) -> TeacherOutput:
        index = batch.get("block_index")
        if index is None:
            raise KDForgeError("a cached teacher needs the batch's block indices (batch['block_index']); build "
                               "batches with kdforge.data.packing.make_batch")
        input_ids = batch["input_ids"]
        device = input_ids.device
        blocks = [int(i) for i in index.reshape(-1).tolist()]
        if input_ids.shape != (len(blocks), self.seq_len):
            raise KDForgeError(f"batch input_ids {tuple(input_ids.shape)} do not match the cache's blocks "
                               f"[{len(blocks)}, {self.seq_len}]")
        want = self._feature_names(taps)
        if self.mode == "sampled":
            names = ["ids", "entropy", "block_hash"]
        elif self.mode == "hybrid":
            names = ["ids", "values", "log_rest", "tail_ids", "entropy", "block_hash"]
            names += ["scale"] if self.values_format != "fp16" else []
        else:
            names = ["ids", "values", "logsumexp", "log_rest", "block_hash"]
            names += ["scale"] if self.values_format != "fp16" else []
        names += [f"feature.{self.feature_specs.index(spec)}" for spec in want.values()]
        rows = [self._read(b, names) for b in blocks]
        got = {name: torch.cat([r[name] for r in rows]) for name in names}
        cpu_ids = input_ids.detach().cpu()
        for j, b in enumerate(blocks):
            if bytes(got["block_hash"][j].numpy()) != block_hash(cpu_ids[j]):
                raise KDForgeError(f"batch row {j} does not hold the tokens of cached block {b}: the data or its "
                                   "order changed since the cache was built; rebuild it with kdforge cache-teacher")
        n, seq = len(blocks), self.seq_len
        k = self.k
        if self.ids_format == "packed":
            ids = decode_ids(got["ids"].reshape(n * seq, -1).numpy(), k, self.vocab_size).reshape(n, seq, k)
        else:
            ids = got["ids"].to(torch.int64)
        features = {name: got[f"feature.{self.feature_specs.index(spec)}"].to(device).float()
                    for name, spec in want.items()}
        if self.mode == "sampled":
            sampled = SampledLogits(ids=ids.to(device), entropy=got["entropy"].float().to(device),
                                    temperature=self.temperature)
            return TeacherOutput(sampled, features)
        scale = got["scale"].reshape(n * seq, 2).numpy() if "scale" in got else None
        values = got["values"]
        values = values.numpy() if values.dtype != torch.float16 else values.float().numpy()
        log_p = decode_values(values.reshape(n * seq, -1), scale, k, self.values_format).reshape(n, seq, k)
        if self.mode == "hybrid":
            return TeacherOutput(self._hybrid(got, ids, log_p, n, seq, device), features)
        lse = got["logsumexp"].float()
        logits = self.temperature * (log_p + lse.unsqueeze(-1))
        # Rescale the (quantised) top-k probabilities to the exact top-k mass 1 - exp(log_rest): the bucket is exact
        # and quantisation can never push the top-k mass to 1 (a zero tail would make reverse KL infinite).
        top_mass = log1mexp(got["log_rest"].float())
        lse = lse + torch.logsumexp(log_p, dim=-1) - top_mass
        sparse = SparseLogits(ids=ids.to(device), logits=logits.to(device), logsumexp=lse.to(device),
                              lse_temperature=self.temperature)
        return TeacherOutput(sparse, features)

    def _hybrid(self, got: Mapping[str, torch.Tensor], ids: torch.Tensor, log_p: torch.Tensor, n: int, seq: int,
                device) -> HybridLogits:
        """A hybrid cache's rows: the decoded head log-probs ``log_p`` [n, T, K] rescaled to the exact head mass
        1 - exp(log_rest), the tail draws [n, T, N] decoded."""
        log_rest = got["log_rest"].float()
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True) + log1mexp(log_rest).unsqueeze(-1)
        if self.ids_format == "packed":
            tail = decode_ids(got["tail_ids"].reshape(n * seq, -1).numpy(), self.samples, self.vocab_size)
            tail = tail.reshape(n, seq, self.samples)
        else:
            tail = got["tail_ids"].to(torch.int64)
        return HybridLogits(ids=ids.to(device), log_probs=log_p.to(device), tail_log_mass=log_rest.to(device),
                            tail_ids=tail.to(device), entropy=got["entropy"].float().to(device),
                            temperature=self.temperature)

    def _feature_names(self, taps) -> dict[str, str]:
        """tap name -> cached spec string, for a Taps object or a {name: spec} mapping."""
        if taps is None:
            return {}
        specs = getattr(taps, "specs", taps)
        wanted = {name: getattr(spec, "raw", spec) for name, spec in specs.items()}
        missing = [s for s in wanted.values() if s not in self.feature_specs]
        if missing:
            have = ", ".join(self.feature_specs) or "none"
            raise KDForgeError(f"teacher cache '{self.path}' has no feature '{missing[0]}' (cached: {have}); rebuild "
                               "it with kdforge cache-teacher --features ...")
        return wanted

    def check_temperatures(self, terms) -> None:
        """Refuse, before training, logit terms this cache cannot serve: on a top-k cache, terms whose exact
        missing-mass policy needs another temperature than the stored logsumexp's; on a sampled or hybrid cache,
        every logit term but forward KL (the only one with an unbiased estimator from samples), and forward KL at
        another temperature than the samples were drawn at."""
        import inspect

        from ..losses.logits import forward_kl
        from ..losses.registry import lookup

        for term in terms:
            params = term.params if hasattr(term, "params") else dict(term)
            kind, fn = lookup(term.loss)
            if kind != "logit":
                continue
            default = inspect.signature(fn).parameters.get("temperature")
            t = float(params.get("temperature", default.default if default is not None else 1.0))
            if self.mode in ("sampled", "hybrid"):
                if fn is not forward_kl or params.get("standardize") or params.get("correction"):
                    raise KDForgeError(
                        f"term '{term.label}' ({term.loss}) has no estimator for the {self.mode} teacher cache "
                        f"'{self.path}': only forward_kl (without standardize or correction) trains from samples; "
                        "use forward_kl or build a top-k cache (kdforge cache-teacher --mode top_k)")
                if not math.isclose(t, self.temperature, rel_tol=1e-6):
                    raise KDForgeError(
                        f"term '{term.label}' uses temperature {t} but the teacher cache '{self.path}' was sampled "
                        f"at temperature {self.temperature}; rebuild it with --temperature {t}")
                continue
            if params.get("missing_mass", "bucket") == "renormalize":
                continue
            if not math.isclose(t, self.temperature, rel_tol=1e-6):
                raise KDForgeError(
                    f"term '{term.label}' uses temperature {t} but the teacher cache '{self.path}' stored its "
                    f"logsumexp at {self.temperature}; rebuild the cache with --temperature {t} or set "
                    "missing_mass: renormalize on that term")


# --------------------------------------------------------------------------- recipe integration


def teacher_architecture(spec) -> torch.nn.Module:
    """The teacher's architecture on the meta device (no weights, no memory): what a student built from the
    teacher's config needs when training reads an offline cache instead of running the teacher."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import resolve_model_path

    config = AutoConfig.from_pretrained(str(resolve_model_path(spec)))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def cached_teacher_for(recipe, tokenizer, train_blocks, student: torch.nn.Module | None = None) -> CachedTeacher:
    """Open the recipe's teacher cache and refuse it (one line, naming what differs) unless it was built on exactly
    these training blocks with this tokenizer, for this student's vocabulary and the objective's temperatures."""
    from ..models import vocab_size

    spec = recipe.teacher
    vocab = None if student is None or recipe.truncate_to_shared_vocab else vocab_size(student)
    cached = CachedTeacher(spec.path, blocks_ids=train_blocks.ids, tokenizer=tokenizer, vocab_size=vocab)
    want = spec.crossfit.identity() if listed_fold_teachers(spec) is not None else None
    have = cached.meta.get("crossfit")
    have = {key: have.get(key) for key in ("folds", "seed", "models")} if have is not None else None
    if want != have:
        raise KDForgeError(f"teacher cache '{spec.path}' was built with teacher.crossfit {describe_crossfit(have)} "
                           f"but the recipe has {describe_crossfit(want)}; rebuild it with `kdforge cache-teacher "
                           "RECIPE` (another teacher.path keeps this one)")
    if cached.meta["teacher"].get("model") != spec.model:
        log.warning("teacher cache %s was built from teacher '%s', the recipe names '%s' (used for evaluation)",
                    spec.path, cached.meta["teacher"].get("model"), spec.model)
    cached.check_temperatures(recipe.objective)
    return cached


def recipe_temperature(recipe) -> float:
    """The temperature a cache for this recipe stores its logsumexp at: the one its exact-policy logit terms use."""
    import inspect

    from ..losses.registry import lookup

    temps = {}
    for term in recipe.objective:
        kind, fn = lookup(term.loss)
        if kind != "logit" or term.params.get("missing_mass") == "renormalize":
            continue
        default = inspect.signature(fn).parameters.get("temperature")
        temps[term.label] = float(term.params.get("temperature", default.default if default is not None else 1.0))
    distinct = sorted(set(temps.values()))
    if len(distinct) > 1:
        raise KDForgeError(f"the objective's logit terms use temperatures {', '.join(map(str, distinct))} but a cache "
                           "stores the logsumexp at one; pass --temperature, and set missing_mass: renormalize on "
                           "the terms at the others")
    return distinct[0] if distinct else 1.0


def cache_recipe_teacher(recipe, *, out: str | Path | None = None, options: CacheOptions | None = None,
                         progress: Callable[[str], None] | None = None) -> tuple[Path, dict[str, Any]]:
    """`kdforge cache-teacher`: run the recipe's teacher over its training blocks once and write the cache.

    The folder defaults to ``teacher.path``, else ``<output_dir>/teacher_cache``; the temperature to the
    objective's (see :func:`recipe_temperature`) unless ``options`` sets another. With ``teacher.crossfit`` each
    block is cached from the teacher of its fold (:func:`build_crossfit_cache`).
    """
    from ..models import load_teacher, load_tokenizer
    from ..data.corpus_blocks import tokenize_corpus

    spec = recipe.teacher
    if spec is None:
        raise KDForgeError("the recipe has no teacher to cache; set teacher.model")
    if spec.curriculum is not None:
        raise KDForgeError("a teacher curriculum runs several teachers; cache-teacher caches one (drop curriculum)")
    listed_fold_teachers(spec)  # a cross-fitted recipe lists its K teachers
    out = Path(out or spec.path or Path(recipe.output_dir) / "teacher_cache")
    if options is None:
        options = CacheOptions(temperature=recipe_temperature(recipe), batch_size=recipe.train.batch_size)
    tokenizer = load_tokenizer(spec)
    train_blocks, _ = tokenize_corpus(recipe, tokenizer)
    if spec.crossfit is not None:
        return out, build_crossfit_cache(spec, tokenizer, train_blocks.ids, out, options=options, progress=progress)
    teacher = load_teacher(spec)
    index = build_cache(teacher, tokenizer, train_blocks.ids, out, teacher_spec=spec.model_dump(), options=options,
                        progress=progress)
    return out, index


def listed_fold_teachers(spec) -> list[str] | None:
    """The K fold teachers of a cross-fitted recipe (teacher.crossfit.models), None without teacher.crossfit;
    KDForgeError (one line) when the recipe does not list them yet."""
    if spec.crossfit is None:
        return None
    if not spec.crossfit.models:
        raise KDForgeError(f"teacher.crossfit.models lists no teachers: fine-tune teacher k on DIR/teacher_k.jsonl "
                           "(written by `kdforge crossfit-split RECIPE --out DIR`) for k = "
                           f"0..{spec.crossfit.folds - 1} and list them in fold order")
    return list(spec.crossfit.models)


def crossfit_split_identity(crossfit, blocks_ids: torch.Tensor, tokenizer) -> dict[str, Any]:
    """What a `kdforge crossfit-split` manifest records and teacher.crossfit.split is checked against: the folds and
    their seed (a CrossfitSpec's), the training blocks [N, T] (count, length, sha256) and the tokenizer."""
    return {"folds": crossfit.folds, "seed": crossfit.seed, "n_blocks": int(blocks_ids.shape[0]),
            "seq_len": int(blocks_ids.shape[1]), "data_sha256": data_sha256(blocks_ids),
            "tokenizer": tokenizer_fingerprint(tokenizer)}


def build_crossfit_cache(spec, tokenizer, blocks_ids: torch.Tensor, out: str | Path, *,
                         options: CacheOptions | None = None,
                         progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write (or finish) a cross-fitted cache in ``out`` and return its index (layout: the module docstring).

    spec: the recipe's TeacherSpec with ``crossfit.models`` (teacher k fine-tuned without fold k); blocks_ids: the
    training blocks [N, T]; folds: :func:`kdforge.crossfit.block_folds` (crossfit.folds, crossfit.seed). Each fold's
    folder is an ordinary cache built by :func:`build_cache` (atomic and resumable), so a rerun skips the folds that
    are complete without loading their teachers. In a sampled cache the draws of a block derive from the cache seed
    and the block's row in ``blocks_ids`` (not its place in its fold), so the folds' draws are independent. Refused
    in one line, before any teacher loads: a fold teacher whose tokenizer or vocabulary size differs from
    ``spec.model``'s (which the student shares), more folds than blocks, a folder holding another cache, and a
    ``crossfit.split`` folder written for other folds or data (without one, nothing shows what the fold teachers were
    fine-tuned on: a warning says so).
    """
    from ..checks import check_student_tokenizer
    from ..crossfit import block_folds, check_split
    from ..models import load_teacher
    from ..models import vocab_size as model_vocab
    from ..recipe import ModelSpec

    options = options or CacheOptions()
    options.check()
    out, crossfit = Path(out), spec.crossfit
    fold_specs = [ModelSpec(model=m, dtype=spec.dtype) for m in listed_fold_teachers(spec)]
    folds = block_folds(blocks_ids.shape[0], crossfit.folds, seed=crossfit.seed)
    if crossfit.split is not None:
        check_split(crossfit.split, crossfit_split_identity(crossfit, blocks_ids, tokenizer))
    else:
        log.warning("teacher.crossfit.split is not set, so nothing checks that fold teacher k was fine-tuned "
                    "without this recipe's fold k; set it to the folder kdforge crossfit-split wrote")
    vocab = model_vocab(teacher_architecture(spec))
    for k, fold_spec in enumerate(fold_specs):
        role = f"teacher.crossfit.models[{k}]"
        check_student_tokenizer(fold_spec.model, tokenizer, role=role,
                                fix="fine-tune every fold teacher from a model with teacher.model's tokenizer")
        fold_vocab = model_vocab(teacher_architecture(fold_spec))
        if fold_vocab != vocab:
            raise KDForgeError(f"{role} '{fold_spec.model}' has {fold_vocab} output ids but teacher.model "
                               f"'{spec.model}' has {vocab}; the fold teachers must share teacher.model's vocabulary "
                               "(the student's): fine-tune each from the same base")
    meta = cache_meta(spec.model_dump(), tokenizer, blocks_ids, vocab, options)
    meta["crossfit"] = {**crossfit.identity(), "fold_sizes": torch.bincount(folds, minlength=crossfit.folds).tolist()}
    _make_folder(out)
    _existing_index(out, meta)
    remove_temporaries(out)
    index = {"format": FORMAT, "version": VERSION, "meta": meta, "complete": False, "shards": [],
             "folds": [{"fold": k, "dir": f"fold_{k}", "model": m, "blocks": n}
                       for k, (m, n) in enumerate(zip(crossfit.models, meta["crossfit"]["fold_sizes"]))],
             "block_folds": folds.tolist()}
    atomic_write_json(out / INDEX, index)
    say = progress or (lambda msg: log.info("%s", msg))
    parts = []
    for k, fold_spec in enumerate(fold_specs):
        rows = (folds == k).nonzero().squeeze(-1)  # fold k's blocks, by their row in blocks_ids
        fold_ids = blocks_ids[rows]
        fold_out = out / f"fold_{k}"
        fold_meta = cache_meta(fold_spec.model_dump(), tokenizer, fold_ids, vocab, options)
        part = _read_index(fold_out) if fold_out.is_dir() else None
        if part is None or not part.get("complete") or part["meta"] != fold_meta or any(
                _shard_ok(fold_out, e) for e in part["shards"]):
            say(f"fold {k + 1}/{crossfit.folds}: caching teacher {fold_spec.model} over the {len(fold_ids)} blocks "
                "it never saw")
            teacher = load_teacher(fold_spec)
            part = build_cache(teacher, tokenizer, fold_ids, fold_out, teacher_spec=fold_spec.model_dump(),
                               options=options, progress=progress, block_numbers=rows.tolist())
            del teacher
        parts.append(part)
    index["complete"] = True
    index["bytes_per_token"] = sum(e["bytes"] for p in parts for e in p["shards"]) / blocks_ids.numel()
    index["bytes_per_token_parts"] = parts[0]["bytes_per_token_parts"]
    atomic_write_json(out / INDEX, index)
    return index
