"""The demo's toy language: short English sentences and the tasks the demo model and adapters learn.

A small closed grammar keeps the tasks learnable by a tiny model in seconds of CPU training, while the
outputs still read as text. The Spanish is word-for-word with the adjective after its noun: a toy
translation, not a grammatical one (every noun is masculine so that "el"/"un" always fit).
"""

from __future__ import annotations

import random
from typing import Callable

ARTICLES = {"the": "el", "a": "un"}
ADJECTIVES = {
    "red": "rojo", "green": "verde", "blue": "azul", "black": "negro", "white": "blanco",
    "big": "grande", "small": "pequeño", "old": "viejo", "new": "nuevo", "happy": "feliz",
}
NOUNS = {
    "cat": "gato", "dog": "perro", "bird": "pájaro", "boy": "niño", "tree": "árbol", "book": "libro",
    "horse": "caballo", "fish": "pez", "friend": "amigo", "river": "río", "car": "coche", "sun": "sol",
}
VERBS = {
    "sees": "ve", "likes": "quiere", "eats": "come", "has": "tiene",
    "finds": "encuentra", "follows": "sigue", "reads": "lee", "draws": "dibuja",
}
ADVERBS = {"today": "hoy", "now": "ahora", "here": "aquí", "again": "otra vez"}

ENGLISH_TO_SPANISH = {**ARTICLES, **ADJECTIVES, **NOUNS, **VERBS, **ADVERBS}


def random_sentence(rng: random.Random) -> str:
    """A sentence of 5 to 8 words: "the" subject, verb, "a" object, sometimes adjectives and an adverb.

    No word appears twice, so each output word of copy, reverse or upper is found in the input by
    content alone, which a tiny model learns far faster than position arithmetic.
    """
    subject_noun, object_noun = rng.sample(sorted(NOUNS), 2)
    subject_adjective, object_adjective = rng.sample(sorted(ADJECTIVES), 2)
    words = ["the"]
    if rng.random() < 0.5:
        words.append(subject_adjective)
    words += [subject_noun, rng.choice(sorted(VERBS)), "a"]
    if rng.random() < 0.5:
        words.append(object_adjective)
    words.append(object_noun)
    if rng.random() < 0.3:
        words.append(rng.choice(sorted(ADVERBS)))
    return " ".join(words)


def copy_text(sentence: str) -> str:
    return sentence


def to_spanish(sentence: str) -> str:
    """Word-for-word translation, moving each adjective after the noun it describes."""
    words = sentence.split()
    translated = []
    index = 0
    while index < len(words):
        word = words[index]
        if word in ADJECTIVES and index + 1 < len(words) and words[index + 1] in NOUNS:
            translated += [NOUNS[words[index + 1]], ADJECTIVES[word]]
            index += 2
        else:
            translated.append(ENGLISH_TO_SPANISH[word])
            index += 1
    return " ".join(translated)


def to_upper(sentence: str) -> str:
    return sentence.upper()


def reverse_words(sentence: str) -> str:
    return " ".join(reversed(sentence.split()))


def count_words(sentence: str) -> str:
    """Counts the words aloud: "1 2 3 ..." up to the number of words."""
    return " ".join(str(number) for number in range(1, len(sentence.split()) + 1))


# What the base model does with a plain prompt ("copy"), and the tasks the adapters make the default.
TASKS: dict[str, Callable[[str], str]] = {
    "copy": copy_text,
    "es": to_spanish,
    "upper": to_upper,
    "reverse": reverse_words,
    "count": count_words,
}
