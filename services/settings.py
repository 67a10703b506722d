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
    model_config = SettingsConfigDict(env_prefix="TOLLHOUSE_", env_file=".env", extra="ignore")

    # Where things are. An empty DATABASE_URL means: the embedded PostgreSQL under data_dir.
    database_url: str = ""
    data_dir: Path = Path(".tollhouse")
    kafka_bootstrap_servers: str = ""
    metering_url: str = "http://127.0.0.1:8081"
    upstream_base_url: str = "http://127.0.0.1:8090/v1"
    upstream_api_key: str = ""

    # Role tokens (Authorization: Bearer …). Empty means that role is disabled.
    admin_token: str = ""
    gateway_token: str = ""
    billing_token: str = ""

    # Topics and the consumer group.
    usage_topic: str = "tollhouse.usage.v1"
    dlq_topic: str = "tollhouse.usage.v1.dlq"
    breach_topic: str = "tollhouse.breaches.v1"
    consumer_group: str = "tollhouse-metering"
    topic_partitions: int = Field(default=4, ge=1, le=10_000)
    topic_replication_factor: int = Field(default=1, ge=1, le=16)
    kafka_idempotent_producer: bool = False

    # Limits: every queue, batch and body has one.
    consumer_batch_max: int = Field(default=5_000, ge=1, le=100_000)
    consumer_poll_ms: int = Field(default=50, ge=1, le=10_000)
    max_event_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_event_future_seconds: int = Field(default=300, ge=0, le=86_400 * 7)
    outbox_batch_max: int = Field(default=1_000, ge=1, le=100_000)
    package_expiry_grace_seconds: int = Field(default=3_600, ge=0, le=86_400 * 30)
    package_expiry_sweep_seconds: int = Field(default=60, ge=1, le=86_400)
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    page_limit_max: int = Field(default=1_000, ge=1, le=100_000)
    db_pool_size: int = Field(default=10, ge=1, le=500)
    reservation_ttl_seconds: int = Field(default=600, ge=1, le=86_400)
    quota_snapshot_seconds: int = Field(default=30, ge=1, le=3_600)
    # Reconciliation and dead letters (the diff's upload is bounded by max_request_bytes).
    reconciliation_max_window_days: int = Field(default=366, ge=1, le=36_600)
    dead_letter_payload_preview_bytes: int = Field(default=64 * 1024, ge=256, le=16 * 1024 * 1024)

    # Gateway (DESIGN §6.1): its name in event sources, time limits, pools and the usage spool.
    gateway_id: str = Field(default="gw-1", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    upstream_timeout_seconds: float = Field(default=600.0, gt=0, le=86_400)
    upstream_connect_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    upstream_max_connections: int = Field(default=1_000, ge=1, le=100_000)
    metering_timeout_seconds: float = Field(default=2.0, gt=0, le=300)
    metering_max_connections: int = Field(default=200, ge=1, le=100_000)
    default_completion_allowance: int = Field(default=1_024, ge=0, le=10_000_000)
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1024, le=16 * 1024**3)
    spool_max_events: int = Field(default=1_000_000, ge=1, le=1_000_000_000)
    spool_max_bytes: int = Field(default=1024**3, ge=1024 * 1024, le=1024**4)
    spool_send_batch_max: int = Field(default=500, ge=1, le=100_000)
    kafka_send_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    batch_poll_seconds: float = Field(default=30.0, gt=0, le=86_400)

    log_format: str = Field(default="auto", pattern="^(auto|json|console)$")
    log_level: str = Field(default="info", pattern="^(debug|info|warning|error)$")

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
