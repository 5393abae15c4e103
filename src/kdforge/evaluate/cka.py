"""Representation diagnostics: linear CKA between every student layer and every teacher layer on held-out text.

Hidden states come from `output_hidden_states=True` (index 0 is the embedding output, index i the output of block i).
Each valid token is one example, so a layer is an [N, D] matrix; widths may differ between the models.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from ..data.packing import TokenBlocks
from ..io import atomic_write_json

try:  # the shared feature-loss implementation, when present
    from ..losses.features import linear_cka
except ImportError:  # pragma: no cover - same definition, through cka_matrix below
    def linear_cka(x: torch.Tensor, y: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            x, y = x[mask], y[mask]
        return cka_matrix([x.reshape(-1, x.shape[-1])], [y.reshape(-1, y.shape[-1])])[0, 0]


@torch.no_grad()
def hidden_states(model: nn.Module, blocks: TokenBlocks, max_tokens: int = 1024, batch_size: int = 8,
                  bf16: bool = False) -> list[torch.Tensor]:
    """Per layer, the [N, D] float32 hidden states of the first blocks covering up to `max_tokens` tokens."""
    n_blocks = max(1, min(len(blocks.ids), max_tokens // blocks.ids.shape[1]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    layers: list[list[torch.Tensor]] = []
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    try:
        for start in range(0, n_blocks, batch_size):
            ids = blocks.ids[start : min(start + batch_size, n_blocks)].to(device)
            with ctx():
                out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
            if not layers:
                layers = [[] for _ in out.hidden_states]
            for acc, h in zip(layers, out.hidden_states):
                acc.append(h.float().reshape(-1, h.shape[-1]).cpu())
    finally:
        model.train(was_training)
    return [torch.cat(chunks) for chunks in layers]


def cka_matrix(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor]) -> torch.Tensor:
    """[student layers, teacher layers] linear CKA, in the feature-space Gram form.

    Each layer is centred and its self-similarity ||Xc^T Xc||_F computed once, so the S x T table costs S*T cross
    products rather than 3*S*T; `linear_cka` above computes the same number for one pair.
    """
    def centred(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        return x - x.mean(0, keepdim=True)

    s = [centred(x) for x in student_states]
    t = [centred(y) for y in teacher_states]
    if {x.shape[0] for x in s + t} != {s[0].shape[0]}:
        raise ValueError("CKA needs the same tokens for both models (different row counts given)")
    s_norm = [torch.linalg.matrix_norm(x.T @ x) for x in s]
    t_norm = [torch.linalg.matrix_norm(y.T @ y) for y in t]
    out = torch.zeros(len(s), len(t), dtype=torch.float64)
    for i, x in enumerate(s):
        for j, y in enumerate(t):
            out[i, j] = (y.T @ x).pow(2).sum() / (s_norm[i] * t_norm[j]).clamp_min(1e-12)
    return out.float()


def layer_cka(student: nn.Module, teacher: nn.Module, blocks: TokenBlocks, max_tokens: int = 1024,
              batch_size: int = 8, teacher_bf16: bool = False) -> torch.Tensor:
    """CKA of every student hidden state against every teacher hidden state on the same held-out tokens."""
    s = hidden_states(student, blocks, max_tokens, batch_size)
    t = hidden_states(teacher, blocks, max_tokens, batch_size, bf16=teacher_bf16)
    return cka_matrix(s, t)


def layer_labels(n: int) -> list[str]:
    return ["emb"] + [str(i) for i in range(1, n)]


def write_cka(matrix: torch.Tensor, out_dir: str | Path, title: str = "linear CKA, student vs teacher",
              stem: str = "cka") -> dict:
    """Write `<stem>.json` (matrix and labels) and `<stem>.png` (heatmap) into out_dir; return the JSON object."""
    from ..report.plots import plot_cka_heatmap

    out_dir = Path(out_dir)
    data = {
        "matrix": [[round(float(v), 6) for v in row] for row in matrix],
        "student_layers": layer_labels(matrix.shape[0]),
        "teacher_layers": layer_labels(matrix.shape[1]),
        "definition": "linear CKA (Kornblith et al., 2019) over held-out tokens; rows: student hidden states, "
                      "columns: teacher hidden states; index emb = embedding output, i = output of block i",
        "png": f"{stem}.png",
    }
    atomic_write_json(out_dir / f"{stem}.json", data)
    plot_cka_heatmap(data, out_dir / f"{stem}.png", title=title)
    return data


def read_cka(path: str | Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None
