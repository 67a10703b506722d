"""Prometheus metrics of the metering service (served at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_CONSUMED = Counter("tollhouse_events_consumed_total", "Usage messages read from Kafka")
EVENTS_ACCEPTED = Counter("tollhouse_events_accepted_total", "Usage events booked into the ledger")
EVENTS_DUPLICATE = Counter("tollhouse_events_duplicate_total", "Redelivered usage events skipped")
EVENTS_CONFLICT = Counter("tollhouse_events_conflict_total", "Events quarantined for an id conflict")
EVENTS_DEAD_LETTERED = Counter(
    "tollhouse_events_dead_lettered_total", "Usage events dead-lettered", ["reason"]
)
BREACHES = Counter("tollhouse_breaches_total", "Breaches recorded", ["type"])
BATCH_COMMIT_SECONDS = Histogram(
    "tollhouse_batch_commit_seconds", "Time to book one consumer batch",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
EVENT_TO_COMMIT_SECONDS = Histogram(
    "tollhouse_event_to_commit_seconds", "From the event's time to its ledger commit",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
PRODUCE_TO_COMMIT_SECONDS = Histogram(
    "tollhouse_produce_to_commit_seconds",
    "From the Kafka timestamp of the oldest message of a partition in a batch to that batch's commit",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
CONSUMER_LAG = Gauge("tollhouse_consumer_lag", "Messages behind the partition end", ["partition"])
CONSUMER_PARTITIONS = Gauge("tollhouse_consumer_partitions",
                            "Usage-topic partitions assigned to this process's consumer members")
BATCHES_FENCED = Counter("tollhouse_batches_fenced_total", "Batches rolled back: partition owned by another consumer")
BATCHES_REBOOKED = Counter(
    "tollhouse_batches_rebooked_total",
    "Batches booked a second time with their event ids looked up: the first try met an event the ledger held",
)
OFFSET_GAPS = Counter("tollhouse_consumer_offset_gaps_total",
                      "Fetches that started past the stored offset, by outcome (reread, or skipped after rereads)",
                      ["outcome"])
OFFSETS_SKIPPED = Counter("tollhouse_consumer_offsets_skipped_total",
                          "Offsets absent from the log (retention, control records) stepped over after rereads")
OUTBOX_PUBLISHED = Counter("tollhouse_outbox_published_total", "Outbox messages published", ["topic"])

# POST /v1/authorize: the in-memory decision (with a snapshot load on a cache miss).
AUTHORIZE_SECONDS = Histogram(
    "tollhouse_authorize_seconds", "Time to decide one POST /v1/authorize in the metering process",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
AUTHORIZE_DECISIONS = Counter(
    "tollhouse_authorize_decisions_total", "POST /v1/authorize answers by reason (ok when allowed)", ["reason"]
)
