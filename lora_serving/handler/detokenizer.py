"""Incremental detokenisation: the text each new token adds, correct for characters split over tokens.

Decoding one token alone is wrong in two ways: a multi-byte character split across byte-level tokens
decodes to U+FFFD until its last byte arrives, and SentencePiece tokenizers drop a word's leading space
when it starts the decoded text. So we decode a short window that starts a few tokens back and emit only
what the window gained, holding text back while it ends in an incomplete character. Special tokens are left
out unless the request keeps them (`skip_special_tokens`).
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"
# Tokens of context kept before the unread ones; enough for any tokenizer's merge/space rules.
CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, token_id: int) -> str:
        """Append a generated token; return the text it completes (possibly "")."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT_CHAR):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back at the end of generation (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False)
