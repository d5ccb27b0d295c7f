"""A tiny deterministic driver for NodeCore in unit tests: fake clock, in-memory storage,
and a loopback 'network' that moves Send/Reply effects between cores by hand."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from meshq.config import NodeConfig
from meshq.core import wire
from meshq.core.events import (
    Connect,
    Disconnect,
    Fail,
    LogsSynced,
    ProduceCommand,
    Publish,
    Reply,
    ReplyReceived,
    RequestReceived,
    Resolve,
    ResolveProduce,
    RunHandler,
    RunHandlers,
    Send,
    Subscribe,
    SyncLogs,
    Unsubscribe,
)
from meshq.core.node import NodeCore
from meshq.log.memory import MemoryStorage


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0
        self.wall_ms_value = 1_700_000_000_000

    def wall_ms(self) -> int:
        return self.wall_ms_value + int((self.now_s - 1000.0) * 1000)


@dataclass
class Outcome:
    """Collects what a waiter was told."""

    results: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    def settle(self, indexes, records, topic, partition, base_offset, error) -> None:
        if error is not None:
            self.errors.append(error)
        else:
            self.results.extend((topic, partition, base_offset + j) for j, _ in enumerate(indexes))


class CoreHarness:
    """One NodeCore plus everything needed to drive it by hand."""

    def __init__(self, node_id: str = "n1", storage: Any = None, clock: FakeClock | None = None,
                 public_key: str = "", **config: Any) -> None:
        config.setdefault("data_dir", "/nonexistent")
        config.setdefault("mdns", False)
        self.config = NodeConfig(node_id=node_id, **config)
        self.clock = clock or FakeClock()
        self.storage = storage if storage is not None else MemoryStorage()
        self.core = NodeCore(self.config, node_id, self.storage, random.Random(7), self.clock.wall_ms)
        self.sent: list[Send] = []
        self.replies: list[Reply] = []
        self.syncs: list[SyncLogs] = []
        self.resolved: dict[int, Any] = {}
        self.failed: dict[int, Any] = {}
        self.connects: list[Connect] = []
        self.published: list[Publish] = []
        self.jobs: list[RunHandler] = []  # handlers the core asked to run (request/reply)
        self.workers: list[RunHandlers] = []  # how they were handed out (one worker each)
        self.auto_sync = True
        # (``public_key``: the node runs with keys, as a keyed runtime starts it; "" without)
        self.apply(self.core.start(f"tcp://127.0.0.1:{9000 + hash(node_id) % 100}", self.clock.now_s,
                                   public_key=public_key))

    # -- effects
    def apply(self, effects: list) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                self.sent.append(effect)
            elif isinstance(effect, Reply):
                self.replies.append(effect)
            elif isinstance(effect, ResolveProduce):
                effect.waiter.settle(effect.indexes, effect.records, effect.topic, effect.partition,
                                     effect.base_offset, effect.error)
            elif isinstance(effect, Resolve):
                self.resolved[effect.waiter] = effect.result
            elif isinstance(effect, Fail):
                self.failed[effect.waiter] = effect.error
            elif isinstance(effect, SyncLogs):
                self.syncs.append(effect)
                if self.auto_sync:
                    self.sync(effect.keys)
            elif isinstance(effect, (Connect, Disconnect)):
                self.connects.append(effect)
            elif isinstance(effect, Publish):
                self.published.append(effect)
            elif isinstance(effect, (Subscribe, Unsubscribe)):
                pass
            elif isinstance(effect, RunHandlers):
                self.jobs.extend(effect.jobs)
                self.workers.append(effect)
            else:
                raise AssertionError(effect)

    def sync(self, keys) -> None:
        for key in keys:
            state = self.core.partitions.get(key)
            if state is not None:
                state.log.sync()
        self.apply(self.core.handle(LogsSynced(frozenset(keys)), self.clock.now_s))

    def handle(self, event: Any) -> None:
        self.apply(self.core.handle(event, self.clock.now_s))

    def advance(self, seconds: float) -> None:
        self.clock.now_s += seconds
        deadline = self.core.next_deadline()
        while deadline is not None and deadline <= self.clock.now_s:
            self.apply(self.core.on_timer(self.clock.now_s))
            deadline = self.core.next_deadline()

    # -- convenience calls
    def produce(self, topic: str, values: list[bytes], keys: list | None = None, acks: str = "leader",
                partition: int | None = None, timeout_s: float = 5.0) -> Outcome:
        outcome = Outcome()
        keys = keys or [None] * len(values)
        records = [(k, v, None, self.clock.wall_ms()) for k, v in zip(keys, values)]
        self.handle(ProduceCommand(topic, records, outcome, partition, acks, self.clock.now_s + timeout_s))
        return outcome

    _next_token = 0

    def command(self, command: Any) -> int:
        """Hand ``command`` (a meshq.core.events command) to the core; returns its waiter token."""
        CoreHarness._next_token += 1
        token = CoreHarness._next_token
        command.waiter = token
        self.handle(command)
        return token

    def request(self, type_: str, body: dict, payloads: tuple = (), request_id: int = 77,
                route: Any = b"peer", caller: str | None = None) -> wire.Message | None:
        """Deliver a raw request to the server half (from ``caller``: see meshq.core.acl); return the decoded
        reply (if any)."""
        before = len(self.replies)
        self.handle(RequestReceived(route, wire.Message(type_, "peer", request_id, body, payloads), caller))
        if len(self.replies) == before:
            return None
        return wire.decode(self.replies[-1].frames, self.config.cluster)


def pump(client: CoreHarness, server: CoreHarness, rounds: int = 20, drop_replies: int = 0) -> int:
    """Move messages between a client core and a server core until quiet; returns replies dropped."""
    dropped = 0
    for _ in range(rounds):
        moved = False
        while client.sent:
            send = client.sent.pop(0)
            message = wire.decode(send.frames, server.config.cluster)
            server.handle(RequestReceived(("client", send.peer), message))
            moved = True
        while server.replies:
            reply = server.replies.pop(0)
            if dropped < drop_replies:
                dropped += 1
                continue
            message = wire.decode(reply.frames, client.config.cluster)
            client.handle(ReplyReceived(server.core.node_id, message))
            moved = True
        if not moved:
            break
    return dropped
