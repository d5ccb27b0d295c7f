"""meshq.aio: the sync API's scenarios as coroutines, on real nodes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import threading

import pytest

import meshq
import meshq.aio

pytestmark = pytest.mark.timeout(60)


class ThreadWatch:
    """Records every hand-off to a thread while it watches: the loop's ``run_in_executor`` (also
    behind ``asyncio.to_thread``) and any ``threading.Thread.start``. Counting live threads instead
    was flaky: other tests' threads end meanwhile."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.seen: list[str] = []
        self._executor = loop.run_in_executor
        self._start = threading.Thread.start
        seen, executor, start = self.seen, self._executor, self._start

        def run_in_executor(*args):
            seen.append(f"run_in_executor{args[1:2]}")
            return executor(*args)

        def thread_start(thread):
            seen.append(f"Thread.start({thread.name})")
            return start(thread)

        loop.run_in_executor = run_in_executor
        threading.Thread.start = thread_start

    def stop(self) -> list[str]:
        self.loop.run_in_executor = self._executor
        threading.Thread.start = self._start
        return self.seen


@pytest.fixture
def storage(tmp_path):
    with meshq.Node(cluster="aio", data_dir=tmp_path / "data", mdns=False, partitions=2, replication_factor=1) as n:
        yield n


def read_back(node: meshq.Node, topic: str) -> list[tuple[int, int, bytes]]:
    with node.consumer(topic) as consumer:
        out = []
        while True:
            records = consumer.poll(timeout=0.5)
            if not records:
                return sorted(out)
            out += [(r.partition, r.offset, r.value) for r in records]


def client_node(storage: meshq.Node) -> meshq.aio.Node:
    return meshq.aio.Node(cluster="aio", seeds=[storage.address.removeprefix("tcp://")], mdns=False, role="client")


def test_a_storage_node_on_asyncio_creates_produces_and_reports_status(tmp_path):
    async def main():
        async with meshq.aio.Node(cluster="aio1", data_dir=tmp_path / "d", mdns=False, partitions=2,
                                  replication_factor=1) as node:
            await node.wait_ready(10)
            members = await node.wait_for_members(1, timeout=10)
            assert [m["node_id"] for m in members] == [node.node_id]
            config = await node.create_topic("orders", partitions=3)
            assert (config.name, config.partitions) == ("orders", 3)
            assert (await node.topic("orders")).partitions == 3
            first = await node.produce("orders", b"a", key=b"k", partition=1)  # led here: through the runtime
            batch = await node.produce_batch("orders", [b"b", b"c"], partition=1)
            queued = [node.produce_async("orders", f"q{i}".encode(), partition=1) for i in range(5)]
            await node.flush(timeout=10)
            assert all(f.done() for f in queued)
            offsets = [first.offset, *(m.offset for m in batch), *[(await f).offset for f in queued]]
            assert offsets == list(range(8))
            status = await node.status()
            (topic,) = [t for t in status["topics"] if t["name"] == "orders"]
            assert topic["partitions"][1]["high_watermark"] == 8
            assert "orders" in [t.name for t in await node.list_topics()]
            return node.sync

    sync = asyncio.run(main())
    assert sync._stopped  # stopped by the context manager


def test_a_client_produces_from_the_event_loop_on_its_own_socket(storage):
    async def main():
        async with client_node(storage) as client:
            await client.wait_ready(10)
            await client.produce("t", b"v0", partition=0)  # the topic is new: through the runtime
            loop = asyncio.get_running_loop()
            watch = ThreadWatch(loop)
            metas = [await client.produce("t", f"v{i}".encode(), partition=0) for i in range(1, 30)]
            assert watch.stop() == []  # no worker threads for the hot path
            # Most go out on the loop's own socket; on a loaded machine a leader that missed its
            # heartbeats looks suspect for a moment and a few go through the runtime instead.
            assert client._direct.stats()["direct_produces"] >= 1
            return [m.offset for m in metas]

    offsets = asyncio.run(main())
    assert offsets == list(range(1, 30))
    assert read_back(storage, "t") == [(0, i, f"v{i}".encode()) for i in range(30)]


def test_concurrent_produces_on_one_loop_are_each_stored_once(storage):
    async def main():
        async with client_node(storage) as client:
            await client.wait_ready(10)
            await client.create_topic("c", partitions=2, replication_factor=1)
            metas = await asyncio.gather(*(client.produce("c", f"v{i}".encode(), partition=i % 2)
                                           for i in range(200)))
            return metas

    metas = asyncio.run(main())
    assert sorted((m.partition, m.offset) for m in metas) == sorted(
        [(0, o) for o in range(100)] + [(1, o) for o in range(100)])
    stored = read_back(storage, "c")
    assert sorted(v for _p, _o, v in stored) == sorted(f"v{i}".encode() for i in range(200))


def test_errors_are_raised_in_the_coroutine(storage):
    async def main():
        async with client_node(storage) as client:
            await client.wait_ready(10)
            with pytest.raises(meshq.UsageError, match="acks must be one of"):
                await client.produce("t", b"x", acks="most")
            with pytest.raises(meshq.UnknownTopicError):
                await client.topic("never-created")
            with pytest.raises(meshq.InvalidTopicError):
                await client.create_topic("__reserved")

    asyncio.run(main())


def test_a_produce_waiting_when_the_node_stops_fails_with_node_stopped(storage):
    async def main():
        client = client_node(storage)
        await client.start()
        await client.wait_ready(10)
        await client.produce("s", b"first", partition=0)
        storage.stop()  # the leader goes away: the next produce waits for an answer
        task = asyncio.create_task(client.produce("s", b"second", partition=0, timeout=30))
        await asyncio.sleep(0.3)
        await client.stop()
        with pytest.raises(meshq.MeshqError):
            await task

    asyncio.run(main())


def test_an_async_consumer_reads_commits_and_resumes_in_its_group(storage):
    async def main():
        async with client_node(storage) as client:
            await client.wait_ready(10)
            for i in range(10):
                await client.produce("c", f"v{i}".encode(), partition=i % 2)
            watch = ThreadWatch(asyncio.get_running_loop())
            async with await client.consumer("c") as plain:  # no group: every partition from the start
                got = []
                while len(got) < 10:
                    got += await plain.poll(timeout=2.0)
            assert sorted(r.value for r in got) == [f"v{i}".encode() for i in range(10)]
            assert watch.stop() == []  # no worker threads for polling
            async with await client.consumer("c", group="g", auto_commit=False) as member:
                first = []
                async for record in member:
                    first.append(record)
                    if len(first) == 4:
                        break
                await member.commit()
                assert sum((await member.committed()).values()) == 4
            async with await client.consumer("c", group="g") as member:  # resumes after the commit
                rest = []
                while len(rest) < 6:
                    rest += await member.poll(timeout=2.0)
                assert await member.poll(timeout=0.3) == []
            assert sorted(r.value for r in first + rest) == [f"v{i}".encode() for i in range(10)]

    asyncio.run(main())


def test_an_async_consumer_reports_its_assignment_and_seeks(storage):
    async def main():
        async with client_node(storage) as client:
            await client.wait_ready(10)
            for i in range(6):
                await client.produce("s", f"v{i}".encode(), partition=0)
            async with await client.consumer("s", group="g2") as member:
                deadline = asyncio.get_running_loop().time() + 10
                while not await member.assignment():  # the coordinator assigns within a poll or two
                    assert asyncio.get_running_loop().time() < deadline
                    await member.poll(timeout=0.2)
                assert 0 in await member.assignment()
                await member.seek(0, 4)
                assert member.position(0) == 4
                got = []
                while len(got) < 2:
                    got += await member.poll(timeout=2.0)
                assert [r.value for r in got] == [b"v4", b"v5"]
                await member.seek(0, "earliest")
                again = []
                while len(again) < 6:
                    again += await member.poll(timeout=2.0)
                assert [r.offset for r in again] == list(range(6))

    asyncio.run(main())


def test_two_async_group_members_split_the_partitions_and_the_last_takes_them_all(storage):
    async def main():
        async with client_node(storage) as client:
            await client.wait_ready(10)
            await client.create_topic("s", partitions=4)
            a = await client.consumer("s", group="split")
            b = await client.consumer("s", group="split")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while sorted(a.partitions + b.partitions) != [0, 1, 2, 3] or not a.partitions or not b.partitions:
                assert loop.time() < deadline, (a.partitions, b.partitions)
                await asyncio.gather(a.poll(timeout=0.1), b.poll(timeout=0.1))
            await b.close()  # leaves: a takes every partition at once
            while a.partitions != [0, 1, 2, 3]:
                assert loop.time() < deadline, a.partitions
                await a.poll(timeout=0.1)
            await a.close()

    asyncio.run(main())


def test_a_coroutine_handler_serves_requests_on_the_event_loop(storage):
    async def main():
        async with client_node(storage) as server, client_node(storage) as caller:
            await server.wait_ready(10)
            await caller.wait_ready(10)
            serving_loop = asyncio.get_running_loop()
            loops = []

            async def echo(payload: bytes) -> bytes:
                loops.append(asyncio.get_running_loop())
                await asyncio.sleep(0.01)
                if payload == b"boom":
                    raise ValueError("bad payload")
                return payload.upper()

            loop = asyncio.get_running_loop()
            watch = ThreadWatch(loop)
            handle = await server.serve("echo", echo, concurrency=4)
            deadline = loop.time() + 10
            while True:  # the caller learns of the service from the mesh
                try:
                    assert await caller.request("echo", b"hi", timeout=1.0) == b"HI"
                    break
                except meshq.NoRespondersError:
                    assert loop.time() < deadline
                    await asyncio.sleep(0.05)
            replies = await asyncio.gather(*(caller.request("echo", f"m{i}", timeout=5.0) for i in range(20)))
            assert replies == [f"M{i}".encode() for i in range(20)]
            assert await server.request("echo", b"local", timeout=2.0) == b"LOCAL"
            with pytest.raises(meshq.RemoteError, match="ValueError"):
                await caller.request("echo", b"boom", timeout=2.0)
            assert set(loops) == {serving_loop}
            assert watch.stop() == []  # no worker pool for a coroutine handler
            await handle.close()
            with pytest.raises(meshq.NoRespondersError):
                await server.request("echo", b"gone", timeout=1.0)

    asyncio.run(main())


def test_async_subscriptions_receive_local_and_remote_publishes_and_end_on_close(storage):
    async def main():
        async with client_node(storage) as a, client_node(storage) as b:
            await a.wait_ready(10)
            await b.wait_ready(10)
            sub = await b.subscribe("sensors.*.temp")
            workers = [await b.subscribe("jobs", queue="w"), await b.subscribe("jobs", queue="w")]
            b.publish("sensors.local.temp", b"here")  # this node's own subscription: at once
            local = await sub.recv(timeout=2.0)
            assert (local.subject, local.data) == ("sensors.local.temp", b"here")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while True:  # a learns of b's interest from the mesh
                a.publish("sensors.far.temp", b"probe", headers={"h": b"1"})
                try:
                    probe = await sub.recv(timeout=0.1)
                    break
                except meshq.TimeoutError:
                    assert loop.time() < deadline
            assert (probe.data, probe.headers, probe.source) == (b"probe", {"h": b"1"}, a.node_id)
            while True:  # drain further probes
                try:
                    await sub.recv(timeout=0.3)
                except meshq.TimeoutError:
                    break
            watch = ThreadWatch(loop)
            for i in range(50):
                a.publish("sensors.far.temp", f"{i}".encode())
                a.publish("sensors.far.humidity", b"no match")
            got = [(await sub.recv(timeout=2.0)).data for _ in range(50)]
            assert got == [f"{i}".encode() for i in range(50)]
            assert watch.stop() == []  # delivered by call_soon_threadsafe, no thread per subscription
            for i in range(20):  # each message to one member of the queue group
                b.publish("jobs", f"j{i}".encode())
            jobs = []
            for w in workers:
                while True:
                    try:
                        jobs.append((await w.recv(timeout=0.3)).data)
                    except meshq.TimeoutError:
                        break
            assert sorted(jobs) == sorted(f"j{i}".encode() for i in range(20))
            received = []

            async def read_all():
                async for message in sub:
                    received.append(message.data)

            reader = asyncio.create_task(read_all())
            a.publish("sensors.x.temp", b"last")
            while not received:
                await asyncio.sleep(0.01)
                assert loop.time() < deadline
            await sub.close()
            await asyncio.wait_for(reader, 2.0)  # iteration ends once the subscription is closed
            assert received == [b"last"]
            with pytest.raises(meshq.SubscriptionClosedError):
                await sub.recv(timeout=0.1)
            for w in workers:
                await w.close()
            async with await a.subscribe("left.open") as still_open:  # closed on leaving the block
                pass
            assert still_open.closed

    asyncio.run(main())


def test_async_shared_consumers_ack_nack_and_redeliver(storage):
    async def main():
        async with client_node(storage) as client:
            await client.wait_ready(10)
            await client.produce_batch("work", [f"w{i}".encode() for i in range(10)], partition=0)
            async with await client.consumer("work", group="pool", mode="shared", ack_timeout=5.0) as c:
                seen = []
                while len(seen) < 10:
                    for record in await c.poll(timeout=2.0):
                        seen.append(record.value)
                        if record.value == b"w3" and seen.count(b"w3") == 1:
                            c.nack(record)  # handed out again
                        else:
                            c.ack(record)
                    assert len(seen) < 30
                await c.flush_acks()
                while seen.count(b"w3") < 2:
                    for record in await c.poll(timeout=2.0):
                        seen.append(record.value)
                        c.ack(record)
                await c.flush_acks()
                assert await c.poll(timeout=0.3) == []
                assert sorted(set(seen)) == sorted(f"w{i}".encode() for i in range(10))
                assert c.stats["acked"] == 10

    asyncio.run(main())


def _zeroconf_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if "zeroconf" in t.name.lower()]


def test_mdns_discovery_runs_on_the_event_loop_with_async_zeroconf(tmp_path):
    """An aio storage node announces itself and an aio client finds it by mDNS alone (pinned to
    127.0.0.1), both with zeroconf on the event loop: no zeroconf thread while they run."""
    from meshq.io.aio_discovery import AsyncDiscovery

    cluster = f"aio-mdns-{tmp_path.name[-8:]}"

    async def scenario():
        before = _zeroconf_threads()
        async with meshq.aio.Node(cluster=cluster, data_dir=tmp_path / "d", interfaces=["127.0.0.1"],
                                  partitions=1, replication_factor=1) as storage_node:
            assert isinstance(storage_node.sync._discovery, AsyncDiscovery)
            async with meshq.aio.Node(cluster=cluster, interfaces=["127.0.0.1"], role="client") as client:
                assert isinstance(client.sync._discovery, AsyncDiscovery)
                assert _zeroconf_threads() == before  # AsyncZeroconf uses this loop, no thread of its own
                await client.wait_ready(timeout=15)
                metadata = await client.produce("found", b"by mdns", acks="leader")
                assert metadata.offset == 0
            # a threaded node of the same cluster finds the aio one too (same records, same filter); in a
            # worker thread, so that the loop goes on answering mDNS queries for the aio storage node
            def threaded_client() -> int:
                with meshq.Node(cluster=cluster, interfaces=["127.0.0.1"], role="client") as sync_client:
                    sync_client.wait_ready(timeout=15)
                    return sync_client.produce("found", b"again", acks="leader").offset

            assert await asyncio.to_thread(threaded_client) == 1
            discovery = storage_node.sync._discovery
        assert discovery._aiozc is None and discovery._stop.is_set()  # closed with the node

    asyncio.run(scenario())


def test_an_operations_own_timeout_keeps_its_message_and_only_the_wait_running_out_says_so():
    """meshq.TimeoutError is a builtin TimeoutError, which asyncio.TimeoutError is since Python 3.11: the
    error an operation raised (an rpc's "no reply ... may or may not have run") must not be replaced by the
    wait's own "did not complete within" message."""
    from concurrent.futures import Future

    async def main():
        failed: Future = Future()
        failed.set_exception(meshq.TimeoutError("no reply from service 'echo' in time; it may or may not have run"))
        with pytest.raises(meshq.TimeoutError, match="may or may not have run"):
            await meshq.aio.Node._settled(failed, 1.0, "request to 'echo'")
        with pytest.raises(meshq.TimeoutError, match="did not complete within 0.1 s"):
            await meshq.aio.Node._settled(Future(), 0.1, "request to 'echo'")

    asyncio.run(main())
