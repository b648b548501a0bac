"""handler/lora/resolver.py on a real engine and a local directory, with the clock in the test's hands: a missing
name is remembered only for MISS_SECONDS, an adapter a request still uses is not evicted, and the resolver
location's forms are checked by name."""

from __future__ import annotations

import shutil

import pytest

from lora_serving.handler import Engine, SamplingParams
from lora_serving.handler.errors import AdapterNotFoundError, ConfigError, InvalidAdapterError
from lora_serving.handler.hub import HubSettings
from lora_serving.handler.lora.resolver import MISS_SECONDS, AdapterResolver, ResolverLocation
from lora_serving.handler.lora.resolver_fetch import resolver_fetch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine(lora_base):
    engine = Engine(lora_base, dtype="float32", enable_lora=True, max_loras=2, max_cpu_loras=3, max_lora_rank=16)
    yield engine
    engine.close()


def resolve(resolver: AdapterResolver, name: str) -> None:
    future = resolver.begin(name)
    if future is not None:
        future.result()


def resolver_for(engine, tenants, tmp_path, clock, max_resolved=4) -> AdapterResolver:
    location = ResolverLocation.parse(str(tenants))
    fetch = resolver_fetch(location, s3_client=None,
                           hub=HubSettings(endpoint=None, token=None, cache_dir=tmp_path / "hub", offline=True),
                           max_total_bytes=1 << 30)
    return AdapterResolver(engine, location, fetch, tmp_path / "store", max_resolved=max_resolved, clock=clock)


def test_a_miss_is_remembered_for_a_while_then_looked_up_again(engine, adapters, tmp_path):
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    clock = Clock()
    resolver = resolver_for(engine, tenants, tmp_path, clock)
    with pytest.raises(AdapterNotFoundError, match="late"):
        resolve(resolver, "late")
    shutil.copytree(adapters["r8-all"], tenants / "late")
    clock.now += MISS_SECONDS - 1
    with pytest.raises(AdapterNotFoundError, match="late"):
        resolve(resolver, "late")  # still remembered: not looked up, although it is there now
    clock.now += 2
    resolve(resolver, "late")
    assert engine.get_adapter("late").path == str((tenants / "late").resolve())
    assert resolver.stats().not_found == 1 and resolver.stats().resolved == 1
    resolver.close()


def test_an_adapter_in_use_is_not_evicted(engine, adapters, tmp_path):
    tenants = tmp_path / "tenants"
    for name in ("busy", "next"):
        shutil.copytree(adapters["r1-qv"], tenants / name)
    resolver = resolver_for(engine, tenants, tmp_path, Clock(), max_resolved=1)
    resolve(resolver, "busy")
    engine.add_request("running", "one two three", SamplingParams(max_new_tokens=4), "busy")
    resolve(resolver, "next")  # over the bound, but "busy" has an unfinished request
    assert {info.name for info in engine.list_adapters()} == {"busy", "next"}
    while engine.has_unfinished_requests():
        engine.step()
    shutil.copytree(adapters["r1-qv"], tenants / "third")
    resolve(resolver, "third")
    assert {info.name for info in engine.list_adapters()} == {"third"}
    assert resolver.stats().evicted == 2
    resolver.close()


def test_names_and_locations_are_checked_first(engine, tmp_path):
    resolver = resolver_for(engine, tmp_path, tmp_path, Clock())
    for name in ("../etc", "a/b", ".hidden", ""):
        with pytest.raises(InvalidAdapterError):
            resolver.begin(name)
    assert resolver.stats().not_found == 0
    for bad in ("relative/dir", "s3://", "hf://", "hf://org/name/", str(tmp_path / "absent")):
        with pytest.raises(ConfigError, match="adapter_resolver"):
            ResolverLocation.parse(bad)
    assert str(ResolverLocation.parse("s3://bucket/prefix")) == "s3://bucket/prefix/"
    assert str(ResolverLocation.parse("hf://org")) == "hf://org/"
    resolver.close()
