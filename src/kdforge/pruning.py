"""Structured pruning of a Llama-style teacher into a smaller student of the same architecture (student.init pruned).

As in NVIDIA's Minitron recipe, the teacher reads a calibration slice of the training blocks once and every prunable
unit gets an activation importance:

- a decoder block: 1 - cosine(block input, block output), averaged over tokens (ShortGPT / Minitron depth scoring);
  a block that leaves the residual stream unchanged scores 0 and goes first;
- an MLP channel: the mean squared activation entering down_proj;
- a query head: the mean squared norm of its output entering o_proj; a KV group: the sum over its query heads;
- an embedding channel: the mean squared output of the blocks' RMSNorms (input_layernorm, post_attention_layernorm).

The kept blocks, channels and heads (in their original order) are copied into a model built from the teacher's config
with the new sizes, so it is a plain transformers model that save_pretrained / from_pretrained handle.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import KDForgeError
from .recipe import PruneSpec

SUPPORTED = ("llama",)


def _refuse_unsupported(teacher: nn.Module) -> None:
    kind = getattr(teacher.config, "model_type", type(teacher).__name__)
    layers = getattr(getattr(teacher, "model", None), "layers", None)
    if kind not in SUPPORTED or layers is None or not all(
            hasattr(layer, "self_attn") and hasattr(layer, "mlp") and hasattr(layer.mlp, "gate_proj")
            for layer in layers):
        raise KDForgeError(f"student.init pruned supports Llama-style teachers ({', '.join(SUPPORTED)}) only; "
                           f"this teacher is '{kind}': use student.init from_teacher or config")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def target_sizes(config, spec: PruneSpec) -> dict[str, int]:
    """The student's sizes (unset ones are the teacher's), refused in one line when the teacher cannot be cut so."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    sizes = {"num_hidden_layers": spec.layers or config.num_hidden_layers,
             "intermediate_size": spec.intermediate_size or config.intermediate_size,
             "num_attention_heads": spec.num_attention_heads or heads,
             "num_key_value_heads": spec.num_key_value_heads or kv,
             "hidden_size": spec.hidden_size or config.hidden_size}
    limits = {"layers": ("num_hidden_layers", config.num_hidden_layers),
              "intermediate_size": ("intermediate_size", config.intermediate_size),
              "num_key_value_heads": ("num_key_value_heads", kv),
              "hidden_size": ("hidden_size", config.hidden_size)}
    for key, (name, teacher_size) in limits.items():
        if sizes[name] > teacher_size:
            raise KDForgeError(f"student.prune.{key} is {sizes[name]} but the teacher has {teacher_size}; "
                               f"valid: 1..{teacher_size}")
    new_kv, new_heads = sizes["num_key_value_heads"], sizes["num_attention_heads"]
    per_group = heads // kv
    if new_heads % new_kv or not new_kv <= new_heads <= new_kv * per_group:
        valid = ", ".join(str(new_kv * k) for k in range(1, per_group + 1))
        raise KDForgeError(f"student.prune.num_attention_heads {new_heads} does not fit {new_kv} KV heads (the "
                           f"teacher has {per_group} query heads per KV head); valid with num_key_value_heads "
                           f"{new_kv}: {valid}")
    return sizes


@torch.no_grad()
def importance(teacher: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Activation importance of the teacher's blocks [L], MLP channels [L, I], query heads [L, H] and embedding
    channels [D], from its forward passes over the token blocks `ids` [N, T]."""
    config = teacher.config
    layers = teacher.model.layers
    n_layers, n_heads, dim = len(layers), config.num_attention_heads, head_dim(config)
    device = next(teacher.parameters()).device
    blocks = torch.zeros(n_layers, device=device)
    channels = torch.zeros(n_layers, config.intermediate_size, device=device)
    heads = torch.zeros(n_layers, n_heads, device=device)
    hidden = torch.zeros(config.hidden_size, device=device)

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.detach().reshape(-1, x.shape[-1]).float()

    def on_block(i):
        def hook(module, args, kwargs, output):
            before = args[0] if args else kwargs["hidden_states"]
            after = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(flat(before), flat(after), dim=-1)
            blocks[i] += (1 - cos).sum()
        return hook

    def on_down(i):
        def hook(module, args):
            channels[i] += flat(args[0]).pow(2).sum(0)
        return hook

    def on_o(i):
        def hook(module, args):
            x = flat(args[0])
            heads[i] += x.view(-1, n_heads, dim).pow(2).sum(-1).sum(0)
        return hook

    def on_norm(module, args, output):
        hidden.add_(flat(output).pow(2).sum(0))

    handles = []
    for i, layer in enumerate(layers):
        handles += [layer.register_forward_hook(on_block(i), with_kwargs=True),
                    layer.mlp.down_proj.register_forward_pre_hook(on_down(i)),
                    layer.self_attn.o_proj.register_forward_pre_hook(on_o(i)),
                    layer.input_layernorm.register_forward_hook(on_norm),
                    layer.post_attention_layernorm.register_forward_hook(on_norm)]
    was_training = teacher.training
    teacher.eval()
    try:
        for start in range(0, len(ids), batch_size):
            batch = ids[start:start + batch_size].to(device)
            teacher(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        teacher.train(was_training)
    tokens = ids.numel()
    scores = {"blocks": blocks / tokens, "channels": channels / tokens, "heads": heads / tokens,
              "hidden": hidden / (tokens * 2 * n_layers)}
    return {name: value.cpu() for name, value in scores.items()}


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order (ties keep the earlier unit)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def _kept_heads(scores: torch.Tensor, kv: int, new_heads: int, new_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept query heads, kept KV heads) of one block: the most important KV groups, then in each the most important
    query heads, grouped so that query head j of the student uses its KV head j // (new_heads // new_kv)."""
    per_group = len(scores) // kv
    groups = scores.view(kv, per_group)
    kept_kv = _top(groups.sum(-1), new_kv)
    kept_q = [g * per_group + _top(groups[g], new_heads // new_kv) for g in kept_kv.tolist()]
    return torch.cat(kept_q), kept_kv


def _rows(heads: torch.Tensor, dim: int) -> torch.Tensor:
    """The projection rows (or columns) of the heads `heads`, head_dim `dim` each."""
    return (heads[:, None] * dim + torch.arange(dim)).reshape(-1)


def prune(teacher: nn.Module, spec: PruneSpec, ids: torch.Tensor) -> nn.Module:
    """A student of the teacher's architecture with the sizes in `spec`, its weights the teacher's kept rows and
    columns; `ids` [N, T]: calibration token blocks (the first calibration_tokens worth are read)."""
    from transformers import AutoModelForCausalLM

    _refuse_unsupported(teacher)
    config = teacher.config
    sizes = target_sizes(config, spec)
    n_blocks = max(1, min(len(ids), math.ceil(spec.calibration_tokens / ids.shape[1])))
    scores = importance(teacher, ids[:n_blocks])

    kept_layers = _top(scores["blocks"], sizes["num_hidden_layers"]).tolist()
    hid = _top(scores["hidden"], sizes["hidden_size"])
    dim = head_dim(config)
    new = config.__class__.from_dict({**config.to_dict(), **sizes, "head_dim": dim})
    if getattr(new, "layer_types", None):
        new.layer_types = [config.layer_types[i] for i in kept_layers]
    student = AutoModelForCausalLM.from_config(new)

    source = teacher.state_dict()
    state: dict[str, torch.Tensor] = {}

    def take(key: str, src: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
        w = source[src]
        if rows is not None:
            w = w.index_select(0, rows.to(w.device))
        if cols is not None:
            w = w.index_select(1, cols.to(w.device))
        state[key] = w.detach().clone()

    for new_i, old_i in enumerate(kept_layers):
        q, kv = _kept_heads(scores["heads"][old_i], config.num_key_value_heads, sizes["num_attention_heads"],
                            sizes["num_key_value_heads"])
        mlp = _top(scores["channels"][old_i], sizes["intermediate_size"])
        q_rows, kv_rows = _rows(q, dim), _rows(kv, dim)
        plan = {"self_attn.q_proj": (q_rows, hid), "self_attn.k_proj": (kv_rows, hid),
                "self_attn.v_proj": (kv_rows, hid), "self_attn.o_proj": (hid, q_rows),
                "mlp.gate_proj": (mlp, hid), "mlp.up_proj": (mlp, hid), "mlp.down_proj": (hid, mlp),
                "input_layernorm": (hid, None), "post_attention_layernorm": (hid, None)}
        for name, (rows, cols) in plan.items():
            for kind in ("weight", "bias"):
                src = f"model.layers.{old_i}.{name}.{kind}"
                if src in source:
                    take(f"model.layers.{new_i}.{name}.{kind}", src, rows, cols if kind == "weight" else None)
    take("model.embed_tokens.weight", "model.embed_tokens.weight", None, hid)
    take("model.norm.weight", "model.norm.weight", hid)
    if "lm_head.weight" in source:
        take("lm_head.weight", "lm_head.weight", None, hid)
        if "lm_head.bias" in source:
            take("lm_head.bias", "lm_head.bias")
    expected = set(student.state_dict())
    missing = expected - set(state)
    if missing:  # a module this Llama-style layout does not know: refuse rather than leave it random
        raise KDForgeError(f"student.init pruned cannot fill {sorted(missing)[0]} of the pruned "
                           f"{type(student).__name__}; the teacher is not a plain Llama layout")
    student.load_state_dict({k: v for k, v in state.items() if k in expected})
    student.kdforge_teacher_layers = kept_layers  # which teacher block each student block was cut from
    return student
