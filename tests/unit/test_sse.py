"""Incremental SSE parsing: events come out whole, in order, byte-exact, however the
bytes are split."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.gateway.sse import SSEError, SSEParser

STREAM = (
    b'data: {"id":"c1","choices":[{"delta":{"content":"Hel"}}]}\n\n'
    b": keep-alive\n\n"
    b'data: {"id":"c1","choices":[{"delta":{"content":"lo"}}]}\r\n\r\n'
    b"event: note\ndata: line one\ndata: line two\n\n"
    b"data: [DONE]\n\n"
)


def feed_all(parser: SSEParser, pieces: list[bytes]) -> list:
    events = []
    for piece in pieces:
        events.extend(parser.feed(piece))
    return events


def test_whole_stream_yields_each_event_with_its_data() -> None:
    events = SSEParser().feed(STREAM)
    assert [e.data for e in events] == [
        '{"id":"c1","choices":[{"delta":{"content":"Hel"}}]}',
        None,
        '{"id":"c1","choices":[{"delta":{"content":"lo"}}]}',
        "line one\nline two",
        "[DONE]",
    ]
    assert events[3].event == "note"
    assert events[-1].is_done


def test_raw_bytes_of_all_events_reproduce_the_stream() -> None:
    assert b"".join(e.raw for e in SSEParser().feed(STREAM)) == STREAM


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    bounds = sorted(set([0, len(STREAM), *cuts]))
    pieces = [STREAM[a:b] for a, b in zip(bounds, bounds[1:])]
    split = feed_all(SSEParser(), pieces)
    assert split == SSEParser().feed(STREAM)


def test_byte_by_byte_with_crlf_split_across_reads() -> None:
    stream = b"data: a\r\n\r\ndata: b\r\r"
    events = feed_all(SSEParser(), [bytes([b]) for b in stream])
    assert [e.data for e in events] == ["a"]  # "b" ended with CR CR: the second CR may yet be CRLF
    parser = SSEParser()
    events = feed_all(parser, [bytes([b]) for b in stream] + [b"x"])
    assert [e.data for e in events] == ["a", "b"]


def test_an_unfinished_event_is_held_back() -> None:
    parser = SSEParser()
    assert parser.feed(b'data: {"partial": ') == []
    assert parser.pending == len(b'data: {"partial": ')
    assert [e.data for e in parser.feed(b"1}\n\n")] == ['{"partial": 1}']
    assert parser.pending == 0


def test_field_without_space_and_without_colon() -> None:
    events = SSEParser().feed(b"data:x\ndata\n\n")
    assert events[0].data == "x\n"


def test_an_oversize_event_is_refused_not_buffered() -> None:
    parser = SSEParser(max_event_bytes=64)
    with pytest.raises(SSEError):
        parser.feed(b"data: " + b"x" * 100)


def test_random_chunking_of_a_long_stream() -> None:
    rng = random.Random(7)
    body = b"".join(f'data: {{"n": {i}}}\n\n'.encode() for i in range(500)) + b"data: [DONE]\n\n"
    parser, events, pos = SSEParser(), [], 0
    while pos < len(body):
        step = rng.randint(1, 50)
        events.extend(parser.feed(body[pos:pos + step]))
        pos += step
    assert len(events) == 501
    assert events[123].data == '{"n": 123}'


LF_STREAM = (
    b'data: {"id":"c1","choices":[{"delta":{"content":"Hel"}}]}\n\n'
    b": keep-alive\n\n"
    b"event: note\ndata: line one\ndata: line two\n\n"
    b"data:no space\n\n"
    b"id: 7\n\n"
    b'data: {"id":"c1","choices":[],"usage":{"total_tokens":3}}\n\n'
    b"data: [DONE]\n\n"
)


@given(st.lists(st.integers(min_value=0, max_value=len(LF_STREAM)), max_size=20))
def test_lf_only_streams_split_anywhere_give_the_same_events(cuts: list[int]) -> None:
    bounds = sorted(set([0, len(LF_STREAM), *cuts]))
    events = feed_all(SSEParser(), [LF_STREAM[a:b] for a, b in zip(bounds, bounds[1:])])
    assert [e.data for e in events] == [
        '{"id":"c1","choices":[{"delta":{"content":"Hel"}}]}', None, "line one\nline two", "no space", None,
        '{"id":"c1","choices":[],"usage":{"total_tokens":3}}', "[DONE]",
    ]
    assert [e.event for e in events] == [None, None, "note", None, None, None, None]
    assert b"".join(e.raw for e in events) == LF_STREAM


def test_extra_blank_lines_are_empty_events_in_any_split() -> None:
    stream = b"data: a\n\n\n\ndata: b\n\n"
    whole = SSEParser().feed(stream)
    assert [e.data for e in whole] == ["a", None, None, "b"] and b"".join(e.raw for e in whole) == stream
    assert feed_all(SSEParser(), [stream[:9], stream[9:]]) == whole
