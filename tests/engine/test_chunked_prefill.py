"""Chunked prefill: a prompt longer than the step's token budget is computed over several steps next to the
running decodes; answers, prompt scores and n choices equal those of unchunked prefill; no step computes
more tokens than the budget."""

from __future__ import annotations

import random

import pytest

from lora_serving.handler import Engine, SamplingParams
from lora_serving.handler.block_manager import BlockManager
from lora_serving.handler.scheduler import Scheduler
from lora_serving.handler.sequence import Sequence, SequenceStatus
from tests.engine.test_parity import FAMILIES, random_prompts, run_staggered
from tests.models import reference_greedy

BUDGET = 16


def record_step_sizes(engine: Engine) -> list[tuple[int, int]]:
    """(decode tokens, all tokens) of every forward pass the engine runs from now on."""
    sizes = []
    execute = engine.runner.execute

    def recording(step, lora=None):
        sizes.append((len(step.decode_seqs), step.num_tokens))
        return execute(step, lora)

    engine.runner.execute = recording
    return sizes


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_answers_equal_unchunked_ones_and_no_step_exceeds_the_budget(tiny_models, family):
    model_dir = tiny_models.get(family, family)
    chunked = Engine(model_dir, dtype="float32", max_rolling_batch_size=8, block_size=4,
                     max_num_batched_tokens=BUDGET)
    unchunked = Engine(model_dir, dtype="float32", max_rolling_batch_size=8, block_size=4,
                       enable_chunked_prefill=False, enable_prefix_caching=False)
    sizes = record_step_sizes(chunked)
    # Long prompts (up to 6 budgets) arriving while shorter requests decode.
    prompts = random_prompts(8, seed=60, min_len=5, max_len=80)
    max_new = [random.Random(60 + i).randint(4, 20) for i in range(len(prompts))]
    answers = run_staggered(chunked, prompts, max_new, join_every=3, per_join=2)
    assert answers == run_staggered(unchunked, prompts, max_new, join_every=3, per_join=2)
    assert answers[:2] == [reference_greedy(model_dir, prompt, new) for prompt, new in zip(prompts[:2], max_new)]
    assert max(total for _, total in sizes) <= BUDGET
    assert any(decodes and total > decodes for decodes, total in sizes)  # chunks shared steps with decodes
    stats = chunked.stats()
    assert stats.chunked_prefill_steps > 0 and unchunked.stats().chunked_prefill_steps == 0
    assert stats.num_free_kv_blocks == stats.num_kv_blocks


def test_running_streams_get_a_token_every_step_while_a_long_prompt_arrives(tiny_models):
    engine = Engine(tiny_models.get("llama", "llama"), dtype="float32", max_num_batched_tokens=BUDGET,
                    max_rolling_batch_size=8)
    streams = random_prompts(4, seed=61, min_len=2, max_len=2)
    for index, prompt in enumerate(streams):
        engine.add_request(f"stream-{index}", prompt, SamplingParams(max_new_tokens=30, ignore_eos=True))
    assert len(engine.step()) == 4
    long_prompt = random_prompts(1, seed=62, min_len=150, max_len=150)[0]
    engine.add_request("long", long_prompt, SamplingParams(max_new_tokens=2, ignore_eos=True))
    steps_until_first_token = 0
    while True:
        outputs = engine.step()
        steps_until_first_token += 1
        assert {output.request_id for output in outputs} >= {f"stream-{index}" for index in range(4)}
        if any(output.request_id == "long" for output in outputs):
            break
    # 151 prompt tokens in chunks of 12 next to the 4 decodes.
    assert steps_until_first_token == -(-151 // (BUDGET - 4))


def test_prompt_scores_over_chunks_equal_unchunked_ones(tiny_models):
    model_dir = tiny_models.get("llama", "llama")
    prompt = random_prompts(1, seed=63, min_len=70, max_len=70)[0]
    params = SamplingParams(max_new_tokens=4, prompt_log_probs=True)
    [chunked] = Engine(model_dir, dtype="float32", max_num_batched_tokens=BUDGET).generate([prompt], params)
    [whole] = Engine(model_dir, dtype="float32", enable_chunked_prefill=False).generate([prompt], params)
    assert len(chunked.prompt_log_probs) == len(prompt) and chunked.prompt_log_probs[0] is None
    assert chunked.prompt_log_probs[1:] == pytest.approx(whole.prompt_log_probs[1:], abs=1e-5)
    assert chunked.token_ids == whole.token_ids


def test_choices_fork_when_the_last_chunk_is_computed(tiny_models):
    model_dir = tiny_models.get("llama", "llama")
    engine = Engine(model_dir, dtype="float32", max_num_batched_tokens=BUDGET, block_size=4)
    prompt = random_prompts(1, seed=64, min_len=50, max_len=50)[0]
    [greedy] = engine.generate([prompt], SamplingParams(max_new_tokens=8, n=3))
    assert [choice.token_ids for choice in greedy.choices] == [reference_greedy(model_dir, prompt, 8)] * 3
    sampled = [SamplingParams(max_new_tokens=8, do_sample=True, seed=9 + i, ignore_eos=True) for i in range(3)]
    [together] = engine.generate([prompt], SamplingParams(max_new_tokens=8, do_sample=True, seed=9, n=3,
                                                          ignore_eos=True))
    alone = Engine(model_dir, dtype="float32", enable_chunked_prefill=False, enable_prefix_caching=False)
    assert [choice.token_ids for choice in together.choices] == [
        result.token_ids for result in alone.generate([prompt] * 3, sampled)]
    assert engine.stats().num_free_kv_blocks == engine.stats().num_kv_blocks


def test_a_prompt_samples_only_after_its_last_chunk():
    manager = BlockManager(num_blocks=20, block_size=4)
    scheduler = Scheduler(manager, max_running=4, max_batched_tokens=10, chunked_prefill=True)
    short, long_ = (Sequence(name, list(range(length)), SamplingParams(max_new_tokens=4))
                    for name, length in (("short", 3), ("long", 25)))
    scheduler.add(short)
    scheduler.add(long_)
    chunks = []
    for _ in range(4):
        step = scheduler.schedule()
        chunks.append((len(step.decode_seqs), step.prefill_lengths, [seq.request_id for seq in step.logit_seqs]))
        scheduler.complete(step)
        for seq in step.logit_seqs:
            seq.output_token_ids.append(1)
    assert chunks == [(0, [3, 7], ["short"]), (1, [9], ["short"]), (1, [9], ["short", "long"]),
                      (2, [], ["short", "long"])]
    assert long_.status is SequenceStatus.RUNNING and long_.num_cached_tokens == 26
    assert len(long_.block_table) == manager.blocks_needed(26)


def test_a_chunked_prefill_preempted_midway_is_recomputed_exactly(tiny_models):
    """A cache too small for the long prompt and the growing decodes together: the long prompt, the newest,
    is preempted between its chunks, its computed blocks parked; it comes back, reuses what is left of them,
    and answers exactly."""
    model_dir = tiny_models.get("llama", "llama")
    engine = Engine(model_dir, dtype="float32", max_num_batched_tokens=8, block_size=4, num_kv_blocks=12,
                    max_rolling_batch_size=4)
    preempted = []
    preempt = engine.scheduler._preempt

    def recording(seq, step):
        preempted.append((seq.request_id, seq.status))
        preempt(seq, step)

    engine.scheduler._preempt = recording
    prompts = random_prompts(2, seed=65, min_len=3, max_len=3) + random_prompts(1, seed=66, min_len=30, max_len=30)
    max_new = [30, 30, 4]
    answers = run_staggered(engine, prompts, max_new, join_every=1, per_join=3)
    assert ("2", SequenceStatus.PREFILLING) in preempted
    assert engine.stats().prefix_cache_hit_tokens > 0
    assert answers == [reference_greedy(model_dir, prompt, new) for prompt, new in zip(prompts, max_new)]
    assert engine.stats().num_free_kv_blocks == 12
