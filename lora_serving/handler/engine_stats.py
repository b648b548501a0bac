"""What `Engine.stats()` reports, and the counters the engine keeps as it steps."""

from __future__ import annotations

from dataclasses import dataclass

from lora_serving.handler.scheduler import ScheduledStep


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    steps: int
    generated_tokens: int
    prompt_tokens: int
    preemptions: int
    # Prefix cache: prompt tokens looked up at admission and found there (their K/V reused, not computed),
    # and blocks kept for reuse that no sequence holds (counted in num_free_kv_blocks: they are reclaimable).
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_cached_kv_blocks: int
    # Steps in which the token budget cut a prefill short (chunked prefill).
    chunked_prefill_steps: int
    num_adapter_slots: int  # 0 without LoRA
    num_busy_adapter_slots: int  # held by sequences in the running batch; the rest can take another adapter


@dataclass(slots=True)
class StepCounters:
    """Counted on the engine thread; `Engine.stats()` reads them from any thread."""

    steps: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0  # computed, not those whose K/V came from the prefix cache
    preemptions: int = 0
    chunked_steps: int = 0

    def count(self, step: ScheduledStep) -> None:
        """A step about to run its forward pass."""
        self.steps += 1
        self.chunked_steps += step.is_chunked
        self.prompt_tokens += sum(max(0, min(seq.num_cached_tokens + length, len(seq.prompt_token_ids))
                                      - seq.num_cached_tokens)
                                  for seq, length in zip(step.prefill_seqs, step.prefill_lengths))
