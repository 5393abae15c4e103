"""Block-wise logit distillation (Block-KD; Yu et al., "Decoupling Dark Knowledge via Block-wise Logit Distillation
for Feature-level Alignment", arXiv 2411.01547).

Student and teacher are each a stack of blocks. Stepping stone N_i keeps the student's first i blocks, maps their
output into the teacher's space with a trainable *connector*, and finishes with the teacher's remaining blocks and
head. Each stepping stone is distilled against the teacher's logits with an ordinary logit loss, so the student's
intermediate features are aligned *through the teacher's own computation* (an implicit, logit-based feature
alignment) rather than by a distance to a teacher feature.

Indexing and weights, as in the paper: with n student blocks, N_i (1 <= i <= n) keeps student blocks 1..i and the
objective of N_i is divided by 2^(n-i). N_n is the student itself (weight 1): in kdforge that is the ordinary logit
term, so a recipe reproducing the paper reads::

    objective:
      - {loss: forward_kl}                                     # N_n, the student
      - {loss: block_kd, temperature: 1.0, kd_loss: forward_kl, projector: linear}   # N_1 .. N_{n-1}

and the `block_kd` term is  sum_{i<n} KD(N_i, teacher) / 2^(n-i)  (student block s = i-1 in 0-based terms,
weight 2^-(n-1-s)). Which teacher block the remainder starts after comes from a layer map (kdforge.align.layer_maps):
student block s paired with teacher block t means N_{s+1} runs teacher blocks t+1..end; `uniform` is the default, and
explicit pairs (`layer_map: [[s, t], ...]`) choose both the mapping and which stepping stones exist (weights stay
2^-(n-1-s)). A pair of the student's last block is never a stepping stone (that model is the student).

Stepping stones exist only in training: the connectors live in the Distiller (so the optimizer and checkpoints see
them) and never in `distiller.student`, the model that is exported; the teacher is referenced, never registered, so
no teacher weight lands in the checkpointed extras either. Gradients flow through the frozen teacher blocks into the
connectors and the student.

Supported model shapes (the `blocks_of` adapters):
  * Hugging Face decoder-only LMs of the Llama family -- model types llama (SmolLM2), mistral, qwen2, qwen3:
    `model.model.{embed_tokens, layers, norm, rotary_emb}` + `model.lm_head`; the teacher's blocks are run as its own
    forward runs them (rotary position embeddings, causal / sliding-window masks per layer type).
  * Sequential-stage models (CNNs): a model with a `stages` attribute (nn.Sequential or nn.ModuleList of blocks run in
    order) and a `head` (module from the last stage's output to logits), whose forward is
    head(stages[-1](...stages[0](x))); a model whose blocks and head go by other names declares them in a
    `kdforge_stages = (blocks attribute, head attribute)` class attribute (kdforge's image CNN: `("features",
    "classifier")`). Connectors are 1x1 convs; a spatial-size mismatch is bridged by
    adaptive average pooling (student larger) or bilinear interpolation (student smaller).

Cost: every stepping stone runs part of the teacher and its head (a full [B, T, V] logit tensor for an LM), so an
n-block student costs about n-1 extra partial teacher forwards and backwards per step. Weights fall off as 2^-(n-i),
so for deep students list only the last few stones with an explicit layer map. The teacher's blocks run under the
teacher's precision (`teacher.dtype: bfloat16` = bf16 autocast, as in its own forward; the Block-KD bench cell went
359 -> 267 s); the loss is taken in fp32.
"""
from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..align.layer_maps import build_layer_map, format_layer_map
from ..align.projectors import build_projector
from ..errors import KDForgeError
from ..lm_head import head_logits
from ..losses.stepping import block_kd  # noqa: F401 - the objective, named here before
from ..losses.logits import LOGIT_LOSSES, needs_labels

log = logging.getLogger("kdforge")

DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")


# --- running slices of a model's blocks --------------------------------------------------------------------------


class DecoderBlocks:
    """Runs any contiguous slice of a Llama-family HF decoder's blocks exactly as its own forward does.

    A plain object (not an nn.Module), so holding one never registers the model's weights anywhere."""

    kind = "decoder"

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.base = model.model
        self.layers = list(self.base.layers[: self.config.num_hidden_layers])
        self.width = int(self.config.hidden_size)

    def __len__(self) -> int:
        return len(self.layers)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.base.embed_tokens(input_ids)

    def context(self, batch: dict[str, Tensor], hidden: Tensor) -> dict[str, Any]:
        """Attention masks and rotary embeddings for this batch (shared by every slice run on it)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kwargs = dict(config=self.config, inputs_embeds=hidden, attention_mask=batch.get("attention_mask"),
                      cache=None, position_ids=position_ids)
        types = self._layer_types()
        masks = {}
        if "full_attention" in types:
            masks["full_attention"] = create_causal_mask(**kwargs)
        if "sliding_attention" in types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return {"masks": masks, "types": types, "position_ids": position_ids,
                "rope": self.base.rotary_emb(hidden, position_ids=position_ids)}

    def _layer_types(self) -> list[str]:
        types = getattr(self.config, "layer_types", None)
        if types:
            return list(types[: len(self.layers)])
        sliding = getattr(self.config, "sliding_window", None) is not None  # Mistral: one mask for every layer
        return ["sliding_attention" if sliding else "full_attention"] * len(self.layers)

    def run(self, hidden: Tensor, start: int, stop: int, ctx: dict[str, Any]) -> Tensor:
        for j in range(start, stop):
            hidden = self.layers[j](hidden, attention_mask=ctx["masks"][ctx["types"][j]],
                                    position_embeddings=ctx["rope"], position_ids=ctx["position_ids"])
        return hidden

    def head(self, hidden: Tensor) -> Tensor:
        return head_logits(self.model, self.base.norm(hidden))  # with the model's soft-cap / logit scale


def stage_names(model: nn.Module) -> tuple[str, str] | None:
    """(blocks attribute, head attribute) of a sequential-stage model: its `kdforge_stages`, else ("stages", "head");
    None when the model lacks either."""
    names = tuple(getattr(model, "kdforge_stages", ("stages", "head")))
    return names if len(names) == 2 and all(hasattr(model, n) for n in names) else None


class StageBlocks:
    """Runs slices of a sequential-stage model (its blocks, e.g. `model.stages`, then its head, e.g. `model.head`;
    stage_names)."""

    kind = "stages"

    def __init__(self, model: nn.Module):
        self.model = model
        blocks, head = stage_names(model)
        self.path = blocks
        self.stages = list(getattr(model, blocks))
        self.head_module = getattr(model, head)

    def __len__(self) -> int:
        return len(self.stages)

    def context(self, batch: dict[str, Tensor], hidden: Tensor) -> dict[str, Any]:
        return {}

    def run(self, hidden: Tensor, start: int, stop: int, ctx: dict[str, Any]) -> Tensor:
        for j in range(start, stop):
            hidden = self.stages[j](hidden)
        return hidden

    def head(self, hidden: Tensor) -> Tensor:
        return self.head_module(hidden)


def blocks_of(model: nn.Module, role: str = "model") -> DecoderBlocks | StageBlocks:
    """The block adapter for a model, or a KDForgeError saying which shapes are supported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is not None:
        if model_type not in DECODER_TYPES:
            raise KDForgeError(f"the {role} is a '{model_type}' model; stepping stones / truncated teachers support "
                               f"the decoder types {', '.join(DECODER_TYPES)} and models with `stages` + `head`")
        return DecoderBlocks(model)
    if stage_names(model) is not None:
        return StageBlocks(model)
    raise KDForgeError(f"the {role} ({type(model).__name__}) has no blocks kdforge can address: use a Llama-family "
                       "HF decoder or give the model a `stages` list of blocks and a `head` (or name them in "
                       "`kdforge_stages`)")


def student_block_tap(student: nn.Module) -> str:
    """The tap spec that captures every block's output of the student, in order."""
    blocks = blocks_of(student, "student")
    return "model.layers.*" if blocks.kind == "decoder" else f"{blocks.path}.*"


def _match_size(x: Tensor, size: tuple[int, ...]) -> Tensor:
    if x.dim() != 4 or tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# --- the trainable part ------------------------------------------------------------------------------------------


class SteppingStones(nn.Module):
    """The connectors of one `block_kd` term, and the stepping-stone forward that uses them.

    `s_probe` is the list of the student's block outputs on an example batch (from the Distiller's probe), which gives
    the student depth and widths; the teacher's input widths come from its config or a probe of its stages."""

    def __init__(self, term, fn, kwargs: dict[str, Any], student: nn.Module, teacher: nn.Module,
                 s_probe: list[Tensor], example_batch: dict[str, Tensor],
                 teacher_autocast: Callable[[], AbstractContextManager] = nullcontext):
        super().__init__()
        self.label, self.fn, self.kwargs = term.label, fn, kwargs
        self.teacher_autocast = teacher_autocast  # the teacher's blocks run at the teacher's precision
        kd = kwargs.get("kd_loss", "forward_kl")
        if kd not in LOGIT_LOSSES:
            raise KDForgeError(f"term '{self.label}': unknown kd_loss '{kd}'; valid: {', '.join(sorted(LOGIT_LOSSES))}")
        if needs_labels(LOGIT_LOSSES[kd]):
            raise KDForgeError(f"term '{self.label}': kd_loss '{kd}' needs labels; use a teacher-vs-student loss")
        self.teacher = blocks_of(teacher, "teacher")  # a plain object: the teacher is never registered here
        student_kind = blocks_of(student, "student").kind
        if student_kind != self.teacher.kind:
            raise KDForgeError(f"term '{self.label}': student and teacher must both be decoders or both stage models")
        n_s, n_t = len(s_probe), len(self.teacher)
        self.n_student = n_s
        pairs = self._pairs(term.layer_map, n_s, n_t)
        self.pairs = [(s, t) for s, t in pairs if s < n_s - 1]
        if not self.pairs:
            raise KDForgeError(f"term '{self.label}': no stepping stones: the layer map {pairs} pairs only the "
                               f"student's last block (N_n is the student itself); the student has {n_s} blocks")
        self.weights = [2.0 ** -(n_s - 1 - s) for s, _ in self.pairs]
        log.info("term %s: %d stepping stones, %s, weights %s", self.label, len(self.pairs),
                 format_layer_map(self.pairs), ", ".join(f"{w:g}" for w in self.weights))
        targets = self._teacher_inputs(example_batch)
        self.target_sizes = [tuple(targets[t].shape[2:]) if targets[t].dim() == 4 else None for _, t in self.pairs]
        self.connectors = nn.ModuleList(
            self._connector(term.projector, s_probe[s], targets[t]) for s, t in self.pairs)

    def _pairs(self, spec, n_s: int, n_t: int) -> list[tuple[int, int]]:
        if spec is None or isinstance(spec, str):
            strategy, extra = spec or "uniform", {}
        elif isinstance(spec, list):
            strategy, extra = "explicit", {"pairs": [tuple(p) for p in spec]}
        else:
            extra = dict(spec)
            strategy = extra.pop("strategy", "uniform")
        if strategy == "learned":
            raise KDForgeError(f"term '{self.label}': stepping stones need a fixed layer map, not 'learned'")
        try:
            return build_layer_map(strategy, n_s, n_t, **extra)
        except (TypeError, ValueError) as err:
            raise KDForgeError(f"term '{self.label}': {err}") from None

    @torch.no_grad()
    def _teacher_inputs(self, example_batch: dict[str, Tensor]) -> list[Tensor]:
        """Per teacher block t, an example of its output (the input of block t+1): the connector's target shape."""
        if self.teacher.kind == "decoder":
            return [torch.zeros(1, 1, self.teacher.width)] * len(self.teacher)
        x, outs = example_batch["inputs"][:1], []
        for j in range(len(self.teacher)):
            x = self.teacher.run(x, j, j + 1, {})
            outs.append(x)
        return outs

    def _connector(self, spec, s: Tensor, t: Tensor) -> nn.Module:
        spec = {"kind": spec} if isinstance(spec, str) else dict(spec or {})
        kind = spec.pop("kind", "conv1x1" if s.dim() == 4 else "linear")
        if s.dim() == 4 and kind not in ("conv1x1", "identity"):
            raise KDForgeError(f"term '{self.label}': stage outputs are feature maps {list(s.shape)}; "
                               "use projector conv1x1 (the default) or identity")
        in_dim, out_dim = (s.shape[1], t.shape[1]) if s.dim() == 4 else (s.shape[-1], t.shape[-1])
        try:
            return build_projector(kind, in_dim, out_dim, **spec)
        except (TypeError, ValueError) as err:
            raise KDForgeError(f"term '{self.label}': {err}") from None

    def stone_logits(self, s_blocks: list[Tensor], batch: dict[str, Tensor]) -> list[Tensor]:
        """Logits of every stepping stone, in the order of `self.pairs`."""
        if len(s_blocks) != self.n_student:
            raise KDForgeError(f"term '{self.label}': captured {len(s_blocks)} student blocks, expected "
                               f"{self.n_student}")
        n_t, ctx, out = len(self.teacher), None, []
        for (s, t), connector, size in zip(self.pairs, self.connectors, self.target_sizes):
            hidden = connector(s_blocks[s])
            if size is not None:
                hidden = _match_size(hidden, size)
            if ctx is None:
                ctx = self.teacher.context(batch, hidden)
            with self.teacher_autocast():
                logits = self.teacher.head(self.teacher.run(hidden, t + 1, n_t, ctx))
            out.append(logits.float())
        return out

    def forward(self, s_blocks: list[Tensor], batch: dict[str, Tensor], teacher_logits: Tensor,
                mask: Tensor | None) -> Tensor:
        """The term's value. LM logits are shifted like the Distiller's (position t predicts token t+1); `mask` is
        the Distiller's shifted target mask."""
        if not isinstance(teacher_logits, Tensor):
            raise KDForgeError(f"term '{self.label}': block_kd needs dense teacher logits (a live teacher)")
        stones = self.stone_logits(s_blocks, batch)
        if teacher_logits.dim() == 3:
            stones = [z[:, :-1] for z in stones]
            teacher_logits = teacher_logits[:, :-1]
        return self.fn(stones, teacher_logits, self.weights, mask=mask, **self.kwargs)

    def extra_repr(self) -> str:
        return f"pairs={self.pairs}, weights={self.weights}"
