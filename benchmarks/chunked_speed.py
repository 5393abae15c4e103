"""Step time of every logit loss chunked from hidden states vs on the full logits, before and after the closed forms.

    .venv/bin/python benchmarks/chunked_speed.py [--batch 4] [--seq 512] [--vocab 49152] [--hidden 576]
                                                 [--chunk 256] [--repeats 3] [--threads 1] [--losses a,b,...]

One process, float32, seeded tensors: student hidden states [B·T, D] and lm-head weight [V, D] (both requiring grad),
a dense teacher [B·T, V], labels (a few ignore_index) and a mask with the last position of each sequence off. A step
is forward + backward of one loss at T = 2 (its defaults otherwise; DKD gets labels):

- unchunked: ``logits = h @ W.T``, the generic function of :mod:`kdforge.losses.logits`, autograd;
- before: :func:`kdforge.losses.chunked.chunked_logit_loss` with ``fast=False`` (every loss under autograd per chunk);
- after: the same with ``fast=True`` (the closed-form gradients, where a loss has one).

Variants are interleaved step by step for --repeats rounds after one warm-up round, so load from other processes
hits them alike; the table shows medians and the ratios chunked / unchunked (target: <= 1.0), with the CPU capability.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdforge.losses.chunked import chunked_logit_loss
from kdforge.losses.logits import LOGIT_LOSSES, cross_entropy

# name -> (loss, kwargs); forward KL twice: plain and with logit standardization
CASES = {
    "cross_entropy": ("cross_entropy", {}),
    "forward_kl": ("forward_kl", {}),
    "forward_kl (standardize)": ("forward_kl", {"standardize": True}),
    "reverse_kl": ("reverse_kl", {}),
    "generalized_jsd (β=0.5)": ("generalized_jsd", {"beta": 0.5}),
    "skew_forward_kl": ("skew_forward_kl", {}),
    "skew_reverse_kl": ("skew_reverse_kl", {}),
    "total_variation": ("total_variation", {}),
    "decoupled_kd": ("decoupled_kd", {}),
    "correlation_aware_kd": ("correlation_aware_kd", {}),
}


def _inputs(args):
    g = torch.Generator().manual_seed(0)
    n = args.batch * args.seq
    hidden = torch.randn(n, args.hidden, generator=g).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.05).requires_grad_()
    teacher = torch.randn(n, args.vocab, generator=g) * 2.0
    labels = torch.randint(0, args.vocab, (n,), generator=g)
    labels[:: 97] = -100
    mask = torch.ones(args.batch, args.seq, dtype=torch.bool)
    mask[:, -1] = False
    return hidden, weight, teacher, labels, mask.reshape(-1)


def _step(variant, loss, kwargs, tensors, chunk):
    hidden, weight, teacher, labels, mask = tensors
    hidden.grad = weight.grad = None
    if loss != "cross_entropy":
        kwargs = {"temperature": 2.0, **kwargs}
    needs_labels = loss in ("cross_entropy", "decoupled_kd")
    t0 = time.perf_counter()
    if variant == "unchunked":
        logits = hidden @ weight.T
        if loss == "cross_entropy":
            value = cross_entropy(logits, labels, mask=mask)
        else:
            extra = {"labels": labels} if needs_labels else {}
            value = LOGIT_LOSSES[loss](logits, teacher, mask=mask, **extra, **kwargs)
        del logits
    else:
        value = chunked_logit_loss(loss, hidden, weight, None if loss == "cross_entropy" else teacher, mask=mask,
                                   labels=labels if needs_labels else None, chunk_size=chunk,
                                   fast=variant == "after", **kwargs)
    value.backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--losses", default=",".join(CASES), help="comma-separated names of CASES")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tensors = _inputs(args)
    names = [n.strip() for n in args.losses.split(",")]
    variants = ("unchunked", "before", "after")
    times: dict[tuple[str, str], list[float]] = {(n, v): [] for n in names for v in variants}
    start = time.perf_counter()
    for rnd in range(args.repeats + 1):  # round 0 warms up and is not counted
        for name in names:
            loss, kwargs = CASES[name]
            for v in variants:
                dt = _step(v, loss, kwargs, tensors, args.chunk)
                if rnd:
                    times[name, v].append(dt)
    print(f"B={args.batch} T={args.seq} V={args.vocab} D={args.hidden} float32, chunk {args.chunk}, "
          f"{args.threads} thread(s), medians of {args.repeats} interleaved rounds, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
          f"total {time.perf_counter() - start:.0f} s")
    print("| loss | unchunked | chunked before (fast=False) | chunked after (fast=True) | ratio before | ratio after | "
          "target ≤ 1.0 |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        u, b, a = (statistics.median(times[name, v]) for v in variants)
        print(f"| {name} | {u:.2f} s | {b:.2f} s | {a:.2f} s | {b / u:.2f} | {a / u:.2f} | "
              f"{'met' if a / u <= 1.0 else 'missed'} |")


if __name__ == "__main__":
    main()
