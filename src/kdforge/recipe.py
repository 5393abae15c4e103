"""The recipe schema: one YAML file describes one distillation run. Defaults live here and only here."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import KDForgeError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """Where a model comes from: an embedded name (`smollm2-135m`), a local HF folder, a GGUF file, or a hub id."""

    model: str
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Inference precision for a teacher: bfloat16 runs its forward under autocast (about 2.5x faster on CPU)."""


class StudentSpec(_Strict):
    init: Literal["config", "from_teacher", "pretrained"] = "config"
    """config: fresh weights from `config` overrides on the teacher's config; from_teacher: keep the teacher layers in
    `layers` (DistilBERT-style); pretrained: load `model`."""
    model: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    layers: list[int] | None = None
    gradient_checkpointing: bool = False


class DataSpec(_Strict):
    corpus: str = "shakespeare"
    """`shakespeare` (embedded), or a text file / glob / directory, or a .jsonl file."""
    text_field: str = "text"
    validation: list[str] = Field(default_factory=lambda: ["lear", "tempest"])
    """Held-out works (Shakespeare names) or paths/globs to held-out text."""
    seq_len: int = Field(128, ge=8)
    max_train_tokens: int | None = None
    max_eval_tokens: int = 16384


class Term(BaseModel):
    """One objective term. Loss-specific arguments (temperature, beta, ...) sit beside `loss` and are checked against
    the loss function's signature."""

    model_config = ConfigDict(extra="allow")
    loss: str
    weight: float = 1.0
    name: str | None = None
    student: str | dict[str, str] | None = None
    """Tap spec(s) for feature terms: a module path, a glob, an HF output such as `hidden_states`, or a dict of them."""
    teacher: str | dict[str, str] | None = None
    projector: str | dict[str, Any] | None = None
    """Student-side projector: a kind (`linear`, `mlp`, `orthogonal`, `conv1x1`, `fam`, `fam_seq`, `identity`) or a
    dict with `kind`, `init` (`xavier`, `kaiming`, `zero`, `identity`) and kind-specific sizes."""
    layer_map: str | dict[str, Any] | list[list[int]] | None = None
    """For layer-list taps: `uniform` (default), `skip`, `last`, `last_k`, `learned`, a dict with `strategy` and `k`,
    or explicit [[student, teacher], ...] pairs."""
    start_step: int = 0
    end_step: int | None = None
    """The term is active for start_step <= step < end_step (e.g. FitNets stage 1: a hint term with end_step)."""

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def label(self) -> str:
        return self.name or self.loss


class TrainSpec(_Strict):
    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = 1e-3
    projector_lr: float | None = None
    weight_decay: float = 0.01
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    clip_grad_norm: float | None = 1.0
    bf16: bool = False
    """Run the student forward under bf16 autocast."""
    eval_every: int = 0
    save_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    deterministic: bool = True


class Recipe(_Strict):
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs/run"
    teacher: ModelSpec | None = None
    student: StudentSpec = Field(default_factory=StudentSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    objective: list[Term] = Field(default_factory=lambda: [Term(loss="cross_entropy")])
    train: TrainSpec = Field(default_factory=TrainSpec)
    truncate_to_shared_vocab: bool = False
    """Compare logits over the first min(V_teacher, V_student) ids, for vocabularies that differ only by padding."""

    @field_validator("objective")
    @classmethod
    def _non_empty(cls, v: list[Term]) -> list[Term]:
        if not v:
            raise ValueError("objective is empty; add at least one term, e.g. {loss: cross_entropy}")
        return v

    def hash(self) -> str:
        """Hash of everything that changes the result (output_dir excluded)."""
        data = self.model_dump(mode="json", exclude={"output_dir"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


_SECTIONS: dict[str, type[BaseModel]] = {
    "": Recipe, "teacher": ModelSpec, "student": StudentSpec, "data": DataSpec, "train": TrainSpec,
}


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            section = _SECTIONS.get(str(e["loc"][0]) if len(e["loc"]) > 1 else "", Recipe)
            parts.append(f"unknown recipe key '{loc}' (valid: {', '.join(sorted(section.model_fields))})")
        else:
            parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values parse as YAML (so numbers, bools and lists work)."""
    for item in overrides:
        if "=" not in item:
            raise KDForgeError(f"override '{item}' is not key=value; write e.g. --set train.steps=100")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        node: Any = data
        parts = key.split(".")
        for p in parts[:-1]:
            if isinstance(node, list):
                node = node[int(p)]
            else:
                node = node.setdefault(p, {})
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


def parse_recipe(data: dict[str, Any]) -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise KDForgeError(f"invalid recipe: {_format_validation_error(err)}") from None
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise KDForgeError(f"recipe file '{path}' not found; pass the path to a YAML recipe (see recipes/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise KDForgeError(f"recipe '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise KDForgeError(f"recipe '{path}' must be a YAML mapping of keys (name, teacher, student, ...)")
    return parse_recipe(apply_overrides(data, overrides or []))
