"""The decode step through torch.compile: the model's layers traced once and fused between its opaque steps.

Why: a decode step at a small batch on CPU is not only its projections: per layer two norms, RoPE, the residual adds
and the activation are a few dozen small torch calls, each paying dispatch and Python, times every layer. Inductor
fuses those into a few generated loops per layer; the projections, decode attention and LoRA stay the eager path's
own kernels, called from the graph as custom ops (handler/compiled_ops.py). vLLM compiles its CPU decode the same way.

What it takes: decode-only steps (one new token per sequence, no prefill in the step) whose decodes the C attention
kernel reads (CPU, fp32 or bf16), at batch sizes 1 (a graph of its own) and 2..max_batch (one graph, the batch
dimension symbolic: the two buckets). With LoRA enabled the graph calls the LoRA op after every projection group,
which adds nothing in a step without adapters. Everything else runs the eager forward, which stays the reference:
prefills and mixed steps, larger batches, soft-capped attention (Gemma 2), mixtures of experts (routing reads counts
on the host), tensor parallelism (collectives inside the layers). Both compute the same operations in the same
order; the compiler may sum a norm's squares in another order, so in fp32 they agree to rounding, as two GEMMs do.

Both graphs are compiled at start (`warm_up`, on dummy inputs before any request exists), tens of seconds for a
30-layer model on 2 cores; inductor's on-disk cache makes the next start quick. Should compiling fail (no C++
compiler, a family the tracer cannot follow), every step runs eagerly, with a warning.
"""

from __future__ import annotations

import logging
import time
import types

import torch
from torch._dynamo.convert_frame import register_bytecode_hook

from lora_serving.handler import compiled_ops
from lora_serving.handler.config import Config
from lora_serving.handler.forward_context import CompiledDecodes, ForwardContext
from lora_serving.handler.step_inputs import StepInputs
from lora_serving.kernels import cpu_attention

logger = logging.getLogger(__name__)

# enforce_eager=auto compiles models with at least this many bytes of weights: below it (test and demo models of a
# few MB) a step costs well under a millisecond of small calls, and the compile would cost the start seconds.
AUTO_MIN_WEIGHT_BYTES = 64 * 1024**2


class _TracedLora:
    """The LoRA hook the traced layers call: one lora_add op per projection group, which runs the step's applier."""

    __slots__ = ()

    def apply(self, layer_index: int, group: str, y: torch.Tensor, x: torch.Tensor) -> None:
        torch.ops.lora_serving.lora_add(y, x, layer_index, group)


_TRACED_LORA = _TracedLora()


def compile_wanted(config: Config, model, device: torch.device, world_size: int) -> bool:
    """Whether this engine's decode steps should run compiled (and why not, logged, where asked for)."""
    if config.enforce_eager == "true":
        return False
    reasons = []
    if device.type != "cpu" or not cpu_attention.serves(model.dtype, device):
        reasons.append("the compiled step calls the C decode-attention kernel: CPU, fp32 or bf16")
    if world_size > 1:
        reasons.append("tensor parallelism: the layers' collectives are not traced")
    if not model.traceable_decode:
        reasons.append(f"{type(model).__name__}'s layers read values on the host")
    if model.attn_logit_softcapping is not None:
        reasons.append("soft-capped attention logits are not the C kernel's form")
    if reasons:
        if config.enforce_eager == "false":
            logger.warning("enforce_eager=false, but the decode step runs eagerly: %s", "; ".join(reasons))
        return False
    if config.enforce_eager == "auto":
        return weight_bytes(model) >= AUTO_MIN_WEIGHT_BYTES
    return True


def weight_bytes(model) -> int:
    element = torch.empty((), dtype=model.dtype).element_size()
    hidden, inter, layers = model.hidden_size, model.intermediate_size, model.num_layers
    per_layer = hidden * (model.q_size + 2 * model.kv_size) + model.q_size * hidden + 3 * hidden * inter
    return element * (layers * per_layer + model.vocab_size * hidden)


class CompiledDecode:
    """`serves(inputs)` says whether a step can take the compiled path; `run` takes it."""

    def __init__(self, model, kv_cache: torch.Tensor, max_batch: int, with_lora: bool) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.max_batch = max_batch
        self.with_lora = with_lora
        self.steps = 0  # decode steps run compiled
        # The code dynamo made for each graph, by its smallest batch size (1, and 2 for 2..max_batch): `run` calls it
        # directly, as vLLM does. Through torch.compile's wrapper every call would check guards first, among them
        # torch's thread count, which the CPU-thread policy changes under load: each change would compile anew.
        self._graph_code: dict[int, types.FunctionType] = {}
        # Dynamo keeps compiled graphs per code object: a copy of _forward's code per engine keeps each engine's
        # graphs and code apart.
        method = type(self)._forward
        self._code = method.__code__.replace()
        self._globals = method.__globals__
        self._compiling_batch = 0
        forward = types.FunctionType(self._code, self._globals, method.__name__)
        # The generated loops run on the calling thread alone: they are small (a norm, RoPE or the activation over
        # the batch's rows), and a parallel region each would wake torch's other threads some 200 times a step,
        # which cost more than it saved; the projections and attention keep the policy's threads. They round every
        # bf16 intermediate as the eager ops (and transformers) do, rather than keep it in fp32.
        self._compiled = torch.compile(types.MethodType(forward, self), dynamic=False, fullgraph=True,
                                       options={"cpp.threads": 1, "emulate_precision_casts": True})

    @property
    def ready(self) -> bool:
        return bool(self._graph_code)

    def warm_up(self) -> None:
        """Compiles both graphs on dummy decodes before any request exists: they write K/V into slots 0 and 1 of
        block 0, which no sequence has yet."""
        started = time.perf_counter()
        hook = register_bytecode_hook(self._keep_code)
        try:
            for batch in (1, 2) if self.max_batch > 1 else (1,):
                self._compiling_batch = batch
                tables = torch.zeros(batch, 2, dtype=torch.long)
                inputs = (torch.zeros(batch, dtype=torch.long), torch.arange(batch), torch.arange(batch), tables,
                          torch.arange(1, batch + 1))
                if batch > 1:
                    for tensor in inputs:
                        torch._dynamo.mark_dynamic(tensor, 0, min=2, max=self.max_batch)
                torch._dynamo.mark_dynamic(tables, 1)
                with torch.inference_mode():
                    self._compiled(*inputs, self.kv_cache)
                if batch not in self._graph_code:
                    raise RuntimeError(f"dynamo made no code for the batch of {batch}")
        except Exception:  # noqa: BLE001  (any compiler failure: the eager forward serves every step)
            logger.warning("compiling the decode step failed; every step runs eagerly", exc_info=True)
            self._graph_code.clear()
            return
        finally:
            hook.remove()
        logger.info("decode step compiled for batch sizes 1..%d in %.1f s", self.max_batch,
                    time.perf_counter() - started)

    def _keep_code(self, original: types.CodeType, made: types.CodeType) -> None:
        if original is self._code:
            self._graph_code[self._compiling_batch] = types.FunctionType(made, self._globals, "compiled_decode")

    def serves(self, inputs: StepInputs) -> bool:
        return (self.ready and not inputs.prefills and inputs.decode_form == "kernel"
                and 0 < len(inputs.decode_tables) <= self.max_batch)

    def run(self, ctx: ForwardContext, input_ids: torch.Tensor) -> torch.Tensor:
        """The final hidden states [B, H] of a decode-only step (ctx.decode_kv: its PaddedDecodes for the kernel)."""
        decodes = ctx.decode_kv
        tables = decodes.block_tables
        if tables.shape[1] == 1:  # the graphs take tables of 2+ blocks (a dimension of 1 is its own shape to torch)
            tables = torch.cat((tables, torch.zeros_like(tables)), dim=1)
        graph = self._graph_code[1 if input_ids.shape[0] == 1 else 2]
        self.steps += 1
        with compiled_ops.lora_for_step(ctx.lora), torch.inference_mode():
            return graph(self, input_ids, ctx.positions, ctx.slot_mapping, tables, decodes.context_lens, self.kv_cache)

    def _forward(self, input_ids, positions, slot_mapping, block_tables, context_lens, kv_cache):
        ctx = ForwardContext(positions=positions, slot_mapping=slot_mapping, num_decode_tokens=0,
                             decode_kv=CompiledDecodes(block_tables, context_lens), prefills=[],
                             lora=_TRACED_LORA if self.with_lora else None)
        return self.model.forward_layers(input_ids, ctx, kv_cache)
