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
            yield lost
            yield lost_ranges
            yield GaugeMetricFamily("meshq_under_replicated_partitions", "partitions led here with fewer in-sync "
                                    "replicas than assigned replicas", value=core.host.under_replicated())
            yield GaugeMetricFamily("meshq_handoffs_in_progress", "partitions (cluster-wide, per this node's "
                                    "metadata) not yet at their ring placement", value=core.status.handoffs())

    registry = CollectorRegistry()
    registry.register(NodeCollector())
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
