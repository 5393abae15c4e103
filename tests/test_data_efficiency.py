"""benchmarks/data_efficiency.py's pure pieces: the headline interpolation and the nested fraction subsets."""
import importlib.util
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from kdforge.data.packing import TokenBlocks

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "data_efficiency.py"
_spec = importlib.util.spec_from_file_location("data_efficiency", _PATH)
de = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(de)

FRACS = [1 / 8, 1 / 4, 1 / 2, 1.0]


def test_reached_between_two_fractions_is_interpolated_in_log_tokens():
    # 400 at 1/4, 300 at 1/2; target 350 is halfway in perplexity -> halfway in log2: 2^-1.5
    frac, how = de.fraction_to_reach(FRACS, [500.0, 400.0, 300.0, 250.0], 350.0)
    assert how == "interpolated"
    assert frac == pytest.approx(2 ** -1.5)
    # a quarter of the way from 1/8 (ppl 500) to 1/4 (ppl 420) -> 2^(-3 + 0.25)
    frac, _ = de.fraction_to_reach(FRACS, [500.0, 420.0, 300.0, 250.0], 480.0)
    assert frac == pytest.approx(2 ** -2.75)
    # exactly on a measured point
    frac, how = de.fraction_to_reach(FRACS, [500.0, 400.0, 300.0, 250.0], 300.0)
    assert (frac, how) == (pytest.approx(0.5), "interpolated")


def test_not_reached_and_reached_at_the_first_fraction():
    assert de.fraction_to_reach(FRACS, [500.0, 450.0, 420.0, 410.0], 400.0) == (None, de.NOT_REACHED)
    assert de.fraction_to_reach(FRACS, [390.0, 350.0, 300.0, 280.0], 400.0) == (1 / 8, de.REACHED_AT_FIRST)


def test_first_crossing_counts_and_order_of_points_does_not():
    # non-monotonic: reached between 1/4 and 1/2, worse again at 1
    frac, _ = de.fraction_to_reach(list(reversed(FRACS)), list(reversed([500.0, 400.0, 300.0, 420.0])), 350.0)
    assert frac == pytest.approx(2 ** -1.5)


def test_budget_rounds_to_whole_batches_at_every_fraction():
    assert de.round_budget(70_000, 8, 64) == 17 * 4096  # 8 fractions-of-1/8 x 8 blocks x 64 tokens
    assert de.round_budget(4095, 8, 64) == 0
    for budget in (4096, 65_536, 100_000):
        rounded = de.round_budget(budget, 8, 64)
        assert all(rounded * f.numerator // f.denominator % (8 * 64) == 0 for f in de.FRACTIONS)


def test_fraction_subsets_are_nested_prefixes_with_the_right_token_counts():
    seq = 16
    corpus = TokenBlocks(torch.arange(300 * seq).view(300, seq), torch.full((300,), 40))
    budget_tokens = de.round_budget(3000, 2, seq)  # 2,048 tokens = 128 blocks
    budget = de.budget_blocks(corpus, budget_tokens)
    assert budget.ids.numel() == budget_tokens
    assert len(set(budget.ids[:, 0].tolist())) == len(budget)  # distinct corpus blocks
    assert torch.equal(budget.ids, de.budget_blocks(corpus, budget_tokens).ids)  # fixed whatever the training seed
    previous = None
    for f in de.FRACTIONS:
        part = de.fraction_blocks(budget, f)
        assert part.ids.numel() == budget_tokens * f.numerator // f.denominator
        assert torch.equal(part.ids, budget.ids[: len(part)])
        if previous is not None:
            assert torch.equal(part.ids[: len(previous)], previous.ids)
        previous = part
    assert torch.equal(de.fraction_blocks(budget, Fraction(1)).ids, budget.ids)


def test_fraction_blocks_keep_labels_and_masks_aligned():
    ids = torch.arange(8 * 4).view(8, 4)
    labels = ids.clone()
    labels[:, :1] = -100
    blocks = TokenBlocks(ids, torch.ones(8), labels=labels, attention_mask=torch.ones_like(ids))
    half = de.fraction_blocks(blocks, Fraction(1, 2))
    assert torch.equal(half.labels, labels[:4]) and half.attention_mask.shape == (4, 4)


def test_budget_larger_than_the_corpus_is_refused():
    corpus = TokenBlocks(torch.zeros(10, 4, dtype=torch.long), torch.ones(10))
    with pytest.raises(SystemExit, match="training corpus has 10"):
        de.budget_blocks(corpus, 44 * 4)


def test_mean_std():
    assert de.mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert de.mean_std([5.0]) == (5.0, None)
