"""The device runner: every piece of a rank's device state, and the forward pass over it.

Every tensor-parallel rank builds one the same way, from the same Config: its shard of the model in the
resolved dtype on its device, the CPU-thread policy, the LoRA slots (and, under tensor parallelism, the LoRA
of the row-parallel projections), then the KV cache once rank 0 has sized it. A step reaches each rank as
one StepMessage (handler/tp/protocol.py): slot writes, copy-on-write block copies, the forward's inputs and
the LoRA plan; `run` carries it out. Rank 0's runner also builds that message from the scheduled step (the
host's block tables), sends it to the other ranks first, and after the forward scores prompts and samples.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_serving.handler.block_manager import BlockManager
from lora_serving.handler.config import Config
from lora_serving.handler.forward_context import ForwardContext
from lora_serving.handler.lora.device_slots import DeviceSlots
from lora_serving.handler.lora.peft_adapter import BaseModelShapes
from lora_serving.handler.lora.step_applier import LoraStepApplier
from lora_serving.handler.lora.step_plan import LoraStepPlan
from lora_serving.handler.models import load_hf_config, load_model
from lora_serving.handler.runner import huge_pages
from lora_serving.handler.runner.compiled_decode import CompiledDecode, compile_wanted
from lora_serving.handler.runner.device import auto_num_kv_blocks, cpu_thread_policy, resolve_dtype
from lora_serving.handler.runner.slot_sync import receive_slot_write, take_slot_writes
from lora_serving.handler.sampler import SampledTokens, Sampler
from lora_serving.handler.scheduler import ScheduledStep
from lora_serving.handler.step_inputs import build_forward_inputs, describe_step
from lora_serving.handler.tp import protocol
from lora_serving.handler.tp.comm import TensorParallelComm
from lora_serving.handler.tp.lora import RowParallelLora
from lora_serving.handler.tp.plan import ModelShape, ShardingPlan
from lora_serving.handler.tp.ranks import RankGroup
from lora_serving.kernels import cpu_attention

# On CPU without the C attention kernel, up to this many K elements per layer in the padded [B, kv_heads,
# longest, d] tensor, one gather and one attention call for all decodes beat one call per sequence (small
# models, short contexts: per-call overhead dominates); above it, per sequence won, up to 4x at bench_engine's
# shapes.
# Measured crossover on 2 cores: between 0.26M (padded 1.6x faster) and 0.82-1.05M (per sequence 1.1-1.4x).
PAD_DECODES_MAX_ELEMENTS = 2**19


class ModelRunner:
    def __init__(self, config: Config, device: torch.device, *, rank: int = 0, world_size: int = 1,
                 comm: TensorParallelComm | None = None, followers: RankGroup | None = None) -> None:
        """`comm`: this rank's collectives (tensor parallelism); `followers`: ranks 1..N-1 as rank 0 sees
        them, which get every step first."""
        self.config = config
        self.device = device
        self.rank = rank
        self.comm = comm
        self.followers = followers
        self.dtype = resolve_dtype(config, device)
        self.cpu_threads = cpu_thread_policy(config, device, world_size)
        model_dir = Path(config.model_id)  # "" (DJL): the working directory
        self.hf_config = load_hf_config(model_dir, config.trust_remote_code)
        self.plan = ShardingPlan(ModelShape.from_hf_config(self.hf_config), rank, world_size)
        self.model = load_model(model_dir, self.hf_config, self.dtype, device, self.plan, comm)
        self.lora_slots: DeviceSlots | None = None
        self.row_parallel: RowParallelLora | None = None
        if config.enable_lora:
            # Every rank holds its shard of every slot; rank 0 logs its writes for the others.
            sharded = world_size > 1
            expert_parameters, num_experts, _ = self.model.expert_lora()
            self.lora_slots = DeviceSlots(config.max_loras, config.max_lora_rank, self.model.num_layers,
                                          self.model.lora_module_shapes(), self.dtype, device,
                                          shard=self.plan if sharded else None,
                                          mirror_writes=sharded and rank == 0,
                                          expert_shapes=expert_parameters, num_experts=num_experts)
            if sharded:
                self.row_parallel = RowParallelLora(comm, self.plan.hidden_columns, config.max_loras,
                                                    config.max_lora_rank, self.dtype, device)
        self.kv_cache: torch.Tensor | None = None
        self.compiled_decode: CompiledDecode | None = None  # made with the KV cache, where wanted
        self._compile = compile_wanted(config, self.model, device, world_size)
        self.block_manager: BlockManager | None = None  # rank 0: the block tables that steps refer to
        self.sampler = Sampler(device)
        # How decodes read their K/V (handler/forward_context.py): "padded" (always, on GPUs), "kernel" (CPU
        # fp32 or bf16 where the C kernel builds), "per_sequence", or "auto" (CPU otherwise): padded while the padded
        # tensor is small. Tests force each.
        if device.type == "cuda":
            self.decode_form = "padded"
        else:
            self.decode_form = "kernel" if cpu_attention.serves(self.dtype, device) else "auto"

    def lora_base_shapes(self) -> BaseModelShapes:
        """What an adapter must fit to be served on this model (this rank's view: under tensor parallelism
        the model refuses expert LoRA)."""
        model = self.model
        return BaseModelShapes(model.num_layers, model.lora_module_shapes(), self.hf_config.model_type,
                               dict(model.peft_modules), *model.expert_lora())

    def num_kv_blocks(self, max_model_len: int) -> int:
        """Rank 0's choice, which every rank then allocates: the configured count, else what fits."""
        return self.config.num_kv_blocks or auto_num_kv_blocks(self.config, self.model, max_model_len)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Every rank holds its KV heads of the same blocks; rank 0 tells the others how many."""
        if self.followers is not None:
            self.followers.send(protocol.WorkerInit(num_kv_blocks=num_blocks))
        model = self.model
        # Zeros: masked-out padding positions then read zeros rather than NaN garbage.
        shape = (model.num_layers, 2, model.num_kv_heads, num_blocks, self.config.block_size, model.head_dim)
        if self.device.type == "cpu":
            self.kv_cache = huge_pages.zeros(shape, model.dtype)
            huge_pages.collapse_weights(model)
        else:
            self.kv_cache = torch.zeros(shape, dtype=model.dtype, device=self.device)
        if self._compile:
            config = self.config
            max_batch = config.max_compiled_batch_size or config.max_rolling_batch_size
            self.compiled_decode = CompiledDecode(self.model, self.kv_cache, max_batch, config.enable_lora)
            self.compiled_decode.warm_up()

    def use_block_manager(self, block_manager: BlockManager) -> None:
        """Rank 0: the host's block tables, from which `execute` describes each step."""
        self.block_manager = block_manager

    def adjust_cpu_threads(self) -> None:
        if self.cpu_threads is not None:
            self.cpu_threads.maybe_adjust()

    def execute(self, step: ScheduledStep, lora: LoraStepPlan | None = None) -> SampledTokens:
        """Rank 0: run one forward pass over the step's tokens; return each sampling sequence's next token
        and log-prob, in `step.sampling_rows()` order (decodes, completing prefills, then sequences forked
        this step). A prefill chunk that does not complete its sequence samples nothing. With tensor
        parallelism the other ranks get the step first and run the same forward on their shards."""
        copies = self.block_manager.take_copies()
        inputs = describe_step(step, self.block_manager, self._decode_form)
        message = protocol.StepMessage(inputs, [], copies, lora)
        if self.followers is not None:
            # The slot changes since the last step go first (their weights broadcast after the message),
            # so that no rank computes with a slot it lacks.
            message.slot_writes, tensors = take_slot_writes(self.lora_slots, self.device)
            self.followers.send(message, tensors)
        ctx, hidden, last_token_index = self.run(message)
        self._score_prompts(step, ctx, hidden)
        seqs, rows = step.sampling_rows()
        if not seqs:
            return SampledTokens([], [], [])
        logits = self.model.compute_logits(hidden[last_token_index])
        return self.sampler.sample(logits, seqs, rows)

    def run(self, message: protocol.StepMessage) -> tuple[ForwardContext, torch.Tensor, torch.Tensor]:
        """What every rank does with a step: the forward context, final hidden states and sampled rows."""
        if self.rank != 0:
            for write in message.slot_writes:
                receive_slot_write(write, self.lora_slots, self.comm, self.dtype, self.device)
        self._copy_blocks(message.block_copies)
        ctx, input_ids, last_token_index = build_forward_inputs(message.inputs, self.device)
        if message.lora is not None:
            ctx.lora = LoraStepApplier(self.lora_slots, message.lora, self.device, self.row_parallel)
        compiled = self.compiled_decode
        if compiled is not None and compiled.serves(message.inputs):
            hidden = compiled.run(ctx, input_ids)
        else:
            hidden = self.model.forward(input_ids, ctx, self.kv_cache)
        return ctx, hidden, last_token_index

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
        padded_tokens = num_decodes * width * self.config.block_size
        small = padded_tokens * self.model.num_kv_heads * self.model.head_dim <= PAD_DECODES_MAX_ELEMENTS
        return "padded" if small else "per_sequence"
