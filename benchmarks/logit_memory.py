"""Peak memory and time of one logit-loss forward + backward: full logits vs kdforge's chunked loss (vs TRL).

    .venv/bin/python benchmarks/logit_memory.py [--batch 4] [--seq 1024] [--vocab 49152] [--hidden 576]
                                                [--chunk 1024] [--repeats 3] [--threads 2]

Every variant runs in its own fresh subprocess (so no allocator state or cached buffers leak between them) on the
same seeded float32 tensors: student hidden states [B·T, D] and lm-head weight [V, D] (both requiring grad), teacher
logits [B·T, V] (dense) or their top-64 (sparse, the offline-cache case), and a mask with the last position of each
sequence off.

How memory is measured: torch's CPU tensors come from the C allocator, invisible to tracemalloc, so this measures
what the OS sees. After the inputs exist and one warm-up step has run, the process's resident-set high-water mark is
reset (writing "5" to /proc/self/clear_refs, Linux >= 4.0), the step runs, and the figure is VmHWM minus the RSS
just before the step: the extra memory the loss forward + backward needed above its inputs. Tensors this large
(> 32 MiB) are mmap'd by glibc and returned on free, so the high-water mark tracks live tensor bytes closely; the
gradients (.grad of hidden and weight, which every variant ends with) are included. Time: median of --repeats steps.

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


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_variant(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from kdforge.losses.chunked import chunked_logit_loss
    from kdforge.losses.logits import forward_kl
    from kdforge.losses.sparse import SparseLogits

    n = args.batch * args.seq
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, args.hidden, generator=g) * 0.5).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.05).requires_grad_()
    mask = torch.ones(args.batch, args.seq, dtype=torch.bool)
    mask[:, -1] = False
    mask = mask.reshape(-1)
    teacher = torch.randn(n, args.vocab, generator=g) * 3
    sparse = args.variant.endswith("_sparse")
    if sparse:
        teacher = SparseLogits.from_dense(teacher, 64)
    labels = torch.where(mask, 0, -100)  # TRL masks with labels == -100
    if args.variant == "trl":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        try:
            from trl.experimental.gkd import GKDTrainer
        except ImportError:
            return {"variant": args.variant, "skipped": "trl is not installed (pip install -e '.[bench]')"}

    def step():
        if args.variant.startswith("chunked"):
            loss = chunked_logit_loss("forward_kl", hidden, weight, teacher, mask=mask, chunk_size=args.chunk)
        elif args.variant == "trl":
            logits = hidden @ weight.T
            loss = GKDTrainer.generalized_jsd_loss(logits, teacher, labels=labels, beta=0.0)
        else:
            logits = hidden @ weight.T
            loss = forward_kl(logits, teacher, mask=mask)
        loss.backward()
        value = float(loss)
        hidden.grad = weight.grad = None
        return value

    step()  # warm-up: lazy library buffers are not the loss's memory
    base = _rss_kb("VmRSS")
    _reset_peak()
    value = step()
    peak = _rss_kb("VmHWM") - base
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"variant": args.variant, "loss": value, "peak_mib": peak / 1024, "time_s": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant and print JSON
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    common = [f"--{k}={getattr(args, k)}" for k in ("batch", "seq", "vocab", "hidden", "chunk", "repeats", "threads")]
    results = {}
    for v in args.variants.split(","):
        proc = subprocess.run([sys.executable, __file__, *common, f"--variant={v}"], capture_output=True, text=True)
        if proc.returncode != 0:
            results[v] = {"variant": v, "skipped": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
        else:
            results[v] = json.loads(proc.stdout.strip().splitlines()[-1])
    n = args.batch * args.seq
    print(f"loss forward+backward, B={args.batch} T={args.seq} V={args.vocab} D={args.hidden} float32, "
          f"chunk={args.chunk}, threads={args.threads}, one subprocess per variant")
    print(f"(full student logits alone: {n * args.vocab * 4 / 2**20:,.0f} MiB)")
    print(f"{'variant':<16}{'loss':>10}{'peak MiB':>11}{'time s':>9}{'mem/naive':>11}{'time/naive':>12}")
    for v, r in results.items():
        if "skipped" in r:
            print(f"{v:<16}  skipped: {r['skipped']}")
            continue
        ref = results.get("naive_sparse" if v.endswith("_sparse") else "naive", {})
        mem = r["peak_mib"] / ref["peak_mib"] if ref.get("peak_mib") else float("nan")
        tim = r["time_s"] / ref["time_s"] if ref.get("time_s") else float("nan")
        print(f"{v:<16}{r['loss']:>10.5f}{r['peak_mib']:>11,.0f}{r['time_s']:>9.2f}{mem:>11.3f}{tim:>12.3f}")


if __name__ == "__main__":
    main()
