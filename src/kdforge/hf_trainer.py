"""`DistillationTrainer`: kdforge's Distiller inside a `transformers.Trainer`, for users who keep their
TrainingArguments, callbacks and loggers (a TRL / HF training script).

    trainer = DistillationTrainer(model=student, teacher_model=teacher,
                                  objective=[{"loss": "cross_entropy", "weight": 0.5},
                                             {"loss": "forward_kl", "weight": 0.5}],
                                  args=TrainingArguments(...), train_dataset=..., data_collator=...)
    trainer.train()
    trainer.save_model("student")   # a plain save_pretrained folder: the student only

What differs from a plain Trainer:
- the loss is the Distiller's total (teacher frozen, eval mode, no grad); each term's value is logged beside `loss`
  (train logs: the term's name; eval logs: `eval_<name>`), averaged over the logging window by target tokens;
- the Distiller's trainable extras (feature-term projectors, learned layer maps, stepping-stone connectors) are one
  more optimizer param group (the Trainer's learning rate and weight decay), are clipped with the student under
  `max_grad_norm`, averaged across processes, and saved in Trainer checkpoints (`kdforge_extras.pt`, restored by
  `resume_from_checkpoint`) but never in a saved student folder;
- gradient accumulation is exact: every micro-batch's terms are normalised by the number of target tokens in the
  whole optimizer step (all micro-batches, all processes), counted by kdforge's own mask (labels != -100 and
  attention_mask, shifted for a causal LM), so unevenly padded micro-batches weigh as they would in one big batch.
"""
from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from typing import Any

import torch
import transformers
from torch import nn

from .batches import shifted_targets
from .distiller import Distiller
from .errors import KDForgeError
from .models import vocab_size

EXTRAS_NAME = "kdforge_extras.pt"


class DistillationTrainer(transformers.Trainer):
    """A `transformers.Trainer` whose loss is a kdforge objective.

    model: the student (what the Trainer trains and saves). teacher_model: a frozen nn.Module (moved to the
    Trainer's device, run in eval mode without grad) or a kdforge teacher source (e.g. an offline cache).
    objective: kdforge terms as dicts or `kdforge.recipe.Term`s, e.g. `[{"loss": "forward_kl", "temperature": 2}]`.
    teacher_dtype: float32, bfloat16 or auto (the teacher's forward precision); truncate_to_shared_vocab,
    logit_chunk_size, seq_len: as in `kdforge.Distiller`. Every other keyword goes to `transformers.Trainer`.
    Batches are dicts of `input_ids` [B, T], `attention_mask` [B, T] and optional `labels` [B, T] (-100: ignored).

    Raises KDForgeError for an empty objective, and whatever the Distiller refuses (unknown loss, KD terms without a
    teacher, mismatched vocabularies).
    """

    loss_is_scaled_for_ga = True  # compute_loss normalises by the whole step's token count itself

    def __init__(self, model: nn.Module, *, teacher_model: Any = None, objective: list[dict[str, Any]] | None = None,
                 teacher_dtype: str = "auto", truncate_to_shared_vocab: bool = False,
                 logit_chunk_size: int | None = None, seq_len: int = 128, **trainer_kwargs: Any):
        if not objective:
            raise KDForgeError("DistillationTrainer needs an objective; pass e.g. objective=[{'loss': 'forward_kl'}]")
        if model is None:
            raise KDForgeError("DistillationTrainer needs the student as model=; model_init is not supported")
        device = next(model.parameters()).device
        if isinstance(teacher_model, nn.Module):
            teacher_model.to(device)  # on the student's device while the Distiller probes feature shapes
        example = None  # the probe batch for feature terms, on the student's device
        if hasattr(model, "get_output_embeddings"):
            ids = torch.arange(2 * min(seq_len, 16), device=device).remainder(vocab_size(model)).view(2, -1)
            example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        distiller = Distiller(teacher_model, model, objective, truncate_to_shared_vocab=truncate_to_shared_vocab,
                              teacher_dtype=teacher_dtype, seq_len=seq_len, example_batch=example,
                              logit_chunk_size=logit_chunk_size)
        super().__init__(model=model, **trainer_kwargs)
        if logit_chunk_size is not None and self.accelerator.num_processes > 1:
            # the chunked path runs the student's base model outside the DDP wrapper, so its gradients would not be
            # all-reduced
            raise KDForgeError("DistillationTrainer: logit_chunk_size works in a single process only; set it to None "
                               "under several processes")
        self.distiller = distiller.to(self.args.device)
        if isinstance(teacher_model, nn.Module) and not hasattr(teacher_model, "hf_device_map"):
            teacher_model.to(self.args.device)
        student = {id(p) for p in model.parameters()}
        self.extra_parameters = [p for p in distiller.parameters() if id(p) not in student and p.requires_grad]
        # term -> [sum of value x tokens, tokens], per mode, since the last log
        self._term_sums: dict[str, dict[str, list[float]]] = {"train": defaultdict(lambda: [0.0, 0.0]),
                                                                 "eval": defaultdict(lambda: [0.0, 0.0])}

    # ---- the loss ----

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """One optimizer step's micro-batches and their target-token count (all processes), by kdforge's mask."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            return batch_samples, None
        count = sum(shifted_targets(b)[1].sum().to(device) for b in batch_samples)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return batch_samples, count

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        """The objective's total for this micro-batch (a scalar tensor).

        num_items_in_batch: the optimizer step's target-token count over all micro-batches and processes (this
        class's get_batch_samples), or None (evaluation): each term is then this batch's own token mean.
        """
        mode = "train" if model.training else "eval"
        self.distiller.train(model.training)
        num_tokens = None if num_items_in_batch is None else torch.as_tensor(num_items_in_batch).clamp_min(1)
        with self._forward_through(model):
            total, values = self.distiller(inputs, num_tokens=num_tokens, step=self.state.global_step)
        if num_tokens is not None and self.accelerator.num_processes > 1:
            total = total * self.accelerator.num_processes  # DDP averages gradients; the count is already global
        tokens = float(shifted_targets(inputs)[1].sum())
        for name, value in values.items():
            acc = self._term_sums[mode][name]
            acc[0] += float(value) * tokens
            acc[1] += tokens
        return (total, {"loss": total.detach()}) if return_outputs else total

    @contextlib.contextmanager
    def _forward_through(self, model: nn.Module):
        """Run the student forward through the wrapper the Trainer built (DDP), so its gradient hooks fire."""
        if model is self.distiller.student or self.distiller.logit_chunk_size is not None:
            yield
            return
        student = self.distiller.student
        self.distiller._modules["student"] = model
        try:
            yield
        finally:
            self.distiller._modules["student"] = student

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the objective's value (each term a plain token mean of this batch); no logits are kept."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.num_processes > 1 and self.accelerator.sync_gradients and self.extra_parameters:
            for p in self.extra_parameters:  # the extras sit outside the DDP wrapper: average their gradients
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.accelerator.num_processes
        return loss

    # ---- the optimizer: the student's groups plus the Distiller's extras ----

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in self.extra_parameters if id(p) not in present]
        if missing:
            optimizer.add_param_group({"params": missing, "weight_decay": self.args.weight_decay})
        return optimizer

    def _clip_grad_norm(self, model):
        if not self.extra_parameters or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_([*model.parameters(), *self.extra_parameters],
                                                self.args.max_grad_norm)

    # ---- logging ----

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds each term's token-weighted mean since the last log (eval logs: `eval_<term>`)."""
        mode, prefix = ("eval", "eval_") if "eval_loss" in logs else ("train", "")
        if mode == "eval" or "loss" in logs:
            for name, (weighted, tokens) in self._term_sums[mode].items():
                if tokens:
                    logs[f"{prefix}{name}"] = weighted / tokens
            self._term_sums[mode].clear()
        super().log(logs, start_time)

    # ---- saving: the student alone; checkpoints also keep the extras ----

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Saves the student as a plain `save_pretrained` folder (no projector). A Trainer checkpoint also gets
        kdforge_extras.pt, the Distiller's trainable extras, so `resume_from_checkpoint` restores them."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if _internal_call and self.extra_parameters and self.args.should_save:
            folder = output_dir if output_dir is not None else self.args.output_dir
            torch.save(self._extras_state(), os.path.join(folder, EXTRAS_NAME))

    def _extras_state(self) -> dict[str, torch.Tensor]:
        extra = {id(p) for p in self.extra_parameters}
        return {n: p.detach() for n, p in self.distiller.named_parameters() if id(p) in extra}

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, EXTRAS_NAME)
        if self.extra_parameters and os.path.isfile(path):
            self.distiller.load_state_dict(torch.load(path, map_location=self.args.device, weights_only=True), strict=False)
