"""What ``GET /readyz`` checks: everything this metering process uses answers.

Always the database. When the process runs the consumer (``tollhouse metering`` without
``--no-consumer``) also the Kafka cluster and the place of each of its consumer members in
their group. A process started with ``--no-consumer`` never talks to Kafka (replays go
through the outbox, which the consuming replicas relay), so a Kafka outage does not make it
unready.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.metadata import MetadataRequest

from services.metering.consumer.membership import GroupMembership

DATABASE_TIMEOUT_SECONDS = 2.0
BROKER_TIMEOUT_SECONDS = 1.0
# Probes come every few seconds from several places (kubelet, the gateways, a load
# balancer): they share one metadata request per second.
BROKER_CACHE_SECONDS = 1.0


@dataclass
class ReadinessReport:
    checks: dict[str, str] = field(default_factory=dict)  # component → "ok", or what it does instead
    problems: list[str] = field(default_factory=list)  # one line per component that is not ready
    partitions: list[int] | None = None  # the partitions of all its consumer members, when it runs them


class BrokerProbe:
    """Does the Kafka cluster answer? A metadata request for no topics (so it creates
    none), at most one per ``cache_seconds``, bounded by ``timeout_seconds``."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        timeout_seconds: float = BROKER_TIMEOUT_SECONDS,
        cache_seconds: float = BROKER_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.timeout_seconds = timeout_seconds
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._client: AIOKafkaClient | None = None
        self._checked_at: float | None = None
        self._problem: str | None = None
        self._lock = asyncio.Lock()

    async def problem(self) -> str | None:
        """None when the cluster answered (recently), else what went wrong."""
        async with self._lock:  # concurrent probes wait for the one request in flight
            if self._checked_at is None or self.clock() - self._checked_at >= self.cache_seconds:
                # In a context of its own: the client's connection and metadata tasks outlive
                # this request, and their log lines must not carry its request_id.
                self._problem = await asyncio.create_task(self._ask(), context=contextvars.Context())
                self._checked_at = self.clock()
            return self._problem

    async def _ask(self) -> str | None:
        try:
            async with asyncio.timeout(self.timeout_seconds):
                if self._client is None:
                    self._client = AIOKafkaClient(
                        bootstrap_servers=self.bootstrap_servers,
                        client_id="tollhouse-readiness",
                        request_timeout_ms=int(self.timeout_seconds * 1000),
                    )
                    await self._client.bootstrap()
                node = self._client.get_random_node()
                if node is None:
                    return f"broker: the cluster at {self.bootstrap_servers} lists no brokers"
                response = await self._client.send(node, MetadataRequest([], allow_auto_topic_creation=False))
        except TimeoutError:
            await self._drop_client()
            return f"broker: no answer from {self.bootstrap_servers} within {self.timeout_seconds:g} s"
        except Exception as exc:  # start again from the bootstrap servers next time
            await self._drop_client()
            return f"broker: {self.bootstrap_servers} unreachable ({type(exc).__name__})"
        if not response.brokers:
            return f"broker: the cluster at {self.bootstrap_servers} lists no brokers"
        return None

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await asyncio.wait_for(client.close(), self.timeout_seconds)
            except Exception:
                pass

    async def close(self) -> None:
        await self._drop_client()


class Readiness:
    """The checks of one process, wired at start-up (``services/metering/service.py``)."""

    def __init__(
        self,
        database_ready: Callable[[], Awaitable[object]],
        *,
        broker: BrokerProbe | None = None,
        members: Sequence[GroupMembership] = (),
    ) -> None:
        self.database_ready = database_ready
        self.broker = broker
        self.members = tuple(members)  # the consumer group members this process runs

    async def check(self, *, api_only: bool = False) -> ReadinessReport:
        """Everything this process runs; with ``api_only`` only what its API needs (the
        database), so that a Kafka outage does not take the authorize path away."""
        report = ReadinessReport()
        probe = None if api_only else self.broker
        database, broker = await asyncio.gather(self._database_problem(), probe.problem() if probe else _nothing())
        report.checks["database"] = "ok" if database is None else "not ready"
        if database:
            report.problems.append(database)
        if api_only:
            report.checks["broker"] = report.checks["consumer"] = "not checked"
            return report
        if self.broker is None:
            report.checks["broker"] = "not used"
        else:
            report.checks["broker"] = "ok" if broker is None else "not ready"
            if broker:
                report.problems.append(broker)
        if not self.members:
            report.checks["consumer"] = "off"
        else:
            count = len(self.members)
            problems = [(i, p) for i, p in enumerate((m.problem() for m in self.members), 1) if p is not None]
            report.checks["consumer"] = "not ready" if problems else "ok"
            report.partitions = sorted(p for m in self.members for p in m.partitions)
            report.problems += [p if count == 1 else f"{p} (member {i} of {count})" for i, p in problems]
        return report

    async def _database_problem(self) -> str | None:
        try:
            await asyncio.wait_for(self.database_ready(), DATABASE_TIMEOUT_SECONDS)
        except Exception as exc:  # any failure means not ready; say which kind
            return f"database: {type(exc).__name__}; check TOLLHOUSE_DATABASE_URL and the server"
        return None


async def _nothing() -> None:
    return None
