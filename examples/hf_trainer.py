"""kdforge inside a transformers.Trainer: keep your TrainingArguments, callbacks and loggers, swap the loss.

Runs offline on CPU in seconds (tiny random Llamas, a byte-level tokenizer trained on the fly):

    python examples/hf_trainer.py

For a real run, load your teacher and student with AutoModelForCausalLM.from_pretrained, tokenize your dataset as
usual (e.g. with `datasets`), and keep the rest.
"""
from __future__ import annotations

import tempfile

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, DataCollatorForLanguageModeling, PreTrainedTokenizerFast,
                          TrainingArguments)

from kdforge.hf_trainer import DistillationTrainer
from kdforge.models import tiny_llama

TEXT = ["The king doth speak of night and day.", "Fair is foul and foul is fair.",
        "Thou art my daughter, sweet and good.", "The sea hath no land, the storm no crown."] * 16


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:90]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def main() -> None:
    tokenizer = tiny_tokenizer()
    teacher = tiny_llama(vocab_size=len(tokenizer), hidden=48, layers=3, seed=1)  # your fine-tuned teacher here
    student = tiny_llama(vocab_size=len(tokenizer), hidden=32, layers=2, seed=2)
    train = [{"input_ids": tokenizer(t)["input_ids"]} for t in TEXT]
    out = tempfile.mkdtemp(prefix="kdforge-hf-trainer-")
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        objective=[
            {"loss": "cross_entropy", "weight": 0.5},
            {"loss": "forward_kl", "weight": 0.5, "temperature": 2.0},
            # a feature term: the student's hidden states (width 32) through a trained linear projector to the
            # teacher's (width 48); the projector trains with the student but is not saved with it
            {"loss": "hidden_mse", "name": "hidden", "weight": 0.1, "student": "hidden_states",
             "teacher": "hidden_states", "projector": "linear"},
        ],
        args=TrainingArguments(output_dir=out, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                               learning_rate=3e-3, max_steps=12, logging_steps=4, save_strategy="no",
                               report_to=[], use_cpu=True, disable_tqdm=True),
        train_dataset=train,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    trainer.train()  # logs loss, cross_entropy, forward_kl and hidden every logging_steps
    trainer.save_model(f"{out}/student")
    student = AutoModelForCausalLM.from_pretrained(f"{out}/student")  # a plain transformers folder
    print(f"student saved to {out}/student ({sum(p.numel() for p in student.parameters())} parameters)")


if __name__ == "__main__":
    main()
