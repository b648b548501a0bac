"""The SmolLM2 directory the tests build holds what the real Hub repo holds, as the repo has it, and the
adapters for it are PEFT's and change what the model says."""

from __future__ import annotations

import json

from safetensors import safe_open
from transformers import AutoTokenizer

from tests.real_model import PIRATE_ADAPTER, RANDOM_ADAPTERS

# What a Hub model repo may hold that the engine reads (README, LICENSE and the like aside).
HUB_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}


def test_directory_holds_only_what_a_hub_repo_holds(smollm2_dir):
    names = {path.name for path in smollm2_dir.iterdir()}
    assert names <= HUB_MODEL_FILES, names - HUB_MODEL_FILES
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names


def test_config_is_smollm2_135m_unquantized_in_bfloat16(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and not any("gguf" in key for key in config)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert (config["hidden_size"], config["vocab_size"], config["rms_norm_eps"]) == (576, 49152, 1e-05)
    assert config["tie_word_embeddings"] is True
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 2)
    with safe_open(smollm2_dir / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
        assert {str(weights.get_slice(name).get_dtype()) for name in names} == {"BF16"}
    # Tied: the embedding is the LM head, stored once.
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert len(names) == 1 + 30 * 9 + 1


def test_tokenizer_has_the_chatml_template_and_end_of_turn(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|im_end|>")
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tokenizer("Hello world").input_ids == [19556, 905]  # no BOS added, as the real tokenizer
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                             tokenize=False)
    assert rendered == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_adapters_are_saved_by_peft(smollm2_adapters):
    assert set(smollm2_adapters) == {*RANDOM_ADAPTERS, PIRATE_ADAPTER}
    for name, path in smollm2_adapters.items():
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in path.iterdir()}, name
        config = json.loads((path / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA", name
    ranks = {json.loads((path / "adapter_config.json").read_text())["r"] for path in smollm2_adapters.values()}
    assert len(ranks) > 1
