"""A byte-level BPE tokenizer trained here, so that tests, benchmarks and the demo need no model hub.

Byte-level, like the Llama-3 / Qwen2 tokenizers: any UTF-8 text round-trips, and multi-byte characters
split across several tokens, which is what incremental detokenisation has to get right.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# A ChatML-style template: the tokenizer's own chat template is what the chat routes render.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_WORDS = (
    "the of and to in is was for on that with as by at from it an be this which or are have not "
    "model adapter request token batch cache serve answer question translate count color river "
    "mountain city number first second third hello world good morning night water fire earth air "
    "one two three four five six seven eight nine ten red green blue yellow black white"
).split()
_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
# Multi-byte characters (2, 3 and 4 bytes in UTF-8) so that byte-level tokens split characters.
_MULTIBYTE = ["é", "ñ", "ü", "ß", "Ж", "λ", "中", "文", "日本語", "한국어", "€", "→", "😀", "🚀", "👍🏽"]


def synthetic_corpus(num_lines: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic text with English words, made-up words, digits, punctuation and multi-byte text."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = []
        for _ in range(rng.randint(4, 16)):
            roll = rng.random()
            if roll < 0.55:
                words.append(rng.choice(_WORDS))
            elif roll < 0.85:
                words.append("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
            elif roll < 0.93:
                words.append(str(rng.randint(0, 9999)))
            else:
                words.append(rng.choice(_MULTIBYTE))
        lines.append(" ".join(words) + rng.choice([".", "!", "?", ",", ":", ""]))
    return lines


def build_tokenizer(
    out_dir: str | Path,
    vocab_size: int = 1024,
    extra_text: Iterable[str] = (),
    seed: int = 0,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and save it (tokenizer.json + config) into out_dir."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = [BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = synthetic_corpus(seed=seed) + list(extra_text)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    # Like Llama's tokenizers, encoding a text starts it with BOS.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(out_dir))
    return fast
