"""Prefix caching and chunked prefill, measured in-process on the benchmark model, with LoRA.

(1) Multi-tenant chat. T tenants, each an adapter with its own system prompt of S tokens; U users per
tenant each hold a conversation of K short turns, and each turn resends the whole conversation (system
prompt, earlier messages and answers, a new message of M tokens) for an answer of N tokens. Conversations
start G seconds apart, and each sends its next turn as soon as its last answer is complete. Every round
uses system prompts never seen before (a cold cache). Time to first token (from add_request to the end of
the step that returned the token) p50 / p99, generated tokens per second, prompt tokens computed; prefix
caching on against off, the two engines taking turns, each side's samples pooled over its rounds.

(2) Long prompts arriving while streams run. B streams decode (short prompts, long answers, half of them
with an adapter); a prompt of L tokens arrives every R steps. Inter-token latency of the streams p50 / p99
and the long prompts' time to first token; chunked prefill against unchunked, both with a step budget
(`max_num_batched_tokens`) of C tokens, taking turns.

    BENCH_CACHE_DIR=... .venv/bin/python scripts/bench_prefix.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# handler before torch: it sets how torch's OpenMP threads wait.
from lora_serving.handler import Engine, SamplingParams

# isort: split
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latency import percentile  # noqa: E402
from bench_lora import make_adapters  # noqa: E402
from benchlib import bench_model_dir, machine_description, print_table  # noqa: E402

VOCAB = (3, 18000)  # token ids drawn from this range, as benchlib's workload does


def random_tokens(rng: random.Random, count: int) -> list[int]:
    return [rng.randrange(*VOCAB) for _ in range(count)]


# ---- (1) multi-tenant chat ----------------------------------------------------------------------------

@dataclass
class Conversation:
    adapter: str
    system: list[int]
    messages: list[list[int]]  # the user's messages, one per turn
    starts_at: float  # seconds after the run starts
    history: list[int] = field(default_factory=list)  # earlier messages and answers
    turn: int = 0
    answer: list[int] = field(default_factory=list)
    sent_at: float | None = None  # of the turn in flight

    def prompt(self) -> list[int]:
        return self.system + self.history + self.messages[self.turn]


@dataclass
class ChatTimings:
    first_token: list[float] = field(default_factory=list)
    generated: int = 0
    prompt_tokens_computed: int = 0
    seconds: float = 0.0


def conversations(args, adapters: list[str], round_: int) -> list[Conversation]:
    rng = random.Random(1000 + round_)
    systems = {adapter: random_tokens(rng, args.system_tokens) for adapter in adapters}
    owners = [adapter for _ in range(args.users) for adapter in adapters]
    return [Conversation(adapter, systems[adapter],
                         [random_tokens(rng, args.message_tokens) for _ in range(args.turns)],
                         starts_at=index * args.start_gap)
            for index, adapter in enumerate(owners)]


def run_chat(engine: Engine, chats: list[Conversation], answer_tokens: int, label: str,
             timings: ChatTimings) -> None:
    params = SamplingParams(max_new_tokens=answer_tokens, ignore_eos=True)
    by_id = {f"{label}-{index}": chat for index, chat in enumerate(chats)}
    prompt_tokens_before = engine.stats().prompt_tokens
    started = time.perf_counter()
    unfinished = set(by_id)
    while unfinished:
        now = time.perf_counter() - started
        for request_id, chat in by_id.items():
            if request_id in unfinished and chat.sent_at is None and chat.starts_at <= now:
                chat.sent_at = time.perf_counter()
                engine.add_request(f"{request_id}-{chat.turn}", chat.prompt(), params, chat.adapter)
        outputs = engine.step()
        ended = time.perf_counter()
        if not outputs and not engine.has_unfinished_requests():
            time.sleep(0.001)  # nothing to do until the next conversation starts
        for output in outputs:
            request_id = output.request_id.rsplit("-", 1)[0]
            chat = by_id[request_id]
            if not chat.answer:
                timings.first_token.append(ended - chat.sent_at)
            chat.answer.extend(token.id for token in output.tokens)
            timings.generated += len(output.tokens)
            if output.finished:
                chat.history += chat.messages[chat.turn] + chat.answer
                chat.answer, chat.sent_at = [], None
                chat.turn += 1
                if chat.turn == len(chat.messages):
                    unfinished.discard(request_id)
    timings.seconds += time.perf_counter() - started
    timings.prompt_tokens_computed += engine.stats().prompt_tokens - prompt_tokens_before


def bench_chat(args, model_dir: Path, adapter_paths: list[Path]) -> None:
    adapters = [f"tenant-{index}" for index in range(args.tenants)]
    engines = {}
    for caching in (True, False):
        engine = Engine(model_dir, dtype="float32", max_rolling_batch_size=32, enable_lora=True,
                        max_loras=args.tenants, max_lora_rank=16, enable_prefix_caching=caching)
        for name, path in zip(adapters, adapter_paths):
            engine.register_adapter(name, path)
        warm = conversations(args, adapters, round_=-1)[: args.tenants]  # new shapes for oneDNN, once
        run_chat(engine, warm, args.answer_tokens, "warm", ChatTimings())
        engines[caching] = engine
    timings = {caching: ChatTimings() for caching in engines}
    hits = {caching: engines[caching].stats().prefix_cache_hit_tokens for caching in engines}
    queried = {caching: engines[caching].stats().prefix_cache_queried_tokens for caching in engines}
    for round_ in range(args.rounds):
        for caching in (True, False) if round_ % 2 == 0 else (False, True):
            run_chat(engines[caching], conversations(args, adapters, round_), args.answer_tokens, f"r{round_}",
                     timings[caching])
    rows = []
    for caching in (True, False):
        side = timings[caching]
        stats = engines[caching].stats()
        hit_rate = (stats.prefix_cache_hit_tokens - hits[caching]) / (stats.prefix_cache_queried_tokens
                                                                     - queried[caching])
        rows.append(["on" if caching else "off", len(side.first_token), percentile(side.first_token, 0.5) * 1e3,
                     percentile(side.first_token, 0.99) * 1e3, side.generated / side.seconds,
                     side.prompt_tokens_computed, f"{hit_rate:.0%}"])
    on, off = timings[True], timings[False]
    rows.append(["on / off", "", percentile(on.first_token, 0.5) / percentile(off.first_token, 0.5),
                 percentile(on.first_token, 0.99) / percentile(off.first_token, 0.99),
                 (on.generated / on.seconds) / (off.generated / off.seconds),
                 on.prompt_tokens_computed / off.prompt_tokens_computed, ""])
    print(f"(1) multi-tenant chat: {args.tenants} tenants (adapters) x {args.users} users, {args.turns} turns each; "
          f"system prompts {args.system_tokens} tokens, messages {args.message_tokens}, answers "
          f"{args.answer_tokens}; conversations start {args.start_gap:g} s apart; {args.rounds} rounds per side")
    print_table(["prefix caching", "requests", "TTFT p50 ms", "TTFT p99 ms", "generated tok/s",
                 "prompt tokens computed", "hit rate"], rows)


# ---- (2) long prompts arriving while streams run -----------------------------------------------------------

@dataclass
class StreamTimings:
    between_tokens: list[float] = field(default_factory=list)
    long_first_token: list[float] = field(default_factory=list)
    longest_step: float = 0.0


def run_streams(engine: Engine, args, adapters: list[str], label: str, timings: StreamTimings) -> None:
    rng = random.Random(7)
    for index in range(args.streams):
        engine.add_request(f"{label}-stream-{index}", random_tokens(rng, 16),
                           SamplingParams(max_new_tokens=args.stream_tokens, ignore_eos=True),
                           adapters[index % len(adapters)] if index % 2 else None)
    last_token_at: dict[str, float] = {}
    long_sent: dict[str, float] = {}
    step = 0
    while engine.has_unfinished_requests():
        if step % args.long_every == args.long_every - 1 and len(long_sent) < args.long_prompts:
            request_id = f"{label}-long-{len(long_sent)}"
            engine.add_request(request_id, random_tokens(rng, args.long_tokens),
                               SamplingParams(max_new_tokens=4, ignore_eos=True))
            long_sent[request_id] = time.perf_counter()
        started = time.perf_counter()
        outputs = engine.step()
        ended = time.perf_counter()
        timings.longest_step = max(timings.longest_step, ended - started)
        step += 1
        for output in outputs:
            if not output.tokens:
                continue
            if output.request_id in long_sent:
                if output.request_id not in last_token_at:
                    timings.long_first_token.append(ended - long_sent[output.request_id])
                last_token_at[output.request_id] = ended
                continue
            if output.request_id in last_token_at:
                timings.between_tokens.append(ended - last_token_at[output.request_id])
            last_token_at[output.request_id] = ended


def bench_streams(args, model_dir: Path, adapter_paths: list[Path]) -> None:
    adapters = ["stream-adapter-0", "stream-adapter-1"]
    engines = {}
    for chunked in (True, False):
        engine = Engine(model_dir, dtype="float32", max_rolling_batch_size=32, enable_lora=True, max_loras=2,
                        max_lora_rank=16, max_num_batched_tokens=args.budget, enable_chunked_prefill=chunked,
                        enable_prefix_caching=False)
        for name, path in zip(adapters, adapter_paths):
            engine.register_adapter(name, path)
        engine.generate([list(range(3, 3 + args.long_tokens))], SamplingParams(max_new_tokens=2))  # warm-up
        engines[chunked] = engine
    timings = {chunked: StreamTimings() for chunked in engines}
    for round_ in range(args.rounds):
        for chunked in (True, False) if round_ % 2 == 0 else (False, True):
            run_streams(engines[chunked], args, adapters, f"r{round_}", timings[chunked])
    rows = []
    for chunked in (True, False):
        side = timings[chunked]
        rows.append(["chunked" if chunked else "unchunked", len(side.between_tokens),
                     percentile(side.between_tokens, 0.5) * 1e3, percentile(side.between_tokens, 0.99) * 1e3,
                     side.longest_step * 1e3, percentile(side.long_first_token, 0.5) * 1e3])
    on, off = timings[True], timings[False]
    rows.append(["chunked / unchunked", "", percentile(on.between_tokens, 0.5) / percentile(off.between_tokens, 0.5),
                 percentile(on.between_tokens, 0.99) / percentile(off.between_tokens, 0.99),
                 on.longest_step / off.longest_step,
                 percentile(on.long_first_token, 0.5) / percentile(off.long_first_token, 0.5)])
    print(f"(2) {args.streams} streams of {args.stream_tokens} tokens (half with an adapter); a prompt of "
          f"{args.long_tokens} tokens arrives every {args.long_every} steps ({args.long_prompts} per round); "
          f"max_num_batched_tokens {args.budget}; {args.rounds} rounds per side")
    print_table(["prefill", "stream ITL samples", "ITL p50 ms", "ITL p99 ms", "longest step ms",
                 "long prompt TTFT p50 ms"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="runs per side, the sides taking turns")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--users", type=int, default=4, help="per tenant")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--system-tokens", type=int, default=300)
    parser.add_argument("--message-tokens", type=int, default=24)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--start-gap", type=float, default=0.2, help="seconds between conversations' starts")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--stream-tokens", type=int, default=160)
    parser.add_argument("--long-tokens", type=int, default=1536)
    parser.add_argument("--long-every", type=int, default=40, help="steps between long prompts")
    parser.add_argument("--long-prompts", type=int, default=3, help="per round")
    parser.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens of part (2)")
    parser.add_argument("--skip-chat", action="store_true")
    parser.add_argument("--skip-streams", action="store_true")
    args = parser.parse_args()

    model_dir = bench_model_dir()
    adapter_paths = make_adapters(model_dir, max(args.tenants, 2))
    print(f"# bench_prefix: {machine_description()}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    if not args.skip_chat:
        bench_chat(args, model_dir, adapter_paths)
        print()
    if not args.skip_streams:
        bench_streams(args, model_dir, adapter_paths)


if __name__ == "__main__":
    main()
