"""A recipe's corpus as token blocks: read (kdforge.data.corpus), tokenized and packed (kdforge.data.packing).

The causal-LM task (kdforge.tasks.causal_lm), the offline teacher cache and the bench all read a recipe's training
and held-out blocks through `tokenize_corpus`; it sits in the data layer so none of them imports another for it.
"""
from __future__ import annotations

from .corpus import load_corpus
from .packing import TokenBlocks, pack, tokenize_documents


def tokenize_corpus(recipe, tokenizer) -> tuple[TokenBlocks, TokenBlocks]:
    """(training blocks [N, data.seq_len], held-out blocks [M, data.seq_len]) of the recipe's corpus.

    Training tokens are capped at data.max_train_tokens, held-out ones at data.max_eval_tokens. Raises KDForgeError
    when the corpus makes fewer training blocks than one train.batch_size, or no held-out block."""
    if recipe.data.prompts is not None:  # prompt–response records: padded blocks whose labels mask the prompt
        from .prompts import prompt_blocks

        return prompt_blocks(recipe, tokenizer)
    corpus = load_corpus(recipe.data, tokenizer)
    seq = recipe.data.seq_len
    ids, chars = tokenize_documents(tokenizer, corpus.train)
    train = pack(ids, chars, seq, recipe.data.max_train_tokens, "training corpus", min_blocks=recipe.train.batch_size)
    vids, vchars = tokenize_documents(tokenizer, corpus.validation)
    val = pack(vids, vchars, seq, recipe.data.max_eval_tokens, "held-out corpus", min_blocks=1)
    return train, val
