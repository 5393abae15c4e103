"""Checks that a run's models and data fit together, made before the first step so a mistake costs seconds.

- data.seq_len must fit every model's position range: past it, Llama-style rotary models run silently on positions
  they never trained on, and GPT-2 dies with an index error deep in its forward.
- A pretrained student with its own tokenizer must share the teacher's: kdforge tokenizes with the teacher's and
  exports the student with it, so a student whose ids mean other tokens would learn (and ship) a scrambled vocabulary
  even when both vocabularies have the same size.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .errors import KDForgeError

# Config fields that hold a model's largest position, by architecture family.
_MAX_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence ``model``'s config allows, or None when it states none."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for field in _MAX_POSITION_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_seq_len(seq_len: int, models: dict[str, nn.Module | None]) -> None:
    """Refuse a block length longer than a model's maximum positions, naming both numbers."""
    for role, model in models.items():
        limit = None if model is None else max_positions(model)
        if limit is not None and seq_len > limit:
            raise KDForgeError(f"data.seq_len={seq_len} is longer than the {role}'s maximum of {limit} positions "
                               f"({type(model).__name__}); set data.seq_len to at most {limit}")


def check_student_tokenizer(student_model: str | None, teacher_tokenizer, *, role: str = "student.model",
                            fix: str = "use a student with the teacher's tokenizer (or a fresh student: student.init "
                                       "config)") -> None:
    """Refuse a pretrained student whose own tokenizer differs from the teacher's (ids, or special tokens); `role`
    names the model in the message (e.g. a fold teacher of teacher.crossfit.models) and `fix` says what to do."""
    if not student_model or teacher_tokenizer is None:
        return
    from .models import load_tokenizer
    from .recipe import ModelSpec

    folder = Path(student_model).expanduser()
    if folder.is_dir() and not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json",
                                                                       "vocab.json", "tokenizer.model")):
        return  # weights only: it will use the teacher's tokenizer
    try:
        student_tokenizer = load_tokenizer(ModelSpec(model=student_model))
    except KDForgeError:
        return  # no tokenizer of its own
    ours, theirs = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    who = "student" if role == "student.model" else role
    if ours == theirs and teacher_tokenizer.all_special_tokens == student_tokenizer.all_special_tokens:
        return
    if ours == theirs:
        why = (f"special tokens differ (teacher {teacher_tokenizer.all_special_tokens}, "
               f"{who} {student_tokenizer.all_special_tokens})")
    else:
        by_id = {i: t for t, i in theirs.items()}
        diff = next((f"id {i} is {t!r} for the teacher but {by_id.get(i)!r} for the {who}"
                     for t, i in sorted(ours.items(), key=lambda x: x[1]) if by_id.get(i) != t),
                    f"the {who}'s has {len(theirs)} entries, the teacher's {len(ours)}")
        why = f"{len(ours)} vs {len(theirs)} entries; {diff}"
    raise KDForgeError(f"{role} '{student_model}' has its own tokenizer, which differs from the teacher's "
                       f"({why}); kdforge trains on the teacher's token ids, so {fix}")
