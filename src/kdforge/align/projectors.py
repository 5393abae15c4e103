"""Projectors: small trainable maps from the student's feature space to the teacher's.

Feature losses that compare vectors one to one (MSE, cosine, FitNets, CRD)
need equal widths; a projector bridges the gap and is thrown away after
distillation, so it never costs the exported student anything.

``build_projector(kind, in_dim, out_dim, init=...)`` is the single entry point
so recipes can name a projector in config.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal as _orthogonal

from kdforge.align.frequency import FrequencyAttention, SequenceFrequencyAttention

__all__ = ["build_projector", "PROJECTOR_KINDS", "PROJECTOR_INITS"]

PROJECTOR_KINDS = ("identity", "linear", "mlp", "orthogonal", "conv1x1", "fam", "fam_seq")
PROJECTOR_INITS = ("xavier", "kaiming", "zero", "identity")


@torch.no_grad()
def _init_weight_(weight: torch.Tensor, init: str) -> None:
    """Initialise a ``[out, in]`` (or ``[out, in, 1, 1]``) weight in place."""
    w2 = weight.view(weight.shape[0], weight.shape[1])
    if init == "xavier":
        nn.init.xavier_uniform_(w2)
    elif init == "kaiming":
        # a projector is linear, so the gain is 1: std = 1/sqrt(fan_in)
        nn.init.kaiming_normal_(w2, mode="fan_in", nonlinearity="linear")
    elif init == "zero":
        w2.zero_()
    elif init == "identity":
        nn.init.eye_(w2)  # copies the min(in, out) identity block for non-square maps


def _init_linear_(layer: nn.Module, init: str) -> None:
    _init_weight_(layer.weight, init)
    if getattr(layer, "bias", None) is not None:
        with torch.no_grad():
            layer.bias.zero_()


def _build_mlp(in_dim: int, out_dim: int, hidden_dim: int | None, init: str) -> nn.Module:
    if init == "identity":
        raise ValueError("build_projector: init='identity' is undefined for 'mlp' (GELU is not the identity); "
                         "use kind='linear' or init='zero' / 'xavier' / 'kaiming'")
    hidden = hidden_dim or max(in_dim, out_dim)
    first, last = nn.Linear(in_dim, hidden), nn.Linear(hidden, out_dim)
    # zero init zeroes only the last layer: output starts at 0 yet gradients reach both layers
    _init_linear_(first, "xavier" if init == "zero" else init)
    _init_linear_(last, init)
    return nn.Sequential(first, nn.GELU(), last)


def _build_orthogonal(in_dim: int, out_dim: int, init: str) -> nn.Module:
    if init == "zero":
        raise ValueError("build_projector: init='zero' is impossible for 'orthogonal' (a zero matrix is not orthogonal)")
    layer = nn.Linear(in_dim, out_dim, bias=False)
    _init_weight_(layer.weight, init)
    # the parametrization orthogonalises the initial weight (QR); an eye-like start is kept as is
    return _orthogonal(layer)


@torch.no_grad()
def _init_fam_(module: FrequencyAttention | SequenceFrequencyAttention, init: str) -> None:
    """``zero``: output 0. ``identity``: global branch off, local = eye, rate 1 -> output = input.
    ``xavier`` / ``kaiming``: local (and mixing) layers; the global filter keeps its FAM init."""
    _init_linear_(module.local, init)
    if isinstance(module, SequenceFrequencyAttention):
        _init_weight_(module.mix.weight, "zero" if init in ("zero", "identity") else init)
    if init in ("zero", "identity"):
        module.global_filter.zero_()
        module.rate_global.fill_(0.0 if init == "identity" else 0.5)
        module.rate_local.fill_(1.0 if init == "identity" else 0.5)


def build_projector(
    kind: str,
    in_dim: int,
    out_dim: int,
    *,
    init: str = "xavier",
    hidden_dim: int | None = None,
    height: int | None = None,
    width: int | None = None,
    max_len: int | None = None,
    cutoff: float = 0.1,
) -> nn.Module:
    """Build a student->teacher projector.

    kinds:
      * ``identity`` -- no-op, requires ``in_dim == out_dim``;
      * ``linear`` -- ``nn.Linear`` (any leading shape ``[..., D]``);
      * ``mlp`` -- Linear-GELU-Linear, ``hidden_dim`` defaults to ``max(in, out)``;
      * ``orthogonal`` -- bias-free linear kept (semi-)orthogonal by
        ``torch.nn.utils.parametrizations.orthogonal``: an isometry (or its
        restriction) that cannot collapse or inflate the student's geometry;
      * ``conv1x1`` -- 1x1 conv for feature maps ``[B, C, H, W]``;
      * ``fam`` -- :class:`FrequencyAttention`, needs ``height`` and ``width``;
      * ``fam_seq`` -- :class:`SequenceFrequencyAttention`, needs ``max_len``.

    inits: ``xavier`` (default), ``kaiming`` (fan-in, linear gain),
    ``zero`` (output starts at 0), ``identity`` (eye-like weight, the
    min-dim identity block when non-square, so the projector starts by passing
    the student through). Biases start at 0.
    """
    if kind not in PROJECTOR_KINDS:
        raise ValueError(f"build_projector: unknown kind {kind!r}; valid kinds: {', '.join(PROJECTOR_KINDS)}")
    if init not in PROJECTOR_INITS:
        raise ValueError(f"build_projector: unknown init {init!r}; valid inits: {', '.join(PROJECTOR_INITS)}")
    if int(in_dim) < 1 or int(out_dim) < 1:
        raise ValueError(f"build_projector: dims must be >= 1, got in_dim={in_dim}, out_dim={out_dim}")

    if kind == "identity":
        if in_dim != out_dim:
            raise ValueError(
                f"build_projector: kind='identity' needs in_dim == out_dim, got {in_dim} -> {out_dim}; "
                "use 'linear' or 'orthogonal' to change the width"
            )
        return nn.Identity()
    if kind == "linear":
        layer = nn.Linear(in_dim, out_dim)
        _init_linear_(layer, init)
        return layer
    if kind == "mlp":
        return _build_mlp(in_dim, out_dim, hidden_dim, init)
    if kind == "orthogonal":
        return _build_orthogonal(in_dim, out_dim, init)
    if kind == "conv1x1":
        layer = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        _init_linear_(layer, init)
        return layer
    if kind == "fam":
        if height is None or width is None:
            raise ValueError("build_projector: kind='fam' needs height= and width= (the feature map size)")
        module = FrequencyAttention(in_dim, out_dim, height, width, cutoff=cutoff)
    else:  # fam_seq
        if max_len is None:
            raise ValueError("build_projector: kind='fam_seq' needs max_len= (the longest sequence it will see)")
        module = SequenceFrequencyAttention(in_dim, out_dim, max_len, cutoff=cutoff)
    _init_fam_(module, init)
    return module
