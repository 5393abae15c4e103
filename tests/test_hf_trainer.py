"""DistillationTrainer: kdforge's Distiller inside transformers.Trainer (tiny offline models)."""
from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

OBJECTIVE = [
    {"loss": "cross_entropy", "weight": 0.5},
    {"loss": "forward_kl", "weight": 0.5},
    {"loss": "hidden_mse", "name": "hidden", "weight": 0.1, "student": "hidden_states", "teacher": "hidden_states",
     "projector": "linear"},
]


def _examples(tokenizer, n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Tokenized lines of uneven length (so micro-batches pad unevenly)."""
    from conftest import make_text

    lines = [line for line in make_text(40 * n, seed).splitlines() if line][:n]
    return [{"input_ids": tokenizer(line)["input_ids"][: 8 + (5 * i) % 17]} for i, line in enumerate(lines)]


def _trainer(tiny_assets, tmp_path, *, train, **args):
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, TrainingArguments

    from kdforge.hf_trainer import DistillationTrainer
    from kdforge.models import tiny_llama

    tok = AutoTokenizer.from_pretrained(tiny_assets["teacher"])
    teacher = transformers.AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"])
    student = tiny_llama(vocab_size=len(tok), hidden=32, layers=2, heads=4, seed=3)
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=3e-3,
                    max_steps=8, logging_steps=2, save_strategy="no", report_to=[], use_cpu=True,
                    disable_tqdm=True, seed=0, lr_scheduler_type="constant")
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, objective=[dict(t) for t in OBJECTIVE],
        args=TrainingArguments(**{**defaults, **args}), train_dataset=_examples(tok, train),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False), processing_class=tok)
    return trainer, tok


def test_trains_logs_terms_updates_projectors_and_saves_only_the_student(tiny_assets, tmp_path):
    trainer, tok = _trainer(tiny_assets, tmp_path, train=32, max_steps=8)
    extras = trainer.extra_parameters
    assert extras, "the hidden_mse term's linear projector is a trainable extra"
    before = [p.detach().clone() for p in extras]
    graded = []

    class SeeGrads(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            graded.append(all(p.grad is not None and p.grad.abs().sum() > 0 for p in extras))

    trainer.add_callback(SeeGrads())
    trainer.train()
    assert graded and all(graded), "every step's projector gradient is non-zero"
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, extras)), "the optimizer updated the projector"
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    for h in logs:
        assert {"cross_entropy", "forward_kl", "hidden"} <= set(h)
    assert logs[-1]["loss"] < logs[0]["loss"]

    folder = tmp_path / "student"
    trainer.save_model(str(folder))
    names = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in names and "kdforge_extras.pt" not in names
    from safetensors.torch import load_file

    keys = set(load_file(folder / "model.safetensors"))
    assert keys == set(trainer.model.state_dict()), "the student's weights, nothing else"
    assert not any("projector" in k or "feature_terms" in k for k in keys)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([tok("the king speak")["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, trainer.model.eval()(ids).logits)

    metrics = trainer.evaluate(eval_dataset=_examples(tok, 8, seed=5))
    assert {"eval_loss", "eval_cross_entropy", "eval_forward_kl", "eval_hidden"} <= set(metrics)


def test_one_accumulated_trainer_step_has_the_gradient_of_one_manual_distiller_step(tiny_assets, tmp_path):
    """Two unevenly padded micro-batches of 2 (gradient accumulation) give the gradient of the whole batch of 4 in one
    Distiller call: terms are normalised by the step's target tokens, not averaged per micro-batch."""
    from transformers import DataCollatorForLanguageModeling

    trainer, tok = _trainer(tiny_assets, tmp_path, train=4, max_steps=1, per_device_train_batch_size=2,
                            gradient_accumulation_steps=2, max_grad_norm=0.0, learning_rate=1e-9)
    examples = trainer.train_dataset
    lengths = sorted(len(e["input_ids"]) for e in examples)
    assert lengths[0] < lengths[-1], "uneven lengths, so micro-batches pad differently"
    params = [p for p in trainer.distiller.parameters() if p.requires_grad]
    batch = DataCollatorForLanguageModeling(tok, mlm=False)(examples)
    trainer.distiller.train()
    total, _ = trainer.distiller(batch)
    total.backward()
    manual = [p.grad.detach().clone() for p in params]
    trainer.distiller.zero_grad(set_to_none=True)

    seen = []

    class Grab(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            seen.append([p.grad.detach().clone() for p in params])

    trainer.add_callback(Grab())
    trainer.train()
    assert len(seen) == 1
    for got, want in zip(seen[0], manual):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_refuses_an_empty_objective(tiny_assets):
    from kdforge.errors import KDForgeError
    from kdforge.hf_trainer import DistillationTrainer
    from kdforge.models import tiny_llama

    with pytest.raises(KDForgeError, match="needs an objective"):
        DistillationTrainer(model=tiny_llama(), teacher_model=tiny_llama(), objective=[])


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_process_ddp_step_has_the_whole_batch_gradient(tmp_path):
    """Under torchrun (2 CPU ranks): the student runs through the DDP wrapper, the projectors (outside it) are averaged
    across ranks, and the token count is global, so the gradient is that of the whole global batch."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    entry = Path(__file__).with_name("hf_trainer_ddp_entry.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(entry),
           str(tmp_path / "out")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    # the two ranks print concurrently, so a line may run into the next: match the number alone
    diffs = [float(d) for d in re.findall(r"max relative difference ([0-9.]+e[-+][0-9]+)", run.stdout)]
    assert len(diffs) == 2 and max(diffs) < 1e-4, run.stdout
