"""The copy throttle in the ``host`` room's replicas: a replica catching up gets at most the node's
``copy_rate_mb_per_s``; in-sync followers are never throttled (issue 19, item 6)."""

from __future__ import annotations

from tests.core.rooms.conftest import Net, batch, create_topic, produce_body

VALUE = b"x" * 50_000


def lagging_follower(**config):
    """Three nodes, topic ``t`` (1 partition, RF 3); one follower cut off while the leader takes
    3 MB: (net, leader, the lagging follower, the other follower)."""
    net = Net("n1", "n2", "n3", **config)
    create_topic(net.form(), "t", 1, 3, net=net)
    net.run(2.0)
    leader = net[net["n1"].core.partitions[("t", 0)].replica.leader]
    followers = sorted(n for n in ("n1", "n2", "n3") if n != leader.core.node_id)
    lagging, other = net[followers[0]], net[followers[1]]
    net.cut(followers[0])
    for sequence in range(60):
        leader.request("produce", produce_body(acks="leader"), (batch([VALUE], base_sequence=sequence),))
        net.run(0.01)
    net.run(leader.config.failure_timeout_s + 1.0)  # past replica_lag_s: the cut follower is out of sync
    assert followers[0] not in leader.core.partitions[("t", 0)].replica.in_sync(net.clock.now_s)
    assert other.core.partitions[("t", 0)].log.end_offset == 60
    assert lagging.core.partitions[("t", 0)].log.end_offset == 0
    return net, leader, lagging, other


def test_a_catching_up_replica_is_copied_at_the_configured_rate():
    rate_mb = 0.5
    net, leader, lagging, other = lagging_follower(copy_rate_mb_per_s=rate_mb)
    throttle = leader.core.host.copy_throttle
    net.heal()
    start_s, sent_before = net.clock.now_s, throttle.bytes_sent
    log = lagging.core.partitions[("t", 0)].log
    net.run(2.0)
    elapsed = net.clock.now_s - start_s
    copied = log.size_bytes
    limit = throttle.burst_bytes + rate_mb * 1e6 * elapsed + len(VALUE) + 1024  # + one batch of overshoot
    assert 0 < copied <= limit, (copied, limit)
    assert throttle.bytes_sent - sent_before == copied
    assert log.end_offset < 60 and throttle.waits > 0
    # meanwhile new writes reach the in-sync follower at once: it is never throttled
    leader.request("produce", produce_body(acks="quorum"), (batch([b"live"], base_sequence=60),))
    net.run(0.2)
    assert other.core.partitions[("t", 0)].log.end_offset == 61
    # and the copy does finish
    net.run_until(lambda: log.end_offset == 61, 30.0)


def test_zero_copies_as_fast_as_the_follower_takes_it():
    net, leader, lagging, _other = lagging_follower(copy_rate_mb_per_s=0)
    net.heal()
    net.run_until(lambda: lagging.core.partitions[("t", 0)].log.end_offset == 60, 1.0)
    assert leader.core.host.copy_throttle.waits == 0


def test_a_copy_yields_to_live_writes_on_its_leader():
    from meshq.core.throttle import LIVE_SHARE

    rate_mb = 0.5
    net, leader, lagging, _other = lagging_follower(copy_rate_mb_per_s=rate_mb)
    throttle = leader.core.host.copy_throttle
    assert not throttle.yielding(net.clock.now_s)  # the writes that made the lag are over a window old
    net.heal()
    start_s = net.clock.now_s
    log = lagging.core.partitions[("t", 0)].log
    for sequence in range(60, 80):  # a small live write every 0.1 s
        leader.request("produce", produce_body(acks="quorum"), (batch([b"live"], base_sequence=sequence),))
        net.run(0.1)
    elapsed = net.clock.now_s - start_s
    # the share plus the write rate (a few hundred bytes a second here) for the one replica catching up
    limit = throttle.burst_bytes + (LIVE_SHARE * rate_mb * 1e6 + 5000) * elapsed + len(VALUE) + 4096
    assert 0 < log.size_bytes <= limit, (log.size_bytes, limit)
    status = leader.request("status", {}).body["status"]["copy"]
    assert status["yielding_to_writes"] and LIVE_SHARE * rate_mb <= status["rate_now_mb_per_s"] < LIVE_SHARE * rate_mb + 0.01
    net.run_until(lambda: log.end_offset == 80, 60.0)  # and, the writes over, it finishes at the whole rate
