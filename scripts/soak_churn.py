"""The soak's adapter churn (`scripts/soak.py --churn-every S`): names that are registered, updated to other
files and unregistered every few seconds while clients send requests naming them.

Each churned name is served, at any moment, by one of the server's own adapters' directories (a "version":
their greedy answers are already known) or by nothing. A request for a churned name must be answered with
the version that was registered when the server accepted it: since that moment lies somewhere between
sending and the answer, the answer must equal the reference of a version the name had at some instant of
that window, and "not registered" (a 400) is right only if the name was unregistered at some instant of
it. Anything else (the old version's answer long after an update, a 5xx, a hang) fails. The prompts share
a long context, as a tenant's system prompt would: with the prefix cache on, the same tokens come under
every version's weights, and a cache keyed by tokens, or by name, would answer with another version's K/V.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from soak_reference import Expected
from soak_traffic import Outcome, Traffic, _not_ok, _stream_records, _token_ids

UNREGISTERED = None


@dataclass
class Change:
    name: str
    version: str | None  # the adapter whose files serve the name after the change; None: unregistered
    started: float
    ended: float | None = None  # None while the call is in flight


@dataclass
class Churn:
    names: list[str]
    versions: list[str]
    sources: dict[str, str]  # version -> the directory it is registered from
    references: dict[tuple[str, str], Expected]  # (prompt, version) -> greedy answer
    prompts: list[str]
    changes: list[Change] = field(default_factory=list)

    def current(self, name: str) -> str | None:
        done = [change for change in self.changes if change.name == name and change.ended is not None]
        return done[-1].version if done else UNREGISTERED

    def possible(self, name: str, sent: float, answered: float) -> set[str | None]:
        """What the name could have been served by at some instant between `sent` and `answered`."""
        before, during = UNREGISTERED, set()
        for change in self.changes:  # one churner: a name's changes never overlap, and are in order
            if change.name != name:
                continue
            if change.ended is not None and change.ended <= sent:
                before = change.version
            elif change.started < answered:
                during.add(change.version)
        return {before} | during


async def churn_loop(client, churn: Churn, every: float, deadline: float, rng: random.Random,
                     outcomes: dict[str, list[Outcome]]) -> None:
    """Every `every` seconds one churned name changes: registered if it is not, else updated to other files
    or unregistered, half and half."""
    while time.monotonic() + every < deadline:
        await asyncio.sleep(every)
        name = rng.choice(churn.names)
        await change(client, churn, name, rng, outcomes)


async def change(client, churn: Churn, name: str, rng: random.Random, outcomes: dict[str, list[Outcome]]) -> None:
    current = churn.current(name)
    if current is None:
        kind, version = "churn: register", rng.choice(churn.versions)
        call = client.post("/adapters", json={"name": name, "src": churn.sources[version]})
    elif rng.random() < 0.5:
        kind, version = "churn: update", rng.choice([v for v in churn.versions if v != current])
        call = client.post(f"/adapters/{name}/update", params={"src": churn.sources[version]})
    else:
        kind, version = "churn: unregister", UNREGISTERED
        call = client.delete(f"/adapters/{name}")
    record = Change(name, version, time.perf_counter())
    churn.changes.append(record)
    started = time.perf_counter()
    response = await call
    record.ended = time.perf_counter()
    if response.status_code != 200:
        # The change may not have happened: the name's state is unknown from here on, so the run fails.
        outcomes[kind].append(_not_ok(response, started))
        return
    outcomes[kind].append(Outcome(200, record.ended - started, True, counts_latency=False))


def churn_kinds(churn: Churn):
    """The request kinds that name churned adapters: a whole LMI answer and a streamed one."""

    async def churn_whole(traffic: Traffic, rng: random.Random) -> Outcome:
        name, prompt = rng.choice(churn.names), rng.choice(churn.prompts)
        sent = time.perf_counter()
        response = await traffic.client.post("/invocations", json={
            "inputs": prompt, "adapters": name, "parameters": {"max_new_tokens": traffic.max_new_tokens,
                                                               "details": True}})
        if response.status_code != 200:
            return _judge_refusal(response, churn, name, sent)
        return _judge_answer(response, churn, name, prompt, sent, _token_ids(response.json()))

    async def churn_stream(traffic: Traffic, rng: random.Random) -> Outcome:
        name, prompt = rng.choice(churn.names), rng.choice(churn.prompts)
        sent = time.perf_counter()
        response, records, _ = await _stream_records(traffic, "/invocations", {
            "inputs": prompt, "adapters": name, "stream": True,
            "parameters": {"max_new_tokens": traffic.max_new_tokens, "details": True}}, sse=False)
        if response.status_code != 200:
            return _judge_refusal(response, churn, name, sent)
        if not records or "generated_text" not in records[-1] or "error" in records[-1]:
            return _not_ok(response, sent, f"the stream ended without a whole answer: {records[-1:]}")
        ids = [record["token"]["id"] for record in records if record["token"]["id"] >= 0]
        return _judge_answer(response, churn, name, prompt, sent, ids)

    return [("churn lmi", churn_whole, 3), ("churn stream", churn_stream, 2)]


def _judge_answer(response, churn: Churn, name: str, prompt: str, sent: float, ids: list[int]) -> Outcome:
    answered = time.perf_counter()
    versions = churn.possible(name, sent, answered) - {UNREGISTERED}
    if any(tuple(ids) == churn.references[prompt, version].token_ids for version in versions):
        return Outcome(200, answered - sent, True)
    return _not_ok(response, sent, f"{name}: token ids {ids} are none of the versions it had meanwhile "
                                   f"({sorted(versions)})")


def _judge_refusal(response, churn: Churn, name: str, sent: float) -> Outcome:
    answered = time.perf_counter()
    refused_as_unknown = response.status_code == 400 and "is not registered" in response.text
    if refused_as_unknown and UNREGISTERED in churn.possible(name, sent, answered):
        return Outcome(400, answered - sent, True, counts_latency=False)
    return _not_ok(response, sent)


def churn_prompts(sentences: list[str]) -> list[str]:
    """One prompt per sentence, all starting with the same context: every sentence, a line each."""
    context = "".join(f"{sentence}\n" for sentence in sentences)
    return [f"{context}{sentence}\n" for sentence in sentences]


def build_churn(references: dict[tuple[str, str], Expected], sources: dict[str, str], num_names: int) -> Churn:
    """Churned names served by the server's own adapters' directories (`sources`, by adapter name);
    `references`: (prompt, adapter) -> its greedy answer, for the churn prompts under every adapter."""
    return Churn(names=[f"churn-{index}" for index in range(num_names)], versions=sorted(sources), sources=sources,
                 references=references, prompts=sorted({prompt for prompt, _ in references}))
