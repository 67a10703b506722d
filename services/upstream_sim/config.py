"""What the simulated upstream can be told at start: failure switches, reply shape, limits."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MODELS: tuple[str, ...] = (
    "gpt-3.5-turbo",
    "gpt-3.5-turbo-instruct",
    "gpt-4",
    "gpt-4-turbo",
    "gpt-4o",
    "gpt-4o-mini",
    "o1",
    "o1-mini",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
)


@dataclass(frozen=True)
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 8090

    # Failure switches (each also settable per request with an X-Sim-* header).
    latency_ms: int = 0  # before the first byte of every /v1 reply
    chunk_delay_ms: int = 0  # between two chunks of a stream
    error_rate: float = 0.0  # share of /v1 requests answered with a 500
    seed: int = 0  # seeds the error draws, so a run can be replayed

    # Reply shape.
    models: tuple[str, ...] = DEFAULT_MODELS  # what GET /v1/models lists; any model id is served
    embedding_dimensions: int = 8
    reply_tokens: int | None = None  # None: the natural echo reply; N: a reply of exactly N tokens

    # Limits: refusing with a clear error beats running out of memory.
    max_request_bytes: int = 32 * 1024 * 1024
    max_file_bytes: int = 200 * 1024 * 1024  # OpenAI's limit for a batch input file
    max_stored_bytes: int = 1024 * 1024 * 1024  # all files together
    max_files: int = 10_000
    max_batch_lines: int = 50_000  # OpenAI's limit per batch
    max_batches: int = 10_000
    max_choices: int = 16  # `n`
    max_reply_tokens: int = 100_000
    max_latency_ms: int = 600_000
    usage_log_max: int = 100_000  # records kept for GET /sim/usage

    batch_delay_ms: int = 0  # how long a batch stays in_progress before it runs
    batch_line_delay_ms: int = 0  # how long each line of a batch takes to run
    batch_yield_every: int = field(default=256, repr=False)  # lines between event-loop yields

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port <= 65_535:
            problems.append(f"port {self.port} is not in 0..65535")
        for name in ("latency_ms", "chunk_delay_ms", "batch_delay_ms", "batch_line_delay_ms"):
            value = getattr(self, name)
            if not 0 <= value <= self.max_latency_ms:
                problems.append(f"{name} {value} is not in 0..{self.max_latency_ms}")
        if not 0.0 <= self.error_rate <= 1.0:
            problems.append(f"error_rate {self.error_rate} is not in 0..1")
        if not 1 <= self.embedding_dimensions <= 4096:
            problems.append(f"embedding_dimensions {self.embedding_dimensions} is not in 1..4096")
        if self.reply_tokens is not None and not 0 <= self.reply_tokens <= self.max_reply_tokens:
            problems.append(f"reply_tokens {self.reply_tokens} is not in 0..{self.max_reply_tokens}")
        for name in ("max_request_bytes", "max_file_bytes", "max_stored_bytes", "max_files", "max_batch_lines",
                     "max_batches", "max_choices", "usage_log_max", "batch_yield_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if problems:
            raise ValueError("invalid upstream-sim config: " + "; ".join(problems))
