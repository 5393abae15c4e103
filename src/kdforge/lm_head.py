"""What a causal LM does to ``lm_head(last hidden state)`` before returning its logits.

Most causal LMs return ``logits = lm_head(h)``. Some transform them first, and a loss computed from ``h`` and the
head weight (the chunked logit losses, Block-KD's stepping stones) must apply the same transform or it trains a
different objective:

- soft-capping, ``cap · tanh(z / cap)``: Gemma 2/3/4 and others, config ``final_logit_softcapping``;
- a constant scale: Cohere (``z · logit_scale``), Granite (``z / logits_scaling``), HyperCLOVA X
  (``z · logits_scaling``).

:func:`logit_transform` reads the transform from the model's config; :func:`check_logit_transform` verifies it on the
model itself at a magnitude where a soft-cap shows (logits of a fresh model are far below any cap), so a model whose
logits are computed some other way is refused by what it does, not by how small its logits are today.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import KDForgeError

# Config attributes that hold a constant logit scale, and whether the model multiplies or divides by it.
_MULTIPLY = "multiply"
_DIVIDE = "divide"
_SCALE_ATTRIBUTES: dict[str, str] = {"logit_scale": _MULTIPLY, "logits_scaling": _DIVIDE}
_MODEL_TYPES_THAT_MULTIPLY_LOGITS_SCALING = {"hyperclovax"}


@dataclass(frozen=True)
class LogitTransform:
    """``logits = softcap · tanh(scale · z / softcap)`` (no tanh when softcap is None) for ``z = lm_head(h)``."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def chain(self, z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """d(loss)/dz from d(loss)/d(transformed logits) ``grad``, for raw logits ``z`` (in place on grad)."""
        if self.softcap is not None:
            t = torch.tanh(z.to(grad.dtype) * (self.scale / self.softcap))
            grad.mul_(1.0 - t * t)
        if self.scale != 1.0:
            grad.mul_(self.scale)
        return grad


def _config_value(config, name: str):
    value = getattr(config, name, None)
    if value is None and getattr(config, "text_config", None) is not None:
        value = getattr(config.text_config, name, None)
    return value


def logit_transform(model: torch.nn.Module) -> LogitTransform:
    """The transform ``model`` applies to ``lm_head(h)``, read from ``model.config`` (identity without a config)."""
    config = getattr(model, "config", None)
    if config is None:
        return LogitTransform()
    softcap = _config_value(config, "final_logit_softcapping")
    scale = 1.0
    for name, how in _SCALE_ATTRIBUTES.items():
        value = _config_value(config, name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if name == "logits_scaling" and getattr(config, "model_type", "") in _MODEL_TYPES_THAT_MULTIPLY_LOGITS_SCALING:
            how = _MULTIPLY
        scale *= float(value) if how == _MULTIPLY else 1.0 / float(value)
    return LogitTransform(scale, float(softcap) if softcap else None)


def head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``model``'s logits for its final hidden states ``[..., D]`` (after the final norm): transform(lm_head(h))."""
    return logit_transform(model)(model.get_output_embeddings()(hidden))


@torch.no_grad()
def check_logit_transform(model: torch.nn.Module, base: torch.nn.Module, head: torch.nn.Module,
                          length: int = 8) -> LogitTransform:
    """Verify that ``model(ids).logits == transform(head(base(ids).last_hidden_state))``; return the transform.

    Checked twice: as the model is, and with the last hidden state amplified (a forward hook on ``base``) until the
    raw logits reach ~1000, where a soft-cap or any other saturating transform cannot hide.

    Both sides run the same head in the weight's dtype, so they agree to float32 rounding (rtol 1e-3); a bf16 or
    fp16 head is compared at that dtype's resolution instead (rtol 2⁻⁶, about two units of bf16's last place), which
    still refuses a soft-cap or scale the transform misses by orders of magnitude more.

    Raises KDForgeError naming the model when its logits are computed some other way.
    """
    transform = logit_transform(model)
    device = head.weight.device
    low = head.weight.dtype in (torch.bfloat16, torch.float16)
    rtol, atol = (2.0**-6, 2.0**-6) if low else (1e-3, 1e-4)
    ids = torch.arange(length, device=device).remainder(head.weight.shape[0]).unsqueeze(0)
    was_training = model.training
    model.eval()
    gain = {"factor": 1.0}

    def amplify(_module, _args, output):
        output.last_hidden_state = output.last_hidden_state * gain["factor"]
        return output

    try:
        raw = head(base(input_ids=ids, use_cache=False).last_hidden_state).float()
        handle = base.register_forward_hook(amplify)
        try:
            for factor in (1.0, 1000.0 / max(float(raw.abs().max()), 1e-6)):
                gain["factor"] = factor
                full = model(input_ids=ids, use_cache=False).logits.float()
                mine = transform(head(base(input_ids=ids, use_cache=False).last_hidden_state).float())
                scale = float(mine.abs().max()) + 1e-6
                if full.shape != mine.shape or not torch.allclose(full, mine, rtol=rtol, atol=atol * scale):
                    raise KDForgeError(
                        f"train.logit_chunk_size: {type(model).__name__} does not compute its logits as "
                        f"{_describe(transform)}; kdforge knows soft-capping (final_logit_softcapping) and logit "
                        "scales (logit_scale, logits_scaling): set logit_chunk_size to null for this model")
        finally:
            handle.remove()
    finally:
        model.train(was_training)
    return transform


def _describe(transform: LogitTransform) -> str:
    text = "lm_head(last hidden state)"
    if transform.scale != 1.0:
        text = f"{transform.scale:g} · {text}"
    if transform.softcap is not None:
        text = f"{transform.softcap:g} · tanh({text} / {transform.softcap:g})"
    return text
