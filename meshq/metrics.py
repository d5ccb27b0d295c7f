"""Prometheus endpoint (``meshq node --metrics-port N``): a collector reading the node's counters,
and the latency histograms.

Theory of operation
-------------------
Counters and gauges are read from the core when scraped (``NodeCollector``). Latencies are
observed where they are known, once per request or batch, never per record:

- ``meshq_produce_latency_seconds{acks}``: produce requests this node served as leader, from
  the request's handling to its acknowledgement (replication, fsync); kept by the pure core
  (``meshq.core.latency``) and exported as a histogram at scrape time.
- ``meshq_produce_client_latency_seconds{api}``: this node's own produce calls, from the call to
  its acknowledgement (``produce``: each ``produce()`` call; ``batch``: each batch the runtime's
  producer completed: a ``produce_batch`` call, a ``produce_async`` buffer, or a ``produce()``
  whose leader is this node, which goes through the runtime).
- ``meshq_consume_latency_seconds``: the age of the newest record of each non-empty ``poll()``
  (now minus its timestamp: the time from produce to delivery while caught up; a consumer
  reading a backlog sees the backlog's age).
- ``meshq_rpc_request_latency_seconds``: this node's ``request`` / ``request_async`` calls, from
  the call to the reply (or error).

The client-side histograms (prometheus_client ``Histogram``) exist only when the node serves
metrics: without ``metrics_port`` the hot paths test one attribute and observe nothing.
"""

from __future__ import annotations

import time
from typing import Any

from meshq.core.latency import BUCKETS_S


class ClientLatency:
    """The histograms the node's API calls observe (see the module docstring)."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Histogram

        self.produce = Histogram("meshq_produce_client_latency_seconds", "this node's produce calls, from the call "
                                 "to the acknowledgement", labelnames=["api"], buckets=BUCKETS_S, registry=registry)
        self.produce_one = self.produce.labels(api="produce")
        self.produce_batch = self.produce.labels(api="batch")
        self.consume = Histogram("meshq_consume_latency_seconds", "age of the newest record of each non-empty "
                                 "poll(): produce-to-delivery time", buckets=BUCKETS_S, registry=registry)
        self.rpc = Histogram("meshq_rpc_request_latency_seconds", "this node's requests, from the call to the reply "
                             "or error", buckets=BUCKETS_S, registry=registry)

    def observe_consume(self, records: list) -> None:
        self.consume.observe(max(0.0, time.time() - records[-1].timestamp_ms / 1000.0))

    def rpc_done_callback(self) -> Any:
        """A ``Future`` done-callback observing the time from now to the future's completion."""
        started = time.monotonic()
        rpc = self.rpc

        def done(_future: Any) -> None:
            rpc.observe(time.monotonic() - started)

        return done


def create_metrics(node: Any) -> tuple[Any, ClientLatency]:
    """(the node's registry with its collector, the client latency histograms registered in it)."""
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(_collector(node))
    return registry, ClientLatency(registry)


def serve_metrics(registry: Any, host: str, port: int) -> Any:
    """Start a Prometheus HTTP endpoint for ``registry`` on ``host:port``; returns the server (``shutdown()`` it)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


def _collector(node: Any) -> Any:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    class NodeCollector:
        def collect(self) -> Any:
            core = node.core
            counters = dict(core.counters)
            yield CounterMetricFamily("meshq_records_produced", "records appended as leader",
                                      value=counters["records_produced"])
            yield CounterMetricFamily("meshq_batches_produced", "batches appended as leader",
                                      value=counters["batches_produced"])
            yield CounterMetricFamily("meshq_fetched_bytes", "bytes served to fetches",
                                      value=counters["records_fetched_bytes"])
            yield CounterMetricFamily("meshq_duplicate_records_dropped", "idempotent retries recognised",
                                      value=counters["duplicates_dropped"])
            yield CounterMetricFamily("meshq_produces_parked", "produce requests held while their partition's "
                                      "leadership moved", value=counters["produces_parked"])
            yield CounterMetricFamily("meshq_frames_invalid", "frames dropped as invalid",
                                      value=counters["frames_invalid"])
            invalid = core.invalid_frames()
            yield CounterMetricFamily("meshq_invalid_frames", "frames dropped as invalid (wire and pub/sub data)",
                                      value=invalid["total"])
            by_peer = CounterMetricFamily("meshq_invalid_frames_by_peer", "frames dropped as invalid, by the "
                                          "sender's address (or the node id a decoded frame names)", labels=["peer"])
            for peer, count in sorted(invalid["by_peer"].items()):
                by_peer.add_metric([peer], count)
            yield by_peer
            yield CounterMetricFamily("meshq_auth_refused", "connections refused: untrusted CURVE key, or "
                                      "CURVE against plain", value=counters.get("auth_refused", 0))
            yield CounterMetricFamily("meshq_access_refused", "requests this node refused for want of a grant (a "
                                      "storage node: any; a client node: requests to the services it serves)",
                                      value=core.access.counters["refused"])
            disk = GaugeMetricFamily("meshq_log_bytes", "bytes on disk per partition", labels=["topic", "partition"])
            watermark = GaugeMetricFamily("meshq_high_watermark", "high watermark per partition",
                                          labels=["topic", "partition"])
            lost = GaugeMetricFamily("meshq_lost_offsets", "offsets damaged on this node's disk, never served",
                                     labels=["topic", "partition"])
            lost_ranges = GaugeMetricFamily("meshq_lost_offset_ranges", "damaged offset ranges (damaged batches "
                                            "as recovery and reads found them) on this node's disk",
                                            labels=["topic", "partition"])
            detected = CounterMetricFamily("meshq_corrupt_batches_detected", "damaged batches this node's log found "
                                           "(recovery, reads, scrub) since it started", labels=["topic", "partition"])
            repaired = CounterMetricFamily("meshq_corrupt_batches_repaired", "damaged batches written back from a "
                                           "replica's intact copy since the node started", labels=["topic", "partition"])
            for (topic, partition), state in sorted(list(core.partitions.items())):
                detected.add_metric([topic, str(partition)], state.log.corrupt_batches_detected)
                repaired.add_metric([topic, str(partition)], state.log.corrupt_batches_repaired)
                disk.add_metric([topic, str(partition)], state.log.size_bytes)
                watermark.add_metric([topic, str(partition)], state.high_watermark)
                ranges = state.log.lost_offsets
                lost.add_metric([topic, str(partition)], sum(last - first + 1 for first, last in ranges))
                lost_ranges.add_metric([topic, str(partition)], len(ranges))
            yield disk
            yield watermark
            pubsub = core.pubsub.report()
            delivered = CounterMetricFamily("meshq_pubsub_delivered", "messages queued for a local subscription",
                                            labels=["subscription", "pattern", "queue"])
            dropped = CounterMetricFamily("meshq_pubsub_dropped", "messages a full subscription queue refused",
                                          labels=["subscription", "pattern", "queue"])
            for sub in pubsub["subscriptions"]:
                labels = [str(sub["id"]), sub["pattern"], sub["queue"] or ""]
                delivered.add_metric(labels, sub["delivered"])
                dropped.add_metric(labels, sub["dropped"])
            yield delivered
            yield dropped
            peer_received = CounterMetricFamily("meshq_pubsub_peer_received", "pub/sub messages received from a peer",
                                                labels=["peer"])
            peer_dropped = CounterMetricFamily("meshq_pubsub_peer_dropped", "pub/sub messages from a peer lost on the "
                                               "way (gaps in its numbering)", labels=["peer"])
            peer_sent = CounterMetricFamily("meshq_pubsub_peer_sent", "pub/sub messages sent to a peer",
                                            labels=["peer"])
            for peer in pubsub["peers"]:
                peer_received.add_metric([peer["node_id"]], peer["received"])
                peer_dropped.add_metric([peer["node_id"]], peer["dropped"])
                peer_sent.add_metric([peer["node_id"]], peer["sent"])
            yield peer_received
            yield peer_dropped
            yield peer_sent
            yield CounterMetricFamily("meshq_pubsub_published", "messages published on this node",
                                      value=pubsub["published"])
            yield CounterMetricFamily("meshq_pubsub_no_interest", "messages published that no subscription matched",
                                      value=pubsub["no_interest"])
            yield lost
            yield lost_ranges
            yield detected
            yield repaired
            yield GaugeMetricFamily("meshq_under_replicated_partitions", "partitions led here with fewer in-sync "
                                    "replicas than assigned replicas", value=core.host.under_replicated())
            yield from _rpc_metrics(core, CounterMetricFamily, GaugeMetricFamily)
            yield GaugeMetricFamily("meshq_storage_full", "1 while this node refuses new records because its "
                                    "storage is full (below --min-free-bytes, or a write found no space)",
                                    value=1 if core.space.full else 0)
            yield CounterMetricFamily("meshq_storage_full_refused", "new records refused because the storage was full",
                                      value=counters.get("storage_full_refused", 0))
            yield GaugeMetricFamily("meshq_handoffs_in_progress", "partitions (cluster-wide, per this node's "
                                    "metadata) not yet at their ring placement", value=core.status.handoffs())
            served = HistogramMetricFamily("meshq_produce_latency_seconds", "produce requests served here as "
                                           "leader, from their handling to their acknowledgement", labels=["acks"])
            for acks, histogram in core.server.produce_latency.items():
                buckets, sum_s = histogram.cumulative()
                served.add_metric([acks], buckets, sum_s)
            yield served

    return NodeCollector()


def _rpc_metrics(core: Any, counter: Any, gauge: Any) -> Any:
    """Request/reply: per service offered here (served, errors, in flight, handler p50/p99) and
    this node's own requests (by outcome)."""
    report = core.rpc.report()  # read from the metrics thread, as the counters above are
    labels = ["service"]
    served = counter("meshq_rpc_served", "requests a handler of this node answered", labels=labels)
    errors = counter("meshq_rpc_handler_errors", "requests whose handler raised", labels=labels)
    busy = counter("meshq_rpc_busy_refused", "requests refused as busy (sent to another instance)", labels=labels)
    in_flight = gauge("meshq_rpc_in_flight", "requests running or queued here", labels=labels)
    p50 = gauge("meshq_rpc_handler_p50_seconds", "median handler time (last 1024 requests)", labels=labels)
    p99 = gauge("meshq_rpc_handler_p99_seconds", "99th percentile handler time (last 1024 requests)", labels=labels)
    for service in report["services"]:
        name = [service["service"]]
        served.add_metric(name, service["served"])
        errors.add_metric(name, service["errors"])
        busy.add_metric(name, service["busy"])
        in_flight.add_metric(name, service["in_flight"])
        if service["p50_ms"] is not None:
            p50.add_metric(name, service["p50_ms"] / 1000)
            p99.add_metric(name, service["p99_ms"] / 1000)
    yield from (served, errors, busy, in_flight, p50, p99)
    outcomes = counter("meshq_rpc_requests", "requests this node sent through its runtime, by outcome",
                       labels=["outcome"])
    for outcome in ("replies", "remote_errors", "timeouts", "no_responders", "outcome_unknown", "retries",
                    "late_replies"):
        outcomes.add_metric([outcome], report["calls"][outcome])
    yield outcomes
