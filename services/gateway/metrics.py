"""Prometheus metrics of the gateway (served at /metrics).

Names carry ``gateway`` so a process that runs metering too (``tollhouse dev``, the
tests) registers no name twice. ``model`` is only set once metering accepted the model,
so callers cannot grow the label set with made-up names.
"""

from __future__ import annotations

from functools import lru_cache

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "tollhouse_gateway_requests_total", "Calls answered by the gateway", ["endpoint", "model", "status"]
)
UPSTREAM_SECONDS = Histogram(
    "tollhouse_gateway_upstream_seconds", "From sending a call upstream to its response headers", ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
METERING_SECONDS = Histogram(
    "tollhouse_gateway_authorize_seconds", "POST /v1/authorize round trips",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
EVENTS_SPOOLED = Counter(
    "tollhouse_gateway_events_spooled_total", "Usage events written to the spool", ["status", "estimated"]
)
EVENTS_SENT = Counter("tollhouse_gateway_events_sent_total", "Usage events acknowledged by Kafka")
SEND_FAILURES = Counter("tollhouse_gateway_send_failures_total", "Failed attempts to send spooled events to Kafka")
SPOOL_EVENTS = Gauge("tollhouse_gateway_spool_events", "Usage events waiting in the spool", ["gateway_id"])
SPOOL_BYTES = Gauge("tollhouse_gateway_spool_bytes", "Bytes of usage events waiting in the spool", ["gateway_id"])
CALLS_IN_FLIGHT = Gauge("tollhouse_gateway_calls_in_flight", "Calls being answered (a stream until its end)",
                        ["gateway_id"])
KAFKA_CONNECTED = Gauge("tollhouse_gateway_kafka_connected", "1 while the last send to Kafka succeeded", ["gateway_id"])


# The labelled children the call path touches, looked up once per label set (labels()
# takes a lock and validates its arguments on every call). The sets are small: route
# templates, models metering accepted, statuses.


@lru_cache(maxsize=4096)
def requests_of(endpoint: str, model: str, status: str) -> Counter:
    return REQUESTS.labels(endpoint, model, status)


@lru_cache(maxsize=64)
def upstream_seconds_of(endpoint: str) -> Histogram:
    return UPSTREAM_SECONDS.labels(endpoint)


@lru_cache(maxsize=16)
def events_spooled_of(status: str, estimated: bool) -> Counter:
    return EVENTS_SPOOLED.labels(status, "true" if estimated else "false")
