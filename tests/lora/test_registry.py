"""Adapter registration: refusals with reasons, the host/device tiers, pinning, identity."""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from lora_serving.handler import Engine, SamplingParams
from lora_serving.handler.errors import (
    AdapterCapacityError,
    AdapterExistsError,
    AdapterNotFoundError,
    InvalidAdapterError,
    LoraNotEnabledError,
)
from lora_serving.handler.lora.host_cache import HostCache
from lora_serving.handler.lora.peft_adapter import AdapterVersion, AdapterWeights
from tests.adapters import _fresh_copy, make_peft_adapter, peft_greedy
from tests.engine.test_parity import random_prompts


@pytest.fixture
def engine(lora_base):
    return Engine(lora_base, dtype="float32", enable_lora=True, max_loras=2, max_cpu_loras=3, max_lora_rank=16)


def save_peft(base_dir, out_dir, **config):
    model = get_peft_model(_fresh_copy(base_dir), LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(str(out_dir))
    return out_dir


def rewrite_tensors(adapter_dir, edit):
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    return adapter_dir


def first_key(tensors, fragment):
    return next(k for k in sorted(tensors) if fragment in k)


def lying_adapters(lora_base, tiny_models, tmp_path, adapters):
    """Each maker returns (adapter dir, fragment the refusal must contain)."""
    import shutil

    def copy(name):
        return shutil.copytree(adapters["r8-all"], tmp_path / name)

    def rank_lie():
        path = copy("rank-lie")
        config = json.loads((path / "adapter_config.json").read_text())
        config["r"] = 4
        (path / "adapter_config.json").write_text(json.dumps(config))
        return path, "gives model.layers.0.mlp.down_proj rank 4 but its tensors have rank 8"

    def nan_weights():
        path = rewrite_tensors(copy("nan"), lambda t: t[first_key(t, "q_proj.lora_B")].fill_(float("nan")))
        return path, "NaN or infinite"

    def missing_b():
        path = rewrite_tensors(copy("missing"), lambda t: t.pop(first_key(t, "layers.1.self_attn.v_proj.lora_B")))
        return path, "model.layers.1.self_attn.v_proj has no lora_B weight"

    def corrupt_header():
        path = copy("corrupt")
        (path / "adapter_model.safetensors").write_bytes(b"\xff\xff\xff\xff\x00\x00\x00\x00{not json")
        return path, "adapter_model.safetensors is corrupt"

    def no_config():
        path = copy("no-config")
        (path / "adapter_config.json").unlink()
        return path, "adapter_config.json is missing"

    def no_weights():
        path = copy("no-weights")
        (path / "adapter_model.safetensors").unlink()
        return path, "no adapter_model.safetensors or adapter_model.bin"

    def dora():
        return save_peft(lora_base, tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True), "DoRA"

    def modules_to_save():
        return (save_peft(lora_base, tmp_path / "mts", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                "modules_to_save")

    def embedding():
        return save_peft(lora_base, tmp_path / "emb", r=4, target_modules=["embed_tokens"]), "embed_tokens"

    def too_high_rank():
        return make_peft_adapter(lora_base, tmp_path / "r32", r=32, alpha=32), "above option.max_lora_rank=16"

    def other_shapes():
        wide = tiny_models.get("llama-wide", "llama", hidden_size=96)
        return make_peft_adapter(wide, tmp_path / "wide", r=4, alpha=8), "which do not fit the base model's 128 -> 64 projection"

    def other_architecture():
        from transformers import GPT2Config, GPT2LMHeadModel

        gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1024))
        model = get_peft_model(gpt2, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False,
                                                fan_in_fan_out=True))
        model.save_pretrained(str(tmp_path / "gpt2"))
        return tmp_path / "gpt2", "fan_in_fan_out"

    def other_architecture_names():
        path = copy("renamed")
        rewrite_tensors(path, lambda t: t.update(
            {k.replace("self_attn.q_proj", "attn.c_attn"): t.pop(k) for k in [first_key(t, "q_proj.lora_A")]}))
        return path, "attn.c_attn"

    return [rank_lie, nan_weights, missing_b, corrupt_header, no_config, no_weights, dora, modules_to_save,
            embedding, too_high_rank, other_shapes, other_architecture, other_architecture_names]


def test_adapters_that_cannot_be_served_are_refused_naming_adapter_and_reason(
    engine, lora_base, tiny_models, tmp_path, adapters
):
    for make in lying_adapters(lora_base, tiny_models, tmp_path, adapters):
        path, reason = make()
        with pytest.raises(InvalidAdapterError) as error:
            engine.register_adapter(make.__name__, path)
        assert f"Adapter {make.__name__} cannot be served" in str(error.value)
        assert reason in str(error.value), make.__name__
    assert engine.list_adapters() == []
    # The engine keeps serving, with and without adapters.
    engine.register_adapter("good", adapters["r8-all"])
    prompt = random_prompts(1, seed=40)[0]
    [result] = engine.generate([prompt], SamplingParams(max_new_tokens=8), ["good"])
    assert result.token_ids == peft_greedy(lora_base, adapters["r8-all"], prompt, 8)


def test_registry_errors(engine, lora_base, adapters):
    engine.register_adapter("a", adapters["r8-all"])
    with pytest.raises(AdapterExistsError, match="Adapter a is already registered"):
        engine.register_adapter("a", adapters["r1-qv"])
    with pytest.raises(AdapterNotFoundError, match="Adapter nope is not registered"):
        engine.unregister_adapter("nope")
    with pytest.raises(AdapterNotFoundError, match="Adapter nope is not registered"):
        engine.add_request("x", [0, 5], SamplingParams(), adapter="nope")
    for bad_name in ("../etc", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(InvalidAdapterError, match="adapter name"):
            engine.register_adapter(bad_name, adapters["r8-all"])
    plain = Engine(lora_base, dtype="float32")
    with pytest.raises(LoraNotEnabledError, match="LoRA is not enabled"):
        plain.register_adapter("a", adapters["r8-all"])
    with pytest.raises(LoraNotEnabledError, match="LoRA is not enabled"):
        plain.add_request("x", [0, 5], SamplingParams(), adapter="a")


def fake_weights(key: str) -> AdapterWeights:
    return AdapterWeights(version=AdapterVersion(key, None, key), modules={})


def test_host_cache_evicts_least_recently_used_and_never_pinned():
    cache = HostCache(capacity=2)
    assert cache.put(fake_weights("a")) == []
    cache.put(fake_weights("b"))
    cache.get("a")  # a is now more recent than b
    assert cache.put(fake_weights("c")) == ["b"]
    cache.set_pinned("a", True)
    assert cache.put(fake_weights("d")) == ["c"]
    cache.set_pinned("a", False)
    # Entries the waiting queue wants are spared while something else can go.
    assert cache.put(fake_weights("e"), protect=frozenset({"a"})) == ["d"]
    assert cache.keys() == ["a", "e"]
    # Capacity is a memory bound: when only wanted entries are left, the oldest still goes.
    assert cache.put(fake_weights("f"), protect=frozenset({"a", "e"})) == ["a"]


def test_tiers_follow_use_and_pinned_adapters_stay_resident(engine, lora_base, adapters):
    names = list(adapters)
    engine.register_adapter(names[0], adapters[names[0]], pin=True)
    for name in names[1:4]:
        engine.register_adapter(name, adapters[name], preload=True)
    tiers = {info.name: info.tier for info in engine.list_adapters()}
    # Three host places: the pinned one stays, the oldest unpinned preload was pushed out.
    assert tiers[names[0]] == "host" and tiers[names[1]] == "disk"
    assert tiers[names[2]] == tiers[names[3]] == "host"
    with pytest.raises(AdapterCapacityError, match="one must stay free"):
        engine.register_adapter(names[4], adapters[names[4]], pin=True)
    engine.register_adapter(names[4], adapters[names[4]], preload=False)
    prompts = random_prompts(4, seed=41)
    engine.generate(prompts, SamplingParams(max_new_tokens=4), names[1:5])
    infos = {info.name: info for info in engine.list_adapters()}
    assert infos[names[0]].tier == "device" and infos[names[0]].pinned
    assert [info.tier for info in infos.values()].count("device") == 2
    assert infos[names[4]].tier in ("device", "host") and infos[names[4]].tokens_served == 4
    engine.update_adapter(names[0], pin=False)
    engine.generate(random_prompts(2, seed=42), SamplingParams(max_new_tokens=2), names[2:4])
    assert engine.get_adapter(names[0]).tier != "device"


def test_a_step_never_uses_more_adapters_than_slots_and_cold_requests_are_not_starved(lora_base, adapters):
    engine = Engine(lora_base, dtype="float32", enable_lora=True, max_loras=1, max_cpu_loras=2,
                    max_rolling_batch_size=8, max_adapter_wait_steps=3)
    engine.register_adapter("hot", adapters["r8-all"])
    engine.register_adapter("cold", adapters["r1-qv"], preload=False)
    adapters_per_step = []
    execute = engine.runner.execute

    def recording_execute(step, lora=None):
        adapters_per_step.append({seq.adapter for seq in step.seqs if seq.adapter})
        return execute(step, lora)

    engine.runner.execute = recording_execute
    prompts = random_prompts(40, seed=43, min_len=3, max_len=8)
    admitted_at = None
    for step in range(200):
        if step < 40:  # a steady stream of requests for the resident adapter
            engine.add_request(f"hot-{step}", prompts[step], SamplingParams(max_new_tokens=6), adapter="hot")
        if step == 2:
            engine.add_request("cold", prompts[0], SamplingParams(max_new_tokens=6), adapter="cold")
        for output in engine.step():
            if output.request_id == "cold" and admitted_at is None:
                admitted_at = step
        if not engine.has_unfinished_requests():
            break
    assert all(len(names) <= 1 for names in adapters_per_step)
    # Bound: the wait limit, then the running hot requests drain (6 tokens each), plus the load.
    assert admitted_at is not None and admitted_at <= 2 + 3 + 6 + 3
    assert admitted_at < 40  # it did not wait for the stream of hot requests to end


def test_unregistering_lets_accepted_requests_finish_and_refuses_new_ones(engine, lora_base, adapters):
    engine.register_adapter("a", adapters["r16-attn"])
    prompt = random_prompts(1, seed=44)[0]
    engine.add_request("running", prompt, SamplingParams(max_new_tokens=10), adapter="a")
    tokens = []
    for _ in range(3):
        tokens += [t.id for out in engine.step() for t in out.tokens]
    engine.unregister_adapter("a")
    with pytest.raises(AdapterNotFoundError, match="Adapter a is not registered"):
        engine.add_request("late", prompt, SamplingParams(), adapter="a")
    while engine.has_unfinished_requests():
        tokens += [t.id for out in engine.step() for t in out.tokens]
    assert tokens == peft_greedy(lora_base, adapters["r16-attn"], prompt, 10)


def test_re_registered_name_never_serves_the_old_weights(engine, lora_base, adapters):
    prompt = random_prompts(1, seed=45)[0]
    engine.register_adapter("x", adapters["r8-all"])
    engine.add_request("old", prompt, SamplingParams(max_new_tokens=10), adapter="x")
    tokens = {"old": [], "new": []}

    def step():
        for out in engine.step():
            tokens[out.request_id] += [t.id for t in out.tokens]

    step()  # "old" is admitted: its version holds a slot now
    engine.unregister_adapter("x")
    engine.register_adapter("x", adapters["r8-mlp"])
    engine.add_request("new", prompt, SamplingParams(max_new_tokens=10), adapter="x")
    while engine.has_unfinished_requests():
        step()
    assert tokens["new"] == peft_greedy(lora_base, adapters["r8-mlp"], prompt, 10)
    assert tokens["old"] == peft_greedy(lora_base, adapters["r8-all"], prompt, 10)
    # update_adapter swaps the files under the same name the same way.
    engine.update_adapter("x", adapters["r16-attn"])
    [updated] = engine.generate([prompt], SamplingParams(max_new_tokens=10), ["x"])
    assert updated.token_ids == peft_greedy(lora_base, adapters["r16-attn"], prompt, 10)


def test_a_failed_load_fails_only_the_requests_waiting_for_it(engine, lora_base, adapters, tmp_path):
    import shutil

    path = shutil.copytree(adapters["r8-all"], tmp_path / "fragile")
    engine.register_adapter("fragile", path, preload=False)
    rewrite_tensors(path, lambda t: t[first_key(t, "q_proj.lora_A")].mul_(2))  # changed after registration
    prompts = random_prompts(3, seed=46)
    engine.register_adapter("fine", adapters["r1-qv"])
    results = engine.generate(prompts, SamplingParams(max_new_tokens=6), ["fragile", None, "fine"])
    assert results[0].finish_reason.value == "error"
    assert "Adapter fragile failed to load" in results[0].error and "changed since registration" in results[0].error
    assert results[1].token_ids == peft_greedy(lora_base, None, prompts[1], 6)
    assert results[2].token_ids == peft_greedy(lora_base, adapters["r1-qv"], prompts[2], 6)


def test_a_failed_load_does_not_fail_another_name_with_the_same_files(engine, lora_base, adapters, tmp_path):
    import shutil

    twin = shutil.copytree(adapters["r8-all"], tmp_path / "twin")
    engine.register_adapter("twin", twin, preload=False)
    engine.register_adapter("original", adapters["r8-all"], preload=False)  # same content: one cache entry
    shutil.rmtree(twin)
    prompts = random_prompts(2, seed=47)
    results = engine.generate(prompts, SamplingParams(max_new_tokens=6), ["twin", "original"])
    assert results[0].finish_reason.value == "error" and "Adapter twin failed to load" in results[0].error
    assert results[1].token_ids == peft_greedy(lora_base, adapters["r8-all"], prompts[1], 6)


def test_disk_loads_run_off_the_step_loop(engine, lora_base, adapters, monkeypatch):
    import threading

    import lora_serving.handler.lora.loader as loader_module

    release = threading.Event()
    real_load = loader_module.load_peft_adapter

    def slow_load(*args, **kwargs):
        if threading.current_thread().name.startswith("lora-load"):
            release.wait(timeout=30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(loader_module, "load_peft_adapter", slow_load)
    engine.register_adapter("cold", adapters["r8-mlp"], preload=False)
    prompts = random_prompts(2, seed=47)
    engine.add_request("base", prompts[0], SamplingParams(max_new_tokens=8))
    engine.add_request("cold", prompts[1], SamplingParams(max_new_tokens=8), adapter="cold")
    base_tokens = 0
    for _ in range(6):  # the load is blocked: the running base request still decodes every step
        outputs = engine.step()
        base_tokens += sum(len(o.tokens) for o in outputs if o.request_id == "base")
        assert not any(o.request_id == "cold" for o in outputs)
    assert base_tokens == 6
    release.set()
    cold_tokens = []
    while engine.has_unfinished_requests():
        cold_tokens += [t.id for o in engine.step() if o.request_id == "cold" for t in o.tokens]
    assert cold_tokens == peft_greedy(lora_base, adapters["r8-mlp"], prompts[1], 8)
    assert engine.get_adapter("cold").load_seconds is not None


def test_adapters_in_the_model_dir_register_at_start(tiny_models, adapters, tmp_path):
    import shutil

    model_dir = shutil.copytree(tiny_models.get("llama", "llama"), tmp_path / "model")
    shutil.copytree(adapters["r1-qv"], model_dir / "adapters" / "es")
    shutil.copytree(adapters["r8-mlp"], model_dir / "adapters" / "fr")
    (model_dir / "adapters" / "broken").mkdir()
    (model_dir / "adapters" / "broken" / "adapter_config.json").write_text("{")
    engine = Engine(model_dir, dtype="float32", enable_lora=True)
    assert [info.name for info in engine.list_adapters()] == ["es", "fr"]
