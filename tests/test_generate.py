"""`kdforge generate` (kdforge.generate): batched teacher generation for sequence-level KD, resumable, then trained on."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from kdforge.errors import KDForgeError
from kdforge.generate import check_terminates, generate_batch, generate_responses
from kdforge.recipe import GenerateSpec, parse_recipe


def _pairs(n: int, seed: int = 0) -> list[dict]:
    from conftest import make_text

    return [{"prompt": make_text(8 + i % 5, seed + i).replace("\n", " ")[:20 + 7 * (i % 4)],
             "response": " the king"} for i in range(n)]


@pytest.fixture()
def gen_recipe(tiny_recipe, tmp_path):
    """The tiny recipe on prompt–response records: 10 training prompts, 4 held out in their own file."""
    for name, rows in (("train", _pairs(10)), ("val", _pairs(4, 100))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {**tiny_recipe, "data": {"prompts": str(tmp_path / "train.jsonl"),
                                    "validation": [str(tmp_path / "val.jsonl")], "seq_len": 32},
            "generate": {"max_new_tokens": 6, "batch_size": 4}}


@pytest.fixture()
def teacher_and_tok(tiny_assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"]).eval(), \
        AutoTokenizer.from_pretrained(tiny_assets["teacher"])


def _records(path):
    lines = path.read_text().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(teacher_and_tok):
    teacher, tok = teacher_and_tok
    prompts = [tok(p["prompt"], add_special_tokens=False)["input_ids"] for p in _pairs(5)]
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths, so padding happens"
    gen = GenerateSpec(max_new_tokens=7, stop_at_eos=False)
    batched = generate_batch(teacher, tok, prompts, gen)
    single = [generate_batch(teacher, tok, [p], gen)[0] for p in prompts]
    assert [b["ids"] for b in batched] == [s["ids"] for s in single]
    assert all(len(b["ids"]) == 7 and b["finish"] == "length" for b in batched)
    with torch.no_grad():  # and it is greedy: each new token is the argmax after the prompt and the tokens before
        ids = torch.tensor([prompts[0] + batched[0]["ids"]])
        argmax = teacher(input_ids=ids).logits[0, len(prompts[0]) - 1:-1].argmax(-1).tolist()
    assert argmax == batched[0]["ids"]
    # EOS ends a response (the EOS itself is not kept) while the others in the batch go on
    first = batched[0]["ids"]
    k = next((j for j in range(1, len(first)) if first[j] not in first[:j]), 0)  # a token first seen at position k
    stop = first[k]
    tok.eos_token = tok.convert_ids_to_tokens(stop)
    cut = generate_batch(teacher, tok, prompts, GenerateSpec(max_new_tokens=7))
    assert cut[0]["ids"] == first[:k] and cut[0]["finish"] == "eos"
    for b, c in zip(batched, cut):
        assert c["ids"] == (b["ids"][: b["ids"].index(stop)] if stop in b["ids"] else b["ids"])


def test_sampling_follows_its_seed(teacher_and_tok):
    teacher, tok = teacher_and_tok
    prompts = [tok(p["prompt"], add_special_tokens=False)["input_ids"] for p in _pairs(3)]
    gen = GenerateSpec(max_new_tokens=12, stop_at_eos=False, do_sample=True, temperature=1.5, top_p=0.95)
    a, b = (generate_batch(teacher, tok, prompts, gen, seed=s) for s in (1, 1))
    c = generate_batch(teacher, tok, prompts, gen, seed=2)
    greedy = generate_batch(teacher, tok, prompts, GenerateSpec(max_new_tokens=12, stop_at_eos=False))
    assert [x["ids"] for x in a] == [x["ids"] for x in b]
    assert [x["ids"] for x in a] != [x["ids"] for x in c] and [x["ids"] for x in a] != [x["ids"] for x in greedy]


def test_settings_that_cannot_end_are_refused_in_one_line(gen_recipe, tmp_path):
    with pytest.raises(KDForgeError) as err:
        check_terminates(GenerateSpec(max_new_tokens=None, stop_at_eos=False), eos_token_id=2)
    assert str(err.value) == ("generation cannot end: generate.max_new_tokens is null and generate.stop_at_eos is "
                              "false; set generate.max_new_tokens (e.g. 128)")
    with pytest.raises(KDForgeError, match="the tokenizer has no EOS token"):
        check_terminates(GenerateSpec(max_new_tokens=None), eos_token_id=None)
    check_terminates(GenerateSpec(max_new_tokens=None), eos_token_id=2)  # EOS alone ends it
    recipe = parse_recipe({**gen_recipe, "generate": {"max_new_tokens": None, "stop_at_eos": False}})
    with pytest.raises(KDForgeError, match="cannot end"):
        generate_responses(recipe, tmp_path / "x.jsonl", teacher=object(), progress=False)  # before any model runs
    assert not (tmp_path / "x.jsonl").exists()


def test_generate_resumes_after_a_kill_without_duplicates_or_losses(gen_recipe, teacher_and_tok, tmp_path,
                                                                    monkeypatch):
    import kdforge.generate as generate

    teacher, tok = teacher_and_tok
    recipe = parse_recipe(gen_recipe)
    whole = tmp_path / "whole.jsonl"
    res = generate_responses(recipe, whole, teacher=teacher, tokenizer=tok, progress=False)
    assert (res["written"], res["total"]) == (10, 10)
    head, records = _records(whole)
    info = head["kdforge_generate"]
    assert info["teacher"]["path"] == gen_recipe["teacher"]["model"] and info["teacher"]["parameters"] > 0
    assert info["settings"]["max_new_tokens"] == 6 and info["settings"]["do_sample"] is False
    assert info["prompts"] == {"source": gen_recipe["data"]["prompts"], "split": "train", "count": 10,
                               "validation": gen_recipe["data"]["validation"]}
    assert [r["id"] for r in records] == [str(i) for i in range(10)]
    assert all(r["reference"] == " the king" and r["response_tokens"] <= 6 for r in records)

    # killed during the third batch: the first two batches are on disk, and the kill cut a line in half
    calls = {"n": 0}
    real = generate.generate_batch

    def dies_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "generate_batch", dies_on_third)
    part = tmp_path / "part.jsonl"
    with pytest.raises(KeyboardInterrupt):
        generate_responses(recipe, part, teacher=teacher, tokenizer=tok, progress=False)
    assert len(_records(part)[1]) == 8
    with open(part, "ab") as f:
        f.write(b'{"id": "8", "prompt": "half a li')
    monkeypatch.setattr(generate, "generate_batch", real)
    res = generate_responses(recipe, part, teacher=teacher, tokenizer=tok, progress=False)
    assert (res["written"], res["skipped_done"]) == (2, 8)
    assert _records(part) == (head, records), "the same file as an uninterrupted run: nothing twice, nothing lost"
    again = generate_responses(recipe, part, teacher=teacher, tokenizer=tok, progress=False)
    assert again["written"] == 0 and _records(part)[1] == records

    other = parse_recipe({**gen_recipe, "generate": {"max_new_tokens": 9, "batch_size": 4}})
    with pytest.raises(KDForgeError) as err:
        generate_responses(other, part, teacher=teacher, tokenizer=tok, progress=False)
    assert f"{part} was written with another settings (max_new_tokens 6 -> 9); give another --out" in str(err.value)
    assert "\n" not in str(err.value)


def test_generate_on_the_cli_then_distil_on_the_responses(gen_recipe, tmp_path):
    """Sequence-level KD end to end: the teacher answers the prompts, then a recipe trains on its answers."""
    from kdforge.cli import app
    from kdforge.train import tokenize_corpus, train

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(gen_recipe))
    out = tmp_path / "teacher.jsonl"
    res = CliRunner().invoke(app, ["generate", str(path), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert f"wrote 10 responses to {out}" in res.output and f"--set data.prompts={out}" in res.output
    _, records = _records(out)
    seqkd = parse_recipe({**gen_recipe, "data": {**gen_recipe["data"], "prompts": str(out)},
                          "objective": [{"loss": "cross_entropy"}],
                          "train": {**gen_recipe["train"], "steps": 2}})
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gen_recipe["teacher"]["model"])
    train_blocks, _ = tokenize_corpus(seqkd, tok)
    first = records[0]
    want = tok(first["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert train_blocks.labels[0][train_blocks.labels[0] != -100].tolist() == want, "it learns the teacher's answer"
    run = train(seqkd, progress=False)
    assert json.loads((run / "final.json").read_text())["student"]["perplexity"] > 0
    bad = CliRunner().invoke(app, ["generate", str(path), "--set", "generate.max_new_tokens=null",
                                   "--set", "generate.stop_at_eos=false"])
    assert bad.exit_code == 2 and "generation cannot end" in bad.output


def test_seqkd_recipe_generates_then_trains_on_tiny_models(tiny_assets, tmp_path, monkeypatch):
    """recipes/seqkd.yaml as shipped, on the tiny teacher: `kdforge generate` writes data.prompts from
    generate.prompts, then `kdforge distill` of the same recipe trains on it."""
    from pathlib import Path

    from kdforge.generate import default_output
    from kdforge.recipe import load_recipe
    from kdforge.train import train

    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pairs(12)))
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pairs(3, 50)))
    shipped = Path(__file__).resolve().parents[1] / "recipes" / "seqkd.yaml"
    overrides = [f"output_dir={tmp_path / 'run'}", f"teacher.model={tiny_assets['teacher']}",
                 "teacher.dtype=float32", f"generate.prompts={tmp_path / 'prompts.jsonl'}",
                 "generate.max_new_tokens=8", "generate.max_prompts=10", f"data.prompts={tmp_path / 'seqkd.jsonl'}",
                 f"data.validation=[{tmp_path / 'held.jsonl'}]", "data.seq_len=32",
                 "student.config={hidden_size: 32, num_hidden_layers: 2, intermediate_size: 64, "
                 "num_attention_heads: 4, num_key_value_heads: 2, head_dim: 8}",
                 "train.steps=2", "train.batch_size=4", "train.warmup_steps=1", "train.logit_chunk_size=16"]
    recipe = load_recipe(shipped, overrides)
    with pytest.raises(KDForgeError, match="run `kdforge generate RECIPE` first"):
        train(recipe, progress=False)
    assert default_output(recipe) == tmp_path / "seqkd.jsonl"
    res = generate_responses(recipe, progress=False)
    assert res["written"] == 10 and res["path"] == str(tmp_path / "seqkd.jsonl")
    head, records = _records(tmp_path / "seqkd.jsonl")
    assert head["kdforge_generate"]["prompts"]["source"] == str(tmp_path / "prompts.jsonl")
    run = train(recipe, progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["loss/cross_entropy"] > 0
    with pytest.raises(KDForgeError, match="data.prompts must name the .jsonl file"):
        load_recipe(shipped, ["data.prompts=shakespeare"])


def test_a_killed_generate_process_resumes_without_duplicates_or_losses(gen_recipe, tmp_path):
    """SIGKILL a real `kdforge generate` process mid-run, then resume (in this process, the same code as a rerun of the
    command): every prompt answered exactly once, and the file equals an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import make_text

    rows = [{"prompt": make_text(6, i).replace("\n", " ")[:24], "response": "x"} for i in range(80)]
    (tmp_path / "many.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {**gen_recipe, "data": {**gen_recipe["data"], "prompts": str(tmp_path / "many.jsonl")},
              "generate": {"max_new_tokens": 24, "batch_size": 2, "stop_at_eos": False}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "killed.jsonl"
    cmd = [sys.executable, "-m", "kdforge.cli", "generate", str(path), "--out", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.is_file() and out.read_text().count("\n") >= 6:  # the header and a few batches are on disk
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stdout.read().decode()[-500:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 6 <= out.read_text().count("\n") < 81, "killed part-way"
    res = generate_responses(parse_recipe(recipe), out, progress=False)
    assert 0 < res["written"] < 80 and res["written"] + res["skipped_done"] == 80
    head, records = _records(out)
    assert sorted(r["id"] for r in records) == sorted(str(i) for i in range(80)), "each prompt exactly once"
    whole = tmp_path / "whole.jsonl"
    generate_responses(parse_recipe(recipe), whole, progress=False)
    assert _records(whole) == (head, records), "the same file as an uninterrupted run"


def test_the_teacher_is_named_by_its_weights(gen_recipe, tiny_assets):
    from transformers import AutoModelForCausalLM

    from kdforge.generate import teacher_identity

    recipe = parse_recipe(gen_recipe)
    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"])  # noqa: E731
    first, again = teacher_identity(recipe, load()), teacher_identity(recipe, load())
    assert first == again and first["path"] == str(tiny_assets["teacher"])
    other = load()
    with torch.no_grad():  # past the first values of the tensor: the tensor's sum tells
        other.model.layers[1].mlp.down_proj.weight[3, 5] += 0.01
    assert teacher_identity(recipe, other)["fingerprint"] != first["fingerprint"]
    noted = load()
    noted.config.some_loader_note = "added"  # what a loader adds to the config does not rename the model
    assert teacher_identity(recipe, noted)["fingerprint"] == first["fingerprint"]
