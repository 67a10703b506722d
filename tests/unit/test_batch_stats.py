"""The per-source counters a batch writes: rows come out in one order whatever the batch's."""

from __future__ import annotations

from services.metering.consumer.batch import ACCEPTED, DEAD, DUPLICATE, _Stats


def test_source_rows_come_in_source_order_so_concurrent_members_lock_them_alike() -> None:
    forward, backward = _Stats(), _Stats()
    for source, column in (("gateway/b", ACCEPTED), ("gateway/a", DUPLICATE), ("unknown", DEAD), ("gateway/b", 0)):
        forward.add(source, column)
    for source, column in (("gateway/b", 0), ("unknown", DEAD), ("gateway/a", DUPLICATE), ("gateway/b", ACCEPTED)):
        backward.add(source, column)
    expected = [("gateway/a", 1, 0, 1, 0, 0), ("gateway/b", 2, 1, 0, 0, 0), ("unknown", 1, 0, 0, 0, 1)]
    assert forward.rows() == expected
    assert backward.rows() == expected
