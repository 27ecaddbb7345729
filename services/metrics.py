"""Prometheus metrics (DESIGN.md, "Operations"), over every worker.

Counters and histograms are prometheus-client's: under gunicorn each worker
writes them to a file of the folder PROMETHEUS_MULTIPROC_DIR names
(gunicorn.conf.py makes one per instance) and a scrape adds the files up;
without it (tests, `flask run`) they live in this process. What the bus holds
(tasks waiting and in flight, polls, live sessions, redeliveries) is read
from `bus.gauges()` at each scrape, which already counts every worker.

Label values stay bounded: route rules (not paths), LLM names (rows that
exist), error codes of our own; never token names or task ids.
"""
import os

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from services.errors import ServiceError

REGISTRY = CollectorRegistry(auto_describe=True)
CONTENT_TYPE = CONTENT_TYPE_LATEST
METHODS = frozenset({"GET", "POST", "PATCH", "PUT", "DELETE", "HEAD", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"  # a path no route serves (its text is not a label)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0)

requests_total = Counter(
    "switchboard_requests_total", "HTTP requests answered, by route rule, method and status",
    ["route", "method", "status"], registry=REGISTRY)
inference_seconds = Histogram(
    "switchboard_inference_seconds",
    "Inference requests from arrival to their last byte, by LLM (or pool:<model>), kind "
    "(public|virtual|pool) and stream (true|false)",
    ["llm", "kind", "stream"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
time_to_first_chunk_seconds = Histogram(
    "switchboard_time_to_first_chunk_seconds",
    "Streamed inferences from arrival to their first data event, by LLM and kind",
    ["llm", "kind"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
wakes_total = Counter(
    "switchboard_wakes_total", "Wake tasks of hibernating LLMs, by outcome (ok|failed|timeout)",
    ["llm", "outcome"], registry=REGISTRY)
tokens_total = Counter(
    "switchboard_tokens_total",
    "Tokens the backends reported (or, for a stream without usage, estimated), by LLM and "
    "type (prompt|completion)", ["llm", "type"], registry=REGISTRY)
rejections_total = Counter(
    "switchboard_rejections_total",
    "Requests refused with 429 or 503, by cause (the error code: too_many_pending, "
    "too_many_queued, too_many_polls, queue_timeout, bus_unavailable, publisher_offline, "
    "database_busy ...)", ["reason"], registry=REGISTRY)
usage_dropped_total = Counter(
    "switchboard_usage_dropped_total",
    "Usage rows a worker could not keep (its buffer was full, or it could not write them)",
    registry=REGISTRY)


# The codes of our 429s and 503s: a stream whose headers had gone out gets
# them as its last event instead, and is counted a rejection all the same.
REJECTION_CODES = frozenset({
    "too_many_pending", "too_many_queued", "too_many_polls", "queue_timeout",
    "bus_unavailable", "publisher_offline", "publisher_disconnected", "pool_unavailable",
    "database_busy", "database_unavailable", "database_not_migrated"})


def child(metric, *labels):
    """`metric.labels(*labels)`, looked up once per label values (a request
    makes several: the lookup is most of an increment's cost)."""
    children = _children.get(metric)
    if children is None:
        children = _children[metric] = {}
    found = children.get(labels)
    if found is None:
        found = children[labels] = metric.labels(*labels)
    return found


_children: dict = {}


def route_label(rule: str | None) -> str:
    return rule if rule is not None else UNMATCHED_ROUTE


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


class BusCollector:
    """The bus's gauges, read at each scrape. A bus that cannot be reached
    leaves them out (`switchboard_bus_up` says so) rather than fail the scrape."""

    def __init__(self, bus):
        self.bus = bus

    def collect(self):
        up = GaugeMetricFamily("switchboard_bus_up", "Whether the task bus answered this scrape")
        try:
            gauges = self.bus.gauges()
        except ServiceError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for name, key, text in (
                ("switchboard_tasks_waiting", "tasks_waiting",
                 "Tasks queued for a publisher, not yet picked up, by LLM"),
                ("switchboard_tasks_in_flight", "tasks_in_flight",
                 "Tasks picked up by a publisher and not finished, by LLM")):
            family = GaugeMetricFamily(name, text, labels=["llm"])
            for llm, value in sorted(gauges[key].items()):
                family.add_metric([llm], value)
            yield family
        yield GaugeMetricFamily("switchboard_held_polls", "Publisher long-polls held now",
                                value=gauges["held_polls"])
        yield GaugeMetricFamily("switchboard_live_sessions", "Publisher sessions live now",
                                value=gauges["live_sessions"])
        yield CounterMetricFamily("switchboard_redeliveries",
                                  "Tasks delivered again after no acknowledgement",
                                  value=gauges["redeliveries"])


def render(bus) -> bytes:
    """The text exposition of every metric, over every worker, and the bus's gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        out = generate_latest(registry)
    else:
        out = generate_latest(REGISTRY)
    bus_registry = CollectorRegistry()
    bus_registry.register(BusCollector(bus))
    return out + generate_latest(bus_registry)
