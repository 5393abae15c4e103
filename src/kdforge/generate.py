"""`kdforge generate RECIPE`: the teacher answers the recipe's prompts, written as JSONL for sequence-level KD.

Sequence-level knowledge distillation (Kim & Rush, "Sequence-Level Knowledge Distillation", EMNLP 2016): instead of
(or besides) matching the teacher's distribution token by token, the student is trained with plain cross-entropy on
the teacher's own outputs — an approximation of the teacher's sequence distribution by its mode (beam/greedy) or by
samples. Here the teacher generates once, offline; any recipe then trains on the file with `data.prompts: FILE`.

The file: a header line ``{"kdforge_generate": {"version", "teacher", "settings", "prompts"}}`` (the teacher's
identity, the generation settings, which prompts), then one record per prompt,
``{"id", "prompt", "response", "reference", "finish", "response_tokens"}`` (``finish``: ``eos`` or ``length``;
``reference``: the prompt set's own answer, e.g. the real continuation of a Shakespeare passage). Each batch's
records are appended and fsync'ed, so a killed run loses at most the batch in flight: rerunning the same command
repairs a line the kill cut off, skips the prompt ids already answered and appends the rest — no record twice, none
lost. A file written with other settings or another teacher is never appended to. Greedy answers do not depend on
the batching (left padding is exact up to float rounding); sampled ones are seeded per batch by its first prompt id,
so after a resume they are other draws of the same distribution than an uninterrupted run's.

Generation is batched through transformers ``generate`` with the KV cache, prompts left-padded; it stops at
``max_new_tokens`` and (``stop_at_eos``) at EOS, greedy or sampled (temperature, top-p, a seed).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from .data.prompts import HEADER_KEY, PromptRecord, load_prompt_set
from .errors import KDForgeError
from .io import atomic_write_text
from .recipe import GenerateSpec, Recipe

log = logging.getLogger("kdforge")
FORMAT_VERSION = 1


def check_terminates(gen: GenerateSpec, eos_token_id: int | None) -> None:
    """Refuse settings under which a response could never end: no max_new_tokens and no EOS to stop at."""
    if gen.max_new_tokens is None and (not gen.stop_at_eos or eos_token_id is None):
        why = "generate.stop_at_eos is false" if eos_token_id is not None else "the tokenizer has no EOS token"
        raise KDForgeError(f"generation cannot end: generate.max_new_tokens is null and {why}; set "
                           "generate.max_new_tokens (e.g. 128)")


def default_output(recipe: Recipe) -> Path:
    """Where `kdforge generate` writes without --out: data.prompts when generate.prompts names the prompts (the recipe
    then trains on what is written), else beside the run folder, `OUTPUT_DIR.teacher.jsonl`."""
    if recipe.generate.prompts is not None:
        return Path(recipe.data.prompts)
    return Path(str(Path(recipe.output_dir)) + ".teacher.jsonl")


def prompt_source(recipe: Recipe) -> str:
    """The prompts `kdforge generate` answers: generate.prompts, else data.prompts.

    Raises KDForgeError when the recipe names neither."""
    source = recipe.generate.prompts or recipe.data.prompts
    if source is None:
        raise KDForgeError("kdforge generate answers the recipe's prompts, but data.prompts is not set; set "
                           "data.prompts (e.g. shakespeare, or a .jsonl of prompt records)")
    return source


def teacher_identity(recipe: Recipe, model) -> dict[str, Any]:
    """What names the teacher in the header: the recipe's spec, the folder it loaded from, its parameter count and a
    fingerprint of its weights (each tensor's name, shape, first values and sum; a different checkpoint in the same
    folder differs). The config is left out: attributes a loader adds to it would change it without changing the
    model."""
    from .models import resolve_model_path
    from .precision import resolve

    spec = recipe.teacher
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        p = p.detach().float().cpu()
        digest.update(f"{name}{tuple(p.shape)}{float(p.double().sum()):.6e}".encode())
        digest.update(p.reshape(-1)[:16].numpy().tobytes())
    return {"model": spec.model, "gguf_file": spec.gguf_file, "path": str(resolve_model_path(spec)),
            "dtype": resolve(spec.dtype), "parameters": sum(p.numel() for p in model.parameters()),
            "fingerprint": digest.hexdigest()[:16]}


def header(recipe: Recipe, teacher_id: dict[str, Any], prompt_count: int) -> dict[str, Any]:
    gen = recipe.generate
    settings = gen.model_dump(mode="json", exclude={"batch_size", "split", "max_prompts"})
    settings["seed"] = gen.seed if gen.seed is not None else recipe.seed
    settings["max_prompt_tokens"] = recipe.data.max_prompt_tokens or recipe.data.seq_len // 2
    data = recipe.data
    prompts = {"source": prompt_source(recipe), "split": gen.split, "count": prompt_count,
               "validation": data.validation_split if data.validation_split is not None else list(data.validation)}
    return {HEADER_KEY: {"version": FORMAT_VERSION, "teacher": teacher_id, "settings": settings, "prompts": prompts}}


def read_existing(path: Path, expected: dict[str, Any]) -> set[str]:
    """The prompt ids already answered in a file of the same header. A last line cut off by a kill is dropped from
    the file (it is generated again). Raises KDForgeError when the header differs or a line is damaged."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data[: data.rfind(b"\n") + 1]
        log.info("%s: dropped a last line cut off mid-write (%d bytes); it is generated again", path,
                 len(data) - len(keep))
        with open(path, "r+b") as f:
            f.truncate(len(keep))
            f.flush()
            os.fsync(f.fileno())
        data = keep
    lines = data.decode("utf-8").splitlines()
    if not lines:
        return set()
    try:
        head = json.loads(lines[0])
    except json.JSONDecodeError:
        head = None
    if not isinstance(head, dict) or HEADER_KEY not in head:
        raise KDForgeError(f"{path} exists but is not a `kdforge generate` file (no header on line 1); give another "
                           "--out")
    was, now = head[HEADER_KEY], expected[HEADER_KEY]
    for key in ("version", "teacher", "settings", "prompts"):
        old, new = was.get(key), now[key]
        if key == "prompts" and isinstance(old, dict):  # more or fewer prompts (generate.max_prompts) may follow
            old, new = {k: v for k, v in old.items() if k != "count"}, {k: v for k, v in new.items() if k != "count"}
        if old != new:
            if isinstance(old, dict) and isinstance(new, dict):
                changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in {**old, **new} if old.get(k) != new.get(k)]
            else:
                changed = [f"{old!r} -> {new!r}"]
            raise KDForgeError(f"{path} was written with another {key} ({'; '.join(changed[:3])}); give another "
                               "--out, or delete the file to start over")
    done = set()
    for n, line in enumerate(lines[1:], 2):
        try:
            done.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise KDForgeError(f"{path}:{n} is not a generated record; repair or delete that line and rerun") from None
    return done


def _batch_seed(seed: int, first_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{first_id}".encode()).digest()[:7], "big")


@torch.no_grad()
def generate_batch(model, tokenizer, prompt_ids: list[list[int]], gen: GenerateSpec, *, seed: int = 0,
                   bf16: bool = False) -> list[dict[str, Any]]:
    """Responses to a batch of tokenized prompts: ``[{"ids": [...], "text": str, "finish": "eos"|"length"}]``.

    The prompts are left-padded into one [B, L] batch (attention mask 0 on padding) and run through transformers
    ``generate`` with the KV cache: greedy, or sampled with ``temperature`` / ``top_p`` (no top-k, no repetition
    penalty, whatever the checkpoint's generation_config says) after ``torch.manual_seed(seed)``. A response stops
    at EOS (``stop_at_eos``; the EOS is not part of it) or after ``max_new_tokens`` (null: the model's maximum
    positions). Raises KDForgeError for settings that cannot terminate.
    """
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    check_terminates(gen, eos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    width = max(len(p) for p in prompt_ids)
    device = next(model.parameters()).device
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):  # left padding: every prompt ends at the last column, where generation starts
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    max_new = gen.max_new_tokens
    if max_new is None:
        max_new = max(1, int(getattr(model.config, "max_position_embeddings", width + 512)) - width)
    sampling = {"do_sample": True, "temperature": gen.temperature, "top_p": gen.top_p, "top_k": 0} \
        if gen.do_sample else {"do_sample": False}
    config = GenerationConfig(max_new_tokens=max_new, eos_token_id=eos if gen.stop_at_eos else None,
                              pad_token_id=pad, repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1,
                              **sampling)
    torch.manual_seed(seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    saved = model.generation_config  # the checkpoint's defaults (its EOS ids, top-k, penalties) must not fill in
    model.generation_config = GenerationConfig()  # what `config` leaves unset
    try:
        with autocast:
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    finally:
        model.generation_config = saved
    results = []
    for row in out[:, width:].tolist():
        finish = "length"
        if gen.stop_at_eos and eos is not None and eos in row:
            row = row[: row.index(eos)]
            finish = "eos"
        results.append({"ids": row, "text": tokenizer.decode(row, skip_special_tokens=False), "finish": finish})
    return results


def generate_responses(recipe: Recipe, out: Path | None = None, *, teacher=None, tokenizer=None,
                       progress: bool = True) -> dict[str, Any]:
    """Answer the recipe's prompts (generate.prompts or data.prompts, split generate.split) with its teacher into
    ``out`` (JSONL; default :func:`default_output`).

    Resumes a file of the same header: the prompts already answered are skipped. Returns ``{"path", "written",
    "skipped_done", "total", "prompts_truncated", "finish": {"eos": n, "length": n}}`` for this launch.
    Raises KDForgeError when the recipe has no teacher or no data.prompts, for non-terminating settings, and for
    a file written with other settings.
    """
    from .models import load_teacher, load_tokenizer
    from .precision import resolve
    from .progress import Progress, phase

    gen, data = recipe.generate, recipe.data
    if recipe.teacher is None:
        raise KDForgeError("kdforge generate needs a teacher; set teacher.model in the recipe")
    source = prompt_source(recipe)
    out = Path(out or default_output(recipe))
    if tokenizer is None:
        tokenizer = load_tokenizer(recipe.teacher)
    check_terminates(gen, tokenizer.eos_token_id)  # before the teacher loads
    prompt_set = load_prompt_set(data.model_copy(update={"prompts": source}), tokenizer, need_response=False)
    records: list[PromptRecord] = prompt_set.train if gen.split == "train" else prompt_set.validation
    if gen.max_prompts is not None:
        records = records[: gen.max_prompts]
    if teacher is None:
        with phase(f"loading teacher {recipe.teacher.model}", enabled=progress):
            teacher = load_teacher(recipe.teacher)
    teacher.eval()
    expected = header(recipe, teacher_identity(recipe, teacher), len(records))
    done: set[str] = set()
    if out.is_file() and out.stat().st_size > 0:
        done = read_existing(out, expected)
        if done:
            log.info("%s: %d of %d prompts already answered; generating the other %d", out, len(done & {r.id for r in records}),
                     len(records), len(records) - len(done & {r.id for r in records}))
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(expected) + "\n")
    todo = [r for r in records if r.id not in done]
    limit = data.max_prompt_tokens or data.seq_len // 2
    encoded = tokenizer([r.prompt for r in todo], add_special_tokens=False)["input_ids"] if todo else []
    truncated = sum(len(p) > limit for p in encoded)
    if truncated:
        log.info("%d of %d prompts are longer than %d tokens and were truncated from the left (the student trains on "
                 "the same truncation)", truncated, len(todo), limit)
    seed = expected[HEADER_KEY]["settings"]["seed"]
    bf16 = resolve(recipe.teacher.dtype) == "bfloat16"
    finish = {"eos": 0, "length": 0}
    with Progress(f"generating {out.name}", len(records), start=len(records) - len(todo), unit="prompt",
                  enabled=progress) as bar, open(out, "ab") as f:
        for start in range(0, len(todo), gen.batch_size):
            batch = todo[start: start + gen.batch_size]
            ids = [p[-limit:] for p in encoded[start: start + gen.batch_size]]
            answers = generate_batch(teacher, tokenizer, ids, gen, seed=_batch_seed(seed, batch[0].id), bf16=bf16)
            lines = []
            for record, answer in zip(batch, answers):
                finish[answer["finish"]] += 1
                lines.append(json.dumps({"id": record.id, "prompt": record.prompt, "response": answer["text"],
                                         "reference": record.response if record.response is not None
                                         else record.reference, "finish": answer["finish"],
                                         "response_tokens": len(answer["ids"])}) + "\n")
            f.write("".join(lines).encode("utf-8"))  # one write per batch, then on disk before the next batch
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(records) - len(todo) + start + len(batch))
    return {"path": str(out), "written": len(todo), "skipped_done": len(records) - len(todo), "total": len(records),
            "prompts_truncated": truncated, "finish": finish}
