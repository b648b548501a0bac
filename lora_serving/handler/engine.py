"""The engine: requests in, one scheduled forward pass per `step()`, tokens out.

`add_request` and `abort` may be called from any thread (the HTTP server's); they only queue work that the
thread driving `step()` picks up at the start of its next step. Everything else runs on that one thread.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Sequence as SequenceOf

from transformers import AutoTokenizer

from lora_serving.handler.block_manager import BlockManager
from lora_serving.handler.config import Config
from lora_serving.handler.engine_stats import EngineStats, StepCounters
from lora_serving.handler.errors import (
    ConfigError,
    InvalidRequestError,
    LoraNotEnabledError,
    ModelLoadError,
)
from lora_serving.handler.lora.manager import LoraManager
from lora_serving.handler.lora.registry import AdapterInfo
from lora_serving.handler.model_limits import eos_token_ids, resolve_max_model_len
from lora_serving.handler.models import load_hf_config
from lora_serving.handler.offline import generate_offline
from lora_serving.handler.output_processor import RequestTextState
from lora_serving.handler.request_sequences import RequestSequences
from lora_serving.handler.runner.device import resolve_device
from lora_serving.handler.runner.model_runner import ModelRunner
from lora_serving.handler.scheduler import Scheduler
from lora_serving.handler.sequence import (
    FinishReason,
    GenerationResult,
    RequestOutput,
    SamplingParams,
    Sequence,
    TokenOutput,
)
from lora_serving.handler.structured_output import StructuredOutputCompiler
from lora_serving.handler.tp.devices import rank_devices, resolve_degree
from lora_serving.handler.tp.plan import ModelShape, ShardingPlan
from lora_serving.handler.tp.ranks import RankGroup

logger = logging.getLogger(__name__)

IDLE_WAIT_SECONDS = 0.002


class Engine:
    def __init__(self, model_dir: str | Path | None = None, *, config: Config | None = None,
                 adapters_from_model_dir: bool = True, **options) -> None:
        """`adapters_from_model_dir`: register every `<model_dir>/adapters/<name>/` (with LoRA enabled); a
        front end that registers them itself (DJL does) turns it off."""
        if config is None:
            config = Config.from_options(model_dir, **options)
        elif model_dir is not None or options:
            raise TypeError("pass either a Config or model_dir and options, not both")
        self.config = config
        self.device = resolve_device(config)
        model_dir = Path(config.model_id)
        if config.model_id.startswith("s3://"):
            raise ConfigError("model_id", config.model_id, "the engine loads a local directory; the container "
                              "downloads s3:// models first")
        if not model_dir.is_dir():
            raise ModelLoadError(f"model directory {model_dir} does not exist")
        self.model_dir = model_dir

        started = time.perf_counter()
        self.hf_config = load_hf_config(model_dir, config.trust_remote_code)
        self.tensor_parallel_degree = resolve_degree(config, self.device)
        # Refused here, before any rank starts: heads or features that do not split over the ranks, then
        # more ranks than devices.
        ShardingPlan(ModelShape.from_hf_config(self.hf_config), 0, self.tensor_parallel_degree)
        devices = rank_devices(self.tensor_parallel_degree, self.device)
        self.ranks: RankGroup | None = None
        if len(devices) > 1:
            # The ranks run from another directory: they get the model's absolute path.
            rank_config = dataclasses.replace(config, model_id=str(model_dir.resolve()))
            self.ranks = RankGroup(rank_config, len(devices), devices, config.tensor_parallel_timeout)
        try:
            self._load(config, model_dir)
        except BaseException:
            self.close()
            raise
        logger.info(
            "engine ready in %.1fs: %s on %s (%s)%s, %d KV blocks of %d tokens, max_model_len %d",
            time.perf_counter() - started, self.hf_config.model_type, self.device, self.dtype,
            f", tensor parallel over {len(devices)} ranks" if self.ranks else "", self.block_manager.num_blocks,
            config.block_size, self.max_model_len,
        )

        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._request_sequences = RequestSequences(
            StructuredOutputCompiler(self.tokenizer, self.model.vocab_size, self.eos_token_ids, self._tokenizer_lock),
            vocab_size=self.model.vocab_size, eos_token_ids=self.eos_token_ids,
            max_running=config.max_rolling_batch_size)
        self._new_requests: deque[Sequence] = deque()
        self._abort_requests: deque[str] = deque()
        # request id -> its unfinished sequences (one per n / best_of choice)
        self._sequences: dict[str, list[Sequence]] = {}
        self._text_states: dict[Sequence, RequestTextState] = {}
        self._counters = StepCounters()
        if self.lora is not None and adapters_from_model_dir:
            self.lora.register_directory(self.model_dir / "adapters")

    def _load(self, config: Config, model_dir: Path) -> None:
        """The tokenizer; this rank's runner (model shard, LoRA slots, KV cache); the host side around it."""
        ranks = self.ranks
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=config.trust_remote_code)
        self.runner = ModelRunner(config, self.device, world_size=self.tensor_parallel_degree,
                                  comm=ranks.comm if ranks is not None else None, followers=ranks)
        self.model, self.dtype = self.runner.model, self.runner.dtype
        if ranks is not None:
            ranks.wait_for("loaded")
        self.max_model_len = resolve_max_model_len(config, self.model.max_position_embeddings)
        self.eos_token_ids = eos_token_ids(model_dir, self.hf_config, self.tokenizer)

        self.lora: LoraManager | None = None
        if config.enable_lora:
            self.lora = LoraManager(self.runner.lora_base_shapes(), self.runner.lora_slots,
                                    max_cpu_loras=config.cpu_lora_capacity, max_rank=config.max_lora_rank,
                                    max_wait_steps=config.max_adapter_wait_steps, dtype=self.dtype,
                                    device=self.device)
        num_blocks = self.runner.num_kv_blocks(self.max_model_len)
        self.runner.allocate_kv_cache(num_blocks)
        self.block_manager = BlockManager(num_blocks, config.block_size,
                                          enable_prefix_caching=config.enable_prefix_caching)
        self.runner.use_block_manager(self.block_manager)
        self.scheduler = Scheduler(
            self.block_manager,
            max_running=config.max_rolling_batch_size,
            # Every running sequence's decode fits, whatever the setting.
            max_batched_tokens=max(config.max_num_batched_tokens, config.max_rolling_batch_size),
            gate=self.lora.admission if self.lora is not None else None,
            chunked_prefill=config.enable_chunked_prefill,
        )

    # ---- requests -----------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
    ) -> None:
        """Queue a request; raises InvalidRequestError (with the reason) if it can never be served."""
        params = params or SamplingParams()
        params.validate()
        adapter_version = None
        if adapter:
            if self.lora is None:
                raise LoraNotEnabledError(f"Adapter {adapter} cannot be used: LoRA is not enabled "
                                          "(option.enable_lora=false)")
            adapter_version = self.lora.resolve(adapter)
        self._request_sequences.check(params)
        prompt_token_ids = self.tokenize(prompt)
        self._check_fits(prompt_token_ids, params)
        seqs = self._request_sequences.create(request_id, prompt_token_ids, params, adapter or None, adapter_version)
        with self._lock:
            if request_id in self._sequences:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self._sequences[request_id] = seqs
            self._new_requests.append(seqs[0])  # the others are its forks

    def abort(self, request_id: str) -> None:
        """Stop a request at the next step and free what it holds; unknown or finished ids are ignored."""
        with self._lock:
            self._abort_requests.append(request_id)

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self._sequences)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty")
            with self._tokenizer_lock:
                token_ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, (list, tuple)) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            token_ids = list(prompt)
            vocab_size = self.model.vocab_size
            bad = [t for t in token_ids if not 0 <= t < vocab_size]
            if bad:
                raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
        else:
            raise InvalidRequestError("a prompt must be a string or a list of token ids")
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        return token_ids

    def _check_fits(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        prompt_len = len(prompt_token_ids)
        total = prompt_len + params.max_new_tokens
        if prompt_len > self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {prompt_len} tokens, more than the model's maximum length {self.max_model_len}"
            )
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} exceeds the "
                f"model's maximum length {self.max_model_len}"
            )
        if total > self.block_manager.capacity_tokens:
            raise InvalidRequestError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} can never "
                f"fit in the KV cache ({self.block_manager.capacity_tokens} tokens)"
            )

    # ---- the step -----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Admit queued requests, run one forward pass, and report every request that progressed."""
        outputs: list[RequestOutput] = []
        self.check_health()
        self.runner.adjust_cpu_threads()
        self._take_queued(outputs)
        if self.lora is not None:
            for seq, message in self.lora.take_failed(self.scheduler.waiting):
                outputs.extend(self._finish(seq, FinishReason.ERROR, error=message))
            self.lora.prefetch(self.scheduler.waiting)
        step = self.scheduler.schedule()
        if self.lora is not None:
            self.lora.admission.group_by_slot(step.decode_seqs)
        self._counters.preemptions += len(step.preempted)
        if step.is_empty:
            if self.scheduler.waiting and not outputs:
                # Everything waits on an adapter load: yield the CPU to the loader instead of spinning.
                time.sleep(IDLE_WAIT_SECONDS)
            return outputs
        self._counters.count(step)
        seqs, _ = step.sampling_rows()
        try:
            lora_plan = self.lora.admission.step_plan(step) if self.lora is not None else None
            sampled = self.runner.execute(step, lora_plan)
        except Exception as error:  # a failed forward must not take the engine (or other steps) down
            if self.ranks is not None:
                # ...except with tensor parallelism: the ranks may now disagree on where they are.
                raise self.ranks.failure_in_step(error) from error
            failed = step.seqs + [child for children in step.forks.values() for child in children]
            logger.exception("forward pass failed for %d sequences", len(failed))
            for seq in failed:
                outputs.extend(self._finish(seq, FinishReason.ERROR, error=f"internal error: {error}"))
            return outputs
        self.scheduler.complete(step)
        for seq, token_id, log_prob, top in zip(seqs, sampled.token_ids, sampled.log_probs, sampled.top):
            text_state = self._text_states[seq]
            token, finish = text_state.process(seq, token_id, log_prob, top)
            self._counters.generated_tokens += 1
            if self.lora is not None:
                self.lora.record_token(seq)
            # The prompt's scores go out with the first token (the prefill that computed them).
            prompt_log_probs = seq.prompt_log_probs if len(seq.output_token_ids) == 1 else None
            if finish is None:
                outputs.append(RequestOutput(seq.request_id, [token], finished=False, index=seq.index,
                                             prompt_log_probs=prompt_log_probs))
            else:
                [output] = self._finish(seq, finish, tokens=[token], error=text_state.error)
                output.prompt_log_probs = prompt_log_probs
                outputs.append(output)
        return outputs

    def _take_queued(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            new_requests = list(self._new_requests)
            self._new_requests.clear()
            aborts = list(self._abort_requests)
            self._abort_requests.clear()
        for seq in new_requests:
            for each in (seq, *seq.forks):
                self._text_states[each] = RequestTextState(self.tokenizer, each, self.eos_token_ids)
            self.scheduler.add(seq)
        for request_id in aborts:
            for seq in list(self._sequences.get(request_id, ())):
                if not seq.is_finished:
                    outputs.extend(self._finish(seq, FinishReason.ABORTED))

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        tokens: list[TokenOutput] | None = None,
        error: str | None = None,
    ) -> list[RequestOutput]:
        """Finish `seq`, and the forks it has not handed its blocks to yet (it never ran)."""
        outputs = []
        for each in (seq, *seq.forks):
            each.finish_reason = reason
            self.scheduler.remove(each)
            self.runner.sampler.release(each)
            self._text_states.pop(each, None)
            with self._lock:
                remaining = self._sequences.get(each.request_id, [])
                if each in remaining:
                    remaining.remove(each)
                if not remaining:
                    self._sequences.pop(each.request_id, None)
            outputs.append(RequestOutput(each.request_id, tokens if each is seq and tokens else [], finished=True,
                                         finish_reason=reason, error=error, index=each.index))
        seq.forks = []
        return outputs

    # ---- health and shutdown ------------------------------------------------------------------------

    def check_health(self) -> None:
        """Raise RankFailedError, naming the rank, once a tensor-parallel rank has died; the engine can then
        no longer step. Cheap (an exit-status check): the engine loop calls it while idle."""
        if self.ranks is not None:
            self.ranks.check_alive()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks and the adapter loaders. The engine cannot step afterwards."""
        ranks, self.ranks = getattr(self, "ranks", None), None
        if ranks is not None:
            ranks.close()
        lora = getattr(self, "lora", None)
        if lora is not None:
            lora.close()

    # ---- offline convenience ------------------------------------------------------------------------

    def generate(
        self,
        prompts: str | list[int] | SequenceOf[str | list[int]],
        params: SamplingParams | SequenceOf[SamplingParams] | None = None,
        adapters: str | None | SequenceOf[str | None] = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt, batched by the rolling scheduler; results in prompt order. With n or
        best_of > 1, a prompt's result is its first choice, and `.choices` lists all n.

        Drives `step()` itself, so it must not run while another thread is stepping this engine.
        """
        return generate_offline(self, prompts, params, adapters)

    # ---- adapters -----------------------------------------------------------------------------------

    def register_adapter(self, name: str, path: str | Path, *, pin: bool = False, preload: bool = True,
                         source: str | None = None) -> AdapterInfo:
        """Check and register a PEFT LoRA adapter directory; InvalidAdapterError says why one is refused.
        `source`: where the directory came from (an s3:// or hf:// url), listed instead of the local path."""
        return self._require_lora().register(name, path, pin=pin, preload=preload, source=source)

    def update_adapter(self, name: str, path: str | Path | None = None, *, pin: bool | None = None,
                       source: str | None = None) -> AdapterInfo:
        return self._require_lora().update(name, path, pin=pin, source=source)

    def unregister_adapter(self, name: str) -> None:
        """New requests for `name` are refused from now on; requests already accepted finish."""
        self._require_lora().unregister(name)

    def get_adapter(self, name: str) -> AdapterInfo:
        return self._require_lora().info(name)

    def list_adapters(self) -> list[AdapterInfo]:
        return self._require_lora().list()

    def adapters_in_use(self) -> set[str]:
        """The adapter names of the requests not finished yet: their files may still be read."""
        with self._lock:
            return {seq.adapter for seqs in self._sequences.values() for seq in seqs if seq.adapter}

    def _require_lora(self) -> LoraManager:
        if self.lora is None:
            raise LoraNotEnabledError("LoRA is not enabled (set option.enable_lora=true)")
        return self.lora

    # ---- introspection ------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        running = list(self.scheduler.running)  # a copy: the engine thread changes the list while we read
        return EngineStats(
            num_running=len(running),
            num_waiting=len(self.scheduler.waiting) + len(self._new_requests),
            num_kv_blocks=self.block_manager.num_blocks,
            num_free_kv_blocks=self.block_manager.num_free_blocks,
            steps=self._counters.steps,
            generated_tokens=self._counters.generated_tokens,
            prompt_tokens=self._counters.prompt_tokens,
            preemptions=self._counters.preemptions,
            prefix_cache_queried_tokens=self.block_manager.prefix_queried_tokens,
            prefix_cache_hit_tokens=self.block_manager.prefix_hit_tokens,
            num_cached_kv_blocks=self.block_manager.num_cached_blocks,
            chunked_prefill_steps=self._counters.chunked_steps,
            num_adapter_slots=self.lora.slots.num_slots if self.lora is not None else 0,
            num_busy_adapter_slots=self.lora.admission.num_busy_slots(running) if self.lora is not None else 0,
        )
