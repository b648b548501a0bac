"""Decode attention straight from the paged cache, against an fp32 softmax written out by hand.

On CPU with fp32 the C kernel reads every sequence's blocks in place through the block tables; without it a
sequence whose blocks are consecutive is read in place, any other is gathered; on GPUs all are gathered into
one padded batch. Every form must give the reference's answer, with grouped-query heads and with a sliding
window, and the engine must still equal transformers with each form.
"""

from __future__ import annotations

import random

import pytest
import torch

from lora_serving.handler import Engine, SamplingParams
from lora_serving.handler.attention import paged_attention
from lora_serving.handler.forward_context import CachedKV, ForwardContext, PaddedDecodes
from lora_serving.handler.runner import model_runner
from lora_serving.handler.runner.model_runner import PAD_DECODES_MAX_ELEMENTS
from lora_serving.handler.step_inputs import StepInputs, build_forward_inputs
from lora_serving.kernels import cpu_attention
from tests.models import reference_greedy

KV_HEADS, Q_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 2, 4, 8, 4, 12


def reference(q, keys, values, scale, window):
    """q [q_heads, d], keys/values [L, kv_heads, d] -> [q_heads, d]; head h reads KV head h // group."""
    length = keys.shape[0]
    start = 0 if window is None else max(0, length - window)
    group = Q_HEADS // KV_HEADS
    out = torch.empty_like(q)
    for head in range(Q_HEADS):
        k = keys[start:, head // group]
        v = values[start:, head // group]
        weights = torch.softmax((k @ q[head]) * scale, dim=0)
        out[head] = weights @ v
    return out


def decode_kv(table: list[int], length: int) -> CachedKV:
    if table == list(range(table[0], table[0] + len(table))):
        return CachedKV(length=length, first_block=table[0], block_ids=None)
    return CachedKV(length=length, first_block=None, block_ids=torch.tensor(table))


def padded(layouts, in_kernel: bool) -> PaddedDecodes:
    width = max(len(table) for table, _ in layouts)
    lengths = [length for _, length in layouts]
    return PaddedDecodes(block_tables=torch.tensor([table + [0] * (width - len(table)) for table, _ in layouts]),
                         context_lens=torch.tensor(lengths), longest=max(lengths), shortest=min(lengths),
                         in_kernel=in_kernel)


def skip_without_the_kernel(form: str) -> None:
    if form == "kernel" and not cpu_attention.serves(torch.float32, "cpu"):
        pytest.skip("the C kernels do not build here")


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("form", ["per sequence", "padded", "kernel"])
def test_every_form_of_decode_attention_matches_the_reference(window, form, monkeypatch):
    skip_without_the_kernel(form)
    gen = torch.Generator().manual_seed(0)
    # Three decoding sequences: consecutive blocks, scattered blocks, and one that ends mid-block.
    layouts = [([2, 3, 4], 10), ([9, 0, 6], 12), ([7, 11], 5)]
    k_cache = torch.zeros(KV_HEADS, NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM)
    v_cache = torch.zeros_like(k_cache)
    history, new_k, new_v, slots = [], [], [], []
    for table, length in layouts:
        keys = torch.randn(length, KV_HEADS, HEAD_DIM, generator=gen)
        values = torch.randn(length, KV_HEADS, HEAD_DIM, generator=gen)
        for position in range(length - 1):  # the cache holds all but the token being decoded
            block, offset = table[position // BLOCK_SIZE], position % BLOCK_SIZE
            k_cache[:, block, offset] = keys[position]
            v_cache[:, block, offset] = values[position]
        last = length - 1
        slots.append(table[last // BLOCK_SIZE] * BLOCK_SIZE + last % BLOCK_SIZE)
        new_k.append(keys[last])
        new_v.append(values[last])
        history.append((keys, values))
    # Garbage in every unused slot: a read past a sequence's length would show.
    k_cache[k_cache == 0] = 1e3
    v_cache[v_cache == 0] = -1e3
    q = torch.randn(len(layouts), Q_HEADS, HEAD_DIM, generator=gen)
    ctx = ForwardContext(
        positions=torch.tensor([length - 1 for _, length in layouts]),
        slot_mapping=torch.tensor(slots),
        num_decode_tokens=len(layouts),
        decode_kv=[decode_kv(table, length) for table, length in layouts] if form == "per sequence"
        else padded(layouts, in_kernel=form == "kernel"),
        prefills=[],
    )
    if form == "per sequence":
        assert [kv.first_block for kv in ctx.decode_kv] == [2, None, None]
    kernel_calls = []
    kernel = cpu_attention.decode_attention
    monkeypatch.setattr(cpu_attention, "decode_attention", lambda *args: kernel_calls.append(1) or kernel(*args))
    scale = HEAD_DIM**-0.5
    out = paged_attention(q, torch.stack(new_k), torch.stack(new_v), k_cache, v_cache, ctx, window, scale)
    assert len(kernel_calls) == (form == "kernel")
    for row, (keys, values) in enumerate(history):
        torch.testing.assert_close(out[row], reference(q[row], keys, values, scale, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["padded", "per_sequence", "kernel"])
@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: a sliding window of 12
def test_each_form_matches_transformers_in_the_engine(tiny_models, family, form, monkeypatch):
    skip_without_the_kernel(form)
    model_dir = tiny_models.get(family, family)
    engine = Engine(model_dir, dtype="float32", max_rolling_batch_size=16, block_size=4)
    engine.runner.decode_form = form  # "padded" is the GPU form, here on CPU
    forms = []
    build = model_runner.build_forward_inputs

    def spy(inputs, device):
        built = build(inputs, device)
        if inputs.decode_tables:
            decode_kv = built[0].decode_kv
            forms.append("per_sequence" if isinstance(decode_kv, list) else
                         "kernel" if decode_kv.in_kernel else "padded")
        return built

    monkeypatch.setattr(model_runner, "build_forward_inputs", spy)
    rng = random.Random(7)
    short = [[0] + [rng.randrange(3, 1024) for _ in range(rng.randint(2, 6))] for _ in range(8)]
    long = [[0] + [rng.randrange(3, 1024) for _ in range(rng.randint(60, 80))] for _ in range(8)]
    prompts = [prompt for pair in zip(short, long) for prompt in pair]
    results = engine.generate(prompts, SamplingParams(max_new_tokens=12))
    assert set(forms) == {form}
    for prompt, result in zip(prompts, results):
        assert result.token_ids == reference_greedy(model_dir, prompt, 12)


def test_cpu_decodes_take_the_kernel_where_it_builds(tiny_models):
    for dtype in (torch.float32, torch.bfloat16):
        runner = Engine(tiny_models.get("llama", "llama"), dtype=str(dtype).removeprefix("torch.")).runner
        assert runner.decode_form == ("kernel" if cpu_attention.serves(dtype, "cpu") else "auto")
    assert Engine(tiny_models.get("llama", "llama"), dtype="float16").runner.decode_form == "auto"


def test_auto_pads_small_batches_and_attends_large_ones_per_sequence(tiny_models):
    engine = Engine(tiny_models.get("llama", "llama"), dtype="float32", block_size=4)
    runner = engine.runner
    runner.decode_form = "auto"  # CPU without the C kernel (or another dtype)
    per_token = runner.model.num_kv_heads * runner.model.head_dim * 4  # K elements per 4-token block

    def decodes(tables: list[list[int]], lengths: list[int]) -> StepInputs:
        """The step inputs of decodes only, the form chosen as the runner chooses it."""
        count = len(tables)
        return StepInputs([1] * count, [n - 1 for n in lengths], list(range(count)), list(range(count)), tables,
                          lengths, runner._decode_form(count, max(map(len, tables))), [])

    small = [[1, 2]] * 2
    # Two decodes, so that the size threshold decides (a lone decode is never padded, below).
    large = [list(range(PAD_DECODES_MAX_ELEMENTS // per_token + 1))] * 2
    assert isinstance(build_forward_inputs(decodes(small, [8, 8]), runner.device)[0].decode_kv, PaddedDecodes)
    assert isinstance(build_forward_inputs(decodes(large, [4 * len(large[0])] * 2), runner.device)[0].decode_kv, list)
    # One decode is one attention call either way; unpadded it reads its consecutive blocks in place.
    lone = build_forward_inputs(decodes(small[:1], [8]), runner.device)[0].decode_kv
    assert isinstance(lone, list) and lone[0].first_block == 1
