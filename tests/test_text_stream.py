"""Streaming detokenization: the pieces add up to the full decode, even across multi-byte characters."""

from __future__ import annotations

import pytest

from lambdasplit.client.generate import TextStream

TEXTS = [
    "Héllo wörld — 日本語のテキスト 🎉🎉 end.\n\nNew para:  two  spaces",
    "AI, ML and DL are   related.\n- item\n\t- nested",
]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_make_the_whole_text(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)  # never half a character


def test_long_streams_decode_a_bounded_window(tokenizer):
    ids = tokenizer("word " * 2000)["input_ids"]
    stream = TextStream(tokenizer)
    text = "".join(stream.push(i) for i in ids)
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert stream.read - stream.prefix <= 4  # the window stays a few tokens wide
