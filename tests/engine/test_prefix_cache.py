"""Automatic prefix caching: answers with the cache equal answers without it, token for token; blocks are
shared only between equal prefixes under equal adapter content; shared blocks are never written; parked
blocks go last, oldest first."""

from __future__ import annotations

import random

import pytest

from lora_serving.handler import Engine, SamplingParams
from lora_serving.handler.block_manager import BlockManager
from lora_serving.handler.sequence import Sequence
from tests.adapters import make_peft_adapter, peft_greedy
from tests.engine.test_parity import random_prompts

FAMILIES = ["llama", "mistral", "qwen2"]  # mistral: a sliding window of 12, shorter than the shared prefixes


@pytest.fixture(scope="module")
def family_adapters(tiny_models, tmp_path_factory):
    """Per family: the base model and two adapters, one on k/v only (its K/V differ from the base's at the
    first layer), one on q/o/down (its K/V differ from the second layer on)."""
    root = tmp_path_factory.mktemp("prefix-adapters")

    def make(family: str):
        base = tiny_models.get(family, family)
        return base, {
            "kv": make_peft_adapter(base, root / family / "kv", r=8, alpha=16, targets=["k_proj", "v_proj"], seed=3),
            "qo": make_peft_adapter(base, root / family / "qo", r=4, alpha=8,
                                    targets=["q_proj", "o_proj", "down_proj"], seed=4),
        }

    return {family: make(family) for family in FAMILIES}


def lora_engine(base, adapters, **options) -> Engine:
    engine = Engine(base, dtype="float32", enable_lora=True, max_loras=2, max_rolling_batch_size=8, block_size=4,
                    **options)
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    return engine


def shared_prefix_jobs(seed: int) -> list[tuple[list[int], str | None, int]]:
    """Prompts that share a long system prefix, each under several adapters, some repeated exactly, one a
    prefix of another: (prompt, adapter, max_new_tokens)."""
    rng = random.Random(seed)
    system = random_prompts(1, seed=seed, min_len=26, max_len=26)[0]
    prompts = [system + [rng.randrange(3, 1024) for _ in range(rng.randint(1, 12))] for _ in range(4)]
    prompts.append(prompts[0] + [rng.randrange(3, 1024) for _ in range(9)])
    jobs = []
    for round_ in range(2):
        for index, prompt in enumerate(prompts):
            for adapter in (None, "kv", "qo")[index % 2 :]:
                jobs.append((prompt, adapter, rng.randint(3, 12) + round_))
    return jobs


def run_staggered(engine: Engine, jobs) -> list[list[int]]:
    """Two requests join every step, so that later ones find blocks computed by earlier ones, finished or
    still running."""
    results: dict[int, list[int]] = {}
    pending = list(enumerate(jobs))
    while pending or engine.has_unfinished_requests():
        for _ in range(2):
            if pending:
                index, (prompt, adapter, new_tokens) = pending.pop(0)
                engine.add_request(str(index), prompt, SamplingParams(max_new_tokens=new_tokens), adapter)
                results[index] = []
        for output in engine.step():
            assert output.error is None, output.error
            results[int(output.request_id)].extend(token.id for token in output.tokens)
    return [results[index] for index in range(len(jobs))]


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_with_the_cache_equal_answers_without_it(family_adapters, family):
    base, adapters = family_adapters[family]
    jobs = shared_prefix_jobs(seed=FAMILIES.index(family))
    cached = lora_engine(base, adapters)
    uncached = lora_engine(base, adapters, enable_prefix_caching=False)
    assert run_staggered(cached, jobs) == run_staggered(uncached, jobs)
    stats = cached.stats()
    # Most prompt tokens came from the cache: the system prefix once per adapter, then the rest reused.
    assert stats.prefix_cache_hit_tokens > stats.prefix_cache_queried_tokens / 2
    assert uncached.stats().prefix_cache_hit_tokens == 0
    assert stats.num_cached_kv_blocks > 0
    for engine in (cached, uncached):
        assert engine.stats().num_free_kv_blocks == engine.stats().num_kv_blocks


def test_two_adapters_with_one_prompt_share_no_block(family_adapters, tmp_path):
    base, adapters = family_adapters["llama"]
    other_kv = make_peft_adapter(base, tmp_path / "kv2", r=8, alpha=16, targets=["k_proj", "v_proj"], seed=5)
    engine = lora_engine(base, {"kv": adapters["kv"], "kv2": other_kv, "kv-again": adapters["kv"]})
    prompt = random_prompts(1, seed=50, min_len=30, max_len=30)[0]
    params = SamplingParams(max_new_tokens=8)
    engine.generate([prompt], params, ["kv"])
    hits = engine.stats().prefix_cache_hit_tokens

    [other] = engine.generate([prompt], params, ["kv2"])
    assert engine.stats().prefix_cache_hit_tokens == hits  # the same tokens, other K/V: nothing to reuse
    assert other.token_ids == peft_greedy(base, other_kv, prompt, 8)
    [base_answer] = engine.generate([prompt], params, [None])
    assert engine.stats().prefix_cache_hit_tokens == hits
    assert base_answer.token_ids == peft_greedy(base, None, prompt, 8)
    # The same content under another name is the same K/V: shared.
    [again] = engine.generate([prompt], params, ["kv-again"])
    assert engine.stats().prefix_cache_hit_tokens == hits + 28  # 7 of the 31 tokens' 8 blocks (the last computed)
    assert again.token_ids == peft_greedy(base, adapters["kv"], prompt, 8)


def test_a_name_registered_again_with_other_weights_misses_the_old_blocks(family_adapters, tmp_path):
    base, adapters = family_adapters["llama"]
    new_weights = make_peft_adapter(base, tmp_path / "new", r=8, alpha=16, targets=["k_proj", "v_proj"], seed=6)
    engine = lora_engine(base, {"tenant": adapters["kv"]})
    prompt = random_prompts(1, seed=51, min_len=30, max_len=30)[0]
    params = SamplingParams(max_new_tokens=8)
    engine.generate([prompt], params, ["tenant"])
    hits = engine.stats().prefix_cache_hit_tokens

    engine.unregister_adapter("tenant")
    engine.register_adapter("tenant", new_weights)
    [answer] = engine.generate([prompt], params, ["tenant"])
    assert engine.stats().prefix_cache_hit_tokens == hits
    assert answer.token_ids == peft_greedy(base, new_weights, prompt, 8)

    # Updated back to the first files: their blocks are still cached, and right again.
    engine.update_adapter("tenant", adapters["kv"])
    [answer] = engine.generate([prompt], params, ["tenant"])
    assert engine.stats().prefix_cache_hit_tokens > hits
    assert answer.token_ids == peft_greedy(base, adapters["kv"], prompt, 8)


def test_blocks_shared_by_running_sequences_are_never_written(tiny_models):
    base = tiny_models.get("llama", "llama")
    engine = Engine(base, dtype="float32", max_rolling_batch_size=8, block_size=4)
    prompt = random_prompts(1, seed=52, min_len=39, max_len=39)[0]  # 40 tokens: 10 full blocks
    engine.generate([prompt], SamplingParams(max_new_tokens=3))
    probe = Sequence("probe", prompt + [5], SamplingParams())
    blocks = engine.block_manager.cached_prefix(probe)
    assert len(blocks) == 10
    before = engine.runner.kv_cache[:, :, :, blocks].clone()

    # Requests that reuse them side by side, one as a prefix of nothing more (all but its last token
    # reused), sampled choices that copy on write after them, and longer prompts that continue them.
    sampled = SamplingParams(max_new_tokens=10, do_sample=True, seed=1, n=3, ignore_eos=True)
    results = engine.generate([prompt, prompt, prompt + [7, 8, 9], prompt + [11] * 6],
                              [SamplingParams(max_new_tokens=10), sampled, SamplingParams(max_new_tokens=10),
                               SamplingParams(max_new_tokens=10)])
    assert all(result.error is None for result in results)
    assert engine.runner.kv_cache[:, :, :, blocks].equal(before)
    assert engine.block_manager.cached_prefix(probe) == blocks
    uncached = Engine(base, dtype="float32", max_rolling_batch_size=8, block_size=4, enable_prefix_caching=False)
    assert results[0].token_ids == uncached.generate([prompt], SamplingParams(max_new_tokens=10))[0].token_ids


def test_prompt_scores_are_whole_after_a_cache_hit(tiny_models):
    base = tiny_models.get("llama", "llama")
    engine = Engine(base, dtype="float32", block_size=4)
    prompt = random_prompts(1, seed=53, min_len=30, max_len=30)[0]
    engine.generate([prompt], SamplingParams(max_new_tokens=2))
    [scored] = engine.generate([prompt], SamplingParams(max_new_tokens=2, prompt_log_probs=True))
    uncached = Engine(base, dtype="float32", block_size=4, enable_prefix_caching=False)
    [expected] = uncached.generate([prompt], SamplingParams(max_new_tokens=2, prompt_log_probs=True))
    assert len(scored.prompt_log_probs) == len(prompt) and scored.prompt_log_probs[0] is None
    assert scored.prompt_log_probs[1:] == pytest.approx(expected.prompt_log_probs[1:], abs=1e-5)


# ---- the block manager alone ---------------------------------------------------------------------------

def _seq(tokens: list[int], max_new_tokens: int = 4) -> Sequence:
    return Sequence("s", list(tokens), SamplingParams(max_new_tokens=max_new_tokens))


def _admit_and_compute(manager: BlockManager, seq: Sequence) -> list[int]:
    cached = manager.cached_prefix(seq)
    manager.admit(seq, cached)
    manager.commit(seq, seq.num_tokens - seq.num_cached_tokens)
    return cached


def test_parked_blocks_go_last_a_run_at_a_time_the_oldest_first():
    manager = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    first = _seq(range(100, 109), max_new_tokens=1)  # 9 tokens: blocks 0, 1 full, block 2 partial
    _admit_and_compute(manager, first)
    assert first.block_table == [0, 1, 2]
    manager.free(first)  # 0 and 1 parked (1 first: a chain's tail goes first), 2 free
    assert manager.num_free_blocks == 8 and manager.num_cached_blocks == 2
    again = _seq([*range(100, 108), 9], max_new_tokens=1)  # the first two blocks again, then another token
    assert manager.cached_prefix(again) == [0, 1]

    second = _seq(range(200, 212), max_new_tokens=1)  # 3 blocks now: free ones, not the parked
    _admit_and_compute(manager, second)
    assert second.block_table == [2, 3, 4] and manager.num_cached_blocks == 2
    manager.free(second)  # 4, 3, 2 parked after 1 and 0; 5, 6, 7 free

    # 4 blocks now, 5 with its answer: the free ones cannot hold it, so a run of parked ones goes, the one
    # whose youngest block is oldest (3, 4 with the free 5..7), for it to read its K/V in place.
    newcomer = _seq(range(300, 316), max_new_tokens=1)
    _admit_and_compute(manager, newcomer)
    assert newcomer.block_table == [3, 4, 5, 6] and manager.num_cached_blocks == 3
    assert manager.cached_prefix(again) == [0, 1]


def test_random_traffic_never_shares_a_block_it_should_not():
    """Sequences with common prefixes come, compute, grow and go at random. A hit always hands back blocks
    holding exactly the asked-for prefix; no sequence ever writes into a block another holds; no block is
    lost."""
    rng = random.Random(7)
    block_size, num_blocks = 4, 48
    manager = BlockManager(num_blocks=num_blocks, block_size=block_size, enable_prefix_caching=True)
    written: dict[int, tuple[int, ...]] = {}  # block -> the tokens from position 0 that filled it
    heads = [[rng.randrange(1000) for _ in range(12)] for _ in range(3)]
    live: list[Sequence] = []

    def compute(seq: Sequence, count: int) -> None:
        for position in range(seq.num_cached_tokens, seq.num_cached_tokens + count):
            block = seq.block_table[position // block_size]
            assert sum(block in other.block_table for other in live) == 1, "a write into a shared block"
            written[block] = tuple(seq.token_ids[: (position // block_size + 1) * block_size])
        manager.commit(seq, count)

    for _ in range(2000):
        action = rng.random()
        if action < 0.3 or not live:
            tokens = rng.choice(heads)[: rng.randint(0, 12)] + [rng.randrange(1000) for _ in range(rng.randint(1, 9))]
            seq = _seq(tokens, max_new_tokens=rng.randint(1, 12))
            cached = manager.cached_prefix(seq)
            for index, block in enumerate(cached):
                assert written[block] == tuple(tokens[: (index + 1) * block_size])
            if manager.can_admit(seq, cached):
                manager.admit(seq, cached)
                live.append(seq)
                compute(seq, seq.num_tokens - seq.num_cached_tokens)
        elif action < 0.5:
            manager.free(live.pop(rng.randrange(len(live))))
        else:
            seq = rng.choice(live)
            if len(seq.output_token_ids) < seq.params.max_new_tokens and manager.can_allocate(seq, 1):
                seq.output_token_ids.append(rng.randrange(1000))
                manager.allocate(seq, 1)
                compute(seq, 1)
        held = {block for seq in live for block in seq.block_table}
        assert manager.num_free_blocks == num_blocks - len(held)
    for seq in live:
        manager.free(seq)
    assert manager.num_free_blocks == num_blocks
