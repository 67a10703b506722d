"""The gateway's HTTP/1.1 client, for its two hops on every call (metering's authorize and
the upstream model API) and the Files/Batch calls: keep-alive connections in one bounded
pool per client, replies parsed by httptools, bodies read whole or streamed.

It exists because the hops are most of what the gateway adds to a call: httpx spent about
1 ms of CPU per request here and looks at every pooled connection on each request, more
than the rest of the gateway's work for a call. This client does one write per request and
one parse per read, and nothing per idle connection.

What it does not do (the gateway does not need it): HTTP/2, redirects, cookies, proxies
from the environment, compression (the gateway sends no ``Accept-Encoding``, so replies
come as they are), request bodies it has not read whole.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable

import httptools

IDLE_SECONDS = 4.0  # a pooled connection idle longer is closed (uvicorn closes after 5 s)
_PAUSE_AT = 256 * 1024  # a streamed reply buffered beyond this stops reading from the socket
_RESUME_AT = 64 * 1024


class HTTPError(Exception):
    """The exchange failed; the message says how."""


class ConnectFailed(HTTPError):
    """The request was not sent: no connection (refused, timed out, none free in the pool in
    time) or a request that cannot be written. Upstream did nothing."""


class NoAnswer(HTTPError):
    """The request was sent, but no complete reply came: read timeout, connection closed,
    or bytes that are not HTTP. Upstream may have done the work."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; holds the state of the reply it is receiving."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.idle_since = 0.0
        self.waiter: asyncio.Future | None = None
        self.begin()

    def begin(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.until_close = False  # no length and not chunked: the body ends with the connection
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.failure: HTTPError | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(NoAnswer(f"the reply is not valid HTTP/1.1 ({exc})"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.headers_done and self.until_close and not self.complete:
            self.complete = True
        elif not self.complete:
            self.fail(NoAnswer("the connection closed before the reply was complete"))
        self.wake()

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status < 200:  # 1xx (e.g. 100 Continue): the real reply follows
            self.headers = {}
            return
        self.headers_done = True
        self.until_close = ("content-length" not in self.headers
                            and "chunked" not in self.headers.get("transfer-encoding", "").lower())
        self.wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _PAUSE_AT and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self.wake()

    def on_message_complete(self) -> None:
        if self.headers_done:
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()  # only known until the parser resets
            self.wake()

    # used by the client and the response

    def fail(self, error: HTTPError) -> None:
        if self.failure is None:
            self.failure = error
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Until the parser has news (headers, body, the end, a failure), at most ``timeout`` s."""
        waiter = self.waiter = self.loop.create_future()
        expiry = self.loop.call_later(timeout, _expire, waiter, timeout)
        try:
            await waiter
        finally:
            expiry.cancel()
            self.waiter = None

    def take(self) -> bytes:
        chunks = self.chunks
        chunk = chunks.popleft() if len(chunks) == 1 else b"".join([chunks.popleft() for _ in range(len(chunks))])
        self.buffered -= len(chunk)
        if self.paused and self.buffered < _RESUME_AT and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.lost and self.failure is None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.lost = True


def _expire(waiter: asyncio.Future, timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(NoAnswer(f"no reply within {timeout:g} s"))


class Response:
    """A reply: status and headers at once; the body read whole (``content`` after
    ``aread``, set already unless streamed) or piece by piece (``aiter_bytes``). Its
    connection goes back to the pool when the body has been read, or is closed by
    ``aclose`` if it was not."""

    def __init__(self, client: HTTPClient, conn: _Connection) -> None:
        self._client = client
        self._conn: _Connection | None = conn
        self.status_code = conn.status
        self.headers = conn.headers
        self.content = b""
        self._read = False

    async def aread(self) -> bytes:
        if not self._read:
            self.content = b"".join([chunk async for chunk in self.aiter_bytes()])
            self._read = True
        return self.content

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            if self.content:
                yield self.content
            return
        while True:
            if conn.chunks:
                yield conn.take()  # all that has arrived, in one piece
            elif conn.failure is not None:
                self._let_go(reuse=False)
                raise conn.failure
            elif conn.complete:
                self._let_go(reuse=True)
                return
            else:
                try:
                    await conn.wait(self._client.read_timeout)
                except BaseException:
                    self._let_go(reuse=False)
                    raise

    async def aclose(self, *, drain_seconds: float = 0.0) -> None:
        """Let go of the connection: back to the pool if the reply was read to its end
        (or, with ``drain_seconds``, ends within that time, the rest discarded), else closed,
        which also tells upstream to stop sending."""
        conn = self._conn
        if conn is None:
            return
        if drain_seconds > 0 and not conn.complete and conn.failure is None:
            try:
                async with asyncio.timeout(drain_seconds):
                    while not conn.complete and conn.failure is None:
                        conn.chunks.clear()
                        await conn.wait(drain_seconds)
            except (TimeoutError, HTTPError):
                pass
        self._let_go(reuse=conn.complete)

    def _let_go(self, *, reuse: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._client._release(conn, reuse=reuse)


class HTTPClient:
    def __init__(self, base_url: str, *, headers: dict[str, str] | None = None, connect_timeout: float,
                 read_timeout: float, max_connections: int, idle_seconds: float = IDLE_SECONDS) -> None:
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.base_url = base_url
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._base_path = url.path.rstrip("/") + "/"
        self._fixed_head = f"Host: {url.netloc}\r\n" + "".join(
            f"{_checked(k)}: {_checked(v)}\r\n" for k, v in (headers or {}).items())
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.idle_seconds = idle_seconds
        self._idle: list[_Connection] = []
        self._open = 0  # connections counted against max_connections: idle, in use, connecting
        self._room: collections.deque[asyncio.Future] = collections.deque()
        self._closed = False

    async def request(self, method: str, path: str, *, headers: dict[str, str] | None = None, content: bytes = b"",
                      params: dict[str, str] | None = None, stream: bool = False,
                      on_sent: Callable[[], None] | None = None) -> Response:
        """``path`` is relative to the base URL (``chat/completions`` under ``…/v1``);
        ``params`` become its query string. With ``stream`` the reply comes back after its
        headers; otherwise after its body. ``on_sent`` is called once the request is handed
        to the connection, so its work overlaps the server's."""
        if params:
            path = f"{path}?{urllib.parse.urlencode(params)}"
        head = self._head(method, path, headers, content)
        conn = await self._acquire()
        conn.begin()
        assert conn.transport is not None
        if len(content) > 64 * 1024:
            conn.transport.writelines((head, content))
        else:
            conn.transport.write(head + content)
        try:
            if on_sent is not None:
                on_sent()
            while not conn.headers_done:
                if conn.failure is not None:
                    raise conn.failure
                await conn.wait(self.read_timeout)
        except BaseException:
            self._release(conn, reuse=False)
            raise
        response = Response(self, conn)
        if not stream:
            await response.aread()
        return response

    async def get(self, path: str, **kwargs) -> Response:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs) -> Response:
        return await self.request("POST", path, **kwargs)

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._drop(self._idle.pop())
        while self._room:
            waiter = self._room.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectFailed("the client is closed"))

    # The pool

    def _head(self, method: str, path: str, headers: dict[str, str] | None, content: bytes) -> bytes:
        target = self._base_path + _checked(path).lstrip("/")
        if " " in target:
            raise ConnectFailed(f"the path {path!r} has a space; quote it")
        lines = [f"{method} {target} HTTP/1.1\r\n", self._fixed_head]
        if headers:
            lines.extend(f"{_checked(k)}: {_checked(v)}\r\n" for k, v in headers.items())
        if content or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(content)}\r\n")
        lines.append("\r\n")
        try:
            return "".join(lines).encode("latin-1")
        except UnicodeEncodeError:
            raise ConnectFailed("a request header is not Latin-1 text") from None

    async def _acquire(self) -> _Connection:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        while True:
            if self._closed:
                raise ConnectFailed("the client is closed")
            now = loop.time()
            while self._idle:
                conn = self._idle.pop()
                if not conn.lost and now - conn.idle_since < self.idle_seconds:
                    return conn
                self._drop(conn)
            if self._open < self.max_connections:
                self._open += 1
                try:
                    return await self._connect(loop, max(0.001, deadline - now))
                except BaseException:
                    self._open -= 1
                    self._make_room()
                    raise
            waiter = loop.create_future()
            self._room.append(waiter)
            expiry = loop.call_later(max(0.0, deadline - now), _no_room, waiter, self)
            try:
                await waiter
            finally:
                expiry.cancel()

    async def _connect(self, loop: asyncio.AbstractEventLoop, timeout: float) -> _Connection:
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(lambda: _Connection(loop), self._host, self._port,
                                                       ssl=self._ssl)
        except TimeoutError:
            raise ConnectFailed(f"no connection to {self._host}:{self._port} within {timeout:.3g} s") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(f"cannot connect to {self._host}:{self._port}: {exc}") from None
        return conn

    def _release(self, conn: _Connection, *, reuse: bool) -> None:
        if reuse and conn.reusable and not self._closed:
            conn.idle_since = conn.loop.time()
            self._idle.append(conn)
        else:
            self._drop(conn)
        self._make_room()

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        self._open -= 1

    def _make_room(self) -> None:
        while self._room:
            waiter = self._room.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _no_room(waiter: asyncio.Future, client: HTTPClient) -> None:
    if not waiter.done():
        waiter.set_exception(ConnectFailed(
            f"all {client.max_connections} connections to {client._host}:{client._port} stayed busy"))


def _checked(text: str) -> str:
    if "\r" in text or "\n" in text:
        raise ConnectFailed("a request line or header holds a line break")
    return text
