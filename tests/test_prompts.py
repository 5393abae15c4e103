"""Prompt–response data (kdforge.data.prompts): records, the Shakespeare prompt set, response-only masks for every
loss term, bad input, and training on it end to end."""
from __future__ import annotations

import json

import pytest
import torch

from kdforge.data.prompts import (PromptRecord, encode_records, load_prompt_set, passage_records, read_prompt_records,
                                  shakespeare_prompt_set)
from kdforge.errors import KDForgeError
from kdforge.recipe import DataSpec, parse_recipe

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture()
def tok(tiny_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_assets["teacher"])


@pytest.fixture()
def chat_tok(tok):
    tok.chat_template = TEMPLATE
    return tok


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def _pairs(n: int, seed: int = 0) -> list[dict]:
    from conftest import make_text

    rows = []
    for i in range(n):
        text = make_text(30, seed + i).replace("\n", " ")
        rows.append({"prompt": text[:40], "response": text[40:120]})
    return rows


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_passages_are_openings_and_their_real_continuations():
    speeches = [f"Speaker{i}.\n" + "\n".join(f"line {i}.{j} of the speech, in verse" for j in range(4))
                for i in range(40)]
    text = "\n\n".join(speeches) + "\n"
    records = passage_records("play", text, passage_chars=300, prompt_chars=100)
    assert len(records) >= 5
    assert [r.id for r in records[:2]] == ["play:0", "play:1"]
    joined = "".join(r.prompt + r.response for r in records)
    for r in records:
        assert len(r.prompt) >= 100 and r.prompt.endswith("\n") and r.response.strip()
        assert len(r.prompt + r.response) >= 150
        assert (r.prompt + r.response).replace("\n\n", "\n") in text.replace("\n\n", "\n"), "verbatim text"
        assert not r.prompt.endswith("\n\n"), "a prompt never ends on the blank line between speeches"
    assert joined.count("line 3.0 of") == 1, "passages do not overlap"


def test_shakespeare_prompts_are_split_by_work(tmp_path, monkeypatch):
    import kdforge.data.shakespeare as shakespeare

    for work in ("hamlet", "lear", "tempest"):
        (tmp_path / f"{work}.txt").write_text("\n\n".join(f"{work.upper()}.\nA line of {work}, number {i}, and more "
                                                          f"words.\nAnother line {i}." for i in range(60)))
    monkeypatch.setattr(shakespeare, "shakespeare_dir", lambda: tmp_path)
    prompts = shakespeare_prompt_set(["lear", "tempest"])
    assert prompts.train_names == ["hamlet"] and prompts.validation_names == ["lear", "tempest"]
    assert prompts.train and all(r.id.startswith("hamlet:") and "hamlet" in r.response for r in prompts.train)
    assert {r.id.split(":")[0] for r in prompts.validation} == {"lear", "tempest"}
    with pytest.raises(KDForgeError, match="unknown held-out work 'leer'"):
        shakespeare_prompt_set(["leer"])
    # a prompt file may be held out against Shakespeare works (what a SeqKD recipe on generated responses does)
    spec = DataSpec(prompts=_jsonl(tmp_path / "p.jsonl", _pairs(3)), validation=["lear"])
    assert {r.id.split(":")[0] for r in load_prompt_set(spec, None).validation} == {"lear"}


def test_pairs_chat_saved_dataset_and_parquet_read_alike(tmp_path, chat_tok):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "To be", "response": " or not to be"}, {"prompt": "Now is", "completion": " the winter",
                                                                  "id": "w"}]
    records, names = read_prompt_records(_jsonl(tmp_path / "pairs.jsonl", rows), chat_tok)
    assert [(r.id, r.prompt, r.response, r.chat) for r in records] == [
        ("0", "To be", " or not to be", False), ("w", "Now is", " the winter", False)]
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    (r,), _ = read_prompt_records(_jsonl(tmp_path / "chat.jsonl", chat), chat_tok)
    assert (r.prompt, r.response, r.reference, r.chat) == ("<|user|>hi<eos><|assistant|>", "hello<eos>", "hello", True)
    pairs = [{"prompt": "To be", "response": " or not"}] * 3
    datasets.Dataset.from_list(pairs).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_list(pairs).to_parquet(str(tmp_path / "p.parquet"))
    for source in ("saved", "p.parquet"):
        records, names = read_prompt_records(str(tmp_path / source), chat_tok)
        assert [(x.prompt, x.response) for x in records] == [("To be", " or not")] * 3 and names
    datasets.Dataset.from_list(chat * 2).save_to_disk(str(tmp_path / "chat_saved"))
    records, _ = read_prompt_records(str(tmp_path / "chat_saved"), chat_tok)
    assert records[1].prompt == "<|user|>hi<eos><|assistant|>" and records[1].response == "hello<eos>"


def test_bad_records_are_named_with_the_fix(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": \n')
    with pytest.raises(KDForgeError) as err:
        read_prompt_records(str(path), tok)
    assert f"{path}:3 is not valid JSON" in _one_line(err)
    path.write_text('{"prompt": "a", "response": "b"}\n{"text": "x", "label": 1}\n')
    with pytest.raises(KDForgeError) as err:
        read_prompt_records(str(path), tok)
    assert f"{path}:2 has neither 'messages' nor 'prompt' and 'response' (has text, label)" in _one_line(err)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    with pytest.raises(KDForgeError) as err:
        read_prompt_records(str(path), tok)  # the tiny tokenizer has no chat template
    assert (f"{path}:1 is a chat record but the teacher's tokenizer has no chat template; give the tokenizer one"
            in _one_line(err)) and '{"prompt": ..., "response": ...} records' in str(err.value)
    path.write_text('{"prompt": "a", "response": 3}\n')
    with pytest.raises(KDForgeError, match="field 'response' is a int, not text"):
        read_prompt_records(str(path), tok)


def test_blocks_mask_prompts_truncate_left_and_skip_empty_responses(tok):
    records = [PromptRecord("a", "the king", " doth speak"),
               PromptRecord("b", "the king " * 20, " night"),  # prompt longer than the limit: cut on the left
               PromptRecord("c", "the queen", ""),  # no response tokens: skipped
               PromptRecord("d", "day", " love " * 40)]  # response longer than the block: cut on the right
    blocks, stats = encode_records(records, tok, seq_len=24, max_prompt_tokens=8)
    assert (stats.kept, stats.skipped_empty, stats.prompts_truncated, stats.responses_cut) == (3, 1, 1, 1)
    assert blocks.ids.shape == blocks.labels.shape == blocks.attention_mask.shape == (3, 24)
    p = tok("the king", add_special_tokens=False)["input_ids"]
    r = tok(" doth speak", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(p) + len(r)
    assert blocks.ids[0, :n].tolist() == p + r
    assert blocks.labels[0].tolist() == [-100] * len(p) + r + [-100] * (24 - n)
    assert blocks.attention_mask[0].tolist() == [1] * n + [0] * (24 - n)
    long_prompt = tok("the king " * 20, add_special_tokens=False)["input_ids"]
    assert blocks.ids[1, :8].tolist() == long_prompt[-8:], "the prompt keeps its last tokens"
    assert (blocks.labels[1, :8] == -100).all() and (blocks.labels[1, 8:] != -100).any()
    assert blocks.attention_mask[2].all() and (blocks.labels[2] != -100).sum() == 24 - len(tok("day")["input_ids"])
    assert int(blocks.chars[0]) == len(" doth speak")
    with pytest.raises(KDForgeError) as err:
        encode_records(records, tok, seq_len=24, max_prompt_tokens=8, what="training prompt set", min_blocks=4)
    assert "makes 3 usable record(s) of 4, fewer than 4; lower train.batch_size to at most 3" in _one_line(err)
    with pytest.raises(KDForgeError, match="leaves no room for a response"):
        parse_recipe({"data": {"prompts": "x.jsonl", "max_prompt_tokens": 32, "seq_len": 32}})


def _direct_kl(s_logits, t_logits, labels):
    """Forward KL(teacher || student) at temperature 1, averaged over the response targets only."""
    keep = labels[:, 1:] != -100
    s = s_logits[:, :-1][keep].log_softmax(-1)
    t = t_logits[:, :-1][keep].log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean()


@pytest.mark.parametrize("chunk", [None, 5])
def test_kd_and_ce_terms_count_only_response_tokens(tok, chunk):
    """Pins every term on a prompt–response batch to a direct computation over the response tokens alone."""
    from kdforge.distiller import Distiller
    from kdforge.models import tiny_llama

    records = [PromptRecord(str(i), "the king doth speak " * (i + 1), " of night and day" * (3 - i)) for i in range(3)]
    blocks, _ = encode_records(records, tok, seq_len=32)
    batch = {"input_ids": blocks.ids, "attention_mask": blocks.attention_mask, "labels": blocks.labels}
    teacher = tiny_llama(vocab_size=len(tok), hidden=48, layers=2, seed=1)
    student = tiny_llama(vocab_size=len(tok), hidden=32, layers=2, seed=0)
    distiller = Distiller(teacher, student, [{"loss": "cross_entropy"}, {"loss": "forward_kl"}],
                          logit_chunk_size=chunk)
    _, values = distiller(batch)
    with torch.no_grad():
        s = student(input_ids=blocks.ids, attention_mask=blocks.attention_mask).logits
        t = teacher(input_ids=blocks.ids, attention_mask=blocks.attention_mask).logits
    keep = blocks.labels[:, 1:] != -100
    ce = torch.nn.functional.cross_entropy(s[:, :-1][keep], blocks.labels[:, 1:][keep])
    assert float(values["forward_kl"]) == pytest.approx(float(_direct_kl(s, t, blocks.labels)), rel=1e-5)
    assert float(values["cross_entropy"]) == pytest.approx(float(ce), rel=1e-5)
    # and the prompt positions are never read: a teacher whose logits there are NaN gives the same values
    from kdforge.teachers.live import TeacherOutput

    def poisoned(batch, taps=None):
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.clone()
        predicts_prompt = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        predicts_prompt[:, :-1] = batch["labels"][:, 1:] == -100
        logits[predicts_prompt] = float("nan")
        return TeacherOutput(logits.detach())

    assert bool(((blocks.labels[:, 1:] == -100) & blocks.attention_mask[:, 1:].bool()).any()), "prompts are there"
    _, again = Distiller(poisoned, student, [{"loss": "cross_entropy"}, {"loss": "forward_kl"}],
                         logit_chunk_size=chunk)(batch)
    assert float(again["forward_kl"]) == pytest.approx(float(values["forward_kl"]), rel=1e-6)


def test_feature_terms_count_only_response_positions(tok):
    from kdforge.distiller import Distiller
    from kdforge.models import tiny_llama

    records = [PromptRecord(str(i), "the king doth speak " * 2, " of night and day" * (i + 1)) for i in range(2)]
    blocks, _ = encode_records(records, tok, seq_len=32)
    batch = {"input_ids": blocks.ids, "attention_mask": blocks.attention_mask, "labels": blocks.labels}
    teacher = tiny_llama(vocab_size=len(tok), hidden=32, layers=2, seed=1)
    student = tiny_llama(vocab_size=len(tok), hidden=32, layers=2, seed=0)
    distiller = Distiller(teacher, student, [{"loss": "hidden_mse", "student": "model.norm", "teacher": "model.norm",
                                              "projector": "identity"}])
    _, values = distiller(batch)
    with torch.no_grad():
        hs = student(input_ids=blocks.ids, attention_mask=blocks.attention_mask, output_hidden_states=True)
        ht = teacher(input_ids=blocks.ids, attention_mask=blocks.attention_mask, output_hidden_states=True)
    keep = torch.zeros_like(blocks.ids, dtype=torch.bool)
    keep[:, :-1] = blocks.labels[:, 1:] != -100  # the positions that predict a response token
    direct = ((hs.hidden_states[-1] - ht.hidden_states[-1]) ** 2)[keep].mean()
    assert float(values["hidden_mse"]) == pytest.approx(float(direct), rel=1e-4)


def test_distill_on_prompt_response_records_end_to_end(tiny_recipe, tmp_path):
    from kdforge.train import train, tokenize_corpus

    data = {"prompts": _jsonl(tmp_path / "pairs.jsonl", _pairs(24)), "validation_split": 0.25, "seq_len": 32,
            "max_prompt_tokens": 12}
    recipe = parse_recipe({**tiny_recipe, "data": data, "train": {**tiny_recipe["train"], "steps": 3}})
    out = train(recipe, progress=False)
    final = json.loads((out / "final.json").read_text())
    from transformers import AutoTokenizer

    _, val = tokenize_corpus(recipe, AutoTokenizer.from_pretrained(tiny_recipe["teacher"]["model"]))
    assert final["student"]["eval_tokens"] == int((val.labels[:, 1:] != -100).sum()), "held-out: responses only"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["tokens"] < 3 * 4 * 31, "tokens seen count response tokens, not whole blocks"
    assert (out / "student" / "config.json").is_file()
    from kdforge.evaluate.suite import run_eval
    from kdforge.recipe import EvalSpec

    res = run_eval(out, spec=EvalSpec(ood=None, generation=False, speed=False, cka=False))
    assert res["heldout"]["student"]["perplexity"] == pytest.approx(final["student"]["perplexity"], rel=1e-5), \
        "`kdforge eval RUN` measures the same held-out responses as the run"
    with pytest.raises(KDForgeError, match="teacher.kind: live"):
        parse_recipe({**tiny_recipe, "data": data, "teacher": {"model": "x", "kind": "cache", "path": "c"}})
