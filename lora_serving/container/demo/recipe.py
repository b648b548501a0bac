"""Every number that decides what the demo build produces: sizes, seeds, schedules, adapters, serving keys.

Measured on 40 held-out sentences, greedy: with these schedules the base model and every adapter give
the exact answer to every plain prompt, and in chat form to all but 2 (reverse). With half the steps the
rarer words (the adverbs) failed about one sentence in ten: the margin is what keeps the demo's answers
right on another machine's floating point.
"""

from __future__ import annotations

from dataclasses import dataclass

SEED = 0

TOKENIZER_VOCAB_SIZE = 2048
TOKENIZER_CORPUS_LINES = 3000

MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    # Fewer key/value heads than query heads, as in Llama 3 and Mistral, so the demo exercises GQA.
    num_key_value_heads=2,
    max_position_embeddings=512,
)


@dataclass(frozen=True)
class TrainingSchedule:
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int


BASE_SCHEDULE = TrainingSchedule(steps=500, batch_size=32, learning_rate=3e-3, warmup_steps=30)
ADAPTER_SCHEDULE = TrainingSchedule(steps=100, batch_size=32, learning_rate=1e-2, warmup_steps=5)

# The share of training prompts in the chat template's form rather than the plain one.
CHAT_SHARE = 0.25

# How often the base model sees each task: reversing is the slowest to learn, counting the fastest.
BASE_TASK_WEIGHTS = {"copy": 1.0, "es": 1.0, "upper": 1.0, "reverse": 2.0, "count": 0.5}

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_PROJECTIONS = ATTENTION_PROJECTIONS + ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterRecipe:
    """One LoRA adapter; its name is also the task it makes the model's default answer."""

    name: str
    rank: int
    alpha: int
    target_modules: tuple[str, ...]
    use_rslora: bool = False


# Mixed ranks, module sets and scalings, so that serving the demo exercises each of them.
ADAPTERS = (
    AdapterRecipe("es", rank=16, alpha=32, target_modules=ALL_PROJECTIONS),
    AdapterRecipe("upper", rank=4, alpha=8, target_modules=ATTENTION_PROJECTIONS),
    AdapterRecipe("reverse", rank=8, alpha=16, target_modules=ALL_PROJECTIONS, use_rslora=True),
    # PEFT's own default module set for Llama: k, o and the MLP stay without LoRA.
    AdapterRecipe("count", rank=8, alpha=16, target_modules=("q_proj", "v_proj")),
)
ADAPTER_NAMES = tuple(adapter.name for adapter in ADAPTERS)

SERVING_PROPERTIES = {
    "engine": "Python",
    "option.rolling_batch": "auto",
    "option.dtype": "auto",
    "option.enable_lora": "true",
    "option.max_loras": str(len(ADAPTERS)),
    "option.max_lora_rank": str(max(adapter.rank for adapter in ADAPTERS)),
    "option.max_cpu_loras": str(len(ADAPTERS)),
    "option.max_rolling_batch_size": "32",
}
