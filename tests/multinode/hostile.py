"""A hostile client (run as its own process by tests/multinode/test_hostile_frames.py).

``python -m tests.multinode.hostile SPEC_JSON`` throws ``count`` hostile frames, as fast as
pyzmq takes them, at the ROUTER and PUB/SUB ports of the nodes named in the spec, and prints
one JSON line: how many frames of each kind it sent to each node, and how many of those no
node may accept (``invalid``: each must be dropped and counted in ``invalid_frames``).

Kinds (one pool of frames per node, drawn from a seeded ``random.Random``, sent round-robin):

- ``random``: random bytes, 0-1500 of them, in 1-3 frames;
- ``truncated``: a valid request header cut short;
- ``wrong_types``: a valid envelope whose body (or header field) has the wrong type or range;
- ``huge_lengths``: msgpack declaring a 4 GiB str/bin/array/map, and record batches whose
  length and record count claim far more than the frame holds;
- ``wrong_cluster``: a valid produce for another cluster;
- ``stale_epochs``: raft appends of term 0 and replication appends of epoch 0 naming the real
  nodes (valid frames, refused by the protocol: not counted as invalid);
- ``replayed``: a replication append carrying a real, correctly stamped record batch at
  offset 0 with a stale epoch (valid frame, refused);
- ``spoofed``: replication appends of the current epoch in another node's name: to a
  follower with a batch failing its CRC, to the leader in another replica's name (valid
  frames, refused; each logged at most once per thousand);
- at the end, one ``status`` request per node: its answer shows every frame before it arrived;
- on the PUB/SUB side: the client announces itself (``hello``) with the address of a PUB it
  binds, and publishes junk events and data frames to every node's SUB; it also connects an
  XSUB to every node's PUB and sends junk subscriptions.
"""

from __future__ import annotations

import json
import random
import struct
import sys
import time
from typing import Any

import msgpack
import zmq

from meshq.config import PROTOCOL_VERSION
from meshq.core import batch as batch_format
from meshq.core.pubsub import frames as pubsub_frames

HUGE_HEADERS = [b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff"]


def header(cluster: str, sender: str, type_: str, request_id: int, body: Any, version: Any = PROTOCOL_VERSION) -> bytes:
    return msgpack.packb([version, cluster, sender, type_, request_id, body], use_bin_type=True)


def produce_body(topic: str, partition: int) -> dict:
    return {"topic": topic, "partition": partition, "acks": "quorum", "timeout_ms": 1000}


def huge_batch(rng: random.Random) -> bytes:
    batch = bytearray(batch_format.encode_batch([(None, b"v", None, 1)]))
    struct.pack_into(">I", batch, 8, rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 1 << 30]))  # batch_length
    struct.pack_into(">i", batch, 57, rng.choice([0x7FFFFFFF, 1 << 24]))  # record_count
    return bytes(batch)


def pool_for(rng: random.Random, spec: dict, target: str) -> list[tuple[str, bool, list[bytes]]]:
    """(kind, invalid?, frames) for one node."""
    cluster, topic, nodes = spec["cluster"], spec["topic"], [n["node_id"] for n in spec["nodes"]]
    good = batch_format.encode_batch([(b"k", b"hostile", None, 1)])
    replay = batch_format.stamp(good, 0, 0)
    pool: list[tuple[str, bool, list[bytes]]] = []
    for i in range(spec["pool"]):
        kinds = ("random", "truncated", "wrong_types", "huge_lengths", "wrong_cluster", "stale_epochs",
                 "replayed", "spoofed")
        kind = kinds[i % len(kinds)]
        request_id = rng.randrange(1, 1 << 40)
        if kind == "random":
            frames = [rng.randbytes(rng.randrange(0, 1500)) for _ in range(rng.randrange(1, 4))]
            invalid = True
        elif kind == "truncated":
            full = header(cluster, "hostile", "produce", request_id, produce_body(topic, 0))
            frames, invalid = [full[: rng.randrange(1, len(full))], good], True
        elif kind == "wrong_types":
            body: Any = produce_body(topic, 0)
            field, value = rng.choice([("partition", "zero"), ("acks", 7), ("timeout_ms", -1.5), ("topic", b"t"),
                                       ("partition", -5), ("acks", None)])
            body[field] = value
            choice = rng.randrange(4)
            if choice == 0:
                frames = [header(cluster, "hostile", "produce", request_id, body), good]
            elif choice == 1:
                frames = [header(cluster, 17, "produce", request_id, produce_body(topic, 0)), good]
            elif choice == 2:
                frames = [header(cluster, "hostile", "produce", -1, produce_body(topic, 0)), good]
            else:
                frames = [header(cluster, "hostile", "produce", request_id, [1, 2, 3]), good]
            invalid = True
        elif kind == "huge_lengths":
            if rng.random() < 0.5:
                frames = [b"\x96\x01" + rng.choice(HUGE_HEADERS) + rng.randbytes(rng.randrange(0, 64))]
                invalid = True
            else:  # a valid envelope whose batch lies about its size: the handler refuses it (protocol error)
                frames = [header(cluster, "hostile", "produce", request_id, produce_body(topic, 0)), huge_batch(rng)]
                invalid = False
        elif kind == "wrong_cluster":
            frames = [header(cluster + "-other", "hostile", "produce", request_id, produce_body(topic, 0)), good]
            invalid = True
        elif kind == "stale_epochs":
            leader = rng.choice(nodes)
            if rng.random() < 0.5:
                body = {"term": 0, "leader": leader, "prev_index": -1, "prev_term": 0, "commit": -1, "entries": []}
                frames = [header(cluster, leader, "raft_append", 0, body)]
            else:
                body = {"topic": topic, "partition": rng.randrange(2), "epoch": 0, "cv": 0, "leader": leader,
                        "prev_offset": -1, "prev_epoch": 0, "hw": 0, "epoch_start": 0, "log_start": 0}
                frames = [header(cluster, leader, "repl_append", 0, body)]
            invalid = False
        elif kind == "spoofed":
            # The current epoch and configuration, in the name of the partition's leader (to a
            # follower) or of another replica (to the leader): refused — a batch failing its CRC,
            # "two leaders" — and logged by the node at most once per thousand.
            p = spec["partitions"][rng.randrange(len(spec["partitions"]))]
            if p["leader"] == target:
                sender = next(r for r in p["replicas"] if r != target)
                body = {"topic": topic, "partition": p["partition"], "epoch": p["epoch"], "cv": p["cv"],
                        "leader": sender, "prev_offset": -1, "prev_epoch": 0, "hw": 0, "epoch_start": 0,
                        "log_start": 0}
                frames = [header(cluster, sender, "repl_append", 0, body)]
            else:
                broken = bytearray(replay)
                broken[-1] ^= 0x01  # (inside the CRC'd bytes)
                body = {"topic": topic, "partition": p["partition"], "epoch": p["epoch"], "cv": p["cv"],
                        "leader": p["leader"], "prev_offset": -1, "prev_epoch": 0, "hw": 0, "epoch_start": 0,
                        "log_start": 0}
                frames = [header(cluster, p["leader"], "repl_append", 0, body), bytes(broken)]
            invalid = False
        else:  # replayed
            leader = rng.choice(nodes)
            body = {"topic": topic, "partition": rng.randrange(2), "epoch": 0, "cv": 0, "leader": leader,
                    "prev_offset": -1, "prev_epoch": 0, "hw": 1, "epoch_start": 0, "log_start": 0}
            frames = [header(cluster, leader, "repl_append", 0, body), replay]
            invalid = False
        pool.append((kind, invalid, frames))
    return pool


def pub_pool(rng: random.Random, spec: dict, node_id: str) -> list[list[bytes]]:
    """Junk published to ``node_id``'s SUB: it passes the SUB's prefix filters, then must fail."""
    cluster = spec["cluster"]
    prefix = pubsub_frames.data_prefix(node_id)
    out = []
    for i in range(256):
        choice = i % 4
        if choice == 0:
            out.append([pubsub_frames.CONTROL_PREFIX + rng.randbytes(rng.randrange(0, 200))])
        elif choice == 1:
            out.append([header(cluster + "-other", "spy", "heartbeat", 0, {})])
        elif choice == 2:
            out.append([prefix + rng.randbytes(rng.randrange(0, 100)), rng.randbytes(rng.randrange(0, 100))])
        else:
            out.append([prefix + struct.pack(">Q", 1) + b"\xdd\xff\xff\xff\xff", b""])
    return out


def main() -> None:
    spec = json.loads(sys.argv[1])
    rng = random.Random(spec["seed"])
    context = zmq.Context()
    cluster = spec["cluster"]
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, 100_000)
    pub_port = pub.bind_to_random_port("tcp://127.0.0.1")
    dealers, pools, pubs, xsubs = [], [], [], []
    for node in spec["nodes"]:
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(node["address"])
        dealers.append(dealer)
        pools.append(pool_for(rng, spec, node["node_id"]))
        pubs.append(pub_pool(rng, spec, node["node_id"]))
        xsub = context.socket(zmq.XSUB)
        xsub.setsockopt(zmq.LINGER, 0)
        xsub.connect(node["pub_address"])
        xsubs.append(xsub)
        # announce a "client member" whose PUB is ours: the node's SUB connects to it
        member = {"node_id": f"spy{spec['seed'] % 1000}", "address": "tcp://127.0.0.1:9",
                  "pub_address": f"tcp://127.0.0.1:{pub_port}", "role": "client", "incarnation": 1}
        dealer.send_multipart([header(cluster, member["node_id"], "hello", 1, {"member": member})])
    time.sleep(0.3)  # (PUB/SUB: what is published before a node's SUB connected is lost; counted as sent anyway)
    sent = [{"total": 0, "invalid": 0, "published": 0, "subscriptions": 0} for _ in spec["nodes"]]
    kinds: dict[str, int] = {}
    count = spec["count"]
    started = time.monotonic()
    i = 0
    while i < count:
        for n, dealer in enumerate(dealers):
            if i >= count:
                break
            slot = i // len(dealers)
            if slot % 10 == 9:  # one frame in ten on the PUB/SUB side
                if slot % 20 == 19:
                    topic = rng.randbytes(rng.randrange(0, 64))
                    xsubs[n].send(b"\x01" + topic if rng.random() < 0.9 else rng.randbytes(8))
                    sent[n]["subscriptions"] += 1
                else:
                    pub.send_multipart(pubs[n][slot % len(pubs[n])])
                    sent[n]["published"] += 1
                    kinds["published"] = kinds.get("published", 0) + 1
            else:
                kind, invalid, frames = pools[n][slot % len(pools[n])]
                dealer.send_multipart(frames)
                sent[n]["invalid"] += invalid
                kinds[kind] = kinds.get(kind, 0) + 1
            sent[n]["total"] += 1
            i += 1
        if i % 2048 < len(dealers):
            for dealer in dealers:  # read what the nodes answered (errors, refusals): nothing piles up here
                while dealer.poll(0):
                    dealer.recv_multipart()
    elapsed = time.monotonic() - started
    # One status request on each DEALER after the junk: a node answers it only once it has read
    # every frame before it (one connection keeps its order), so when all answered, all arrived.
    for dealer in dealers:
        dealer.send_multipart([header(cluster, "hostile", "status", 4242, {})])
    for dealer in dealers:
        deadline = time.monotonic() + 120
        while True:
            assert dealer.poll(max(0, int((deadline - time.monotonic()) * 1000))), "a node never answered status"
            reply = dealer.recv_multipart()
            unpacked = msgpack.unpackb(reply[0], raw=False, strict_map_key=False)
            if unpacked[3] == "status_ok" and unpacked[4] == 4242:
                break
    print(json.dumps({"sent": sent, "kinds": kinds, "seconds": elapsed,
                      "delivered_seconds": time.monotonic() - started}), flush=True)
    for sock in [*dealers, *xsubs, pub]:
        sock.close(linger=2000)
    context.term()


if __name__ == "__main__":
    main()
