"""Teacher-cache build throughput vs. the teacher's own forward throughput, measured side by side in one process.

Prints tokens/s of a plain no-grad teacher forward over the blocks (batch by batch, logits discarded) and of
`build_cache` over the same blocks and batches (forward + top-k + coding + checksums + shard writes), and their ratio
cache build / forward (target >= 0.8: building a cache should cost little beyond running the teacher). The build is
timed both as by default (each batch's full logits post-processed) and fused (`fuse=True`: the base model's last
hidden states, each chunk of rows' logits made and reduced while in cache).

    .venv/bin/python benchmarks/cache_build.py [--blocks 64] [--seq 256] [--batch 8] [--vocab 49152]
                                               [--hidden 64] [--layers 4] [--k 64] [--repeats 3] [--threads 1]
                                               [--profile [--fused]]

The teacher is a random Llama (`kdforge.models.tiny_llama`) of --layers layers, width --hidden and a vocabulary of
--vocab (SmolLM2's 49,152 by default), on random token ids; the cache uses the default options (top-64, packed ids,
int6 values) with --k and --batch. The three measurements alternate for --repeats rounds (so load from other processes
hits all alike) after one warm-up of each; the figures are medians. Like the `kdforge` command, the process keeps
freed memory in its heap (`kdforge.runtime.keep_freed_memory_in_heap`). --profile instead runs one cache build (fused
with --fused) under cProfile and prints the top functions by cumulative and by own time.
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
    ap.add_argument("--profile", action="store_true", help="profile one cache build instead of timing")
    ap.add_argument("--fused", action=argparse.BooleanOptionalAction, default=False, help="the build --profile runs")
    args = ap.parse_args()
    keep_freed_memory_in_heap()  # as the kdforge command does at start-up
    torch.set_num_threads(args.threads)
    teacher = tiny_llama(vocab_size=args.vocab, hidden=args.hidden, layers=args.layers, heads=4, seed=0)
    tokenizer = _Tokenizer(args.vocab)
    ids = torch.randint(0, args.vocab, (args.blocks, args.seq), generator=torch.Generator().manual_seed(0))
    options = CacheOptions(k=args.k, batch_size=args.batch, shard_blocks=256)
    live = LiveTeacher(teacher)

    def forward() -> None:
        for b0 in range(0, args.blocks, args.batch):
            batch = ids[b0:b0 + args.batch]
            live({"input_ids": batch, "attention_mask": torch.ones_like(batch)})

    def build(fuse: bool = True) -> None:
        with tempfile.TemporaryDirectory(prefix="kdforge-cache-bench-") as tmp:
            build_cache(teacher, tokenizer, ids, tmp, teacher_spec={"model": "synthetic"}, options=options, fuse=fuse)

    if args.profile:
        build(args.fused)  # warm-up
        prof = cProfile.Profile()
        prof.runcall(build, args.fused)
        stats = pstats.Stats(prof)
        stats.sort_stats("cumulative").print_stats(25)
        stats.sort_stats("tottime").print_stats(20)
        return

    def timed(fn, *fn_args) -> float:
        t0 = time.perf_counter()
        fn(*fn_args)
        return time.perf_counter() - t0

    forward(), build(True), build(False)  # warm-up
    fwd, cache, unfused = [], [], []
    for _ in range(args.repeats):
        fwd.append(timed(forward))
        cache.append(timed(build, True))
        unfused.append(timed(build, False))
    tokens = ids.numel()
    tf, tc, tu = statistics.median(fwd), statistics.median(cache), statistics.median(unfused)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s); teacher "
          f"{args.layers} layers, d={args.hidden}, V={args.vocab}; {args.blocks} blocks x {args.seq} tokens, batch "
          f"{args.batch}, k={args.k}; medians of {args.repeats}")
    print(f"teacher forward   {tf:7.2f} s  {tokens / tf:10,.0f} tok/s")
    print(f"cache build       {tu:7.2f} s  {tokens / tu:10,.0f} tok/s  (default: full logits post-processed)")
    print(f"fused build       {tc:7.2f} s  {tokens / tc:10,.0f} tok/s  (fuse=True)")
    print(f"ratio             {tf / tu:.3f}  (cache build tok/s / forward tok/s; target >= 0.8)")
    print(f"ratio fused       {tf / tc:.3f}")


if __name__ == "__main__":
    main()
