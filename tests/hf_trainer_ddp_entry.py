"""Run under torchrun (2 CPU ranks, gloo) by tests/test_hf_trainer.py: one DistillationTrainer step with gradient
accumulation, uneven valid tokens per micro-batch and rank, must have the gradient of one Distiller call on the whole
batch (student and projector). Prints `rank R max relative difference D`."""
import os
import sys

import torch
import transformers
from transformers import TrainingArguments

from kdforge.hf_trainer import DistillationTrainer
from kdforge.models import tiny_llama

torch.set_num_threads(1)
out_dir = sys.argv[1]
g = torch.Generator().manual_seed(0)  # the same examples on every rank (no per-process tokenizer training)
examples = [{"input_ids": torch.randint(2, 128, (6 + (7 * i) % 19,), generator=g).tolist()} for i in range(8)]


def collate(rows):
    ids = torch.zeros(len(rows), max(len(r["input_ids"]) for r in rows), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


objective = [{"loss": "cross_entropy", "weight": 0.5}, {"loss": "forward_kl", "weight": 0.5},
             {"loss": "hidden_mse", "name": "hidden", "weight": 0.1, "student": "hidden_states",
              "teacher": "hidden_states", "projector": "linear"}]
args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
                         max_grad_norm=0.0, learning_rate=1e-9, report_to=[], use_cpu=True, save_strategy="no",
                         disable_tqdm=True, ddp_backend="gloo")
trainer = DistillationTrainer(model=tiny_llama(hidden=32, layers=2, seed=3), objective=objective, args=args,
                              teacher_model=tiny_llama(hidden=48, layers=3, seed=1), train_dataset=examples,
                              data_collator=collate)
assert trainer.accelerator.num_processes == 2 and trainer.extra_parameters
params = [p for p in trainer.distiller.parameters() if p.requires_grad]
total, _ = trainer.distiller(collate(examples))  # every rank: the whole global batch (8) in one call
total.backward()
manual = [p.grad.clone() for p in params]
trainer.distiller.zero_grad(set_to_none=True)
seen = []


class Grab(transformers.TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        seen.append([p.grad.clone() for p in params])


trainer.add_callback(Grab())
trainer.train()
worst = max(float((a - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(seen[0], manual))
print(f"rank {os.environ['RANK']} max relative difference {worst:.3e}", flush=True)
