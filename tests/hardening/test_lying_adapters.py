"""Adapters that lie (config rank against tensor rank, NaN weights, missing tensors, a corrupt safetensors
header, another base model's shapes or module names, ...) registered over HTTP: each refused with a 400 naming
the adapter and the reason, never listed, and the engine goes on serving the good adapters exactly.

The lying adapters are tests/lora's own (engine level); here they come through the register routes."""

from __future__ import annotations

from pathlib import Path

from tests.adapters import peft_greedy
from tests.hardening.conftest import adapter_names, assert_json_error
from tests.lora.test_registry import lying_adapters
from tests.server.test_s3_startup import PROMPT, greedy_ids

# Missing files are refused by the container's storage layer before the engine reads anything.
REFUSED_BY_STORAGE = {"no_config": "is not a LoRA adapter: it has no adapter_config.json",
                      "no_weights": "is not a LoRA adapter: it has neither adapter_model.safetensors"}


def test_lying_adapters_are_refused_and_the_engine_is_unaffected(lora_server, client, server_base, server_adapters,
                                                                  tiny_models):
    model_dir = Path(lora_server.runtime.config.model_id)
    workdir = model_dir / "lying"  # inside the server's allowed roots
    workdir.mkdir()
    # tests/lora's "r8-all" (rank 8, alpha 16, every projection) is this server's a2.
    makers = lying_adapters(server_base, tiny_models, workdir, {"r8-all": server_adapters["a2"]})
    for index, make in enumerate(makers):
        path, reason = make()
        name = make.__name__.replace("_", "-")
        if index % 2:
            response = client.post("/models/model/adapters", params={"name": name, "src": str(path)})
        else:
            response = client.post("/adapters", json={"name": name, "src": str(path)})
        if make.__name__ in REFUSED_BY_STORAGE:
            assert_json_error(response, 400, str(path), REFUSED_BY_STORAGE[make.__name__])
        else:
            assert_json_error(response, 400, f"Adapter {name} cannot be served", reason)
    assert adapter_names(client) == {"a1", "a2"}

    prompt_ids = lora_server.runtime.engine.tokenize(PROMPT)
    for adapter in ("a1", "a2"):
        assert greedy_ids(client, adapter) == peft_greedy(server_base, server_adapters[adapter], prompt_ids, 6)
    mixed = client.post("/invocations", json={"inputs": [PROMPT] * 3, "adapters": ["a1", "", "a2"],
                                              "parameters": {"max_new_tokens": 6, "details": True}})
    assert [[token["id"] for token in item["details"]["tokens"]] for item in mixed.json()] == [
        peft_greedy(server_base, server_adapters["a1"], prompt_ids, 6),
        peft_greedy(server_base, None, prompt_ids, 6),
        peft_greedy(server_base, server_adapters["a2"], prompt_ids, 6),
    ]
