"""Greedy generation on a fixed prompt set, and how often a student's greedy tokens match the teacher's."""
from __future__ import annotations

import inspect
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

# Eight Shakespeare-ish openings. Fixed, so agreement figures compare across runs.
DEFAULT_PROMPTS = [
    "To be, or not to be, that is",
    "Now is the winter of our discontent",
    "KING. My lord, what news",
    "O, speak again, bright angel, for thou",
    "What light through yonder window",
    "Friends, Romans, countrymen, lend me",
    "The quality of mercy is not",
    "Enter the QUEEN and her ladies.\nQUEEN. Where",
]
DEFAULT_NEW_TOKENS = 16


@dataclass
class Generations:
    prompts: list[str]
    tokens: list[list[int]]  # the new token ids of each prompt
    texts: list[str]  # the decoded new tokens
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0  # the prompt forwards (each also yields the first new token)
    decode_tokens: int = 0  # tokens made by incremental forwards with the KV cache
    decode_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def generation_tokens_per_s(self) -> float:
        return self.decode_tokens / max(self.decode_seconds, 1e-9)

    def to_json(self) -> dict:
        return {"prompts": self.prompts, "tokens": self.tokens, "texts": self.texts,
                "generation_tokens_per_s": self.generation_tokens_per_s}


def _autocast(model: nn.Module, bf16: bool):
    if not bf16:
        return nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)


def _cache_io(model: nn.Module) -> str:
    """The keyword a model takes its KV cache by: `cache` (transformers >= 5.2x) or the older `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, prompts: list[str] | None = None,
                    new_tokens: int = DEFAULT_NEW_TOKENS, bf16: bool = False) -> Generations:
    """Exactly `new_tokens` greedy tokens per prompt (EOS does not stop it), batch 1, with the KV cache.

    Our own loop rather than `model.generate`, so no generation_config (sampling, repetition penalty, stop ids) of a
    checkpoint changes what "greedy" means between teacher and student.
    """
    prompts = list(prompts or DEFAULT_PROMPTS)
    device = next(model.parameters()).device
    cache_kw = _cache_io(model)
    was_training = model.training
    model.eval()
    result = Generations(prompts, [], [])
    try:
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            out_ids: list[int] = []
            with _autocast(model, bf16):
                t0 = time.perf_counter()
                out = model(input_ids=ids, use_cache=True)
                nxt = out.logits[:, -1].float().argmax(-1, keepdim=True)
                result.prefill_seconds += time.perf_counter() - t0
                result.prompt_tokens += ids.shape[1]
                out_ids.append(int(nxt))
                past = _cache_of(out)
                t0 = time.perf_counter()
                for _ in range(new_tokens - 1):
                    out = model(input_ids=nxt, use_cache=True, **{cache_kw: past})
                    past = _cache_of(out)
                    nxt = out.logits[:, -1].float().argmax(-1, keepdim=True)
                    out_ids.append(int(nxt))
                result.decode_seconds += time.perf_counter() - t0
                result.decode_tokens += new_tokens - 1
            result.tokens.append(out_ids)
            result.texts.append(tokenizer.decode(out_ids, skip_special_tokens=False))
    finally:
        model.train(was_training)
    return result


def generation_agreement(reference: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    """token_agreement: fraction of generated positions where both picked the same token (position by position, so
    one early divergence usually lowers the rest); exact_match: fraction of prompts whose whole continuation matches."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference continuations but {len(other)} to compare")
    same = total = exact = 0
    for a, b in zip(reference, other):
        n = max(len(a), len(b))
        same += sum(x == y for x, y in zip(a, b))
        total += n
        exact += int(a == b)
    return {"token_agreement": same / max(total, 1), "exact_match": exact / max(len(reference), 1)}
