"""meshq.aio: the sync API's scenarios as coroutines, on real nodes on 127.0.0.1."""

from __future__ import annotations

import asyncio

import pytest

import meshq
import meshq.aio

pytestmark = pytest.mark.timeout(60)


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
            handed_off: list = []
            run_in_executor = loop.run_in_executor
            loop.run_in_executor = lambda *args: handed_off.append(args) or run_in_executor(*args)
            metas = [await client.produce("t", f"v{i}".encode(), partition=0) for i in range(1, 30)]
            loop.run_in_executor = run_in_executor
            assert handed_off == []  # no worker threads for the hot path (counting threads was flaky:
            # other tests' threads end meanwhile)
            assert client._direct.stats()["direct_produces"] == 29
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
