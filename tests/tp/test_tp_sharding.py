"""Sharded forward passes against the whole model, in one process: ranks as threads over one gloo group.
Covers what the 2-core test machine cannot start as processes: 4 ranks, and KV heads replicated over them."""

from __future__ import annotations

import datetime
import threading

import pytest
import torch
import torch.distributed as dist

from lora_serving.handler.models import load_hf_config, load_model
from lora_serving.handler.step_inputs import PrefillInput, StepInputs, build_forward_inputs
from lora_serving.handler.tp.comm import TensorParallelComm
from lora_serving.handler.tp.plan import ModelShape, ShardingPlan

BLOCK_SIZE = 16


def prefill_hidden(model, token_ids: list[int]) -> torch.Tensor:
    """Final hidden states [T, H] of one prefill from position 0, on a fresh KV cache."""
    count = len(token_ids)
    inputs = StepInputs(token_ids, list(range(count)), list(range(count)), [count - 1], [], [], "per_sequence",
                        [PrefillInput(0, count, 0, None)])
    ctx, input_ids, _ = build_forward_inputs(inputs, torch.device("cpu"))
    blocks = -(-count // BLOCK_SIZE)
    kv_cache = torch.zeros(model.num_layers, 2, model.num_kv_heads, blocks, BLOCK_SIZE, model.head_dim)
    return model.forward(input_ids, ctx, kv_cache)


@pytest.mark.parametrize("family,world_size", [
    ("llama", 2), ("qwen2", 2),
    # 4 ranks over 2 KV heads: each KV head held by two ranks; the fused q/k/v rows of Phi-3 read per rank.
    ("llama", 4), ("qwen2", 4), ("phi3", 4),
    ("qwen3", 2), ("gemma2", 2), ("gemma3_text", 2), ("phi3", 2), ("mixtral", 2), ("qwen3_moe", 2),
])
def test_sharded_forward_equals_the_whole_model(tiny_models, family, world_size):
    model_dir = tiny_models.get(family, family)
    hf_config = load_hf_config(model_dir)
    token_ids = [0] + list(range(40, 70))
    expected = prefill_hidden(load_model(model_dir, hf_config, torch.float32, torch.device("cpu")), token_ids)
    timeout = datetime.timedelta(seconds=60)
    store = dist.TCPStore("127.0.0.1", 0, world_size, True, timeout=timeout, wait_for_workers=False)
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run_rank(rank: int) -> None:
        try:
            rank_store = store if rank == 0 else dist.TCPStore("127.0.0.1", store.port, world_size, False,
                                                                timeout=timeout)
            comm = TensorParallelComm.connect(rank_store, rank, world_size, torch.device("cpu"), 60)
            plan = ShardingPlan(ModelShape.from_hf_config(hf_config), rank, world_size)
            model = load_model(model_dir, hf_config, torch.float32, torch.device("cpu"), plan, comm)
            assert model.num_kv_heads == max(1, 2 // world_size)
            results[rank] = prefill_hidden(model, token_ids)
        except BaseException as error:  # reported by the test thread
            errors.append(error)

    threads = [threading.Thread(target=run_rank, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    for rank in range(world_size):  # every rank ends with the whole hidden state, equal up to float noise
        torch.testing.assert_close(results[rank], expected, rtol=1e-5, atol=1e-5)
