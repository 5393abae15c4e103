"""Shared fixtures: a tiny BPE tokenizer, a tiny random Llama teacher folder, and a small text corpus — all offline."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# precision `auto` means float32 in every test (and the subprocesses they start), whatever this CPU's bf16 support;
# tests of the detection itself unset it
os.environ.setdefault("KDFORGE_AUTO_PRECISION", "float32")

import torch  # noqa: E402

# Tiny models gain nothing from threads, and tests often share the CPU with other processes.
torch.set_num_threads(1)

WORDS = ("the king queen lord lady speak night day love death crown sword heart blood fair foul sweet "
         "good ill storm sea land father daughter brother sister hath doth thou thee thy mine").split()


def make_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    while n_words > 0:
        k = rng.randint(4, 12)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n_words -= k
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """A trained 128-token BPE, a tiny Llama teacher saved with it, and train/val text files."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    from kdforge.models import tiny_llama

    root = tmp_path_factory.mktemp("tiny")
    (root / "corpus").mkdir()
    train_txt = root / "corpus" / "train.txt"
    val_txt = root / "corpus" / "val.txt"
    train_txt.write_text(make_text(6000, 0))
    val_txt.write_text(make_text(1500, 1))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # sorted: ByteLevel.alphabet() comes in a different order in every process, and 90 of them picked unsorted gave
    # each test session another vocabulary (a flaky test once)
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())[:90])
    tok.train([str(train_txt)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    teacher_dir = root / "teacher"
    model = tiny_llama(vocab_size=len(fast), hidden=48, layers=3, heads=4, seed=1)
    model.save_pretrained(teacher_dir)
    fast.save_pretrained(teacher_dir)
    return {"root": root, "teacher": teacher_dir, "train": train_txt, "val": val_txt}


@pytest.fixture()
def tiny_recipe(tiny_assets, tmp_path):
    """A valid recipe dict on the tiny assets; tests change what they need. Precision is pinned to float32, so a test
    does not depend on whether this CPU has native bf16 (`auto` picks by the hardware)."""
    return {
        "name": "tiny",
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "teacher": {"model": str(tiny_assets["teacher"]), "dtype": "float32"},
        "student": {"init": "config", "config": {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64}},
        "data": {"corpus": str(tiny_assets["train"]), "validation": [str(tiny_assets["val"])], "seq_len": 32,
                 "max_eval_tokens": 1024},
        "objective": [{"loss": "cross_entropy", "weight": 0.5}, {"loss": "forward_kl", "weight": 0.5}],
        "train": {"steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "save_every": 3, "log_every": 1,
                  "bf16": False},
    }


@pytest.fixture(scope="module")
def peaked_teacher():
    """(a tiny 300-id Llama whose output distribution is peaked, 6 blocks of 16 ids): the teacher-cache tests' teacher."""
    from kdforge.models import tiny_llama

    teacher = tiny_llama(vocab_size=300, hidden=32, layers=2, heads=4, seed=0)
    with torch.no_grad():  # a peaked teacher, as trained ones are
        teacher.lm_head.weight.mul_(30)
    ids = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(0))
    return teacher, ids
