"""Teacher forward tokens/s at each precision, side by side in one process, on the machine it runs on (issue #10).

Runs the embedded teacher (SmolLM2-135M-Instruct, or --model) through kdforge's LiveTeacher in fp32, under bf16
autocast, and at `auto` (kdforge.precision: bf16 only where the hardware runs it natively), interleaved so machine
noise hits all three alike; also times the teacher's MLP-shaped linear (1024x576 @ 576x1536) the same way. Prints
the CPU capability torch sees and what auto picks, and why.

    .venv/bin/python benchmarks/teacher_precision.py [--reps 3] [--batch 4] [--seq 128] [--threads 1]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from contextlib import nullcontext

import torch

from kdforge import precision
from kdforge.models import load_teacher
from kdforge.recipe import ModelSpec
from kdforge.teachers.live import LiveTeacher


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    auto = precision.detect()
    print(f"CPU: {cpu_name()}; torch {torch.__version__} capability {precision.cpu_capability()}; native bf16: "
          f"{', '.join(precision.native_cpu_bf16()) or 'none'}; {args.threads} thread(s)")
    print(f"auto -> {auto.dtype}: {auto.reason}")

    # The teacher's MLP shape: 1024 tokens x 576 -> 1536.
    lin, x = torch.nn.Linear(576, 1536), torch.randn(1024, 576)
    modes = {"float32": nullcontext, "bfloat16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    modes["auto"] = modes[auto.dtype]

    def linear(ctx):
        def run():
            with torch.no_grad(), ctx():
                for _ in range(10):
                    lin(x)
        return run

    lin_times = {name: [] for name in modes}
    for name, ctx in modes.items():
        linear(ctx)()  # warm-up
    for _ in range(args.reps):
        for name, ctx in modes.items():
            lin_times[name].append(timed(linear(ctx)) / 10)

    model = load_teacher(ModelSpec(model=args.model, dtype="float32"))
    teachers = {name: LiveTeacher(model, name) for name in ("float32", "bfloat16", "auto")}
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    fwd_times = {name: [] for name in teachers}
    for t in teachers.values():
        t(batch)  # warm-up
    for _ in range(args.reps):
        for name, t in teachers.items():
            fwd_times[name].append(timed(lambda: t(batch)))

    m = statistics.median
    tokens = ids.numel()
    print(f"\nmedians of {args.reps} interleaved reps; teacher {args.model}, batch {args.batch}x{args.seq}")
    print(f"{'precision':<22}{'teacher fwd s':>14}{'tokens/s':>11}{'vs fp32':>9}{'linear ms':>11}")
    for name in teachers:
        label = f"auto ({teachers[name].dtype})" if name == "auto" else name + (" autocast" if name == "bfloat16" else "")
        f, lt = m(fwd_times[name]), m(lin_times[name])
        print(f"{label:<22}{f:>14.3f}{tokens / f:>11,.0f}{m(fwd_times['float32']) / f:>8.2f}x{lt * 1e3:>11.1f}")


if __name__ == "__main__":
    main()
