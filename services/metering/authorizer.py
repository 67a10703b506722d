"""The authorizer behind ``POST /v1/authorize``: fast, and correct under concurrency.

Decisions are made in memory, from snapshots of the projections (one query per key on
first use) and from the reservations this process holds. Freshness comes from
PostgreSQL LISTEN/NOTIFY: every transaction that changes what a decision reads (a consumer
batch, a top-up, a key change, a new price) sends a notice that is delivered when it
commits; the authorizer then reloads the accounts named and releases the reservations the
booked usage events settled, in that order, so a settled call is never counted twice nor
forgotten. Snapshots are also reloaded after ``QUOTA_SNAPSHOT_SECONDS`` as a safety net:
the first call after that is answered from the snapshot in hand while it is reloaded in
the background; one older than twice that is not used at all (the call waits for the
database).

A reservation holds the call's estimate against the package, the balance and the key's
caps until its usage event is booked, or until it expires (``RESERVATION_TTL_SECONDS``).
Calls are allowed while some room is left, so calls racing the last of a limit overshoot
it by at most about one call. Holds live in this process: with several metering API
replicas, route a key's authorize calls to one replica (e.g. hash on the key) to keep
that bound; otherwise it grows to one call per replica.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import asyncpg
import msgspec
import structlog
from prometheus_client import Counter

from services.contracts.ids import new_id
from services.metering import metrics
from services.metering.domain.pricing import PriceBook, PriceRow, Tier
from services.metering.domain.quota import Decision, Holds, KeySnapshot, decide
from services.metering.store import quota as store
from services.metering.store.ingest import connect

log = structlog.get_logger("tollhouse.authorizer")

NEGATIVE_CACHE_SECONDS = 2.0


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(slots=True)
class _Reservation:
    key_id: str
    account_id: str
    package_id: str | None
    tokens: int
    money: int
    expires_at: float


@dataclass(slots=True)
class _Entry:
    snapshot: KeySnapshot
    loaded_at: float


@dataclass(frozen=True, slots=True)
class Authorization:
    decision: Decision
    snapshot: KeySnapshot | None
    reservation_id: str | None


class Authorizer:
    def __init__(
        self,
        database_url: str,
        *,
        reservation_ttl_seconds: float = 600.0,
        snapshot_seconds: float = 30.0,
        pool_size: int = 4,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.database_url = database_url
        self.reservation_ttl = reservation_ttl_seconds
        self.snapshot_seconds = snapshot_seconds
        self.pool_size = pool_size
        self.clock = clock
        self.prices = PriceBook([])
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._entries: dict[bytes, _Entry] = {}
        self._hash_by_key: dict[str, bytes] = {}
        self._keys_by_account: dict[str, set[str]] = {}
        self._unknown: dict[bytes, float] = {}
        self._reservations: dict[str, _Reservation] = {}
        self._expiries: list[tuple[float, str]] = []  # heap of (expires_at, reservation_id)
        self._held_package: dict[str, int] = {}
        self._held_account: dict[str, int] = {}
        self._held_key: dict[str, int] = {}
        self._loading: dict[bytes, asyncio.Future] = {}
        self._refreshes: set[asyncio.Task] = set()  # background reloads of snapshots due
        self._tasks: list[asyncio.Task] = []
        self._stopped = asyncio.Event()

    # Life cycle

    async def start(self) -> "Authorizer":
        self._pool = await asyncpg.create_pool(
            self.database_url, min_size=1, max_size=self.pool_size,
            server_settings={"application_name": "tollhouse-authorizer", "timezone": "UTC"},
        )
        await self._listen()
        await self._reload_prices()
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="authorizer-housekeeping"))
        return self

    async def stop(self) -> None:
        self._stopped.set()
        for task in [*self._tasks, *self._refreshes]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._refreshes, return_exceptions=True)
        if self._listener is not None and not self._listener.is_closed():
            await self._listener.close()
        if self._pool is not None:
            await self._pool.close()

    async def _listen(self) -> None:
        self._listener = await connect(self.database_url)
        await self._listener.add_listener(store.QUOTA_CHANNEL, self._on_notice)
        # Anything that changed while nobody listened is unknown: start from the database.
        self._forget_snapshots()

    # The decision

    async def authorize(self, api_key: str, model: str, estimated_tokens: int = 0) -> Authorization:
        started = time.perf_counter()
        secret_hash = hash_secret(api_key)
        snapshot = await self._snapshot(secret_hash)
        if snapshot is None:
            _observe_decision(_UNKNOWN_KEY.reason, started)
            return Authorization(_UNKNOWN_KEY, None, None)
        now = self.clock()
        price = self.prices.at(model, now)
        holds = Holds(
            tokens=self._held_package.get(snapshot.package_id, 0) if snapshot.package_id else 0,
            money=self._held_key.get(snapshot.key_id, 0),
        )
        decision = decide(snapshot, price, model, holds, now, estimated_tokens,
                          account_money=self._held_account.get(snapshot.account_id, 0))
        reservation_id = None
        if decision.allowed and (decision.hold_tokens or decision.hold_money):
            reservation_id = new_id("res")
            self._hold(reservation_id, _Reservation(
                snapshot.key_id, snapshot.account_id, snapshot.package_id, decision.hold_tokens,
                decision.hold_money, time.monotonic() + self.reservation_ttl,
            ))
        _observe_decision(decision.reason, started)
        return Authorization(decision, snapshot, reservation_id)

    async def models_for(self, api_key: str) -> tuple[KeySnapshot, list[PriceRow]] | None:
        """The key's snapshot and the current price rows of the models its tier may use
        (None for an unknown key). For ``GET /v1/models`` at the gateway."""
        snapshot = await self._snapshot(hash_secret(api_key))
        if snapshot is None:
            return None
        now = self.clock()
        tier = Tier[snapshot.tier]
        rows = [self.prices.at(m, now) for m in self.prices.models()]
        return snapshot, [r for r in rows if r is not None and tier >= Tier[r.min_tier]]

    def held(self, reservation_id: str) -> bool:
        return reservation_id in self._reservations

    # Snapshots

    async def _snapshot(self, secret_hash: bytes) -> KeySnapshot | None:
        entry = self._entries.get(secret_hash)
        now = time.monotonic()
        if entry is not None:
            age = now - entry.loaded_at
            if age < self.snapshot_seconds:
                return entry.snapshot
            if age < 2 * self.snapshot_seconds:
                # Due: this call is answered from it while it is reloaded in the background,
                # so calls never queue on the database for a key in use (every key in use
                # would otherwise make its callers wait once per snapshot period).
                if secret_hash not in self._loading:
                    refresh = asyncio.get_running_loop().create_task(self._load(secret_hash))
                    self._refreshes.add(refresh)
                    refresh.add_done_callback(self._refreshed)
                return entry.snapshot
        unknown_since = self._unknown.get(secret_hash)
        if unknown_since is not None and now - unknown_since < NEGATIVE_CACHE_SECONDS:
            return None
        pending = self._loading.get(secret_hash)
        if pending is not None:  # one query per key, however many calls wait for it
            return await asyncio.shield(pending)
        return await self._load(secret_hash)

    async def _load(self, secret_hash: bytes) -> KeySnapshot | None:
        future = asyncio.get_running_loop().create_future()
        self._loading[secret_hash] = future
        try:
            assert self._pool is not None
            async with self._pool.acquire() as conn:
                snapshot = await store.snapshot_by_hash(conn, secret_hash, self.clock())
            if snapshot is None:
                self._entries.pop(secret_hash, None)
                self._unknown[secret_hash] = time.monotonic()
            else:
                self._install(secret_hash, snapshot)
            future.set_result(snapshot)
            return snapshot
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiting callers re-raise it themselves
            raise
        finally:
            del self._loading[secret_hash]

    def _refreshed(self, task: asyncio.Task) -> None:
        self._refreshes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The snapshot in hand stays in use until it is too old; the next call retries.
            log.warning("snapshot_refresh_failed", error=repr(task.exception()))

    def _install(self, secret_hash: bytes, snapshot: KeySnapshot) -> None:
        self._entries[secret_hash] = _Entry(snapshot, time.monotonic())
        self._hash_by_key[snapshot.key_id] = secret_hash
        self._keys_by_account.setdefault(snapshot.account_id, set()).add(snapshot.key_id)

    def _forget_snapshots(self) -> None:
        self._entries.clear()
        self._unknown.clear()

    async def _reload_accounts(self, account_ids: list[str]) -> None:
        key_ids = [k for a in account_ids for k in self._keys_by_account.get(a, ())]
        if not key_ids:
            return
        assert self._pool is not None
        async with self._pool.acquire() as conn:
            fresh = await store.snapshots_by_key(conn, key_ids, self.clock())
        for secret_hash, snapshot in fresh.items():
            self._install(secret_hash, snapshot)

    async def _reload_prices(self) -> None:
        assert self._pool is not None
        async with self._pool.acquire() as conn:
            rows = await store.price_rows(conn)
        self.prices = PriceBook([PriceRow(**dict(r)) for r in rows])

    # Notices and reservations

    def _on_notice(self, connection, pid, channel, payload: str) -> None:
        try:
            notice = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            log.warning("bad_quota_notice", payload=payload[:200])
            return
        task = asyncio.get_running_loop().create_task(self._apply_notice(notice))
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _apply_notice(self, notice: dict) -> None:
        if notice.get("k"):
            self._unknown.clear()
        if notice.get("p"):
            await self._reload_prices()
        accounts = notice.get("a") or []
        try:
            await self._reload_accounts(accounts)
        except Exception as exc:  # keep the holds; drop the stale snapshots instead
            log.error("quota_reload_failed", error=repr(exc))
            for account in accounts:
                for key_id in self._keys_by_account.get(account, ()):
                    self._entries.pop(self._hash_by_key.get(key_id, b""), None)
        for reservation_id in notice.get("r") or []:
            self._release(reservation_id)

    def _hold(self, reservation_id: str, r: _Reservation) -> None:
        self._reservations[reservation_id] = r
        heapq.heappush(self._expiries, (r.expires_at, reservation_id))
        if r.tokens and r.package_id:
            self._held_package[r.package_id] = self._held_package.get(r.package_id, 0) + r.tokens
        if r.money:
            self._held_account[r.account_id] = self._held_account.get(r.account_id, 0) + r.money
            self._held_key[r.key_id] = self._held_key.get(r.key_id, 0) + r.money

    def _release(self, reservation_id: str) -> None:
        r = self._reservations.pop(reservation_id, None)
        if r is None:
            return
        if r.tokens and r.package_id:
            _subtract(self._held_package, r.package_id, r.tokens)
        if r.money:
            _subtract(self._held_account, r.account_id, r.money)
            _subtract(self._held_key, r.key_id, r.money)

    async def _housekeeping(self) -> None:
        """Expire reservations; reconnect the listener if its connection dropped."""
        while not self._stopped.is_set():
            await asyncio.sleep(1.0)
            now = time.monotonic()
            while self._expiries and self._expiries[0][0] <= now:
                self._release(heapq.heappop(self._expiries)[1])  # no-op when already settled
            if self._listener is None or self._listener.is_closed():
                try:
                    await self._listen()
                    await self._reload_prices()
                    log.info("quota_listener_reconnected")
                except Exception as exc:
                    log.error("quota_listener_down", error=repr(exc))


_DECISIONS_BY_REASON: dict[str, Counter] = {}


def _observe_decision(reason: str, started: float) -> None:
    metrics.AUTHORIZE_SECONDS.observe(time.perf_counter() - started)
    counter = _DECISIONS_BY_REASON.get(reason)
    if counter is None:  # reasons are the fixed codes of the error table: a small, bounded set
        counter = _DECISIONS_BY_REASON[reason] = metrics.AUTHORIZE_DECISIONS.labels(reason)
    counter.inc()


def _subtract(held: dict[str, int], name: str, amount: int) -> None:
    left = held.get(name, 0) - amount
    if left > 0:
        held[name] = left
    else:
        held.pop(name, None)


def _unknown_key() -> Decision:
    from services.contracts import errors

    return Decision(False, errors.INVALID_API_KEY,
                    "The API key is not valid. Check it, or create a new key in the console.", {})


_UNKNOWN_KEY = _unknown_key()
