"""Prometheus endpoint (``meshq node --metrics-port N``): a collector reading the node's counters."""

from __future__ import annotations

from typing import Any


def serve_metrics(node: Any, host: str, port: int) -> Any:
    """Start a Prometheus HTTP endpoint for ``node`` on ``host:port``; returns the server (``shutdown()`` it)."""
    from prometheus_client import start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import CollectorRegistry

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
            yield CounterMetricFamily("meshq_frames_invalid", "frames dropped as invalid",
                                      value=counters["frames_invalid"])
            yield CounterMetricFamily("meshq_auth_refused", "connections refused: untrusted CURVE key, or "
                                      "CURVE against plain", value=counters.get("auth_refused", 0))
            disk = GaugeMetricFamily("meshq_log_bytes", "bytes on disk per partition", labels=["topic", "partition"])
            watermark = GaugeMetricFamily("meshq_high_watermark", "high watermark per partition",
                                          labels=["topic", "partition"])
            lost = GaugeMetricFamily("meshq_lost_offsets", "offsets damaged on this node's disk, never served",
                                     labels=["topic", "partition"])
            lost_ranges = GaugeMetricFamily("meshq_lost_offset_ranges", "damaged offset ranges (damaged batches "
                                            "as recovery and reads found them) on this node's disk",
                                            labels=["topic", "partition"])
            for (topic, partition), state in sorted(list(core.partitions.items())):
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
            yield GaugeMetricFamily("meshq_under_replicated_partitions", "partitions led here with fewer in-sync "
                                    "replicas than assigned replicas", value=core.host.under_replicated())
            yield from _rpc_metrics(core, CounterMetricFamily, GaugeMetricFamily)
            yield GaugeMetricFamily("meshq_handoffs_in_progress", "partitions (cluster-wide, per this node's "
                                    "metadata) not yet at their ring placement", value=core.status.handoffs())

    registry = CollectorRegistry()
    registry.register(NodeCollector())
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


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
