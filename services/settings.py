"""Settings for every service: environment variables with the ``TOLLHOUSE_`` prefix, or ``.env``.

One typed object, read once at start; nothing else reads ``os.environ``. A bad value stops
the program with a message that names the setting.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLHOUSE_", env_file=".env", extra="ignore",
                                      use_attribute_docstrings=True)

    # Where things are. An empty DATABASE_URL means: the embedded PostgreSQL under data_dir.
    database_url: str = ""
    """PostgreSQL holding the ledger: a libpq `postgresql://` URL (TCP, or a Unix socket via
    `?host=/dir`). Empty: an embedded PostgreSQL under `DATA_DIR/pg`, started on demand."""
    data_dir: Path = Path(".tollhouse")
    """Where the embedded PostgreSQL keeps its data (`DATA_DIR/pg`) and the gateway its usage spool."""
    kafka_bootstrap_servers: str = ""
    """Kafka bootstrap servers, `host:port[,host:port…]`. Required by `tollhouse metering` (unless
    `--no-consumer`) and `tollhouse gateway`."""
    metering_url: str = "http://127.0.0.1:8081"
    """Gateway: the metering service's root URL."""
    upstream_base_url: str = "http://127.0.0.1:8090/v1"
    """Gateway: the upstream model API, OpenAI convention (ends in `/v1`)."""
    upstream_api_key: str = ""
    """Gateway: the key sent upstream as `Authorization: Bearer …`; empty sends none."""

    # Role tokens (Authorization: Bearer …). Empty means that role is disabled.
    admin_token: str = ""
    """Bearer token of the admin role (control plane, dead-letter replay, billing reads). Empty
    disables the role."""
    gateway_token: str = ""
    """Bearer token of the gateway role (`POST /v1/authorize`); the gateway sends it to metering.
    Empty disables the role."""
    billing_token: str = ""
    """Bearer token of the read-only billing role (usage, quota, ledger, exports, reconciliation).
    Empty disables the role."""

    # Topics and the consumer group.
    usage_topic: str = "tollhouse.usage.v1"
    """Kafka topic of usage events (key = account id)."""
    dlq_topic: str = "tollhouse.usage.v1.dlq"
    """Kafka topic dead letters are published on."""
    breach_topic: str = "tollhouse.breaches.v1"
    """Kafka topic breaches are published on."""
    consumer_group: str = "tollhouse-metering"
    """Kafka consumer group shared by all metering replicas."""
    topic_partitions: int = Field(default=4, ge=1, le=10_000)
    """Partitions of a topic metering creates because it is missing; existing topics are left as
    they are."""
    topic_replication_factor: int = Field(default=1, ge=1, le=16)
    """Replication factor of a topic metering creates because it is missing."""
    kafka_idempotent_producer: bool = False
    """Use Kafka's idempotent producer for usage events (gateway) and the outbox relay (metering)."""

    # Limits: every queue, batch and body has one.
    consumer_batch_max: int = Field(default=50_000, ge=1, le=100_000)
    """Most usage messages booked in one consumer batch (one database transaction). Batches only grow this large
    while a backlog is booked; larger ones write fewer projection rows per event (one per key and period in the
    batch), but hold the accounts' locks longer (a top-up waits for the batch it meets)."""
    consumer_members: int = Field(default=2, ge=1, le=64)
    """Consumer group members each metering process runs, each with its own partitions, batches
    and database connection: while one member's batch waits on PostgreSQL another's is rated,
    so a process books faster with up to one member per partition it holds. Members beyond the
    topic's partitions stand by. Under a backlog each member holds up to two batches in memory: the
    one it books and the next, read ahead."""
    consumer_poll_ms: int = Field(default=50, ge=1, le=10_000)
    """Longest wait of one consumer poll for new messages, in milliseconds."""
    consumer_fetch_wait_ms: int = Field(default=20, ge=1, le=10_000)
    """Longest time the broker may hold a consumer fetch waiting for data, in milliseconds (Kafka's
    `fetch.max.wait.ms`). Every message waits up to this long before it is booked on a broker
    that holds a fetch for its full time even when data is there; idle, it is one fetch
    request per this interval per replica."""
    max_event_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    """Largest usage message; a larger one is dead-lettered as `oversize`."""
    max_event_future_seconds: int = Field(default=300, ge=0, le=86_400 * 7)
    """How far ahead of the consumer's clock an event time may be; further is dead-lettered as
    `time_in_future`."""
    outbox_batch_max: int = Field(default=1_000, ge=1, le=100_000)
    """Most outbox rows (breaches, dead letters, replays) the relay publishes per round."""
    package_expiry_grace_seconds: int = Field(default=3_600, ge=0, le=86_400 * 30)
    """Wait after a package's `valid_until` before booking its unused tokens as expired, so late
    events still deduct from it."""
    package_expiry_sweep_seconds: int = Field(default=60, ge=1, le=86_400)
    """How often the expiry sweeper looks for packages to expire."""
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    """Largest HTTP request body (metering and gateway); larger gets 413."""
    page_limit_max: int = Field(default=1_000, ge=1, le=100_000)
    """Largest `limit` of a paginated list; above it is a 400."""
    db_pool_size: int = Field(default=10, ge=1, le=500)
    """Database connections of the metering API's pool (per process)."""
    reservation_ttl_seconds: int = Field(default=600, ge=1, le=86_400)
    """How long an authorize reservation is held when no usage event settles it."""
    quota_snapshot_seconds: int = Field(default=30, ge=1, le=3_600)
    """How often the authorizer reloads a key's cached snapshot without a database notice: the
    first call after this is answered from the snapshot in hand while it is reloaded in the
    background; a snapshot twice this old is not used."""
    # Reconciliation and dead letters (the diff's upload is bounded by max_request_bytes).
    reconciliation_max_window_days: int = Field(default=366, ge=1, le=36_600)
    """Longest `from`–`to` window of `GET /v1/reconciliation`."""
    dead_letter_payload_preview_bytes: int = Field(default=64 * 1024, ge=256, le=16 * 1024 * 1024)
    """Payload bytes shown per dead letter in `GET /v1/dead-letters` (the single-letter view shows
    all)."""

    # Gateway (DESIGN §6.1): its name in event sources, time limits, pools and the usage spool.
    gateway_id: str = Field(default="gw-1", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    """Gateway: its name, in the `source` of its events (`gateway/<id>`) and its spool file name.
    Unique per instance."""
    upstream_timeout_seconds: float = Field(default=600.0, gt=0, le=86_400)
    """Gateway: longest wait for upstream's next byte."""
    upstream_connect_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    """Gateway: longest wait to connect upstream (or for a pooled connection)."""
    upstream_max_connections: int = Field(default=1_000, ge=1, le=100_000)
    """Gateway: upstream connection pool size."""
    metering_timeout_seconds: float = Field(default=2.0, gt=0, le=300)
    """Gateway: longest authorize round trip to metering; slower is a 503."""
    metering_max_connections: int = Field(default=200, ge=1, le=100_000)
    """Gateway: metering connection pool size."""
    default_completion_allowance: int = Field(default=1_024, ge=0, le=10_000_000)
    """Gateway: completion tokens reserved for a call that sets no `max_tokens`."""
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1024, le=16 * 1024**3)
    """Gateway: largest `/v1/files` upload."""
    spool_max_events: int = Field(default=1_000_000, ge=1, le=1_000_000_000)
    """Gateway: spool limit in events; when full, new calls get 503."""
    spool_max_bytes: int = Field(default=1024**3, ge=1024 * 1024, le=1024**4)
    """Gateway: spool limit in bytes; when full, new calls get 503."""
    spool_send_batch_max: int = Field(default=500, ge=1, le=100_000)
    """Gateway: most spooled events sent to Kafka per send."""
    kafka_send_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    """Gateway: longest wait for one send to Kafka."""
    batch_poll_seconds: float = Field(default=30.0, gt=0, le=86_400)
    """Gateway: how often unbilled Batch API jobs are polled upstream."""

    log_format: str = Field(default="auto", pattern="^(auto|json|console)$")
    """`json` (one JSON object per line), `console`, or `auto` (console on a terminal, else JSON)."""
    log_level: str = Field(default="info", pattern="^(debug|info|warning|error)$")
    """`debug`, `info`, `warning` or `error`."""

    @field_validator("metering_url", "upstream_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _libpq_url(cls, value: str) -> str:
        if value and not value.startswith(("postgresql://", "postgres://", "postgresql+")):
            raise ValueError("must be a postgresql:// URL (as libpq writes it)")
        return value


class SettingsError(SystemExit):
    pass


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()


def load_settings(**overrides: object) -> Settings:
    """Read settings; turn a validation error into one clear line per bad setting."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = [
            f"setting TOLLHOUSE_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        ]
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None


def settings_table() -> str:
    """Every setting as a Markdown table: variable, default, meaning and allowed range.

    ``python -m services.settings`` prints it; docs/operations.md carries a copy, and a test
    checks that the copy is current.
    """
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        meaning = (field.description or "").replace("\n", " ").replace("|", "\\|")
        bounds = _bounds(field.metadata)
        if bounds:
            meaning += f" Allowed: {bounds}."
        rows.append(f"| `TOLLHOUSE_{name.upper()}` | {_default_text(field.default)} | {meaning} |")
    return "\n".join(rows) + "\n"


def _default_text(value: object) -> str:
    if value == "":
        return "(empty)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def _bounds(metadata: list) -> str:
    low = high = None
    for item in metadata:
        for attr, symbol in (("ge", "≥"), ("gt", ">")):
            if getattr(item, attr, None) is not None:
                low = f"{symbol} {getattr(item, attr):,}"
        for attr, symbol in (("le", "≤"), ("lt", "<")):
            if getattr(item, attr, None) is not None:
                high = f"{symbol} {getattr(item, attr):,}"
    return ", ".join(part for part in (low, high) if part)


if __name__ == "__main__":
    print(settings_table(), end="")
