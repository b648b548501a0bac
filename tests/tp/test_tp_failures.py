"""A rank that dies fails the engine within a bounded time, naming the rank; degrees that cannot work are
refused at start-up with the reason."""

from __future__ import annotations

import os
import signal
import time

import pytest

from lora_serving.handler import Engine, SamplingParams
from lora_serving.handler.config import Config
from lora_serving.handler.cpu_threads import available_cores
from lora_serving.handler.errors import ConfigError, RankFailedError
from lora_serving.handler.tp.plan import ModelShape, ShardingPlan

# Rank 0 notices a dead peer at the next collective (gloo reports the closed connection at once) or by its
# exit status; either way well within this.
FAILURE_BOUND_SECONDS = 10


def test_a_rank_killed_mid_request_fails_the_engine_naming_it(tiny_models):
    engine = Engine(tiny_models.get("llama", "llama"), dtype="float32", tensor_parallel_degree=2,
                    cpu_kv_cache_mb=16, max_model_len=256)
    try:
        engine.add_request("long", [0, 5, 6, 7], SamplingParams(max_new_tokens=200, ignore_eos=True))
        for _ in range(3):
            engine.step()
        os.kill(engine.ranks.pids[1], signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(RankFailedError, match="tensor-parallel rank 1 \\(of 2\\)") as failure:
            while time.monotonic() - killed_at < FAILURE_BOUND_SECONDS:
                engine.step()
        assert failure.value.rank == 1
        assert time.monotonic() - killed_at < FAILURE_BOUND_SECONDS
        with pytest.raises(RankFailedError, match="rank 1"):  # and from then on, without stepping
            engine.check_health()
    finally:
        engine.close()


def test_a_hung_rank_fails_the_step_after_the_collective_timeout(tiny_models):
    engine = Engine(tiny_models.get("llama", "llama"), dtype="float32", tensor_parallel_degree=2,
                    cpu_kv_cache_mb=16, max_model_len=256, tensor_parallel_timeout=2)
    try:
        engine.add_request("long", [0, 5, 6, 7], SamplingParams(max_new_tokens=200, ignore_eos=True))
        engine.step()
        os.kill(engine.ranks.pids[1], signal.SIGSTOP)  # alive, but never answers again
        stopped_at = time.monotonic()
        with pytest.raises(RankFailedError, match=r"rank 1 \(of 2\) hung: .*timed out after 2s") as failed:
            engine.step()
        assert failed.value.rank == 1
        assert time.monotonic() - stopped_at < 2 + FAILURE_BOUND_SECONDS
    finally:
        engine.close()  # kills the stopped rank


def test_a_rank_that_dies_while_idle_is_noticed_without_a_request(tiny_models):
    engine = Engine(tiny_models.get("llama", "llama"), dtype="float32", tensor_parallel_degree=2,
                    cpu_kv_cache_mb=16, max_model_len=256)
    try:
        engine.check_health()
        os.kill(engine.ranks.pids[1], signal.SIGKILL)
        deadline = time.monotonic() + FAILURE_BOUND_SECONDS
        with pytest.raises(RankFailedError, match="rank 1 \\(of 2\\) exited with status -9"):
            while time.monotonic() < deadline:
                engine.check_health()
                time.sleep(0.05)
    finally:
        engine.close()


def test_a_degree_that_does_not_divide_the_heads_is_refused_before_any_rank_starts(tiny_models):
    with pytest.raises(ConfigError, match="option.tensor_parallel_degree=3: does not divide the model's 4 attention"):
        Engine(tiny_models.get("llama", "llama"), tensor_parallel_degree=3)


def test_more_ranks_than_cpu_cores_is_refused(tiny_models):
    cores = available_cores()
    # A model whose heads and features do split over cores + 1 ranks: only the device count is wrong.
    degree = cores + 1
    model_dir = tiny_models.get(f"llama-{degree}-heads", "llama", num_attention_heads=degree, num_key_value_heads=1,
                                hidden_size=16 * degree, intermediate_size=32 * degree)
    with pytest.raises(ConfigError, match=f"asks for {degree} ranks .* the CPU has {cores} cores"):
        Engine(model_dir, tensor_parallel_degree=degree)


def test_max_is_one_rank_on_a_cpu(tiny_models):
    config = Config.from_options(tiny_models.get("llama", "llama"), tensor_parallel_degree="max", device="cpu",
                                 cpu_kv_cache_mb=16, max_model_len=256)
    engine = Engine(config=config)
    assert engine.tensor_parallel_degree == 1 and engine.ranks is None


SHAPE_8_HEADS_2_KV = ModelShape(hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=8, num_kv_heads=2,
                                head_dim=64, vocab_size=1000)


def test_fewer_kv_heads_than_ranks_are_replicated():
    plans = [ShardingPlan(SHAPE_8_HEADS_2_KV, rank, 4) for rank in range(4)]
    assert [plan.output_rows("k_proj") for plan in plans] == [slice(0, 64), slice(0, 64), slice(64, 128),
                                                              slice(64, 128)]
    # Each rank's two query heads are among the four that share its KV head (GQA group of 4).
    assert [plan.output_rows("q_proj") for plan in plans] == [slice(i * 128, (i + 1) * 128) for i in range(4)]
    assert all(plan.num_local_kv_heads == 1 for plan in plans)


def test_kv_heads_that_neither_split_nor_replicate_evenly_are_refused():
    shape = ModelShape(hidden_size=384, intermediate_size=768, num_layers=1, num_heads=6, num_kv_heads=3,
                       head_dim=64, vocab_size=1000)
    with pytest.raises(ConfigError, match="3 KV heads can neither be split over 2 ranks nor replicated"):
        ShardingPlan(shape, 0, 2)


class _ExitedRank:
    """A rank process that has exited with `code` (None: still running)."""

    def __init__(self, code: int | None) -> None:
        self.code, self.stdin = code, None

    def poll(self) -> int | None:
        return self.code

    def kill(self) -> None:
        self.code = -9

    def wait(self, timeout: float | None = None) -> int | None:
        return self.code


def test_a_rank_killed_by_a_signal_is_named_before_those_that_exited_after_losing_it():
    from lora_serving.handler.tp.ranks import RankGroup

    group = RankGroup.__new__(RankGroup)
    group.world_size, group._failed = 4, None
    # Rank 1 lost its peer mid-collective and exited with a worker's error status; rank 2 was killed.
    group._processes = {1: _ExitedRank(1), 2: _ExitedRank(-9), 3: _ExitedRank(None)}
    with pytest.raises(RankFailedError, match=r"rank 2 \(of 4\) exited with status -9") as failed:
        group.check_alive()
    assert failed.value.rank == 2
