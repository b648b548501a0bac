"""The DJL handler under DJL's real worker, given a Hub id in serving.properties: DJL itself downloads only
s3:// models, so the handler fetches it, with the worker's environment (HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE)."""

from __future__ import annotations

from transformers import AutoTokenizer

from tests.djl.conftest import DJL_PROPERTIES, MODES, NEW_TOKENS, PROMPT, djl_dir, generate, running_worker, token_ids  # noqa: F401
from tests.hub.conftest import GOOD_TOKEN, hub_env
from tests.models import reference_greedy


def test_the_real_djl_worker_serves_a_hub_model_id(djl_dir, hub, server_base, tmp_path):  # noqa: F811
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    properties = {**DJL_PROPERTIES, **MODES["rolling_batch"], "option.model_id": "org/gated", "option.revision": "main"}
    (model_dir / "serving.properties").write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
    env = hub_env(hub, tmp_path / "hf-cache", HF_TOKEN=GOOD_TOKEN)
    with running_worker(djl_dir, model_dir, tmp_path, extra_env=env) as front_end:
        answer = front_end.submit(generate()).wait().json()
    prompt_ids = AutoTokenizer.from_pretrained(str(server_base))(PROMPT)["input_ids"]
    assert token_ids(answer) == reference_greedy(server_base, prompt_ids, NEW_TOKENS)
    assert {"config.json", "model.safetensors"} <= hub.fetched_files("org/gated")
