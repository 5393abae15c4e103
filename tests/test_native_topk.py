"""The teacher cache's native top-k/logsumexp kernel against a direct float64 computation: values, ids (ties by the
smaller id), the tail mass, tiles in any size, threads, and the rows it hands back (underflowed tails, non-finite
logits) recomputed by the cache's torch path."""
from __future__ import annotations

import pytest
import torch

from kdforge.teachers import cache as cache_mod
from kdforge.teachers import native

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the native kernel is not built here")


def _direct(x: torch.Tensor, k: int, temperature: float):
    """(top-k log-probs, ids, logsumexp, log tail mass) in float64, ties broken by the smaller id."""
    z = x.double() / temperature
    order = sorted(range(z.shape[1]), key=lambda j: (-z[0, j].item(), j)) if z.shape[0] == 1 else None
    lse = torch.logsumexp(z, -1)
    if order is not None:
        ids = torch.tensor([order[:k]])
    else:
        ids = torch.stack([torch.tensor(sorted(range(z.shape[1]), key=lambda j: (-z[r, j].item(), j))[:k])
                           for r in range(z.shape[0])])
    tail = z.scatter(-1, ids, float("-inf"))
    return z.gather(-1, ids) - lse[:, None], ids, lse, torch.logsumexp(tail, -1) - lse


def _native(x: torch.Tensor, k: int, temperature: float, tile: int | None = None):
    rows = x.shape[0]
    out = (torch.empty(rows, k), torch.empty(rows, k, dtype=torch.int64), torch.empty(rows), torch.empty(rows))
    stream = native.TopKStream(rows, k, temperature)
    width = tile or x.shape[1]
    for c0 in range(0, x.shape[1], width):
        stream.update(x[:, c0:c0 + width], c0)
    stream.finish(*out)
    return out


@pytest.mark.parametrize("vocab,k,temperature,tile", [(1000, 16, 1.0, None), (1000, 16, 2.0, 97), (4099, 64, 0.5, 512),
                                                      (37, 5, 1.0, None), (300, 1, 1.0, 64), (5000, 300, 3.0, 1024)])
def test_matches_a_direct_float64_computation(vocab, k, temperature, tile):
    g = torch.Generator().manual_seed(vocab + k)
    x = torch.randn(6, vocab, generator=g) * 4
    log_p, ids, lse, log_rest = _native(x, k, temperature, tile)
    ref_p, ref_ids, ref_lse, ref_rest = _direct(x, k, temperature)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(log_p.double(), ref_p, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=2e-5)
    torch.testing.assert_close(log_rest.double(), ref_rest, rtol=0, atol=2e-5)


def test_ties_at_the_kth_value_keep_the_smaller_ids_and_the_rest_stays_in_the_tail():
    x = torch.zeros(1, 200)
    x[0, [5, 50, 150]] = 3.0  # then 197 logits tie at 0 for the last two places
    log_p, ids, lse, log_rest = _native(x, 5, 1.0, tile=64)
    assert ids.tolist() == [[5, 50, 150, 0, 1]]
    ref_p, _, ref_lse, ref_rest = _direct(x, 5, 1.0)
    torch.testing.assert_close(log_p.double(), ref_p, rtol=0, atol=1e-6)
    torch.testing.assert_close(log_rest.double(), ref_rest, rtol=0, atol=1e-6)  # 195 tied logits in the tail


def test_threads_and_tile_widths_give_the_same_outputs():
    x = torch.randn(64, 3000, generator=torch.Generator().manual_seed(1)) * 3
    whole = _native(x, 32, 1.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        split = _native(x, 32, 1.0, tile=700)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole[1], split[1])
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_a_rising_maximum_across_tiles_rescales_the_sums():
    x = torch.randn(3, 4096, generator=torch.Generator().manual_seed(2))
    x[:, -10:] += torch.tensor([[20.0], [60.0], [95.0]])  # the row maximum arrives in the last tile, 30-140 bits up
    log_p, ids, lse, log_rest = _native(x, 8, 1.0, tile=512)
    ref_p, ref_ids, ref_lse, ref_rest = _direct(x, 8, 1.0)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)
    torch.testing.assert_close(log_rest.double(), ref_rest, rtol=0, atol=1e-4)


def test_rows_the_kernel_cannot_finish_are_marked_and_the_cache_recomputes_them():
    x = torch.randn(4, 2000, generator=torch.Generator().manual_seed(3))
    x[0, 7] = 500.0  # the tail is ~e^-500 of the total: underflows against the maximum
    x[1, 9] = float("nan")
    x[2, :1000] = float("-inf")  # masked columns: fine
    x[3, 11] = float("inf")
    _, _, lse, log_rest = _native(x, 4, 1.0)
    assert log_rest[0].isnan() and not (torch.isfinite(lse[1]) and torch.isfinite(log_rest[1]))
    assert torch.isfinite(lse[2]) and torch.isfinite(log_rest[2])
    got = cache_mod.top_k_log_probs(x, 4, 1.0)
    want = cache_mod._torch_top_k_log_probs(lambda a, b: x[a:b], 4, 2000, 4, 1.0, None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, equal_nan=True)
    ref = _direct(x[[0, 2]], 4, 1.0)
    torch.testing.assert_close(got[3][[0, 2]].double(), ref[3], rtol=1e-6, atol=1e-4)  # the exact tail, ~-490


def test_k_equal_to_the_vocabulary_leaves_an_empty_tail():
    x = torch.randn(2, 40)
    log_p, ids, lse, log_rest = cache_mod.top_k_log_probs(x, 40, 1.0)
    assert torch.equal(ids.sort(-1).values, torch.arange(40).expand(2, -1)) and torch.isneginf(log_rest).all()
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(2))
