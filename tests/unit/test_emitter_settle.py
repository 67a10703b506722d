"""How a call's event takes its fallback's place (Emitter.settle_soon): the caller (the
reply) waits for the fallback to be on disk, not for the replacement; the replacement
follows in a task that shutdown waits for; a fallback that could not be spooled makes the
event itself durable first; a caller cancelled while it waits still gets its event
spooled. A real spool file and fsync worker; no broker (the sender is not started)."""

from __future__ import annotations

import asyncio
import os
import signal

import orjson
import pytest

from services.contracts.events import build_usage_event
from services.gateway.emitter import Emitter, Held
from services.gateway.spool import Spool, SpoolError
from services.settings import Settings


def event(status: str, completion_tokens: int):
    return build_usage_event(account_id="acc_1", key_id="key_1", model="gpt-4o", prompt_tokens=12,
                             completion_tokens=completion_tokens, request_id=f"req-{status}", status=status,
                             usage_estimated=status == "cancelled")


@pytest.fixture
async def spool(tmp_path):
    opened = await Spool(tmp_path / "spool.db", max_events=1_000, max_bytes=10**7).open()
    yield opened
    await opened.close()


async def sent_events(spool: Spool) -> list[dict]:
    """The events the sender would send now, as JSON (id, and the data's fields)."""
    out = []
    for row in await spool.read(100):
        document = orjson.loads(row.value)
        out.append({"id": document["id"], **document["data"]})
    return out


async def test_the_reply_waits_for_the_fallback_and_the_event_replaces_it_right_after(spool) -> None:
    emitter = Emitter(Settings(), spool)
    fallback, real = event("cancelled", 0), event("ok", 7)
    held = emitter.hold(fallback)
    built: list[str] = []

    def build():
        built.append(real.id)
        return real

    await emitter.settle_soon(held, build)
    assert held.row.done() and held.row.result() is not None  # the fallback is on disk
    assert spool.held == 1 and built == []  # the replacement has not run yet: the reply goes first
    await emitter.stop(drain_seconds=0)  # waits for the replacement
    assert spool.held == 0 and built == [real.id]
    [sent] = await sent_events(spool)
    assert sent["id"] == real.id and sent["status"] == "ok" and sent["completion_tokens"] == 7


async def test_a_fallback_that_could_not_be_spooled_makes_the_event_durable_before_the_reply(spool) -> None:
    emitter = Emitter(Settings(), spool)
    failed = asyncio.get_running_loop().create_future()
    failed.set_exception(SpoolError("spool write failed: disk I/O error"))
    real = event("ok", 3)
    await emitter.settle_soon(Held(event("cancelled", 0), failed), lambda: real)
    [sent] = await sent_events(spool)  # stored (and fsynced) before settle_soon returned
    assert sent["id"] == real.id
    assert spool._synced == spool._commits
    await emitter.stop(drain_seconds=0)


async def test_with_neither_spooled_the_reply_is_withheld(spool) -> None:
    emitter = Emitter(Settings(), spool)
    failed = asyncio.get_running_loop().create_future()
    failed.set_exception(SpoolError("spool write failed: disk I/O error"))
    await spool.close()
    with pytest.raises(SpoolError):
        await emitter.settle_soon(Held(event("cancelled", 0), failed), lambda: event("ok", 3))


async def test_a_call_cancelled_while_its_fallback_is_fsynced_still_gets_its_event_spooled(spool) -> None:
    emitter = Emitter(Settings(), spool)
    real = event("ok", 5)
    os.kill(spool.fsync_worker_pid, signal.SIGSTOP)  # the fallback's fsync stays open
    try:
        held = emitter.hold(event("cancelled", 0))
        waiting = asyncio.ensure_future(emitter.settle_soon(held, lambda: real))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    finally:
        os.kill(spool.fsync_worker_pid, signal.SIGCONT)
    await emitter.stop(drain_seconds=0)  # waits for the event's task
    assert spool.held == 0
    [sent] = await sent_events(spool)
    assert sent["id"] == real.id
