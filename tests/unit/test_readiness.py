"""Readiness rules without servers: group membership over time, the broker probe's cache,
and how the checks combine."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from services.metering.consumer.membership import REJOIN_GRACE_SECONDS, GroupMembership
from services.metering.readiness import BrokerProbe, Readiness


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_consumer_that_has_not_joined_is_not_ready() -> None:
    membership = GroupMembership("g", clock=Clock())
    assert membership.problem() == "consumer: has not joined consumer group g yet"


def test_a_member_without_partitions_is_ready() -> None:
    membership = GroupMembership("g", clock=Clock())
    membership.rebalancing()
    membership.joined([])
    assert membership.problem() is None and membership.partitions == ()


def test_a_rebalance_within_the_grace_does_not_make_it_unready() -> None:
    clock = Clock()
    membership = GroupMembership("g", clock=clock)
    membership.joined([2, 0])
    membership.rebalancing()
    membership.released([2])
    clock.now += REJOIN_GRACE_SECONDS - 1
    assert membership.problem() is None and membership.partitions == (0,)
    clock.now += 2
    assert membership.problem() == f"consumer: out of consumer group g for {REJOIN_GRACE_SECONDS + 1:.0f} s"
    membership.joined([1])
    assert membership.problem() is None and membership.partitions == (1,)


def test_an_assignment_that_could_not_be_taken_up_is_unready_at_once() -> None:
    membership = GroupMembership("g", clock=Clock())
    membership.joined([0])
    membership.rebalancing()
    membership.failed(ConnectionError("database gone"))
    assert membership.problem() == "consumer: out of consumer group g for 0 s (ConnectionError: database gone)"


def test_a_stopped_consumer_is_not_ready() -> None:
    membership = GroupMembership("g", clock=Clock())
    membership.joined([0, 1])
    membership.left()
    assert membership.problem() is not None and membership.partitions == ()


def test_the_partitions_gauge_counts_every_member_of_the_process() -> None:
    def gauge() -> float:
        return REGISTRY.get_sample_value("tollhouse_consumer_partitions")

    before = gauge()
    first, second = GroupMembership("g", clock=Clock()), GroupMembership("g", clock=Clock())
    first.joined([0, 2])
    second.joined([1])
    assert gauge() == before + 3
    first.rebalancing()
    first.released([2])
    second.joined([1, 3])
    assert gauge() == before + 3
    first.left()
    assert gauge() == before + 2
    second.left()
    assert gauge() == before


async def test_readiness_names_the_member_that_is_out_of_its_group() -> None:
    async def database_up() -> None:
        return None

    clock = Clock()
    first, second = GroupMembership("g", clock=clock), GroupMembership("g", clock=clock)
    first.joined([3, 1])
    second.joined([0])
    members = Readiness(database_up, members=[first, second])
    report = await members.check()
    assert report.checks["consumer"] == "ok" and report.problems == [] and report.partitions == [0, 1, 3]
    second.rebalancing()
    second.failed(ConnectionError("database gone"))
    report = await members.check()
    assert report.checks["consumer"] == "not ready"
    assert report.problems == ["consumer: out of consumer group g for 0 s (ConnectionError: database gone) (member 2 of 2)"]
    first.left()
    second.left()


async def test_the_broker_probe_asks_at_most_once_per_cache_period() -> None:
    clock = Clock()
    probe = BrokerProbe("127.0.0.1:1", cache_seconds=1.0, clock=clock)
    asked = []

    async def ask() -> str | None:
        asked.append(clock.now)
        await asyncio.sleep(0.01)
        return "broker: down"

    probe._ask = ask  # type: ignore[method-assign]
    answers = await asyncio.gather(*(probe.problem() for _ in range(20)))
    assert answers == ["broker: down"] * 20 and len(asked) == 1
    clock.now += 1.0
    await probe.problem()
    assert len(asked) == 2


async def test_an_unreachable_broker_is_reported_with_its_address() -> None:
    probe = BrokerProbe("127.0.0.1:1", timeout_seconds=1.0)
    try:
        problem = await probe.problem()
    finally:
        await probe.close()
    assert problem is not None and problem.startswith("broker: 127.0.0.1:1 unreachable"), problem


async def test_readiness_names_every_problem() -> None:
    async def database_down() -> None:
        raise OSError("connection refused")

    membership = GroupMembership("g", clock=Clock())
    probe = BrokerProbe("127.0.0.1:1")

    async def broker_down() -> str | None:
        return "broker: 127.0.0.1:1 unreachable (KafkaConnectionError)"

    probe.problem = broker_down  # type: ignore[method-assign]
    report = await Readiness(database_down, broker=probe, members=[membership]).check()
    assert report.checks == {"database": "not ready", "broker": "not ready", "consumer": "not ready"}
    assert [p.split(":")[0] for p in report.problems] == ["database", "broker", "consumer"]
    assert report.partitions == []


async def test_without_a_consumer_only_the_database_counts() -> None:
    async def database_up() -> None:
        return None

    report = await Readiness(database_up).check()
    assert report.checks == {"database": "ok", "broker": "not used", "consumer": "off"}
    assert report.problems == [] and report.partitions is None
