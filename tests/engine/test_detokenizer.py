"""Incremental detokenisation equals decoding everything at once, even through split characters."""

from __future__ import annotations

import random

from lora_serving.handler.detokenizer import IncrementalDetokenizer

TEXT = "naïve café → 日本語 and 한국어, emoji 😀🚀👍🏽 done."


def stream(tokenizer, prompt_ids, ids):
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detokenizer.add(token) for token in ids]
    return pieces, detokenizer.flush()


def test_multibyte_characters_are_never_split_in_the_stream(tiny_models):
    tokenizer = tiny_models.tokenizer
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(TEXT.split())  # the tokenizer really splits inside words and characters
    pieces, tail = stream(tokenizer, tokenizer("Q:")["input_ids"], ids)
    assert "".join(pieces) + tail == TEXT
    assert all("\ufffd" not in piece for piece in pieces)
    # Some character took more than one token: the stream held text back at least once.
    assert "" in pieces


def test_random_token_streams_match_full_decoding(tiny_models):
    tokenizer = tiny_models.tokenizer
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(3, len(tokenizer)) for _ in range(rng.randint(1, 30))]
        pieces, tail = stream(tokenizer, [0, 5, 6], ids)
        assert "".join(pieces) + tail == tokenizer.decode(ids, skip_special_tokens=True)
