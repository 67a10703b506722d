"""Incremental parsing of a server-sent event stream (the WHATWG ``text/event-stream`` format).

Pure: bytes go in as they arrive from upstream, complete events come out, each with the
exact bytes it arrived as, so the gateway can forward an event untouched or drop it
(the usage chunk the client did not ask for) without re-encoding anything. Bytes of an
event that has not ended yet stay buffered; the buffer has a limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DONE = "[DONE]"
DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024

# A line ends at CRLF, LF or CR. A CR as the very last byte may be the first half of a
# CRLF split across two reads, so the parser waits for the next byte before using it.
_LINE_END = re.compile(rb"\r\n|\r|\n")


class SSEError(ValueError):
    """The stream broke the format in a way the parser will not buffer (an oversize event)."""


@dataclass(frozen=True, slots=True)
class SSEEvent:
    raw: bytes
    """The event's bytes as received, up to and including the blank line that ended it."""
    data: str | None
    """The ``data`` field lines joined by newlines; None when the event had none (a comment or keep-alive)."""
    event: str | None = None
    """The ``event`` field, when given."""

    @property
    def is_done(self) -> bool:
        return self.data == DONE


class SSEParser:
    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._buffer = bytearray()
        self._scanned = 0  # bytes of _buffer already split into lines of the current event
        self._data: list[str] = []
        self._has_data = False
        self._event: str | None = None

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a complete event."""
        return len(self._buffer)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Add bytes; return the events they complete, in order."""
        if not chunk:
            return []
        if not self._buffer and b"\r" not in chunk and b"\n\n\n" not in chunk and chunk[:1] != b"\n":
            return self._feed_plain(chunk)
        buffer = self._buffer
        buffer += chunk
        events: list[SSEEvent] = []
        start = 0  # where the current event's bytes begin in the buffer
        pos = self._scanned
        size = len(buffer)
        while True:
            match = _LINE_END.search(buffer, pos)
            if match is None:
                break
            if match.end() == size and buffer[match.start()] == 0x0D and match.end() - match.start() == 1:
                break  # a trailing CR: wait to see whether LF follows
            line = bytes(buffer[pos:match.start()])
            pos = match.end()
            if line:
                self._field(line)
                continue
            # Every blank line ends an event, even an empty one: forwarding all raw bytes
            # keeps what the client gets byte-identical to upstream (but for dropped events).
            events.append(SSEEvent(
                raw=bytes(buffer[start:pos]),
                data="\n".join(self._data) if self._has_data else None,
                event=self._event,
            ))
            self._data, self._has_data, self._event = [], False, None
            start = pos
        if start:
            del buffer[:start]
            pos -= start
        self._scanned = pos
        if len(buffer) > self.max_event_bytes:
            raise SSEError(f"an event is longer than {self.max_event_bytes} bytes")
        return events

    def _feed_plain(self, chunk: bytes) -> list[SSEEvent]:
        """The usual case, split without a scan per line: nothing pending, LF line ends,
        and no blank line but the one that ends each event (so the events are exactly
        what lies between the ``\\n\\n``). Gives what the general path gives."""
        parts = chunk.split(b"\n\n")
        rest = parts.pop()  # after the last blank line: the start of an event not ended yet
        events: list[SSEEvent] = []
        for part in parts:
            if part[:6] == b"data: " and b"\n" not in part:  # one data line: most events
                events.append(SSEEvent(part + b"\n\n", part[6:].decode("utf-8", "replace")))
                continue
            for line in part.split(b"\n"):
                self._field(line)
            events.append(SSEEvent(part + b"\n\n", "\n".join(self._data) if self._has_data else None, self._event))
            self._data, self._has_data, self._event = [], False, None
        if rest:
            self._buffer += rest
            if len(self._buffer) > self.max_event_bytes:
                raise SSEError(f"an event is longer than {self.max_event_bytes} bytes")
        return events

    def _field(self, line: bytes) -> None:
        if line[:1] == b":":
            return  # a comment
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
            self._has_data = True
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        # id and retry do not matter to a one-shot proxy stream
