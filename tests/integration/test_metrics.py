"""``--metrics-port``: a real HTTP scrape of the Prometheus endpoint, parsed with prometheus_client's
own text parser; the latency histograms count what the node did (issue #16 item 5)."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import meshq
from meshq.core.latency import LatencyHistogram
from tests.procs import NodeProcess, free_port

pytestmark = pytest.mark.timeout(120)


def scrape(port: int) -> dict:
    """{metric family name: family} from one GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def histogram(families: dict, name: str, **labels: str) -> dict:
    """{"count": n, "sum": s, "buckets": {le: cumulative count}} of one labelled histogram series."""
    family = families[name]
    assert family.type == "histogram", family.type
    out: dict = {"buckets": {}}
    for sample in family.samples:
        if any(sample.labels.get(k) != v for k, v in labels.items()):
            continue
        if sample.name == f"{name}_bucket":
            out["buckets"][sample.labels["le"]] = sample.value
        elif sample.name == f"{name}_count":
            out["count"] = sample.value
        elif sample.name == f"{name}_sum":
            out["sum"] = sample.value
    buckets = list(out["buckets"].values())
    assert buckets == sorted(buckets), "cumulative buckets never decrease"
    assert out["buckets"]["+Inf"] == out["count"]
    return out


def test_latency_histogram_buckets_are_cumulative_upper_bounds():
    h = LatencyHistogram((0.001, 0.01))
    for seconds in (0.0005, 0.001, 0.002, 0.5):
        h.observe(seconds)
    buckets, sum_s = h.cumulative()
    assert buckets == [("0.001", 2), ("0.01", 3), ("+Inf", 4)]  # 0.001 itself is "le 0.001"
    assert sum_s == pytest.approx(0.5035)


def test_scrape_shows_latency_histograms_of_what_the_node_did(tmp_path):
    port = free_port()
    with meshq.Node(cluster="metrics-it", data_dir=tmp_path / "m", mdns=False, metrics_port=port) as node:
        node.produce_batch("metered", [b"x"] * 100, partition=0, acks="leader").result(10)
        node.produce_batch("metered", [b"y"] * 100, partition=0, acks="quorum").result(10)
        for i in range(3):
            node.produce("metered", b"one %d" % i, partition=1, acks="leader")
        consumer = node.consumer("metered", start="earliest")
        read = 0
        while read < 203:
            records = consumer.poll(timeout=5.0)
            assert records, f"only {read} of 203 records read back"
            read += len(records)
        consumer.close()
        node.serve("echo", lambda payload: payload)
        assert node.request("echo", b"hi", timeout=5.0) == b"hi"
        assert node.request_async("echo", b"ho", timeout=5.0).result(10) == b"ho"
        families = scrape(port)
    served_leader = histogram(families, "meshq_produce_latency_seconds", acks="leader")
    served_quorum = histogram(families, "meshq_produce_latency_seconds", acks="quorum")
    assert served_leader["count"] == 1 + 3  # one request per batch, and per produce() (each sent on its own)
    assert served_quorum["count"] == 1
    assert histogram(families, "meshq_produce_latency_seconds", acks="all")["count"] == 0
    client_batch = histogram(families, "meshq_produce_client_latency_seconds", api="batch")
    # every batch the runtime's producer completed: the two produce_batch calls, and the three produce()
    # calls, which reach a leader on this very node through the runtime
    assert client_batch["count"] == 2 + 3 and client_batch["sum"] > 0
    assert histogram(families, "meshq_produce_client_latency_seconds", api="produce")["count"] == 3
    consume = histogram(families, "meshq_consume_latency_seconds")
    assert 1 <= consume["count"] <= 203  # once per non-empty poll, never per record
    rpc = histogram(families, "meshq_rpc_request_latency_seconds")
    assert rpc["count"] == 2 and rpc["sum"] > 0
    # the gauges and counters the operations page lists
    for name in ("meshq_records_produced", "meshq_fetched_bytes", "meshq_log_bytes",
                 "meshq_under_replicated_partitions", "meshq_frames_invalid", "meshq_pubsub_dropped",
                 "meshq_access_refused", "meshq_produces_parked"):
        assert name in families, name


def test_meshq_node_metrics_port_serves_the_histograms(tmp_path):
    port = free_port()
    node = NodeProcess(str(tmp_path / "n1"), extra=["--metrics-port", str(port)])
    node.start()
    try:
        with meshq.Node(cluster=node.cluster, role="client", mdns=False, seeds=[node.seed]) as client:
            client.wait_ready(timeout=20)
            client.produce_batch("scraped", [b"v"] * 50, acks="quorum").result(20)
        served = histogram(scrape(port), "meshq_produce_latency_seconds", acks="quorum")
        assert served["count"] >= 1
    finally:
        node.stop()
