"""Aligning two tokenizers: which tokens of two tokenizations cover the same characters, and which vocabulary
strings both tokenizers have (for kdforge's span-aligned cross-tokenizer term, kdforge.losses.cross_tokenizer).

Spans. A tokenization of a text is read as a partition of its characters: token i covers ``[end(i-1), end(i))``
where ``end`` is the end of its offset (``return_offsets_mapping``), so leading-space trimming of offsets and
multi-byte characters split over tokens never break the partition (a token that adds no character covers an empty
span and is never aligned). A student token and a teacher token are aligned when their spans are equal and non-empty:
both then follow the same text, so the two models' next-token distributions before them predict the same event.

Shared vocabulary. Each tokenizer's regular (non-special) tokens are read as the bytes they stand for: byte-level BPE
tokens (GPT-2's byte-to-unicode alphabet, e.g. SmolLM2's and the BPE kdforge trains) decoded through that alphabet,
SentencePiece-style tokens with ``▁`` as a space and ``<0xNN>`` byte-fallback pieces as that byte, anything else as
its UTF-8 text. Strings present in both vocabularies make the mapping, built once: ``student_ids[s]`` and
``teacher_ids[s]`` are the two ids of shared string s.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import KDForgeError


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
    return "ByteLevel" in kinds


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def vocabulary_bytes(tokenizer) -> dict[bytes, int]:
    """The regular tokens of ``tokenizer`` as {the bytes a token stands for: its id} (special and added tokens
    left out; when two tokens stand for the same bytes, the lower id is kept)."""
    byte_level = _is_byte_level(tokenizer)
    decoder = _byte_decoder()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = set((getattr(tokenizer, "get_added_vocab", lambda: {})() or {}).values())
    out: dict[bytes, int] = {}
    for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if idx in special or idx in added:
            continue
        if byte_level:
            if any(ch not in decoder for ch in token):
                continue
            key = bytes(decoder[ch] for ch in token)
        else:
            m = _BYTE_PIECE.match(token)
            key = bytes([int(m.group(1), 16)]) if m else token.replace("▁", " ").encode("utf-8")
        if key and key not in out:
            out[key] = idx
    return out


@dataclass
class SharedVocabulary:
    """The strings both vocabularies have: ``student_ids`` [S] and ``teacher_ids`` [S] (long), pair s = one string."""

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    student_size: int  # regular tokens in the student's vocabulary
    teacher_size: int  # regular tokens in the teacher's

    @property
    def size(self) -> int:
        return int(self.student_ids.numel())

    @property
    def student_fraction(self) -> float:
        """The share of the student's regular tokens whose string the teacher also has."""
        return self.size / max(self.student_size, 1)


def shared_vocabulary(student_tokenizer, teacher_tokenizer) -> SharedVocabulary:
    """The mapping between the two tokenizers' shared vocabulary strings, in the student's id order."""
    s = vocabulary_bytes(student_tokenizer)
    t = vocabulary_bytes(teacher_tokenizer)
    common = sorted((s[k], t[k]) for k in s.keys() & t.keys())
    ids = torch.tensor(common, dtype=torch.long).reshape(-1, 2)
    return SharedVocabulary(ids[:, 0].contiguous(), ids[:, 1].contiguous(), len(s), len(t))


def spans_from_offsets(offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each token's character span ``[end(i-1), end(i))`` from its offsets (a partition of the text covered)."""
    spans, prev = [], 0
    for _, end in offsets:
        end = max(int(end), prev)
        spans.append((prev, end))
        prev = end
    return spans


def token_spans(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, spans) of ``text`` tokenized without special tokens; spans as in spans_from_offsets."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), spans_from_offsets(enc["offset_mapping"])


def align_spans(student_spans: list[tuple[int, int]],
                teacher_spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Pairs (i, j) of student token i and teacher token j covering the same non-empty characters, in text order.
    Both span lists must be partitions in text order (token_spans / spans_from_offsets)."""
    pairs, i, j = [], 0, 0
    while i < len(student_spans) and j < len(teacher_spans):
        s, t = student_spans[i], teacher_spans[j]
        if s == t and s[1] > s[0]:
            pairs.append((i, j))
            i += 1
            j += 1
        elif s[1] < t[1] or (s[1] == t[1] and s[0] > t[0]):
            i += 1
        else:
            j += 1
    return pairs


def check_alignment(shared: SharedVocabulary, aligned: int, tokens: int, *, min_shared_fraction: float,
                    min_aligned_fraction: float, what: str = "span_kl") -> dict[str, float]:
    """The pair's figures {shared_strings, shared_fraction, aligned_tokens, student_tokens, aligned_fraction}, or
    KDForgeError (one line, with the figures) when too few strings are shared or too few of the student's response
    tokens (``tokens``, of which ``aligned`` have a teacher token over the same characters) align."""
    figures = {"shared_strings": shared.size, "student_vocabulary": shared.student_size,
               "teacher_vocabulary": shared.teacher_size, "shared_fraction": shared.student_fraction,
               "aligned_tokens": aligned, "student_tokens": tokens, "aligned_fraction": aligned / max(tokens, 1)}
    if figures["shared_fraction"] < min_shared_fraction or figures["aligned_fraction"] < min_aligned_fraction:
        raise KDForgeError(
            f"{what}: the tokenizers have no usable alignment: {shared.size:,} shared vocabulary strings "
            f"({figures['shared_fraction']:.1%} of the student's {shared.student_size:,}; at least "
            f"{min_shared_fraction:.0%} needed) and {aligned:,} of {tokens:,} student response tokens "
            f"({figures['aligned_fraction']:.1%}; at least {min_aligned_fraction:.0%} needed) cover the same "
            "characters as a teacher token; use uld (needs no shared vocabulary) or sequence-level KD, or give the "
            "student a tokenizer closer to the teacher's")
    return figures
