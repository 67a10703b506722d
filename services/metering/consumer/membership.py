"""Where this consumer stands in its consumer group, as its rebalance listener sees it.

Read by ``/readyz`` (has the consumer joined the group?) and kept in the partition gauges.
A member with no partitions is a full member: with more members than partitions some
legitimately wait as standbys, and they take over when another one leaves. A process may
run several members (``consumer_members``); the partitions gauge counts all of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from services.metering import metrics

# A rebalance normally ends within the consumer's rebalance timeout (30 s); only a member
# that stays out of its group longer than that is reported as not ready.
REJOIN_GRACE_SECONDS = 30.0


class GroupMembership:
    def __init__(self, group: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.group = group
        self.clock = clock
        self.joined_at: float | None = None  # the last completed join
        self.rebalancing_since: float | None = None  # partitions revoked, the next join not completed
        self.partitions: tuple[int, ...] = ()
        self.error: str | None = None  # the last assignment could not be taken up

    def rebalancing(self) -> None:
        """A rebalance began (the group is re-dividing its partitions)."""
        if self.rebalancing_since is None:
            self.rebalancing_since = self.clock()

    def released(self, partitions: Iterable[int]) -> None:
        """These partitions are no longer this member's (after its batch in flight ended)."""
        gone = set(partitions)
        self._hold(tuple(p for p in self.partitions if p not in gone))
        for partition in gone:
            _forget_lag(partition)

    def joined(self, partitions: Iterable[int]) -> None:
        """A join completed and the assignment (possibly empty) is being consumed."""
        self._hold(tuple(sorted(partitions)))
        self.joined_at = self.clock()
        self.rebalancing_since = None
        self.error = None

    def failed(self, error: BaseException) -> None:
        """The assignment arrived but could not be taken up (its stored offsets were not read)."""
        self.error = f"{type(error).__name__}: {error}"[:200]
        if self.rebalancing_since is None:
            self.rebalancing_since = self.clock()

    def left(self) -> None:
        """The consumer stopped."""
        for partition in self.partitions:
            _forget_lag(partition)
        self.joined_at = self.rebalancing_since = None
        self._hold(())

    def _hold(self, partitions: tuple[int, ...]) -> None:
        # The gauge is the process's: it moves by this member's change, not to its count.
        metrics.CONSUMER_PARTITIONS.inc(len(partitions) - len(self.partitions))
        self.partitions = partitions

    def problem(self, grace_seconds: float = REJOIN_GRACE_SECONDS) -> str | None:
        """Why this member does not count as in its group, or None when it does."""
        cause = f" ({self.error})" if self.error else ""
        if self.joined_at is None:
            return f"consumer: has not joined consumer group {self.group} yet{cause}"
        if self.rebalancing_since is not None:
            out = self.clock() - self.rebalancing_since
            if self.error or out > grace_seconds:
                return f"consumer: out of consumer group {self.group} for {out:.0f} s{cause}"
        return None


def _forget_lag(partition: int) -> None:
    # Another member reports this partition's lag from now on; a stale series here would
    # keep showing the lag of the moment it left.
    try:
        metrics.CONSUMER_LAG.remove(str(partition))
    except KeyError:
        pass
