"""Frequency attention projectors (FAM-KD, Pham et al., WACV 2024).

FAM-KD puts a *frequency attention module* in front of the student's feature:
a learnable filter in the Fourier domain lets the projector reshape the
student's feature globally (every frequency depends on every position), a
high-pass removes the lowest frequencies so the filter focuses on detail, and
a 1x1 conv keeps a local path. The two paths are mixed by learnable scalars.

``FrequencyAttention`` is the paper's module for feature maps ``[B, C, H, W]``.
``SequenceFrequencyAttention`` is kdforge's own extension to token features
``[B, T, D]`` (FFT along the token axis); it is **not** in the paper.

Learnable complex weights are stored as real tensors with a trailing ``2``
(real, imaginary) so ``module.to(torch.bfloat16)`` and optimizers treat them
like any other parameter; FFT maths always runs in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FrequencyAttention", "SequenceFrequencyAttention", "highpass_mask_2d", "highpass_mask_1d"]


def _check_cutoff(cutoff: float) -> None:
    if not 0.0 <= cutoff < 1.0:
        raise ValueError(f"cutoff must be in [0, 1), got {cutoff}")


def highpass_mask_2d(height: int, width: int, cutoff: float) -> Tensor:
    """Bool ``[H, W // 2 + 1]`` for an ``rfft2`` spectrum: False on the low band.

    Like the paper, the band half-width is ``int(cutoff * (n // 2))`` frequency
    steps per axis (cutoff 0.1 -> the lowest 10 % of each half-spectrum). The
    band is symmetric in the signed vertical frequency and always contains DC,
    so a constant map never passes -- the reference code's band can be empty
    for small maps (e.g. 8 x 8), which we consider a bug for a "high-pass".
    """
    _check_cutoff(cutoff)
    rh = int(cutoff * (height // 2))
    rw = int(cutoff * (width // 2))
    ky = (torch.fft.fftfreq(height) * height).round().abs()  # signed ints -> |k|
    kx = torch.arange(width // 2 + 1, dtype=ky.dtype)
    low = (ky[:, None] <= rh) & (kx[None, :] <= rw)
    return ~low


def highpass_mask_1d(length: int, cutoff: float) -> Tensor:
    """Bool ``[T // 2 + 1]`` for an ``rfft`` spectrum: False on bins ``k <= int(cutoff * (T // 2))``."""
    _check_cutoff(cutoff)
    r = int(cutoff * (length // 2))
    return torch.arange(length // 2 + 1) > r


class FrequencyAttention(nn.Module):
    """FAM for feature maps ``[B, in_ch, H, W] -> [B, out_ch, H, W]``.

    Global branch, as in the paper: ``rfft2`` (orthonormal) of the input, a
    learnable complex weight per (in channel, out channel, frequency) that both
    filters and mixes channels, zero the low-frequency band (``cutoff``),
    ``irfft2`` back. Local branch: 1x1 conv. Output
    ``rate_global * global + rate_local * local`` with both learnable scalars
    initialised to 0.5 (the authors' implementation; the paper describes the
    sum of the two branches). The filter is initialised uniformly in
    ``[0, 1/(in*out))`` for real and imaginary parts, as the authors do.
    We use the real FFT (half spectrum) where the authors take a full FFT and
    keep the real part of the inverse: the same family of real outputs with
    half the filter parameters.

    The filter is tied to ``(height, width)``; other sizes raise (resize the
    feature first).
    """

    def __init__(self, in_ch: int, out_ch: int, height: int, width: int, cutoff: float = 0.1) -> None:
        super().__init__()
        for name, v in (("in_ch", in_ch), ("out_ch", out_ch), ("height", height), ("width", width)):
            if int(v) < 1:
                raise ValueError(f"FrequencyAttention: {name} must be >= 1, got {v}")
        self.in_ch, self.out_ch, self.height, self.width, self.cutoff = in_ch, out_ch, height, width, cutoff
        scale = 1.0 / (in_ch * out_ch)
        self.global_filter = nn.Parameter(scale * torch.rand(in_ch, out_ch, height, width // 2 + 1, 2))
        self.register_buffer("highpass", highpass_mask_2d(height, width, cutoff), persistent=False)
        self.local = nn.Conv2d(in_ch, out_ch, kernel_size=1)
        self.rate_global = nn.Parameter(torch.tensor(0.5))
        self.rate_local = nn.Parameter(torch.tensor(0.5))

    def global_branch(self, x: Tensor) -> Tensor:
        """Filtered, high-passed, channel-mixed ``x`` (float32)."""
        spec = torch.fft.rfft2(x.float(), norm="ortho")  # [B, in, H, W//2+1]
        weight = torch.view_as_complex(self.global_filter.float().contiguous())
        spec = torch.einsum("bixy,ioxy->boxy", spec, weight)
        spec = spec * self.highpass.to(spec.device)
        return torch.fft.irfft2(spec, s=(self.height, self.width), norm="ortho")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_ch or tuple(x.shape[-2:]) != (self.height, self.width):
            raise ValueError(
                f"FrequencyAttention expects [B, {self.in_ch}, {self.height}, {self.width}], got {tuple(x.shape)}; "
                "its filter is tied to the spatial size it was built for"
            )
        local = self.local(x).float()
        return self.rate_global * self.global_branch(x) + self.rate_local * local

    def extra_repr(self) -> str:
        return f"in_ch={self.in_ch}, out_ch={self.out_ch}, size=({self.height}, {self.width}), cutoff={self.cutoff}"


class SequenceFrequencyAttention(nn.Module):
    """kdforge's token-axis FAM for hidden states ``[..., T, in_dim] -> [..., T, out_dim]``.

    Not in the paper: the same idea applied along the sequence. Global branch:
    ``rfft`` over T, a learnable complex filter per (frequency, input channel),
    zero bins ``k <= int(cutoff * (T // 2))`` (always including DC), ``irfft``
    to length T, then a bias-free linear ``in_dim -> out_dim``. The paper's
    per-frequency channel mixing would cost ``F * in * out`` complex weights
    (billions for LLM widths); a diagonal filter followed by one shared mixing
    matrix keeps it ``F * in + in * out``. Local branch: ``nn.Linear``. Mixed by
    learnable scalars initialised to 0.5, like :class:`FrequencyAttention`.
    The filter starts all-pass (1 + 0j).

    The filter is defined on the ``max_len // 2 + 1`` frequencies of a length
    ``max_len`` sequence. A shorter sequence uses the filter linearly
    interpolated at its own normalised frequencies ``k / T``, so a given
    weight always means the same cycles-per-token; longer sequences raise.

    Causality: the FFT mixes *future* tokens into each position of the
    projected student feature. That is harmless for a training-only projector
    (it is dropped from the exported student, whose own forward stays causal)
    but do not reuse this module inside a model that must generate.
    Pass ``mask`` to zero padded tokens before the FFT so they do not leak in.
    """

    def __init__(self, in_dim: int, out_dim: int, max_len: int, cutoff: float = 0.1) -> None:
        super().__init__()
        for name, v in (("in_dim", in_dim), ("out_dim", out_dim), ("max_len", max_len)):
            if int(v) < 1:
                raise ValueError(f"SequenceFrequencyAttention: {name} must be >= 1, got {v}")
        _check_cutoff(cutoff)
        self.in_dim, self.out_dim, self.max_len, self.cutoff = in_dim, out_dim, max_len, cutoff
        filt = torch.zeros(max_len // 2 + 1, in_dim, 2)
        filt[..., 0] = 1.0
        self.global_filter = nn.Parameter(filt)
        self.mix = nn.Linear(in_dim, out_dim, bias=False)
        self.local = nn.Linear(in_dim, out_dim)
        self.rate_global = nn.Parameter(torch.tensor(0.5))
        self.rate_local = nn.Parameter(torch.tensor(0.5))

    def filter_for(self, length: int) -> Tensor:
        """Complex filter ``[length // 2 + 1, in_dim]`` for a sequence of ``length`` tokens."""
        filt = self.global_filter.float()
        if length == self.max_len:
            return torch.view_as_complex(filt.contiguous())
        n_bins = filt.shape[0]
        pos = torch.arange(length // 2 + 1, device=filt.device, dtype=torch.float32) * (self.max_len / length)
        pos = pos.clamp(max=n_bins - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=n_bins - 1)
        w = (pos - lo.float())[:, None, None]
        return torch.view_as_complex(((1 - w) * filt[lo] + w * filt[hi]).contiguous())

    def global_branch(self, x: Tensor) -> Tensor:
        t = x.shape[-2]
        spec = torch.fft.rfft(x.float(), dim=-2, norm="ortho")  # [..., T//2+1, in]
        spec = spec * self.filter_for(t)
        spec = spec * highpass_mask_1d(t, self.cutoff).to(spec.device)[:, None]
        y = torch.fft.irfft(spec, n=t, dim=-2, norm="ortho")
        return y @ self.mix.weight.float().T

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if x.dim() < 2 or x.shape[-1] != self.in_dim:
            raise ValueError(f"SequenceFrequencyAttention expects [..., T, {self.in_dim}], got {tuple(x.shape)}")
        t = x.shape[-2]
        if t > self.max_len:
            raise ValueError(
                f"SequenceFrequencyAttention: sequence length {t} exceeds max_len={self.max_len}; "
                "build the projector with a larger max_len"
            )
        if mask is not None:
            if mask.shape != x.shape[:-1]:
                raise ValueError(f"SequenceFrequencyAttention: mask {tuple(mask.shape)} does not match {tuple(x.shape[:-1])}")
            x = x.masked_fill(~mask.bool().unsqueeze(-1), 0.0)
        local = self.local(x).float()
        return self.rate_global * self.global_branch(x) + self.rate_local * local

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, max_len={self.max_len}, cutoff={self.cutoff}"
