"""Feature terms: student tap(s) -> layer map -> projector(s) -> feature loss against the teacher's tap(s).

A term's `student:` / `teacher:` fields are tap specs (see kdforge.taps). What they capture decides the shape of the
term:
  - one tensor each: one pair, optionally through a projector;
  - a list each (a glob such as `model.layers.*`, or `hidden_states`): a layer map picks (student, teacher) pairs of
    transformer blocks and the loss is averaged over pairs, with one projector per pair; `layer_map: learned` instead
    mixes all teacher blocks per student block with learned weights (Align-to-Distill style). Layer-map indices always
    count blocks, whichever tap form names them: a Hugging Face `hidden_states` tuple holds the embedding output at
    index 0, so block i is its entry i + 1 (and its last entry is after the final norm in Llama-style models). The
    embedding outputs are paired only on request (`layer_map: {strategy: ..., embeddings: true}`, TinyBERT's
    embedding-layer term), which needs `hidden_states` taps on both sides;
  - a dict of specs each (e.g. MiniLM's `{q: ..., k: ..., v: ...}`): handed to the loss as dicts.
Projector input/output sizes come from one probe forward at construction, so the optimizer sees every parameter.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .align.layer_maps import LAYER_MAP_STRATEGIES, LearnedLayerMap, build_layer_map, format_layer_map
from .align.projectors import build_projector
from .errors import KDForgeError
from .recipe import Term

log = logging.getLogger("kdforge")

Captured = Tensor | list[Tensor] | dict[str, Any]

# Hugging Face output tuples that hold the embedding output first, then one entry per block.
_EMBEDDING_FIRST = {"hidden_states", "encoder_hidden_states", "decoder_hidden_states"}


def _embedding_offset(tap) -> int:
    """1 when a tap captures a whole hidden-states tuple (entry 0 is the embedding output), else 0."""
    return int(isinstance(tap, str) and tap.strip() in _EMBEDDING_FIRST)


def tap_specs(term: Term) -> tuple[dict[str, str], dict[str, str]]:
    """Flatten a term's student/teacher tap fields into name -> spec dicts (names are unique per term)."""
    def flat(side: str, value) -> dict[str, str]:
        if value is None:
            raise KDForgeError(f"feature loss '{term.loss}' needs `student:` and `teacher:` tap specs")
        if isinstance(value, dict):
            return {f"{term.label}.{side}.{k}": v for k, v in value.items()}
        return {f"{term.label}.{side}": value}

    return flat("s", term.student), flat("t", term.teacher)


def gather(term: Term, side: str, store: dict[str, Any]) -> Captured:
    value = term.student if side == "s" else term.teacher
    if isinstance(value, dict):
        return {k: store[f"{term.label}.{side}.{k}"] for k in value}
    return store[f"{term.label}.{side}"]


def _projector_spec(spec) -> dict[str, Any] | None:
    if spec is None:
        return None
    return {"kind": spec} if isinstance(spec, str) else dict(spec)


def _layer_map_spec(spec) -> dict[str, Any]:
    if spec is None:
        return {"strategy": "uniform"}
    if isinstance(spec, str):
        return {"strategy": spec}
    if isinstance(spec, list):
        return {"strategy": "explicit", "pairs": [tuple(p) for p in spec]}
    return dict(spec)


class FeatureTerm(nn.Module):
    """Holds a feature term's trainable parts (projectors, learned layer map) and computes its value."""

    def __init__(self, term: Term, fn: Callable, kwargs: dict[str, Any], s_probe: Captured, t_probe: Captured,
                 seq_len: int, source_layers: list[int] | None = None):
        """source_layers: for a student made of teacher blocks (student.init from_teacher), the teacher block each
        student block was copied from; without an explicit `layer_map` the term pairs each block with its source."""
        super().__init__()
        self.term, self.fn, self.kwargs = term, fn, kwargs
        self.takes_mask = "mask" in inspect.signature(fn).parameters
        self.resize_logged = False
        self.pairs: list[tuple[int, int]] | None = None
        self.learned: LearnedLayerMap | None = None
        self.projectors = nn.ModuleList()
        proj = _projector_spec(term.projector)
        if isinstance(s_probe, dict) or isinstance(t_probe, dict):
            if proj is not None:
                raise KDForgeError(f"term '{term.label}': projectors apply to single or layer-list taps, not dicts")
            return
        if isinstance(s_probe, list) != isinstance(t_probe, list):
            raise KDForgeError(
                f"term '{term.label}': student tap gives {'a list' if isinstance(s_probe, list) else 'one tensor'} "
                f"but teacher tap gives {'a list' if isinstance(t_probe, list) else 'one tensor'}; "
                "use globs on both sides or single layers on both"
            )
        if isinstance(s_probe, list):
            lm = _layer_map_spec(term.layer_map)
            strategy = lm.pop("strategy")
            if strategy not in (*LAYER_MAP_STRATEGIES, "learned"):
                raise KDForgeError(f"term '{term.label}': unknown layer_map strategy {strategy!r}; valid: "
                                   f"{', '.join(s for s in LAYER_MAP_STRATEGIES if s != 'explicit')}, learned, "
                                   "or explicit [[student, teacher], ...] pairs")
            embeddings = bool(lm.pop("embeddings", False))
            # the first block's index in each captured list (1 for a hidden-states tuple, whose entry 0 is the
            # embedding output): layer maps count blocks, so every tap form names the same blocks
            self.offsets = (_embedding_offset(term.student), _embedding_offset(term.teacher))
            if embeddings and (self.offsets != (1, 1) or strategy == "learned"):
                raise KDForgeError(f"term '{term.label}': layer_map embeddings: true pairs the embedding outputs of "
                                   "`hidden_states` taps; tap hidden_states on both sides, with a fixed strategy")
            n_s, n_t = len(s_probe) - self.offsets[0], len(t_probe) - self.offsets[1]
            follows_source = (term.layer_map is None and source_layers is not None and len(source_layers) == n_s
                              and max(source_layers) < n_t)
            if follows_source:
                self.block_pairs = list(enumerate(source_layers))
                log.info("term %s: the student's blocks were copied from teacher blocks %s; each learns from its "
                         "source (set layer_map to choose otherwise)", term.label, source_layers)
            elif strategy == "learned":
                self.learned = LearnedLayerMap(n_s, n_t, t_probe[-1].shape[-1], **lm)
                self.block_pairs = [(i, i) for i in range(n_s)]  # student block i vs its learned teacher mix i
            else:
                try:
                    self.block_pairs = build_layer_map(strategy, n_s, n_t, **lm)
                except ValueError as err:
                    raise KDForgeError(f"term '{term.label}': {err}") from None
            log.info("term %s: %s%s", term.label, "embedding outputs, " if embeddings else "",
                     self.learned.describe() if self.learned else format_layer_map(self.block_pairs))
            # indices into the captured lists (a learned map's teacher side is its list of mixes, one per block)
            t_offset = 0 if self.learned else self.offsets[1]
            self.pairs = [(0, 0)] * embeddings + [(i + self.offsets[0], j + t_offset) for i, j in self.block_pairs]
            shapes = [(s_probe[i], t_probe[-1] if self.learned else t_probe[j]) for i, j in self.pairs]
        else:
            shapes = [(s_probe, t_probe)]
        if proj is not None:
            for s, t in shapes:
                self.projectors.append(self._build_projector(proj, s, t, seq_len))

    def _build_projector(self, spec: dict[str, Any], s: Tensor, t: Tensor, seq_len: int) -> nn.Module:
        kind = spec.pop("kind") if "kind" in spec else "linear"
        extra = dict(spec)
        if kind == "fam":
            extra.setdefault("height", t.shape[-2])
            extra.setdefault("width", t.shape[-1])
        if kind == "fam_seq":
            extra.setdefault("max_len", seq_len)
        in_dim, out_dim = (s.shape[1], t.shape[1]) if s.dim() == 4 else (s.shape[-1], t.shape[-1])
        try:
            module = build_projector(kind, in_dim, out_dim, **extra)
        except (TypeError, ValueError) as err:
            raise KDForgeError(f"term '{self.term.label}': {err}") from None
        spec["kind"] = kind
        return module

    def forward(self, s_value: Captured, t_value: Captured, mask: Tensor | None) -> Tensor:
        if self.pairs is None:
            s_value = self.projectors[0](s_value) if len(self.projectors) else s_value
            return self._loss(s_value, t_value, mask)
        teacher_side = self.learned(t_value[self.offsets[1]:]) if self.learned is not None else t_value
        total = 0.0
        for n, (i, j) in enumerate(self.pairs):
            s = self.projectors[n](s_value[i]) if len(self.projectors) else s_value[i]
            total = total + self._loss(s, teacher_side[j], mask)
        return total / len(self.pairs)

    def _fit_spatial(self, s, t):
        """An element-wise loss (ELEMENTWISE) on feature maps [B, C, H, W] of different spatial sizes: the student's
        map is resized to the teacher's H x W -- adaptive average pooling when it is an integer multiple of it in both
        sides, bilinear interpolation otherwise -- and the mode is logged once per term. Other losses decide for
        themselves (attention_transfer refuses, naming both sizes, unless resize=True)."""
        if not (self.fn in ELEMENTWISE and isinstance(s, Tensor) and isinstance(t, Tensor) and s.dim() == 4
                and t.dim() == 4 and s.shape[-2:] != t.shape[-2:]):
            return s
        (hs, ws), (ht, wt) = s.shape[-2:], t.shape[-2:]
        pool = hs % ht == 0 and ws % wt == 0
        if not self.resize_logged:
            log.info("term %s: the student's %dx%d feature map is resized to the teacher's %dx%d by %s before the "
                     "loss", self.term.label, hs, ws, ht, wt,
                     "adaptive average pooling" if pool else "bilinear interpolation")
            self.resize_logged = True
        if pool:
            return F.adaptive_avg_pool2d(s, (ht, wt))
        return F.interpolate(s, size=(ht, wt), mode="bilinear", align_corners=False)

    def _loss(self, s, t, mask: Tensor | None) -> Tensor:
        s = self._fit_spatial(s, t)
        kwargs = dict(self.kwargs)
        if self.takes_mask and mask is not None and _token_shaped(s, mask):
            kwargs["mask"] = mask
        return self.fn(s, t, **kwargs)


def _elementwise() -> set[Callable]:
    from .losses import features

    return {features.hidden_mse, features.hidden_cosine, features.fitnets_hint, features.pkd_patient}


#: Feature losses that compare the two tensors element by element (so feature maps must share H x W).
ELEMENTWISE = _elementwise()


def _token_shaped(x, mask: Tensor) -> bool:
    if isinstance(x, dict):
        x = next(iter(x.values()))
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] != mask.shape[0]:
        return False
    t = mask.shape[1]
    return x.shape[1] == t or (x.dim() == 4 and x.shape[-1] == x.shape[-2] == t)  # [B,T,...] or [B,H,T,T]
