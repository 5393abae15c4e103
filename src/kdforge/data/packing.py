"""Tokenization and packing into fixed-length blocks, plus a deterministic, resumable batch order."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KDForgeError


@dataclass
class TokenBlocks:
    """Packed token blocks [N, seq_len] and the number of characters each block's predicted tokens cover."""

    ids: torch.Tensor
    chars: torch.Tensor  # [N] characters covered by tokens 1..seq_len-1 of each block (for bits per character)
    # prompt–response blocks (kdforge.data.prompts) only; packed text has neither: every position counts
    labels: torch.Tensor | None = None  # [N, seq_len] the token where it is a target, -100 on prompt and padding
    attention_mask: torch.Tensor | None = None  # [N, seq_len] 1 on tokens, 0 on padding (right-padded)

    def __len__(self) -> int:
        """The number of blocks (what a batch order draws from)."""
        return len(self.ids)


def tokenize_documents(tokenizer, docs: list[str]) -> tuple[list[int], list[int]]:
    """Token ids of all docs joined by EOS, and the number of characters each token adds (from offsets)."""
    ids: list[int] = []
    char_counts: list[int] = []
    eos = tokenizer.eos_token_id
    for doc in docs:
        enc = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
        prev_end = 0
        for tok, (_, end) in zip(enc["input_ids"], enc["offset_mapping"]):
            ids.append(tok)
            char_counts.append(max(end - prev_end, 0))
            prev_end = max(prev_end, end)
        if eos is not None:
            ids.append(eos)
            char_counts.append(0)
    return ids, char_counts


def pack(ids: list[int], char_counts: list[int], seq_len: int, max_tokens: int | None = None,
         what: str = "corpus", min_blocks: int = 1) -> TokenBlocks:
    if max_tokens is not None:
        ids, char_counts = ids[:max_tokens], char_counts[:max_tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise KDForgeError(f"the {what} has {len(ids)} tokens, fewer than one block of data.seq_len={seq_len}; "
                           "add text or lower data.seq_len")
    if n < min_blocks:  # min_blocks is the batch size
        raise KDForgeError(f"the {what} makes {n} block(s) of data.seq_len={seq_len} tokens, fewer than one batch of "
                           f"train.batch_size={min_blocks}; lower train.batch_size to at most {n}, or add text")
    t = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    c = torch.tensor(char_counts[: n * seq_len], dtype=torch.long).view(n, seq_len)[:, 1:].sum(1)
    return TokenBlocks(t, c)


def batch_indices(n_blocks: int, batch_size: int, micro_step: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> torch.Tensor:
    """Block indices of one rank's micro-batch. A pure function of (seed, micro_step): resume needs no saved state.

    Each global micro-batch takes batch_size * world_size blocks from a per-epoch permutation; rank r takes its slice.
    """
    global_bs = batch_size * world_size
    per_epoch = n_blocks // global_bs
    if per_epoch == 0:
        raise KDForgeError(
            f"the training data has {n_blocks} blocks, fewer than one global batch ({global_bs}); "
            "lower train.batch_size or add text"
        )
    epoch, pos = divmod(micro_step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_blocks, generator=g)
    start = pos * global_bs + rank * batch_size
    return perm[start : start + batch_size]


def make_batch(blocks: TokenBlocks, index: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch of blocks; `block_index` says which (an offline teacher cache looks its rows up by it; models never
    see it: they get input_ids and attention_mask only)."""
    ids = blocks.ids[index]
    labels = ids.clone() if blocks.labels is None else blocks.labels[index]
    mask = torch.ones_like(ids) if blocks.attention_mask is None else blocks.attention_mask[index]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "block_index": torch.as_tensor(index, dtype=torch.long)}
