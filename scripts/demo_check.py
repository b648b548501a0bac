"""Build (or reuse) the demo model and print, per demo sentence, the greedy answer of the base model and
of each adapter, computed by transformers + PEFT; first for the plain prompts, then in chat form.

    .venv/bin/python scripts/demo_check.py [--cache-dir .cache/demo]

The mark after each answer says whether it is the one that model was trained to give.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from transformers import AutoTokenizer

from lora_serving.container.demo.build import ensure_demo_model
from lora_serving.container.demo.examples import BASE_MODEL, DEMO_PROMPTS, DEMO_SENTENCES, intended_answer
from lora_serving.container.demo.prompts import chat_prompt
from lora_serving.container.demo.reference import greedy_outputs


def print_answers(title: str, prompts: list[str], outputs: dict[str, list[str]]) -> None:
    label_width = max(len(name) for name in outputs) + len("adapter ")
    print(f"\n== {title}")
    for index, (sentence, prompt) in enumerate(zip(DEMO_SENTENCES, prompts)):
        print(f"prompt {prompt!r}")
        for name, answers in outputs.items():
            label = "base model" if name == BASE_MODEL else f"adapter {name}"
            mark = "ok" if answers[index] == intended_answer(name, sentence) else "UNEXPECTED"
            print(f"  {label:<{label_width}}  {answers[index]!r:<50} {mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/demo"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    started = time.monotonic()
    model_dir = ensure_demo_model(args.cache_dir)
    print(f"model directory: {model_dir} (ready in {time.monotonic() - started:.1f} s)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat_prompts = [chat_prompt(tokenizer, sentence) for sentence in DEMO_SENTENCES]
    print_answers("plain prompts", list(DEMO_PROMPTS), greedy_outputs(model_dir, DEMO_PROMPTS))
    print_answers("chat template", chat_prompts, greedy_outputs(model_dir, chat_prompts))


if __name__ == "__main__":
    main()
