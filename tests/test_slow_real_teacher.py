"""Slow tests: the real SmolLM2-135M-Instruct teacher and the Shakespeare corpus, a few distillation steps."""
from __future__ import annotations

import json

import pytest
import torch

from kdforge.demo import demo_recipe
from kdforge.models import load_teacher, vocab_size
from kdforge.recipe import ModelSpec, parse_recipe
from kdforge.train import train

pytestmark = pytest.mark.slow


def test_embedded_teacher_resolves_and_loads():
    teacher = load_teacher(ModelSpec(model="smollm2-135m"))
    assert teacher.config.num_hidden_layers == 30 and vocab_size(teacher) == 49152
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_few_distillation_steps_on_shakespeare(tmp_path):
    data = demo_recipe(quick=True, out=tmp_path).model_dump(mode="json")
    data["train"].update(steps=3, save_every=3, log_every=1, batch_size=2)
    data["data"].update(seq_len=64, max_eval_tokens=1024)
    out = train(parse_recipe(data), progress=False)
    final = json.loads((out / "final.json").read_text())
    # The real teacher is far better than a 3-step student on held-out Shakespeare.
    assert final["teacher"]["perplexity"] < 200 < final["student"]["perplexity"]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert {"loss/cross_entropy", "loss/forward_kl"} <= set(rows[-1])
