"""Teacher-cache build throughput vs. the teacher's own forward throughput, measured side by side in one process.

Prints tokens/s of a plain no-grad teacher forward over the blocks (batch by batch, logits discarded) and of
`build_cache` over the same blocks and batches (forward + top-k + coding + checksums + shard writes), and their ratio
cache build / forward (target >= 0.8: building a cache should cost little beyond running the teacher). The build is
timed both as by default (fused: the base model's last hidden states, the logits made a tile at a time and reduced
while in the CPU's cache by the native kernel) and unfused (`fuse=False`: each batch's full logits post-processed).
Each is timed by the wall clock and by the process's CPU time (with one thread, the CPU-time ratio is the one that
other processes on a shared machine disturb least).

    .venv/bin/python benchmarks/cache_build.py [--blocks 64] [--seq 256] [--batch 8] [--vocab 49152]
                                               [--hidden 64] [--layers 4] [--k 64] [--repeats 3] [--threads 1]
                                               [--dtype float32|bfloat16]
                                               [--profile [--no-fused]]

The teacher is a random Llama (`kdforge.models.tiny_llama`) of --layers layers, width --hidden and a vocabulary of
--vocab (SmolLM2's 49,152 by default), on random token ids; the cache uses the default options (top-64, packed ids,
int6 values) with --k and --batch. The three measurements alternate for --repeats rounds (so load from other processes
hits all alike) after one warm-up of each; the figures are medians. Like the `kdforge` command, the process keeps
freed memory in its heap (`kdforge.runtime.keep_freed_memory_in_heap`). --profile instead runs one cache build (unfused
with --no-fused) under cProfile and prints the top functions by cumulative and by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time

import torch

from kdforge.models import tiny_llama
from kdforge.runtime import keep_freed_memory_in_heap
from kdforge.teachers import native
from kdforge.teachers.cache import CacheOptions, build_cache
from kdforge.teachers.live import LiveTeacher


class _Tokenizer:
    """Just what a cache's index records about a tokenizer (its vocabulary, for the fingerprint)."""

    def __init__(self, size: int):
        self.name_or_path = f"synthetic-{size}"
        self._size = size

    def get_vocab(self) -> dict[str, int]:
        return {f"t{i}": i for i in range(self._size)}

    def __len__(self) -> int:
        return self._size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the teacher's precision")
    ap.add_argument("--profile", action="store_true", help="profile one cache build instead of timing")
    ap.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True, help="the build --profile runs")
    args = ap.parse_args()
    keep_freed_memory_in_heap()  # as the kdforge command does at start-up
    torch.set_num_threads(args.threads)
    teacher = tiny_llama(vocab_size=args.vocab, hidden=args.hidden, layers=args.layers, heads=4, seed=0)
    tokenizer = _Tokenizer(args.vocab)
    ids = torch.randint(0, args.vocab, (args.blocks, args.seq), generator=torch.Generator().manual_seed(0))
    options = CacheOptions(k=args.k, batch_size=args.batch, shard_blocks=256)
    live = LiveTeacher(teacher, args.dtype)

    def forward() -> None:
        for b0 in range(0, args.blocks, args.batch):
            batch = ids[b0:b0 + args.batch]
            live({"input_ids": batch, "attention_mask": torch.ones_like(batch)})

    def build(fuse: bool = True) -> None:
        with tempfile.TemporaryDirectory(prefix="kdforge-cache-bench-") as tmp:
            build_cache(teacher, tokenizer, ids, tmp, teacher_spec={"model": "synthetic", "dtype": args.dtype}, options=options, fuse=fuse)

    if args.profile:
        build(args.fused)  # warm-up
        prof = cProfile.Profile()
        prof.runcall(build, args.fused)
        stats = pstats.Stats(prof)
        stats.sort_stats("cumulative").print_stats(25)
        stats.sort_stats("tottime").print_stats(20)
        return

    def timed(fn, *fn_args) -> tuple[float, float]:
        w0, c0 = time.perf_counter(), time.process_time()
        fn(*fn_args)
        return time.perf_counter() - w0, time.process_time() - c0

    forward(), build(True), build(False)  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {"forward": [], "fused": [], "unfused": []}
    for _ in range(args.repeats):
        runs["forward"].append(timed(forward))
        runs["fused"].append(timed(build, True))
        runs["unfused"].append(timed(build, False))
    wall = {name: statistics.median(w for w, _ in times) for name, times in runs.items()}
    cpu = {name: statistics.median(c for _, c in times) for name, times in runs.items()}
    tokens = ids.numel()
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s), native "
          f"kernel {'on' if native.available() else 'off (torch path)'}; teacher {args.layers} layers, d={args.hidden}, "
          f"V={args.vocab}, {args.dtype}; {args.blocks} blocks x {args.seq} tokens, batch {args.batch}, k={args.k}; medians of "
          f"{args.repeats}")
    print(f"{'':34} {'wall':>8} {'tok/s':>9} {'ratio':>6}   {'CPU':>8} {'ratio':>6}")
    for name, label in (("forward", "teacher forward"), ("fused", "cache build (default: fused)"),
                        ("unfused", "cache build, fuse=False")):
        print(f"{label:34} {wall[name]:7.2f}s {tokens / wall[name]:9,.0f} {wall['forward'] / wall[name]:6.3f}   "
              f"{cpu[name]:7.2f}s {cpu['forward'] / cpu[name]:6.3f}")
    print("ratio: forward time / build time = build tok/s / forward tok/s (target >= 0.8 for the default build)")


if __name__ == "__main__":
    main()
