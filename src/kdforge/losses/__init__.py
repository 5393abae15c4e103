"""Distillation losses as pure functions, importable under their registry names.

``from kdforge.losses import forward_kl, tinybert_attention, block_kd`` gives the
function that a recipe's ``loss: <name>`` uses (``kdforge.losses.registry``);
the implementations live in the submodules ``logits``, ``features``,
``attention``, ``relations``, ``cam``, ``chunked``, ``sparse``, ``policy`` (MiniLLM) and ``stepping``
(Block-KD's objective; its stepping stones are built in
``kdforge.teachers.stepping_stones``, a layer above).

The names are resolved lazily (PEP 562), so ``import kdforge.losses`` loads no
loss module until a name is asked for. An unknown name raises
``AttributeError`` (so ``from kdforge.losses import chunked`` still finds the
submodule).
"""

from __future__ import annotations

from typing import Any

#: Every registered loss name (``registry.all_loss_names()``); a test keeps the two in step.
__all__ = [
    "attention_transfer",
    "binary_kd",
    "block_kd",
    "cat_kd",
    "cka",
    "classwise_cam_kd",
    "contrastive",
    "correlation_aware_kd",
    "cross_entropy",
    "decoupled_kd",
    "distilbert_cosine",
    "fitnets_hint",
    "forward_kl",
    "generalized_jsd",
    "hidden_cosine",
    "hidden_mse",
    "logit_mse",
    "minilm_relations",
    "minilm_v1",
    "minillm_policy",
    "pkd_patient",
    "reverse_kl",
    "rkd",
    "rkd_angle",
    "rkd_distance",
    "similarity_preserving",
    "skew_forward_kl",
    "skew_reverse_kl",
    "span_kl",
    "tinybert_attention",
    "total_variation",
    "uld",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from .registry import lookup

        fn = lookup(name)[1]
        globals()[name] = fn  # later look-ups skip this function
        return fn
    raise AttributeError(f"module 'kdforge.losses' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
