"""Corpus files that do not decode are refused (or, below a threshold, reported), never trained on silently."""
from __future__ import annotations

import logging
import random

import pytest

from kdforge.data.corpus import load_corpus, read_text
from kdforge.errors import KDForgeError
from kdforge.recipe import DataSpec

FRENCH = "Le café est très bon. Où est la bibliothèque ? Déjà vu, naïve façade.\n" * 40


def _spec(train, val, **extra):
    return DataSpec(corpus=str(train), validation=[str(val)], **extra)


def test_random_bytes_are_refused_with_their_share(tmp_path):
    rng = random.Random(0)
    (tmp_path / "noise.txt").write_bytes(bytes(rng.randrange(256) for _ in range(4000)))
    (tmp_path / "val.txt").write_text("fine text\n")
    with pytest.raises(KDForgeError, match=r"noise.txt: \d+ of 4000 bytes \(\d+\.\d+%\) are not valid utf-8.*data.encoding"):
        load_corpus(_spec(tmp_path / "noise.txt", tmp_path / "val.txt"))


def test_latin1_text_is_refused_as_utf8_and_read_exactly_with_its_encoding(tmp_path):
    (tmp_path / "fr.txt").write_bytes(FRENCH.encode("latin-1"))
    (tmp_path / "val.txt").write_bytes(FRENCH.encode("latin-1"))
    with pytest.raises(KDForgeError, match="not valid utf-8"):
        load_corpus(_spec(tmp_path / "fr.txt", tmp_path / "val.txt"))
    corpus = load_corpus(_spec(tmp_path / "fr.txt", tmp_path / "val.txt", encoding="latin-1"))
    assert corpus.train == [FRENCH] and corpus.validation == [FRENCH]


def test_a_few_bad_bytes_below_the_threshold_are_reported_and_replaced(tmp_path, caplog):
    path = tmp_path / "almost.txt"
    path.write_bytes(b"good text " * 500 + b"\xff" + b" more text\n")
    with caplog.at_level(logging.WARNING, logger="kdforge"):
        text = read_text(path)
    assert text == "good text " * 500 + "\ufffd more text\n"
    assert "1 of 5012 bytes (0.02%) are not valid utf-8" in caplog.text
    with pytest.raises(KDForgeError, match="raise data.max_undecodable"):
        read_text(path, max_undecodable=0.0)


def test_an_unknown_encoding_is_one_line(tmp_path):
    (tmp_path / "a.txt").write_text("text\n")
    with pytest.raises(KDForgeError, match="'klingon' is not a known text encoding"):
        read_text(tmp_path / "a.txt", "klingon")


# --------------------------------------------------------------------------- structured records (issue 16)

CHAT = [{"role": "user", "content": "Who is the king?"}, {"role": "assistant", "content": "Lear."}]


class TemplateTokenizer:
    """The part of a tokenizer that rendering uses: a chat template applied to messages."""

    chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"

    def apply_chat_template(self, messages, tokenize=False):
        assert tokenize is False
        return "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)


def test_chat_messages_are_rendered_with_the_chat_template_never_stringified(tmp_path):
    import json

    from kdforge.data.corpus import read_documents

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": CHAT[:1]}) + "\n")
    docs = read_documents(path, "messages", tokenizer=TemplateTokenizer())
    assert docs == ["<|user|>Who is the king?\n<|assistant|>Lear.\n", "<|user|>Who is the king?\n"]
    assert not any("'role'" in d for d in docs)
    with pytest.raises(KDForgeError, match=r"chat.jsonl:1 field 'messages' holds chat messages but the tokenizer "
                                           r"has no chat template"):
        read_documents(path, "messages")


def test_a_real_tokenizer_chat_template_renders_roles(tiny_assets, tmp_path):
    import json

    from transformers import AutoTokenizer

    from kdforge.data.corpus import read_documents

    tok = AutoTokenizer.from_pretrained(tiny_assets["teacher"])
    tok.chat_template = TemplateTokenizer.chat_template
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n")
    assert read_documents(path, "messages", tokenizer=tok) == ["<|user|>Who is the king?\n<|assistant|>Lear.\n"]


@pytest.mark.parametrize("value,kind", [({"a": 1}, "dict"), ([1, 2], "list"), (3, "int")])
def test_other_structured_fields_are_refused(tmp_path, value, kind):
    import json

    from kdforge.data.corpus import read_documents

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": value}) + "\n")
    with pytest.raises(KDForgeError, match=rf"rows.jsonl:1 field 'text' is a {kind}, not text"):
        read_documents(path, "text")


def test_a_json_array_file_is_read_as_records(tmp_path):
    import json

    from kdforge.data.corpus import read_documents

    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"text": "first document"}, {"text": "second"}]))
    assert read_documents(path, "text") == ["first document", "second"]
    path.write_text(json.dumps({"text": "one object"}))
    with pytest.raises(KDForgeError, match="a .json corpus must be an array of objects"):
        read_documents(path, "text")
