"""The gateway's HTTP/1.1 client against real servers: the upstream simulator (keep-alive,
streams, broken replies) and small raw TCP servers for what a well-behaved server never
does (hang, close, answer until close)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest

from services.gateway.http_client import ConnectFailed, HTTPClient, NoAnswer
from services.local_services import free_port
from tests.support.gateway import upstream_server

CHAT = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8})
JSON = {"content-type": "application/json"}


def client_of(base_url: str, **options) -> HTTPClient:
    settings = {"connect_timeout": 2.0, "read_timeout": 5.0, "max_connections": 10, **options}
    return HTTPClient(base_url, **settings)


@contextlib.asynccontextmanager
async def raw_server(handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
                     ) -> AsyncIterator[str]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    await reader.readexactly(length)
    return head


async def test_replies_are_read_whole_and_the_connection_is_kept_for_the_next_call() -> None:
    async with upstream_server() as url:
        client = client_of(f"{url}/v1", headers={"Authorization": "Bearer sk-upstream"})
        try:
            first = await client.post("chat/completions", content=CHAT, headers=JSON)
            second = await client.post("chat/completions", content=CHAT, headers=JSON)
            models = await client.get("models")
        finally:
            await client.aclose()
    assert (first.status_code, second.status_code, models.status_code) == (200, 200, 200)
    assert orjson.loads(first.content)["usage"] == orjson.loads(second.content)["usage"]
    assert first.headers["x-request-id"].startswith("chatcmpl-")
    assert client._open == 0 and client._idle == []  # closed with the client
    assert [m["id"] for m in orjson.loads(models.content)["data"]][:1] == ["gpt-3.5-turbo"]


async def test_one_connection_serves_calls_one_after_another() -> None:
    async with upstream_server() as url:
        client = client_of(f"{url}/v1")
        try:
            for _ in range(5):
                await client.post("chat/completions", content=CHAT, headers=JSON)
            assert (client._open, len(client._idle)) == (1, 1)
        finally:
            await client.aclose()


async def test_a_stream_arrives_piece_by_piece_to_its_end() -> None:
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "stream": True})
    async with upstream_server() as url:
        client = client_of(f"{url}/v1")
        try:
            reply = await client.request("POST", "chat/completions", content=body, headers=JSON, stream=True)
            assert reply.headers["content-type"].startswith("text/event-stream")
            text = b"".join([chunk async for chunk in reply.aiter_bytes()])
            assert (client._open, len(client._idle)) == (1, 1)  # read to the end: back in the pool
        finally:
            await client.aclose()
    assert text.endswith(b"data: [DONE]\n\n") and text.count(b"data: ") > 3


async def test_a_stream_left_early_is_closed_unless_drained_to_its_end() -> None:
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "stream": True})
    async with upstream_server() as url:
        client = client_of(f"{url}/v1")
        try:
            for drain, kept in ((0.0, 0), (1.0, 1)):
                reply = await client.request("POST", "chat/completions", content=body, stream=True,
                                             headers={**JSON, "X-Sim-Chunk-Delay-Ms": "10"})
                async for _ in reply.aiter_bytes():
                    break  # the caller stops reading (client gone, or [DONE] seen)
                await reply.aclose(drain_seconds=drain)
                assert (client._open, len(client._idle)) == (kept, kept)
        finally:
            await client.aclose()


async def test_a_stream_broken_off_raises_no_answer_and_the_connection_is_dropped() -> None:
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "stream": True})
    async with upstream_server() as url:
        client = client_of(f"{url}/v1")
        try:
            reply = await client.request("POST", "chat/completions", content=body, stream=True,
                                         headers={**JSON, "X-Sim-Break-After": "2"})
            received = []
            with pytest.raises(NoAnswer):
                async for chunk in reply.aiter_bytes():
                    received.append(chunk)
            assert b"".join(received).count(b"data: ") >= 2
            assert client._open == 0
        finally:
            await client.aclose()


async def test_a_body_cut_short_raises_no_answer() -> None:
    async with upstream_server() as url:
        client = client_of(f"{url}/v1")
        try:
            with pytest.raises(NoAnswer, match="closed before the reply was complete"):
                await client.post("chat/completions", content=CHAT, headers={**JSON, "X-Sim-Break-After": "0"})
        finally:
            await client.aclose()


async def test_a_refused_connection_is_connect_failed() -> None:
    client = client_of(f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(ConnectFailed, match="cannot connect"):
        await client.get("models")


async def test_a_server_that_never_answers_is_no_answer_after_the_read_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async with raw_server(silent) as url:
        client = client_of(url, read_timeout=0.2)
        with pytest.raises(NoAnswer, match="no reply within 0.2 s"):
            await client.get("models")
        assert client._open == 0


async def test_a_body_that_ends_with_the_connection_and_connection_close_are_honoured() -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async with raw_server(until_close) as url:
        client = client_of(url)
        reply = await client.get("models")
        assert (reply.status_code, reply.content) == (200, b"all of it")
        assert client._open == 0  # not reused


async def test_calls_wait_for_a_free_connection_and_give_up_after_the_connect_timeout() -> None:
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with raw_server(slow) as url:
        client = client_of(url, max_connections=1, connect_timeout=0.3)
        first = asyncio.create_task(client.get("a"))
        await asyncio.sleep(0.05)
        with pytest.raises(ConnectFailed, match="stayed busy"):
            await client.get("b")
        second = asyncio.create_task(client.get("c"))  # waits for the first one's connection
        await asyncio.sleep(0.05)
        release.set()
        assert [(await t).content for t in (first, second)] == [b"ok", b"ok"]
        assert client._open == 1
        await client.aclose()


async def test_a_line_break_in_a_path_or_header_is_refused_before_anything_is_sent() -> None:
    client = client_of(f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(ConnectFailed, match="line break"):
        await client.get("files/x\r\nHost: evil")
    with pytest.raises(ConnectFailed, match="line break"):
        await client.get("models", headers={"X-Test": "a\nb"})


async def test_the_request_carries_the_base_path_host_and_fixed_headers() -> None:
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                seen.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()

    async with raw_server(record) as url:
        client = client_of(url, headers={"Authorization": "Bearer sk-gw"})
        reply = await client.post("batches/batch_1/cancel")
        await client.get("readyz", params={"scope": "api", "x": "a b"})
        await client.aclose()
    head = seen[0].decode()
    assert reply.status_code == 204 and reply.content == b""
    assert head.startswith("POST /v1/batches/batch_1/cancel HTTP/1.1\r\n")
    assert f"Host: {url.removeprefix('http://').removesuffix('/v1')}\r\n" in head
    assert "Authorization: Bearer sk-gw\r\n" in head and "Content-Length: 0\r\n" in head
    assert seen[1].decode().startswith("GET /v1/readyz?scope=api&x=a+b HTTP/1.1\r\n")
