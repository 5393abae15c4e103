"""Prompt–response data: records read from JSONL / datasets / the embedded Shakespeare set, tokenized into blocks whose
labels mask the prompt, so every loss term (cross-entropy and distillation alike) counts only response tokens.

A record is either a chat (``{"messages": [{"role": ..., "content": ...}, ...]}``, TRL's conversational format; the
last message is the assistant's response, everything before it the prompt, both rendered with the tokenizer's chat
template) or a pair (``{"prompt": ..., "response": ...}``; ``completion`` is accepted for ``response``). A block is
``prompt ids + response ids (+ EOS for a pair)``, right-padded to ``data.seq_len``: ``labels`` [N, seq_len] hold the
token at response positions and -100 at prompt and padding positions, and ``attention_mask`` is 0 on padding
(kdforge.batches.shifted_targets turns them into the next-token targets and the mask every term is given).

The embedded default (`data.prompts: shakespeare`) is "continue this passage": each work is cut into passages of
about 360 characters at speech boundaries; a passage's opening lines (about 120 characters) are the prompt and its
real continuation the response. Held-out prompts come from the held-out works (data.validation), so no held-out
passage shares a work with a training one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import KDForgeError
from .corpus import is_chat, read_text, render_document
from .packing import TokenBlocks

log = logging.getLogger("kdforge")

PASSAGE_CHARS = 360  # a Shakespeare passage: speeches gathered until this many characters
PROMPT_CHARS = 120  # its opening lines, until this many characters, are the prompt
HEADER_KEY = "kdforge_generate"  # the first record of a file `kdforge generate` writes (kdforge.generate)


@dataclass
class PromptRecord:
    """One prompt and (for training) its response, as text.

    ``prompt`` is what the model is given (a chat is already rendered with the chat template and its generation
    prompt); ``response`` is what it learns (None: a prompt only, to be answered by ``kdforge generate``);
    ``reference`` the record's own answer, kept beside a generated one; ``chat``: the response comes from a chat
    template, which ends the turn itself (no EOS is appended)."""

    id: str
    prompt: str
    response: str | None
    reference: str | None = None
    chat: bool = False


@dataclass
class PromptSet:
    train: list[PromptRecord]
    validation: list[PromptRecord]
    train_names: list[str]
    validation_names: list[str]


# ---------------------------------------------------------------------------------------------------------------
# the embedded "continue this passage" set


def _paragraphs(text: str) -> list[list[str]]:
    """Blank-line-separated paragraphs (a speech, a stage direction) as lists of lines."""
    paragraphs, current = [], []
    for line in text.splitlines():
        line = line.rstrip()
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)
    return paragraphs


def passage_records(work: str, text: str, passage_chars: int = PASSAGE_CHARS,
                    prompt_chars: int = PROMPT_CHARS) -> list[PromptRecord]:
    """A work cut into "continue this passage" records, in reading order, ids ``work:n``.

    Paragraphs are gathered until a passage holds ``passage_chars`` characters (a paragraph longer than twice that
    is cut by lines); the passage's first whole lines reaching ``prompt_chars`` characters are the prompt (ending in
    a newline) and the remaining lines the response. A passage under half of ``passage_chars`` (a work's last
    words) or with no line left after the prompt makes no record.
    """
    pieces: list[list[str]] = []
    for para in _paragraphs(text):  # long paragraphs (a sonnet sequence's pages) are cut by lines
        chunk: list[str] = []
        for line in para:
            chunk.append(line)
            if sum(len(x) + 1 for x in chunk) >= 2 * passage_chars:
                pieces.append(chunk)
                chunk = []
        if chunk:
            pieces.append(chunk)
    passages: list[list[str]] = []
    current: list[str] = []
    for piece in pieces:
        current += ([""] if current else []) + piece  # a blank line between speeches, as in the text
        if sum(len(x) + 1 for x in current) >= passage_chars:
            passages.append(current)
            current = []
    if current:
        passages.append(current)
    records = []
    for lines in passages:
        if sum(len(x) + 1 for x in lines) < passage_chars // 2:
            continue
        k, size = 0, 0
        while k < len(lines) and size < prompt_chars:
            size += len(lines[k]) + 1
            k += 1
        while k < len(lines) and not lines[k - 1].strip():  # never end a prompt on the blank line between speeches
            k += 1
        if k >= len(lines):
            continue
        records.append(PromptRecord(f"{work}:{len(records)}", "\n".join(lines[:k]) + "\n",
                                    "\n".join(lines[k:]) + "\n"))
    return records


def shakespeare_prompt_set(validation: list[str]) -> PromptSet:
    """The embedded prompt set: passages of the works not in ``validation`` for training, of those in it held out."""
    from .shakespeare import shakespeare_dir

    works = {p.stem: p for p in sorted(shakespeare_dir().glob("*.txt"))}
    unknown = [w for w in validation if w not in works]
    if unknown:
        raise KDForgeError(f"unknown held-out work '{unknown[0]}'; choose from: {', '.join(works)}")
    train = [w for w in works if w not in set(validation)]
    read = {w: works[w].read_text(encoding="utf-8") for w in works}
    return PromptSet([r for w in train for r in passage_records(w, read[w])],
                     [r for w in validation for r in passage_records(w, read[w])], train, list(validation))


# ---------------------------------------------------------------------------------------------------------------
# records from files and datasets


def record_from_row(row: Any, where: str, tokenizer, need_response: bool = True,
                    default_id: str = "") -> PromptRecord | None:
    """A JSON object / dataset row as a PromptRecord; None for the header of a `kdforge generate` file.

    Raises KDForgeError (one line, naming ``where``) for a row with neither ``messages`` nor ``prompt`` +
    ``response``, a chat the tokenizer has no template for, or fields that are not text.
    """
    if not isinstance(row, dict):
        raise KDForgeError(f"{where} is a JSON {type(row).__name__}; each record must be an object with 'messages' "
                           "or 'prompt' and 'response'")
    if HEADER_KEY in row:
        return None
    rid = str(row["id"]) if row.get("id") is not None else default_id
    if row.get("messages") is not None:
        messages = row["messages"]
        if not is_chat(messages):
            raise KDForgeError(f"{where} field 'messages' is not a list of chat messages; give "
                               '[{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]')
        if not getattr(tokenizer, "chat_template", None):
            raise KDForgeError(f"{where} is a chat record but the teacher's tokenizer has no chat template; give the "
                               "tokenizer one (chat_template in its tokenizer_config.json or a chat_template.jinja), "
                               'or use {"prompt": ..., "response": ...} records')
        last = messages[-1]
        if last["role"] != "assistant":
            if need_response:
                raise KDForgeError(f"{where}: the last message is the {last['role']}'s, so the record has no "
                                   "response to learn; end each conversation with an assistant message")
            return PromptRecord(rid, render_document(messages, where, tokenizer, generation_prompt=True), None,
                                chat=True)
        if len(messages) < 2:
            raise KDForgeError(f"{where} holds only the assistant's message; a chat record needs a prompt before it")
        prompt = render_document(messages[:-1], where, tokenizer, generation_prompt=True)
        whole = render_document(messages, where, tokenizer)
        if not whole.startswith(prompt):
            raise KDForgeError(f"{where}: the chat template does not render the prompt as the start of the whole "
                               "conversation, so the response cannot be told apart; use "
                               '{"prompt": ..., "response": ...} records')
        return PromptRecord(rid, prompt, whole[len(prompt):], str(last["content"]), chat=True)
    key = "response" if "response" in row else "completion" if "completion" in row else None
    if "prompt" not in row or (key is None and need_response):
        raise KDForgeError(f"{where} has neither 'messages' nor 'prompt' and 'response' (has "
                           f"{', '.join(row) or 'no field'}); give chat records {{\"messages\": [...]}} or pairs "
                           '{"prompt": ..., "response": ...}')
    response = row.get(key) if key else None
    for name, value in (("prompt", row["prompt"]), (key, response)):
        if name is not None and value is not None and not isinstance(value, str):
            raise KDForgeError(f"{where} field '{name}' is a {type(value).__name__}, not text; give a string")
    if response is None and need_response:
        raise KDForgeError(f"{where} field '{key}' is null; give the response text")
    return PromptRecord(rid, row["prompt"], response, row.get("reference"))


def read_prompt_records(source: str, tokenizer, need_response: bool = True,
                        encoding: str = "utf-8") -> tuple[list[PromptRecord], list[str]]:
    """The records of one prompt source (a .jsonl/.json file, a glob or folder of them, a save_to_disk folder or
    parquet file(s)) and the names of the files read. Records without an ``id`` are numbered in reading order.

    Raises KDForgeError naming the file and line of a line that is not JSON, and the record of a bad record.
    """
    from .corpus import _expand, _records
    from .datasets_input import dataset_is_empty, dataset_source, open_dataset, source_name

    rows: list[tuple[str, Any]] = []
    dataset = dataset_source(source)
    if dataset is not None:
        name = source_name(dataset)
        if not dataset_is_empty(dataset):
            ds = open_dataset(dataset, name)
            rows = [(f"dataset '{name}' row {i}", row) for i, row in enumerate(ds)]
        names = [str(p) for p in dataset.paths]
    else:
        paths = _expand(source)
        names = [str(p) for p in paths]
        for path in paths:
            if path.suffix not in (".jsonl", ".json"):
                raise KDForgeError(f"prompt file '{path}' is not .jsonl or .json; give JSONL records with 'messages' "
                                   "or 'prompt' and 'response' (or a dataset folder / parquet)")
            rows += _records(path, read_text(path, encoding))
    records = []
    for where, row in rows:
        record = record_from_row(row, where, tokenizer, need_response, default_id=str(len(records)))
        if record is not None:
            records.append(record)
    if not records:
        raise KDForgeError(f"prompt source '{source}' holds no record; give records with 'messages' or 'prompt' and "
                           "'response'")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise KDForgeError(f"prompt source '{source}' has two records with id '{dup}'; give each record its own id")
    return records, names


def load_prompt_set(spec, tokenizer, need_response: bool = True) -> PromptSet:
    """The training and held-out records `data.prompts` names (``spec`` is a kdforge.recipe.DataSpec).

    Held out: for `shakespeare`, the passages of the works in data.validation; for a file, data.validation_split
    (records drawn with split_seed) or data.validation, whose entries are prompt sources or Shakespeare work names
    (then the embedded passages of those works, with their real continuations).
    """
    if spec.prompts == "shakespeare":
        return shakespeare_prompt_set(list(spec.validation))
    train, train_names = read_prompt_records(spec.prompts, tokenizer, need_response, spec.encoding)
    if spec.validation_split is not None:
        from .datasets_input import split_documents

        seed = spec.split_seed or 0
        train, validation = split_documents(train, spec.validation_split, seed)
        return PromptSet(train, validation, train_names,
                         [f"validation_split {spec.validation_split:g} (seed {seed}) of {spec.prompts}"])
    validation, names, works = [], [], []
    for entry in spec.validation:
        if _is_work_name(entry):
            works.append(entry)
            continue
        records, found = read_prompt_records(entry, tokenizer, need_response, spec.encoding)
        validation += records
        names += found
    if works:
        held = shakespeare_prompt_set(works)
        validation += held.validation
        names += [f"shakespeare:{w}" for w in works]
    return PromptSet(train, validation, train_names, names)


def _is_work_name(entry: str) -> bool:
    return not Path(entry).expanduser().exists() and entry.replace("_", "").isalnum() and entry.islower()


# ---------------------------------------------------------------------------------------------------------------
# tokenization


@dataclass
class EncodeStats:
    kept: int = 0
    skipped_empty: int = 0  # no response tokens after truncation: skipped
    prompts_truncated: int = 0  # prompt longer than the limit: its first tokens dropped
    responses_cut: int = 0  # response longer than what the block leaves: its last tokens dropped
    response_tokens: int = 0

    def line(self, what: str, limit: int, seq_len: int) -> str:
        return (f"{what}: {self.kept} prompt–response records, {self.response_tokens:,} response tokens; "
                f"{self.skipped_empty} skipped (no response tokens after truncation), {self.prompts_truncated} "
                f"prompts truncated from the left to {limit} tokens, {self.responses_cut} responses cut at "
                f"seq_len={seq_len}")


def encode_records(records: Iterable[PromptRecord], tokenizer, seq_len: int, max_prompt_tokens: int | None = None,
                   max_tokens: int | None = None, what: str = "prompt–response data",
                   min_blocks: int = 1) -> tuple[TokenBlocks, EncodeStats]:
    """Blocks ``ids``, ``labels``, ``attention_mask`` [N, seq_len] and ``chars`` [N] of prompt–response records.

    A prompt keeps its last ``max_prompt_tokens`` tokens (default ``seq_len // 2``; left truncation); the response
    (+ EOS for a pair) fills what the block leaves and is cut on the right. A record left with no response token
    is skipped. ``labels`` are -100 on prompt and padding; ``chars`` counts the characters of the kept response
    tokens (bits per character). ``max_tokens`` caps the response tokens (whole records, in order).

    Raises KDForgeError when fewer than ``min_blocks`` records remain (the batch size for training).
    """
    records = list(records)
    limit = max_prompt_tokens or seq_len // 2
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    prompt_ids = tokenizer([r.prompt for r in records], add_special_tokens=False)["input_ids"] if records else []
    responses = (tokenizer([r.response or "" for r in records], add_special_tokens=False,
                           return_offsets_mapping=True) if records else {"input_ids": [], "offset_mapping": []})
    stats = EncodeStats()
    rows_ids, rows_labels, rows_mask, rows_chars = [], [], [], []
    for record, p, r, offsets in zip(records, prompt_ids, responses["input_ids"], responses["offset_mapping"]):
        if len(p) > limit:
            p = p[-limit:]
            stats.prompts_truncated += 1
        ends = [end for _, end in offsets]
        if r and not record.chat and eos is not None:
            r = r + [eos]
            ends.append(ends[-1])
        room = seq_len - len(p)
        if len(r) > room:
            r, ends = r[:room], ends[:room]
            stats.responses_cut += 1
        if not r:
            stats.skipped_empty += 1
            continue
        if max_tokens is not None and stats.response_tokens + len(r) > max_tokens:
            break
        n = len(p) + len(r)
        ids = p + r + [pad] * (seq_len - n)
        rows_ids.append(ids)
        rows_labels.append([-100] * len(p) + r + [-100] * (seq_len - n))
        rows_mask.append([1] * n + [0] * (seq_len - n))
        rows_chars.append(max(ends[-1], 0))
        stats.kept += 1
        stats.response_tokens += len(r)
    if stats.kept < min_blocks:
        fix = (f"lower train.batch_size to at most {stats.kept}, or add records" if stats.kept else
               "add records with non-empty responses, or raise data.seq_len")
        raise KDForgeError(f"the {what} makes {stats.kept} usable record(s) of {len(records)}, fewer than "
                           f"{min_blocks}; {fix}")
    blocks = TokenBlocks(torch.tensor(rows_ids, dtype=torch.long), torch.tensor(rows_chars, dtype=torch.long),
                         labels=torch.tensor(rows_labels, dtype=torch.long),
                         attention_mask=torch.tensor(rows_mask, dtype=torch.long))
    return blocks, stats


def prompt_blocks(recipe, tokenizer) -> tuple[TokenBlocks, TokenBlocks]:
    """(training blocks, held-out blocks) of the recipe's `data.prompts`, each [N, data.seq_len] with labels that
    mask prompt and padding; what was skipped or truncated is logged in one line per split."""
    data = recipe.data
    if recipe.generate.prompts is not None and not Path(data.prompts).expanduser().exists():
        raise KDForgeError(f"data.prompts '{data.prompts}' does not exist yet: it is the file `kdforge generate` "
                           "writes from generate.prompts; run `kdforge generate RECIPE` first")
    prompt_set = load_prompt_set(data, tokenizer)
    limit = data.max_prompt_tokens or data.seq_len // 2
    train, stats = encode_records(prompt_set.train, tokenizer, data.seq_len, data.max_prompt_tokens,
                                  data.max_train_tokens, "training prompt set", min_blocks=recipe.train.batch_size)
    log.info(stats.line(f"training prompts ({data.prompts})", limit, data.seq_len))
    val, vstats = encode_records(prompt_set.validation, tokenizer, data.seq_len, data.max_prompt_tokens,
                                 data.max_eval_tokens, "held-out prompt set")
    log.info(vstats.line(f"held-out prompts ({', '.join(prompt_set.validation_names)})", limit, data.seq_len))
    return train, val
