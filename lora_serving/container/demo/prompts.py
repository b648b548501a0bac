"""How the demo's prompts are written: the plain form every adapter shares, a text naming a task, and chat.

A plain prompt is the input text and a newline. The base model copies it; each adapter is trained to
answer the same plain prompt with its own task. The base model also learns every task when the text
names it ("es: the red cat\\n"), so the adapters only have to make one known skill the default, which is
what lets a few seconds of LoRA training on CPU be enough. Both models also learn the same texts in the
tokenizer's chat template, so that the chat routes answer as the plain ones do.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast


def plain_prompt(text: str) -> str:
    return f"{text}\n"


def instruction(task: str, sentence: str) -> str:
    return f"{task}: {sentence}"


def chat_prompt(tokenizer: PreTrainedTokenizerFast, text: str) -> str:
    """The prompt a chat route makes of one user message: the tokenizer's own template renders it."""
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
