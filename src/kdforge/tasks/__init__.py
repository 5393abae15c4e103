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


def evaluate_target(target, *, corpus: str | None = None, teacher: str | None = None, out_dir=None,
                    **lm_options) -> dict:
    """`kdforge eval TARGET`: a run directory is evaluated by its recipe's task (`Task.run_eval`); a bare student
    folder by the task its files name (an image-classification CNN folder, else a causal LM). `lm_options` go to
    kdforge.evaluate.suite.run_eval, the causal-LM evaluation (spec, seq_len, max_tokens, baseline, lm_eval_*).
    Raises KDForgeError (one line) for a missing target or an unfinished run."""
    import json
    from pathlib import Path

    from ..recipe import parse_recipe

    target = Path(target)
    out = Path(out_dir) if out_dir is not None else None
    if (target / "manifest.json").is_file():
        recipe = parse_recipe(json.loads((target / "manifest.json").read_text())["recipe"])
        if recipe.task != "causal_lm":
            return task_for(recipe).run_eval(target, recipe, out_dir=out)
    else:
        from .image_classification import ImageClassification, folder_recipe, is_cnn_folder

        folder = target / "student" if (target / "student" / "config.json").is_file() else target
        if is_cnn_folder(folder):
            return ImageClassification().evaluate_folder(folder, folder_recipe(folder, corpus=corpus, teacher=teacher),
                                                         out_dir=out)
    from ..evaluate.suite import run_eval

    return run_eval(target, corpus=corpus, teacher=teacher, out_dir=out, **lm_options)
