"""Peak memory and time of one logit-loss forward + backward: full logits vs kdforge's chunked loss (vs TRL).

    .venv/bin/python benchmarks/logit_memory.py [--batch 4] [--seq 1024] [--vocab 49152] [--hidden 576]
                                                [--chunk 256] [--repeats 3] [--threads 2]

Every variant runs in its own fresh subprocess (so no allocator state or cached buffers leak between them) on the
same seeded float32 tensors: student hidden states [B·T, D] and lm-head weight [V, D] (both requiring grad), teacher
logits [B·T, V] (dense) or their top-64 (sparse, the offline-cache case), and a mask with the last position of each
sequence off.

How memory is measured: torch's CPU tensors come from the C allocator, invisible to tracemalloc, so this measures
what the OS sees. After the inputs exist and one warm-up step has run, the process's resident-set high-water mark is
reset (writing "5" to /proc/self/clear_refs, Linux >= 4.0), the step runs, and the figure is VmHWM minus the RSS
just before the step: the extra memory the loss forward + backward needed above its inputs. Tensors this large
(> 32 MiB) are mmap'd by glibc and returned on free, so the high-water mark tracks live tensor bytes closely; the
gradients (.grad of hidden and weight, which every variant ends with) are included. Time: all variants in one
process, interleaved step by step for --repeats rounds (so load from other processes hits them alike), medians.

Variants: naive = logits = h @ W.T, kdforge forward_kl on the full logits; chunked = kdforge
chunked_logit_loss("forward_kl") with --chunk rows at a time; trl = logits = h @ W.T, TRL's
GKDTrainer.generalized_jsd_loss(beta=0) (forward KL) when trl is installed; *_sparse = the same with a top-64
SparseLogits teacher ("bucket" missing mass). Ratios are against naive with the same teacher kind.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ["naive", "chunked", "trl", "naive_sparse", "chunked_sparse"]


def _tensors(args, sparse: bool) -> dict:
    import torch

    from kdforge.losses.sparse import SparseLogits

    n = args.batch * args.seq
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, args.hidden, generator=g) * 0.5).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.05).requires_grad_()
    mask = torch.ones(args.batch, args.seq, dtype=torch.bool)
    mask[:, -1] = False
    teacher = torch.randn(n, args.vocab, generator=g) * 3
    if sparse:
        teacher = SparseLogits.from_dense(teacher, 64)
    return {"hidden": hidden, "weight": weight, "mask": mask.reshape(-1), "teacher": teacher}


def _setup(args, variant: str, shared: dict | None = None):
    """A step() for one variant on the shared tensors (None for a peer that is not installed)."""
    import torch

    from kdforge.losses.chunked import chunked_logit_loss
    from kdforge.losses.logits import forward_kl

    sparse = variant.endswith("_sparse")
    shared = shared if shared is not None else {}
    if sparse not in shared:
        shared[sparse] = _tensors(args, sparse)
    hidden, weight, mask, teacher = (shared[sparse][k] for k in ("hidden", "weight", "mask", "teacher"))
    labels = torch.where(mask, 0, -100)  # TRL masks with labels == -100
    gkd = None
    if variant == "trl":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        try:
            from trl.experimental.gkd import GKDTrainer as gkd
        except ImportError:
            return None

    def step() -> float:
        if variant.startswith("chunked"):
            loss = chunked_logit_loss("forward_kl", hidden, weight, teacher, mask=mask, chunk_size=args.chunk)
        elif variant == "trl":
            loss = gkd.generalized_jsd_loss(hidden @ weight.T, teacher, labels=labels, beta=0.0)
        else:
            loss = forward_kl(hidden @ weight.T, teacher, mask=mask)
        loss.backward()
        value = float(loss)
        hidden.grad = weight.grad = None
        return value

    return step


def measure_memory(args) -> dict:
    """One variant in this fresh process: the RSS high-water mark of one step above the RSS before it."""
    import torch

    from kdforge.evaluate.speed import reset_peak_rss, rss_kib

    torch.set_num_threads(args.threads)
    step = _setup(args, args.variant)
    if step is None:
        return {"variant": args.variant, "skipped": "trl is not installed (pip install -e '.[bench]')"}
    step()  # warm-up: lazy library buffers are not the loss's memory
    base = rss_kib("VmRSS")
    if base is None or not reset_peak_rss():
        raise SystemExit("logit_memory.py measures memory through /proc/self (Linux >= 4.0); run it on Linux")
    value = step()
    return {"variant": args.variant, "loss": value, "peak_mib": (rss_kib("VmHWM") - base) / 1024}


def measure_times(args, variants: list[str]) -> dict[str, float]:
    """All variants in one process, interleaved round by round so machine noise hits them alike; medians."""
    import torch

    torch.set_num_threads(args.threads)
    shared: dict = {}
    steps = {v: s for v in variants if (s := _setup(args, v, shared)) is not None}
    times: dict[str, list[float]] = {v: [] for v in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for v, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[v].append(time.perf_counter() - t0)
    return {v: statistics.median(t) for v, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: one variant's memory, as JSON
    ap.add_argument("--times", action="store_true", help=argparse.SUPPRESS)  # internal: all variants' times
    args = ap.parse_args()
    variants = args.variants.split(",")
    if args.variant:
        print(json.dumps(measure_memory(args)))
        return
    if args.times:
        print(json.dumps(measure_times(args, variants)))
        return

    common = [f"--{k}={getattr(args, k)}" for k in ("batch", "seq", "vocab", "hidden", "chunk", "repeats", "threads")]

    def sub(*extra) -> dict:
        proc = subprocess.run([sys.executable, __file__, *common, *extra], capture_output=True, text=True)
        if proc.returncode != 0:
            return {"skipped": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    results = {v: sub(f"--variant={v}") for v in variants}
    times = sub("--times", f"--variants={args.variants}")
    n = args.batch * args.seq
    print(f"loss forward+backward, B={args.batch} T={args.seq} V={args.vocab} D={args.hidden} float32, "
          f"chunk={args.chunk}, threads={args.threads}")
    print(f"memory: one fresh subprocess per variant; time: median of {args.repeats} interleaved steps in one process")
    print(f"(the full student logits alone: {n * args.vocab * 4 / 2**20:,.0f} MiB)")
    print(f"{'variant':<16}{'loss':>10}{'peak MiB':>11}{'time s':>9}{'mem/naive':>11}{'time/naive':>12}")
    for v, r in results.items():
        if "skipped" in r:
            print(f"{v:<16}  skipped: {r['skipped']}")
            continue
        ref_name = "naive_sparse" if v.endswith("_sparse") else "naive"
        ref = results.get(ref_name, {})
        t, t_ref = times.get(v, float("nan")), times.get(ref_name, float("nan"))
        mem = r["peak_mib"] / ref["peak_mib"] if ref.get("peak_mib") else float("nan")
        print(f"{v:<16}{r['loss']:>10.5f}{r['peak_mib']:>11,.0f}{t:>9.2f}{mem:>11.3f}{t / t_ref:>12.3f}")


if __name__ == "__main__":
    main()
