"""n and best_of: several sequences that share the prompt's KV blocks (copy on write), each answering as the
same request run alone would."""

from __future__ import annotations

import pytest

from lora_serving.handler import Engine, SamplingParams
from lora_serving.handler.block_manager import BlockManager
from lora_serving.handler.sequence import Sequence
from tests.engine.test_parity import random_prompts
from tests.models import reference_greedy


@pytest.fixture(scope="module")
def llama(tiny_models):
    model_dir = tiny_models.get("llama", "llama")
    return model_dir, Engine(model_dir, dtype="float32", max_rolling_batch_size=16)


def _sampled(seed: int, **extra) -> SamplingParams:
    return SamplingParams(max_new_tokens=16, do_sample=True, temperature=1.2, top_p=0.95, seed=seed,
                          ignore_eos=True, **extra)


def test_greedy_choices_are_the_greedy_answer(llama):
    model_dir, engine = llama
    prompt = random_prompts(1, seed=40)[0]
    [result] = engine.generate([prompt], SamplingParams(max_new_tokens=10, n=3))
    expected = reference_greedy(model_dir, prompt, 10)
    assert [choice.token_ids for choice in result.choices] == [expected] * 3
    assert [choice.index for choice in result.choices] == [0, 1, 2]


def test_seeded_choice_i_is_the_request_seeded_with_seed_plus_i(llama):
    _, engine = llama
    prompt = random_prompts(1, seed=41)[0]
    others = random_prompts(3, seed=42)
    results = engine.generate([others[0], prompt, *others[1:]],
                              [SamplingParams(max_new_tokens=9), _sampled(500, n=4), _sampled(7), _sampled(8)])
    alone = engine.generate([prompt] * 4, [_sampled(500 + i) for i in range(4)])
    assert [choice.token_ids for choice in results[1].choices] == [one.token_ids for one in alone]
    assert len({tuple(one.token_ids) for one in alone}) > 1


def test_choices_share_the_prompts_blocks(llama):
    _, engine = llama
    prompt = random_prompts(1, seed=43, min_len=40, max_len=40)[0]  # 41 tokens: 3 blocks, the last one partial
    free_before = engine.block_manager.num_free_blocks
    engine.add_request("shared", prompt, _sampled(1, n=4))
    engine.step()  # one prefill, four first tokens
    assert free_before - engine.block_manager.num_free_blocks == 3
    engine.step()  # each writes its second token: the partial block is copied for three of the four
    assert free_before - engine.block_manager.num_free_blocks == 3 + 3
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_free_blocks == free_before


def test_best_of_returns_the_n_most_likely(llama):
    _, engine = llama
    prompt = random_prompts(1, seed=44)[0]
    [result] = engine.generate([prompt], _sampled(90, n=2, best_of=5))
    alone = engine.generate([prompt] * 5, [_sampled(90 + i) for i in range(5)])
    ranked = sorted(alone, key=lambda one: sum(one.log_probs), reverse=True)
    assert [choice.token_ids for choice in result.choices] == [one.token_ids for one in ranked[:2]]


def test_choices_survive_preemption(tiny_models):
    """A cache too small for every choice at once: choices are preempted and recomputed, and still answer
    as their seeds say."""
    engine = Engine(tiny_models.get("llama", "llama"), dtype="float32", max_rolling_batch_size=8,
                    num_kv_blocks=8, block_size=8)
    prompt = random_prompts(1, seed=45, min_len=20, max_len=20)[0]
    [result] = engine.generate([prompt], SamplingParams(max_new_tokens=20, do_sample=True, seed=3, n=4,
                                                        ignore_eos=True))
    assert engine.stats().preemptions > 0
    alone = [engine.generate([prompt], SamplingParams(max_new_tokens=20, do_sample=True, seed=3 + i,
                                                      ignore_eos=True))[0] for i in range(4)]
    assert [choice.token_ids for choice in result.choices] == [one.token_ids for one in alone]


def test_abort_ends_every_choice(llama):
    _, engine = llama
    engine.add_request("gone", random_prompts(1, seed=46)[0], _sampled(2, n=3))
    engine.step()
    engine.abort("gone")
    outputs = engine.step()
    assert sorted(output.index for output in outputs if output.request_id == "gone" and output.finished) == [0, 1, 2]
    assert not engine.has_unfinished_requests()


def test_copy_on_write_bookkeeping():
    manager = BlockManager(num_blocks=10, block_size=4)
    parent = Sequence("p", list(range(6)), SamplingParams(max_new_tokens=4))
    manager.allocate(parent, 6)
    parent.num_cached_tokens = 6
    child = Sequence("p", list(range(6)), SamplingParams(max_new_tokens=4), index=1)
    manager.fork(parent, child)
    child.num_cached_tokens = 6
    assert child.block_table == parent.block_table and manager.num_free_blocks == 8
    manager.allocate(child, 1)  # position 6 is in the shared second block: copied first
    [(source, destination)] = manager.take_copies()
    assert source == parent.block_table[1] and child.block_table == [parent.block_table[0], destination]
    manager.allocate(parent, 1)  # the parent is now the block's only holder: it writes in place
    assert manager.take_copies() == [] and manager.num_free_blocks == 7
    manager.free(parent)
    assert manager.num_free_blocks == 8  # the first block is still the child's
    manager.free(child)
    assert manager.num_free_blocks == 10
