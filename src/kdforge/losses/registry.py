"""Stable loss names -> functions, grouped by what the function compares. Recipes use these names."""
from __future__ import annotations

import inspect
from typing import Callable

from ..errors import KDForgeError
from .stepping import block_kd
from . import cross_tokenizer
from . import attention, cam, features, logits, relations
from . import policy

# cross_entropy(student_logits, labels, *, mask): the ground-truth term.
LABEL_LOSSES: dict[str, Callable] = {"cross_entropy": logits.cross_entropy}
# fn(student_logits, teacher_logits, *, mask, temperature, ...): logit distillation.
# minillm_policy: MiniLLM's policy gradient on responses the student sampled (labels = the sampled tokens;
# kdforge.onpolicy makes such batches).
LOGIT_LOSSES: dict[str, Callable] = {**logits.LOGIT_LOSSES, "binary_kd": cam.binary_kd,
                                     "minillm_policy": policy.minillm_policy}
# fn(student_tensor, teacher_tensor, *, mask, ...): tensors captured by taps.
FEATURE_LOSSES: dict[str, Callable] = {
    "hidden_mse": features.hidden_mse,
    "hidden_cosine": features.hidden_cosine,
    "distilbert_cosine": features.distilbert_cosine,
    "fitnets_hint": features.fitnets_hint,
    "pkd_patient": features.pkd_patient,
    "cka": features.cka_loss,
    "tinybert_attention": attention.tinybert_attention_mse,
    "minilm_relations": attention.minilm_loss,
    "minilm_v1": attention.minilm_v1_dict_loss,
    "attention_transfer": attention.attention_transfer,
    "rkd": relations.rkd_loss,
    "rkd_distance": relations.rkd_distance,
    "rkd_angle": relations.rkd_angle,
    "similarity_preserving": relations.similarity_preserving,
    "contrastive": relations.contrastive_representation,
    "cat_kd": cam.cat_kd,
    "classwise_cam_kd": cam.classwise_cam_kd,
}

# fn(stone_logits, teacher_logits, stone_weights, *, mask, ...): stepping-stone models built from student blocks, a
# connector and the teacher's remaining blocks (Block-KD, kdforge.teachers.stepping_stones).
STEPPING_STONE_LOSSES: dict[str, Callable] = {"block_kd": block_kd}

# fn(student_logits, teacher_logits, *, mask, ...) at positions paired across two tokenizers (student.tokenizer;
# kdforge.cross_tokenizer pairs them): Universal Logit Distillation and the span-aligned KL.
CROSS_TOKENIZER_LOSSES: dict[str, Callable] = dict(cross_tokenizer.CROSS_TOKENIZER_LOSSES)


def all_loss_names() -> list[str]:
    return sorted({*LABEL_LOSSES, *LOGIT_LOSSES, *FEATURE_LOSSES, *STEPPING_STONE_LOSSES, *CROSS_TOKENIZER_LOSSES})


def lookup(name: str) -> tuple[str, Callable]:
    for kind, table in (("label", LABEL_LOSSES), ("logit", LOGIT_LOSSES), ("feature", FEATURE_LOSSES),
                        ("stepping_stone", STEPPING_STONE_LOSSES), ("cross_tokenizer", CROSS_TOKENIZER_LOSSES)):
        if name in table:
            return kind, table[name]
    raise KDForgeError(f"unknown loss '{name}'; valid losses: {', '.join(all_loss_names())}")


def keyword_arguments(fn: Callable) -> list[str]:
    """Keyword arguments a recipe may set for this loss (tensor inputs and mask are supplied by kdforge)."""
    skip = {"mask", "labels", "reduction", "return_parts"}
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.name not in skip]


def check_arguments(name: str, fn: Callable, given: dict) -> None:
    valid = keyword_arguments(fn)
    for key in given:
        if key not in valid:
            raise KDForgeError(
                f"loss '{name}' has no argument '{key}'; valid: {', '.join(valid) or '(none)'}"
            )
