"""Feature terms: student tap(s) -> layer map -> projector(s) -> feature loss against the teacher's tap(s).

A term's `student:` / `teacher:` fields are tap specs (see kdforge.taps). What they capture decides the shape of the
term:
  - one tensor each: one pair, optionally through a projector;
  - a list each (a glob such as `model.layers.*`, or `hidden_states`): a layer map picks (student, teacher) pairs and
    the loss is averaged over pairs, with one projector per pair; `layer_map: learned` instead mixes all teacher layers
    per student layer with learned weights (Align-to-Distill style);
  - a dict of specs each (e.g. MiniLM's `{q: ..., k: ..., v: ...}`): handed to the loss as dicts.
Projector input/output sizes come from one probe forward at construction, so the optimizer sees every parameter.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .align.layer_maps import LearnedLayerMap, build_layer_map, format_layer_map
from .align.projectors import build_projector
from .errors import KDForgeError
from .recipe import Term

log = logging.getLogger("kdforge")

Captured = Tensor | list[Tensor] | dict[str, Any]


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
                 seq_len: int):
        super().__init__()
        self.term, self.fn, self.kwargs = term, fn, kwargs
        self.takes_mask = "mask" in inspect.signature(fn).parameters
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
            if strategy == "learned":
                self.learned = LearnedLayerMap(len(s_probe), len(t_probe), t_probe[0].shape[-1], **lm)
                pairs = [(i, i) for i in range(len(s_probe))]  # student i vs its learned teacher mix i
            else:
                try:
                    pairs = build_layer_map(strategy, len(s_probe), len(t_probe), **lm)
                except ValueError as err:
                    raise KDForgeError(f"term '{term.label}': {err}") from None
            self.pairs = pairs
            log.info("term %s: %s", term.label, self.learned.describe() if self.learned else format_layer_map(pairs))
            shapes = [(s_probe[i], t_probe[j] if not self.learned else t_probe[0]) for i, j in pairs]
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
        teacher_side = self.learned(t_value) if self.learned is not None else t_value
        total = 0.0
        for n, (i, j) in enumerate(self.pairs):
            s = self.projectors[n](s_value[i]) if len(self.projectors) else s_value[i]
            total = total + self._loss(s, teacher_side[j], mask)
        return total / len(self.pairs)

    def _loss(self, s, t, mask: Tensor | None) -> Tensor:
        kwargs = dict(self.kwargs)
        if self.takes_mask and mask is not None and _token_shaped(s, mask):
            kwargs["mask"] = mask
        return self.fn(s, t, **kwargs)


def _token_shaped(x, mask: Tensor) -> bool:
    if isinstance(x, dict):
        x = next(iter(x.values()))
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] != mask.shape[0]:
        return False
    t = mask.shape[1]
    return x.shape[1] == t or (x.dim() == 4 and x.shape[-1] == x.shape[-2] == t)  # [B,T,...] or [B,H,T,T]
