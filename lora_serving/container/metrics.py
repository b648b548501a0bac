"""Prometheus metrics: requests and latencies counted by the server, engine and adapter state read from
the engine at each scrape (so a gauge is never stale and the engine thread never waits for a lock of ours).

Each server has its own registry, so several servers can live in one process (the tests start several).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lora_serving.handler import Engine
from lora_serving.handler.lora.resolver import AdapterResolver

PREFIX = "lora_serving"
ADAPTER_TIERS = ("device", "host", "disk")
# Token latencies on CPU run from milliseconds to seconds; on a GPU from well under a millisecond.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests answered, by route template and status code",
                                ["route", "status"], registry=self.registry)
        self.time_to_first_token = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                                             "From accepting a request to its first generated token",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(f"{PREFIX}_inter_token_latency_seconds",
                                             "Between consecutive generated tokens of one request",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)

        self.rejected = Counter(f"{PREFIX}_requests_rejected",
                                "Generation requests answered at once because job_queue_size requests already "
                                "waited (503, 429 on the TGI routes), by API (lmi, openai, tgi)",
                                ["api"], registry=self.registry)
        # Generation requests from arrival to the end of their answer (container/overload.py keeps it).
        self.requests_in_flight = 0
        self._engine: Engine | None = None
        Gauge(f"{PREFIX}_requests_in_flight", "Generation requests accepted and not yet answered in full",
              registry=self.registry).set_function(lambda: self.requests_in_flight)
        Gauge(f"{PREFIX}_requests_waiting", "Generation requests accepted but not yet running (job_queue_size "
              "bounds it)", registry=self.registry).set_function(self._requests_waiting)

    def note_rejected(self, api: str) -> None:
        self.rejected.labels(api).inc()

    def watch_engine(self, engine: Engine, resolver: AdapterResolver | None = None) -> None:
        self._engine = engine
        self.registry.register(EngineCollector(engine))
        if resolver is not None:
            self.registry.register(ResolverCollector(resolver))

    def _requests_waiting(self) -> int:
        # A request runs once its sequences are in the batch; one with several sequences (n > 1) is counted
        # as running by each, which can only make the estimate of those waiting smaller.
        running = self._engine.stats().num_running if self._engine is not None else 0
        return max(0, self.requests_in_flight - running)


class ResolverCollector(Collector):
    """option.adapter_resolver: what it resolved, missed, failed and evicted."""

    def __init__(self, resolver: AdapterResolver) -> None:
        self._resolver = resolver

    def collect(self) -> Iterator:
        stats = self._resolver.stats()
        yield _counter("adapters_resolved", "Adapters registered on first use by option.adapter_resolver",
                       stats.resolved)
        yield _counter("adapter_resolver_misses", "Names option.adapter_resolver looked up and did not find",
                       stats.not_found)
        yield _counter("adapter_resolver_failures", "Resolutions that failed (download, archive, load)",
                       stats.failed)
        yield _counter("adapters_evicted", "Resolved adapters unregistered and deleted past option.max_disk_loras",
                       stats.evicted)
        yield _gauge("adapters_resolved_on_disk", "Resolved adapters registered and on disk now", stats.resident)


class EngineCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator:
        stats = self._engine.stats()
        yield _gauge("queue_depth", "Requests waiting to be scheduled", stats.num_waiting)
        yield _gauge("running_sequences", "Sequences in the running batch", stats.num_running)
        yield _gauge("kv_cache_blocks", "KV cache blocks in total", stats.num_kv_blocks)
        used = stats.num_kv_blocks - stats.num_free_kv_blocks
        yield _gauge("kv_cache_usage_ratio", "Fraction of KV cache blocks held by sequences",
                     used / stats.num_kv_blocks if stats.num_kv_blocks else 0.0)
        yield _counter("generated_tokens", "Tokens generated", stats.generated_tokens)
        yield _counter("prompt_tokens", "Prompt tokens computed (not those reused from the prefix cache)",
                       stats.prompt_tokens)
        yield _counter("engine_steps", "Engine steps run", stats.steps)
        yield _counter("preemptions", "Sequences preempted for lack of KV cache", stats.preemptions)
        yield _counter("prefix_cache_queries", "Tokens of admitted sequences looked up in the prefix cache",
                       stats.prefix_cache_queried_tokens)
        yield _counter("prefix_cache_hits", "Tokens whose K/V came from the prefix cache",
                       stats.prefix_cache_hit_tokens)
        queried = stats.prefix_cache_queried_tokens
        yield _gauge("prefix_cache_hit_rate", "Share of looked-up tokens found in the prefix cache, since start",
                     stats.prefix_cache_hit_tokens / queried if queried else 0.0)
        yield _gauge("kv_cache_cached_blocks", "KV blocks kept for the prefix cache that no sequence holds "
                     "(free: taken last, oldest first)", stats.num_cached_kv_blocks)
        yield _counter("chunked_prefill_steps", "Steps in which the token budget cut a prompt's prefill short",
                       stats.chunked_prefill_steps)
        if self._engine.config.enable_lora:
            yield _gauge("adapter_slots", "Device slots for adapters (option.max_loras)", stats.num_adapter_slots)
            yield _gauge("adapter_slots_busy", "Device slots used by sequences in the running batch",
                         stats.num_busy_adapter_slots)
            yield from self._adapter_metrics()

    def _adapter_metrics(self) -> Iterator:
        adapters = self._engine.list_adapters()
        resident = GaugeMetricFamily(f"{PREFIX}_adapter_resident",
                                     "1 for the tier the adapter is in now (device slot, host memory, disk)",
                                     labels=["adapter", "tier"])
        pinned = GaugeMetricFamily(f"{PREFIX}_adapter_pinned", "1 if the adapter is pinned", labels=["adapter"])
        load_seconds = GaugeMetricFamily(f"{PREFIX}_adapter_load_seconds",
                                         "Duration of the adapter's last load from disk", labels=["adapter"])
        tokens_served = CounterMetricFamily(f"{PREFIX}_adapter_tokens_served",
                                            "Tokens generated with the adapter", labels=["adapter"])
        for info in adapters:
            for tier in ADAPTER_TIERS:
                resident.add_metric([info.name, tier], 1.0 if info.tier == tier else 0.0)
            pinned.add_metric([info.name], 1.0 if info.pinned else 0.0)
            if info.load_seconds is not None:
                load_seconds.add_metric([info.name], info.load_seconds)
            tokens_served.add_metric([info.name], info.tokens_served)
        yield _gauge("adapters_registered", "Adapters registered", len(adapters))
        yield from (resident, pinned, load_seconds, tokens_served)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", documentation, value=value)
