"""Mistakes in how models and data fit together are refused before training, with advice that fits the mistake."""
from __future__ import annotations

import re

import pytest

from kdforge.errors import KDForgeError
from kdforge.recipe import parse_recipe


def _prepare(recipe: dict):
    from kdforge.train import prepare

    return prepare(parse_recipe(recipe))


def test_seq_len_beyond_the_models_positions_is_refused_with_both_numbers(tiny_recipe):
    tiny_recipe["data"]["seq_len"] = 1024  # the tiny teacher allows 512
    with pytest.raises(KDForgeError, match=r"data.seq_len=1024 is longer than the teacher's maximum of 512 positions"):
        _prepare(tiny_recipe)


def test_gpt2_n_positions_counts_too():
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdforge.checks import check_seq_len

    gpt2 = GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    check_seq_len(64, {"student": gpt2})
    with pytest.raises(KDForgeError, match="longer than the student's maximum of 64 positions"):
        check_seq_len(65, {"student": gpt2})


def test_a_pretrained_student_with_another_tokenizer_of_the_same_size_is_refused(tiny_recipe, tiny_assets, tmp_path):
    from transformers import AutoTokenizer

    from kdforge.models import tiny_llama

    tok = AutoTokenizer.from_pretrained(tiny_assets["teacher"])
    vocab = tok.get_vocab()
    # the same size, two ids swapped: a different tokenizer that a size check cannot see
    a, b = sorted(vocab, key=vocab.get)[10:12]
    import json

    data = json.loads(tok.backend_tokenizer.to_str())
    data["model"]["vocab"][a], data["model"]["vocab"][b] = vocab[b], vocab[a]
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), unk_token="<unk>",
                                    eos_token="<eos>", pad_token="<eos>")
    student_dir = tmp_path / "student"
    tiny_llama(vocab_size=len(tok), hidden=32, layers=2, heads=4, seed=3).save_pretrained(student_dir)
    other.save_pretrained(student_dir)
    tiny_recipe["student"] = {"init": "pretrained", "model": str(student_dir)}
    with pytest.raises(KDForgeError, match=rf"has its own tokenizer, which differs from the teacher's .*id {vocab[a]} "
                                           rf"is '{re.escape(a)}' for the teacher but '{re.escape(b)}' for the student"):
        _prepare(tiny_recipe)
    tok.save_pretrained(student_dir)  # the teacher's own tokenizer: accepted
    _prepare(tiny_recipe)


def test_a_batch_larger_than_the_data_says_so(tiny_recipe, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("the king speaks to the queen at night. " * 12)
    tiny_recipe["data"]["corpus"] = str(small)
    tiny_recipe["train"]["batch_size"] = 64
    with pytest.raises(KDForgeError, match=r"makes \d+ block\(s\) .* fewer than one batch of train.batch_size=64; "
                                           r"lower train.batch_size to at most \d+"):
        _prepare(tiny_recipe)


def test_a_glob_or_folder_that_matches_nothing_says_so(tiny_recipe, tmp_path):
    tiny_recipe["data"]["corpus"] = str(tmp_path / "nothing" / "*.txt")
    with pytest.raises(KDForgeError, match="matches no file"):
        _prepare(tiny_recipe)
    (tmp_path / "empty").mkdir()
    tiny_recipe["data"]["corpus"] = str(tmp_path / "empty")
    with pytest.raises(KDForgeError, match="holds no .txt, .jsonl or .md file"):
        _prepare(tiny_recipe)


def test_eval_of_an_unfinished_run_says_it_has_not_finished(tmp_path):
    from kdforge.evaluate.suite import run_eval

    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000003").mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    with pytest.raises(KDForgeError, match=r"has not finished, so it has no exported student yet \(last checkpoint: "
                                           r"step_00000003\); rerun `kdforge distill`"):
        run_eval(run)
