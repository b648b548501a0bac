"""Owns all device work of a step: the flat input tensors, the forward pass, the KV cache, sampling."""

from __future__ import annotations

import torch

from lora_serving.handler.block_manager import BlockManager
from lora_serving.handler.forward_context import ForwardContext
from lora_serving.handler.lora.device_slots import DeviceSlots
from lora_serving.handler.lora.manager import LoraStepApplier
from lora_serving.handler.models import LlamaModel
from lora_serving.handler.sampler import SampledTokens, Sampler
from lora_serving.handler.scheduler import ScheduledStep
from lora_serving.handler.step_inputs import StepInputs, build_forward_inputs, describe_step
from lora_serving.handler.tp import protocol
from lora_serving.handler.tp.ranks import RankGroup
from lora_serving.kernels import cpu_attention

# On CPU without the C attention kernel, up to this many K elements per layer in the padded [B, kv_heads,
# longest, d] tensor, one gather and one attention call for all decodes beat one call per sequence (small
# models, short contexts: per-call overhead dominates); above it, per sequence won, up to 4x at bench_engine's
# shapes.
# Measured crossover on 2 cores: between 0.26M (padded 1.6x faster) and 0.82-1.05M (per sequence 1.1-1.4x).
PAD_DECODES_MAX_ELEMENTS = 2**19


def kv_bytes_per_token(model: LlamaModel) -> int:
    element_size = torch.empty((), dtype=model.dtype).element_size()
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * element_size


class ModelRunner:
    def __init__(self, model: LlamaModel, block_manager: BlockManager, ranks: RankGroup | None = None,
                 lora_slots: DeviceSlots | None = None) -> None:
        """`ranks`: the other tensor-parallel ranks (rank 0 only), `lora_slots` whose writes they mirror."""
        self.model = model
        self.ranks = ranks
        self.lora_slots = lora_slots
        self.device = model.device
        self.block_manager = block_manager
        # calloc-backed zeros: pages are only touched when K/V are written, and masked-out padding
        # positions read zeros rather than NaN garbage.
        self.kv_cache = torch.zeros(
            (model.num_layers, 2, model.num_kv_heads, block_manager.num_blocks, block_manager.block_size,
             model.head_dim),
            dtype=model.dtype,
            device=self.device,
        )
        self.sampler = Sampler(self.device)
        # How decodes read their K/V (handler/forward_context.py): "padded" (always, on GPUs), "kernel" (CPU
        # fp32 where the C kernel builds), "per_sequence", or "auto" (CPU otherwise): padded while the padded
        # tensor is small. Tests force each.
        if self.device.type == "cuda":
            self.decode_form = "padded"
        else:
            self.decode_form = "kernel" if cpu_attention.serves(model.dtype, self.device) else "auto"

    def execute(self, step: ScheduledStep, lora: LoraStepApplier | None = None) -> SampledTokens:
        """Run one forward pass over the step's tokens; return each sampling sequence's next token and
        log-prob, in `step.sampling_rows()` order (decodes, completing prefills, then sequences forked this
        step). A prefill chunk that does not complete its sequence samples nothing. With tensor parallelism
        the other ranks get the step first and run the same forward on their shards."""
        copies = self.block_manager.take_copies()
        inputs = describe_step(step, self.block_manager, self._decode_form)
        if self.ranks is not None:
            self._send_step(inputs, copies, lora)
        self._copy_blocks(copies)
        ctx, input_ids, last_token_index = build_forward_inputs(inputs, self.device)
        ctx.lora = lora
        hidden = self.model.forward(input_ids, ctx, self.kv_cache)
        self._score_prompts(step, ctx, hidden)
        seqs, rows = step.sampling_rows()
        if not seqs:
            return SampledTokens([], [], [])
        logits = self.model.compute_logits(hidden[last_token_index])
        return self.sampler.sample(logits, seqs, rows)

    def _send_step(self, inputs: StepInputs, copies: list[tuple[int, int]], lora: LoraStepApplier | None) -> None:
        """The step to ranks 1..N-1: slot changes since the last step first (their weights broadcast after
        the message, whole; each rank keeps its shard), so no rank computes with a slot it lacks."""
        writes: list[protocol.SlotWrite] = []
        tensors: list[torch.Tensor] = []
        for slot, weights in self.lora_slots.take_mirror_ops() if self.lora_slots is not None else ():
            if weights is None:
                writes.append(protocol.SlotWrite(slot, None))
                continue
            keys = sorted(weights.modules)
            modules = [weights.modules[key] for key in keys]
            shapes = [(layer, module, m.a.shape[0], m.a.shape[1], m.b.shape[0])
                      for (layer, module), m in zip(keys, modules)]
            writes.append(protocol.SlotWrite(slot, weights.version.content_hash, shapes))
            tensors.append(torch.cat([t.reshape(-1) for m in modules for t in (m.a, m.b)]).to(self.device))
        message = protocol.StepMessage(inputs, writes, copies, lora.plan if lora is not None else None)
        self.ranks.send(message, tensors)

    # ---- for the generation parameters (handler/sampler.py) -----------------------------------------

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write of KV blocks shared by a request's sequences (handler/block_manager.py)."""
        if copies:
            sources, destinations = (torch.tensor(side, dtype=torch.long, device=self.device) for side in zip(*copies))
            self.kv_cache[:, :, :, destinations] = self.kv_cache[:, :, :, sources]

    def _score_prompts(self, step: ScheduledStep, ctx: ForwardContext, hidden: torch.Tensor) -> None:
        """Each prompt token's log-probability for the prefills that asked, from the hidden state of the token
        before it: chunk by chunk, each scoring the tokens after its own that are not scored yet (a sequence
        preempted mid-prompt computes some again)."""
        for seq, prefill in zip(step.prefill_seqs, ctx.prefills):
            if not seq.scores_prompt:
                continue
            if seq.prompt_log_probs is None:
                seq.prompt_log_probs = [None]  # nothing comes before the first token
            context = prefill.context_len
            # Offsets in this chunk of the hidden states that score a prompt token not scored yet.
            first = len(seq.prompt_log_probs) - 1 - context
            end = min(prefill.end - prefill.start, len(seq.prompt_token_ids) - 1 - context)
            if end <= first:
                continue
            logits = self.model.compute_logits(hidden[prefill.start + first : prefill.start + end])
            targets = torch.tensor(seq.prompt_token_ids[context + first + 1 : context + end + 1], device=self.device)
            scored = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
            seq.prompt_log_probs.extend(scored.tolist())

    def _decode_form(self, num_decodes: int, width: int) -> str:
        if self.decode_form != "auto":
            return self.decode_form
        if num_decodes == 1:
            # One sequence is one attention call either way, and unpadded it reads its blocks in place when they
            # are consecutive (no gather at all): 16 gathers of ~40 us a step at batch 1 on bench_engine's model.
            return "per_sequence"
        padded_tokens = num_decodes * width * self.block_manager.block_size
        small = padded_tokens * self.model.num_kv_heads * self.model.head_dim <= PAD_DECODES_MAX_ELEMENTS
        return "padded" if small else "per_sequence"
