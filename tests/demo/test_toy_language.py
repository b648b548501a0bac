"""The toy language's tasks, on sentences whose answers are written out by hand."""

from __future__ import annotations

import random

from lora_serving.container.demo.toy_language import (
    ENGLISH_TO_SPANISH,
    count_words,
    random_sentence,
    reverse_words,
    to_spanish,
    to_upper,
)


def test_spanish_puts_each_adjective_after_its_noun():
    assert to_spanish("the red cat sees a small dog today") == "el gato rojo ve un perro pequeño hoy"
    assert to_spanish("the bird finds a river again") == "el pájaro encuentra un río otra vez"


def test_word_tasks():
    assert to_upper("the cat sees a dog") == "THE CAT SEES A DOG"
    assert reverse_words("the old cat sees a dog") == "dog a sees cat old the"
    assert count_words("the old cat sees a dog") == "1 2 3 4 5 6"


def test_sentences_use_only_known_words_and_never_repeat_one():
    rng = random.Random(0)
    for _ in range(500):
        words = random_sentence(rng).split()
        assert 5 <= len(words) <= 8
        assert len(set(words)) == len(words)
        assert set(words) <= set(ENGLISH_TO_SPANISH)
