"""Tasks: what differs between distilling a causal LM, an image classifier, ... (kdforge.tasks.base.Task).

`task_for(recipe)` gives the task a recipe's `task:` names; each lives in its own module and is imported only when
used (image_classification needs scikit-learn for its digits).
"""
from __future__ import annotations

from importlib import import_module

from ..errors import KDForgeError
from ..recipe import TASKS

_CLASSES = {"causal_lm": ("causal_lm", "CausalLM"), "image_classification": ("image_classification",
                                                                            "ImageClassification"),
            "multi_label_classification": ("multi_label_classification", "MultiLabelClassification"),
            "object_detection": ("object_detection", "ObjectDetection")}

_CLASSES.update({"sequence_classification": ("sequence_classification", "SequenceClassification"),
                 "sentence_embedding": ("sentence_embedding", "SentenceEmbedding")})


def get_task(name: str):
    """The task object of `name` (one of kdforge.recipe.TASKS). Raises KDForgeError for any other name."""
    if name not in _CLASSES:
        raise KDForgeError(f"task {name!r} is not available; the implemented tasks are {', '.join(TASKS)}")
    module, cls = _CLASSES[name]
    return getattr(import_module(f".{module}", __name__), cls)()


def task_for(recipe):
    """The task of a recipe (its `task:`, default causal_lm)."""
    return get_task(recipe.task)
