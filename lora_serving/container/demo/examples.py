"""Prompts and requests to try on the demo model, for the README, the server's tests and people.

Every adapter answers the same plain prompt differently; the base model copies it. The chat form (the
sentence as the one user message) gets the same answers.
"""

from __future__ import annotations

from lora_serving.container.demo.prompts import plain_prompt
from lora_serving.container.demo.recipe import ADAPTER_NAMES
from lora_serving.container.demo.toy_language import TASKS

# The LMI name of the base model where an adapter name is expected ("" or absent selects it).
BASE_MODEL = ""

DEMO_SENTENCES = (
    "the red cat sees a small dog",
    "the old horse follows a happy boy today",
    "the bird reads a new book",
)
DEMO_PROMPTS = tuple(plain_prompt(sentence) for sentence in DEMO_SENTENCES)

# Enough for the longest answer; generation ends earlier, on EOS.
DEMO_MAX_NEW_TOKENS = 30

# LMI bodies on the first demo sentence, keyed by adapter (BASE_MODEL: none): text for /invocations ...
EXAMPLE_REQUESTS = {
    adapter: {
        "inputs": DEMO_PROMPTS[0],
        "parameters": {"max_new_tokens": DEMO_MAX_NEW_TOKENS},
        **({"adapters": adapter} if adapter != BASE_MODEL else {}),
    }
    for adapter in (BASE_MODEL, *ADAPTER_NAMES)
}
# ... and the chat form, answered as an OpenAI chat.completion.
EXAMPLE_CHAT_REQUESTS = {
    adapter: {
        "messages": [{"role": "user", "content": DEMO_SENTENCES[0]}],
        "max_tokens": DEMO_MAX_NEW_TOKENS,
        **({"adapters": adapter} if adapter != BASE_MODEL else {}),
    }
    for adapter in (BASE_MODEL, *ADAPTER_NAMES)
}


def intended_answer(adapter: str, sentence: str) -> str:
    """What the base model (adapter BASE_MODEL) or an adapter was trained to answer to `sentence`."""
    return TASKS["copy" if adapter == BASE_MODEL else adapter](sentence)
