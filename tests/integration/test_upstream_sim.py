"""The simulated upstream, driven over HTTP by the official ``openai`` SDK, as the gateway and
the benchmarks will drive it: a real uvicorn server on a free port."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from openai import AsyncOpenAI, OpenAI

from services.upstream_sim.app import create_app
from services.upstream_sim.config import SimConfig
from services.upstream_sim.replies import CACHE_MIN_PROMPT
from services.upstream_sim.server import uvicorn_options
from services.upstream_sim.tokenizer import IMAGE_TOKENS

QUESTION = [{"role": "user", "content": "What is the weather in Paris today?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city", "days"]},
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@contextlib.contextmanager
def running_sim(config: SimConfig | None = None) -> Iterator[str]:
    """A simulator on a free port, served by uvicorn in a thread; yields its base URL (…/v1)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(config or SimConfig()), **uvicorn_options()))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the simulator did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    with running_sim() as url:
        yield url


@pytest.fixture
def client(sim_url: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=sim_url, api_key="sk-anything", max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture
async def aclient(sim_url: str):
    async with AsyncOpenAI(base_url=sim_url, api_key="sk-anything", max_retries=0, timeout=30) as c:
        yield c


def usage_numbers(usage) -> tuple[int, int, int, int, int]:
    return (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens,
            usage.prompt_tokens_details.cached_tokens, usage.completion_tokens_details.reasoning_tokens)


# ---------------------------------------------------------------- chat


def test_models_are_listed(client: OpenAI):
    ids = [m.id for m in client.models.list()]
    assert "gpt-4o-mini" in ids and "text-embedding-3-small" in ids


def test_any_authorization_is_accepted(sim_url: str):
    for key in ("sk-one", "not-even-a-key"):
        with OpenAI(base_url=sim_url, api_key=key, max_retries=0) as c:
            assert c.chat.completions.create(model="gpt-4o", messages=QUESTION).choices[0].message.content


def test_chat_reply_echoes_the_prompt_and_usage_adds_up(client: OpenAI):
    reply = client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert reply.object == "chat.completion"
    assert reply.choices[0].finish_reason == "stop"
    assert "What is the weather in Paris today?" in reply.choices[0].message.content
    usage = reply.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details.reasoning_tokens == 0


def test_same_request_twice_gives_the_same_reply_and_usage(client: OpenAI):
    first = client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=50)
    second = client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=50)
    assert first.id != second.id
    assert first.choices[0].message.content == second.choices[0].message.content
    assert usage_numbers(first.usage) == usage_numbers(second.usage)


async def test_async_client_gets_the_same_reply_as_the_sync_one(client: OpenAI, aclient: AsyncOpenAI):
    sync = client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    async_ = await aclient.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert async_.choices[0].message.content == sync.choices[0].message.content
    assert usage_numbers(async_.usage) == usage_numbers(sync.usage)


def test_max_tokens_cuts_the_reply_with_finish_reason_length(client: OpenAI):
    reply = client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=3)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3
    assert reply.choices[0].message.content == "This is a"


def test_max_completion_tokens_is_honoured_too(client: OpenAI):
    reply = client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_completion_tokens=5)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_n_choices_are_billed_once_for_the_prompt(client: OpenAI):
    one = client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    three = client.chat.completions.create(model="gpt-4o", messages=QUESTION, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens


def test_array_content_counts_text_parts_and_a_fixed_price_per_image(client: OpenAI):
    plain = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Describe this picture, please."}])
    parts = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Describe this picture,"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}},
        {"type": "text", "text": "please."},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]}])
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens + 2 * IMAGE_TOKENS
    assert "Describe this picture, please." in parts.choices[0].message.content


def test_tools_make_the_reply_a_call_of_the_first_tool(client: OpenAI):
    reply = client.chat.completions.create(model="gpt-4o", messages=QUESTION, tools=[WEATHER_TOOL, TIME_TOOL])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "days"}
    assert isinstance(arguments["city"], str) and isinstance(arguments["days"], int)
    assert reply.usage.completion_tokens > 0


def test_tool_choice_picks_the_named_tool(client: OpenAI):
    reply = client.chat.completions.create(model="gpt-4o", messages=QUESTION, tools=[WEATHER_TOOL, TIME_TOOL],
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert reply.choices[0].message.tool_calls[0].function.name == "get_time"
    assert json.loads(reply.choices[0].message.tool_calls[0].function.arguments) == {}


def test_tool_choice_none_and_a_tool_result_give_a_text_reply(client: OpenAI):
    none = client.chat.completions.create(model="gpt-4o", messages=QUESTION, tools=[WEATHER_TOOL],
                                          tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "stop"
    call = client.chat.completions.create(model="gpt-4o", messages=QUESTION, tools=[WEATHER_TOOL])
    tool_call = call.choices[0].message.tool_calls[0]
    after = client.chat.completions.create(model="gpt-4o", tools=[WEATHER_TOOL], messages=[
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [tool_call.model_dump()]},
        {"role": "tool", "tool_call_id": tool_call.id, "content": "Sunny, 21 °C"},
    ])
    assert after.choices[0].finish_reason == "stop" and after.choices[0].message.content
    assert after.usage.prompt_tokens > call.usage.prompt_tokens


def test_legacy_functions_give_a_function_call(client: OpenAI):
    reply = client.chat.completions.create(model="gpt-3.5-turbo", messages=QUESTION,
                                           functions=[WEATHER_TOOL["function"]])
    choice = reply.choices[0]
    assert choice.finish_reason == "function_call"
    assert choice.message.function_call.name == "get_weather"
    assert set(json.loads(choice.message.function_call.arguments)) == {"city", "days"}


def test_reasoning_models_report_reasoning_tokens_inside_completion_tokens(client: OpenAI):
    plain = client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    thinking = client.chat.completions.create(model="o1-mini", messages=QUESTION)
    assert thinking.choices[0].message.content == plain.choices[0].message.content
    visible = plain.usage.completion_tokens
    assert thinking.usage.completion_tokens_details.reasoning_tokens == 2 * visible
    assert thinking.usage.completion_tokens == 3 * visible
    capped = client.chat.completions.create(model="my-reasoning-model", messages=QUESTION, max_completion_tokens=10)
    assert capped.usage.completion_tokens == 10
    assert capped.usage.completion_tokens_details.reasoning_tokens == 10
    assert capped.choices[0].message.content == "" and capped.choices[0].finish_reason == "length"


def test_long_prompts_report_half_of_them_cached_in_blocks_of_128(client: OpenAI):
    long_text = " ".join(["word"] * CACHE_MIN_PROMPT)
    reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": long_text}])
    prompt = reply.usage.prompt_tokens
    assert prompt > CACHE_MIN_PROMPT
    assert reply.usage.prompt_tokens_details.cached_tokens == (prompt // 2) // 128 * 128


def test_cached_and_reply_token_headers_set_the_usage(client: OpenAI):
    reply = client.chat.completions.create(model="gpt-4o", messages=QUESTION,
                                           extra_headers={"X-Sim-Cached-Tokens": "7", "X-Sim-Reply-Tokens": "40"})
    assert reply.usage.prompt_tokens_details.cached_tokens == 7
    assert reply.usage.completion_tokens == 40 and reply.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------- streaming


def test_stream_with_include_usage_ends_with_the_usage_chunk(client: OpenAI):
    whole = client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=QUESTION, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert usage_numbers(last.usage) == usage_numbers(whole.usage)
    assert all(c.usage is None for c in body)
    assert body[-1].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text == whole.choices[0].message.content
    content_chunks = [c for c in body if c.choices[0].delta.content]
    assert len(content_chunks) == whole.usage.completion_tokens  # one token per chunk


def test_stream_without_include_usage_has_no_usage_chunk(client: OpenAI):
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=QUESTION, stream=True))
    assert chunks and all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stream_wire_format_has_usage_null_on_every_other_chunk_and_done(sim_url: str):
    body = {"model": "gpt-4o", "messages": QUESTION, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{sim_url}/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all("usage" in e and e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] > 0

    body.pop("stream_options")
    with httpx.stream("POST", f"{sim_url}/chat/completions", json=body) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line and line != "data: [DONE]"]
    assert all("usage" not in e for e in events)


async def test_async_stream_with_usage(aclient: AsyncOpenAI):
    stream = await aclient.chat.completions.create(model="gpt-4o", messages=QUESTION, stream=True,
                                                   stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == len([c for c in chunks[:-1] if c.choices[0].delta.content])
    assert text.startswith("This is a simulated reply.")


def test_streamed_tool_call_arguments_reassemble_to_the_non_streamed_ones(client: OpenAI):
    whole = client.chat.completions.create(model="gpt-4o", messages=QUESTION, tools=[WEATHER_TOOL])
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=QUESTION, tools=[WEATHER_TOOL],
                                                 stream=True, stream_options={"include_usage": True}))
    first = chunks[0].choices[0].delta.tool_calls[0]
    assert first.function.name == "get_weather" and first.id == whole.choices[0].message.tool_calls[0].id
    arguments = "".join(c.choices[0].delta.tool_calls[0].function.arguments
                        for c in chunks if c.choices and c.choices[0].delta.tool_calls)
    assert arguments == whole.choices[0].message.tool_calls[0].function.arguments
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    assert usage_numbers(chunks[-1].usage) == usage_numbers(whole.usage)


def test_broken_stream_stops_after_n_chunks_without_usage(client: OpenAI):
    received = []
    with pytest.raises((openai.APIConnectionError, httpx.HTTPError)):
        stream = client.chat.completions.create(model="gpt-4o", messages=QUESTION, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_headers={"X-Sim-Break-After": "3"})
        for chunk in stream:
            received.append(chunk)
    contents = [c.choices[0].delta.content for c in received if c.choices and c.choices[0].delta.content]
    assert contents == ["This", " is", " a"]
    assert all(c.usage is None for c in received)
    assert not any(c.choices and c.choices[0].finish_reason for c in received)


def test_broken_stream_on_the_wire_has_no_done(sim_url: str):
    body = {"model": "gpt-4o", "messages": QUESTION, "stream": True, "stream_options": {"include_usage": True}}
    lines = []
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("POST", f"{sim_url}/chat/completions", json=body,
                          headers={"X-Sim-Break-After": "2"}) as response:
            for line in response.iter_lines():
                lines.append(line)
    events = [line for line in lines if line]
    assert len(events) == 3  # the role chunk and two content chunks
    assert "data: [DONE]" not in events


def test_broken_non_streaming_reply_raises_a_connection_error(client: OpenAI):
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, extra_headers={"X-Sim-Break-After": "0"})


# ---------------------------------------------------------------- completions and embeddings


def test_completions_with_a_prompt_array_answer_each_prompt_and_sum_the_usage(client: OpenAI):
    prompts = ["Say hello", "Name three colours of the rainbow", "你好"]
    singles = [client.completions.create(model="gpt-3.5-turbo-instruct", prompt=p, max_tokens=30) for p in prompts]
    batch = client.completions.create(model="gpt-3.5-turbo-instruct", prompt=prompts, max_tokens=30)
    assert batch.object == "text_completion"
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [s.choices[0].text for s in singles]
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert batch.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert batch.usage.total_tokens == batch.usage.prompt_tokens + batch.usage.completion_tokens


def test_completions_default_to_16_tokens_like_openai(client: OpenAI):
    reply = client.completions.create(model="gpt-3.5-turbo-instruct",
                                      prompt="Tell me a long story about a cat who lived in a lighthouse")
    assert reply.usage.completion_tokens == 16 and reply.choices[0].finish_reason == "length"


def test_completions_token_prompts_count_one_token_per_id(client: OpenAI):
    reply = client.completions.create(model="gpt-3.5-turbo-instruct", prompt=[[1, 2, 3], [4, 5]])
    assert len(reply.choices) == 2 and reply.usage.prompt_tokens == 5


def test_completions_stream_with_usage(client: OpenAI):
    whole = client.completions.create(model="gpt-3.5-turbo-instruct", prompt=["a b c", "d e"], max_tokens=8)
    chunks = list(client.completions.create(model="gpt-3.5-turbo-instruct", prompt=["a b c", "d e"], max_tokens=8,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    for index in (0, 1):
        text = "".join(c.choices[0].text for c in chunks[:-1] if c.choices[0].index == index)
        assert text == whole.choices[index].text


def test_embeddings_input_array_gives_one_vector_per_input_and_summed_usage(client: OpenAI):
    inputs = ["The food was delicious", "and the waiter", "was friendly."]
    singles = [client.embeddings.create(model="text-embedding-3-small", input=t) for t in inputs]
    batch = client.embeddings.create(model="text-embedding-3-small", input=inputs)
    assert [d.index for d in batch.data] == [0, 1, 2]
    assert all(len(d.embedding) == 8 for d in batch.data)
    assert [d.embedding for d in batch.data] == [s.data[0].embedding for s in singles]
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles) == 4 + 3 + 3
    assert batch.usage.total_tokens == batch.usage.prompt_tokens


def test_embeddings_are_deterministic_unit_vectors_in_float_and_base64(client: OpenAI, sim_url: str):
    as_float = client.embeddings.create(model="text-embedding-3-small", input="hello", encoding_format="float",
                                        dimensions=16)
    vector = as_float.data[0].embedding
    assert len(vector) == 16 and abs(sum(v * v for v in vector) - 1) < 1e-9
    raw = httpx.post(f"{sim_url}/embeddings", json={"model": "text-embedding-3-small", "input": "hello",
                                                    "encoding_format": "base64", "dimensions": 16}).json()
    decoded = struct.unpack("<16f", base64.b64decode(raw["data"][0]["embedding"]))
    assert decoded == pytest.approx(vector, abs=1e-6)
    other_model = client.embeddings.create(model="text-embedding-3-large", input="hello", dimensions=16)
    assert other_model.data[0].embedding != pytest.approx(vector, abs=1e-6)


def test_embeddings_of_token_arrays_count_their_length(client: OpenAI):
    reply = client.embeddings.create(model="text-embedding-3-small", input=[[1, 2, 3, 4], [5, 6]])
    assert len(reply.data) == 2 and reply.usage.prompt_tokens == 6


# ---------------------------------------------------------------- batch API


def _jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _wait_for(client: OpenAI, batch_id: str, statuses: set[str]):
    deadline = time.monotonic() + 30
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.05)


def test_batch_job_runs_every_line_and_reports_counts_usage_and_output(client: OpenAI):
    prompts = ["First question?", "Second question, a bit longer.", "Third."]
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": p}], "max_tokens": 20}}
             for i, p in enumerate(prompts)]
    lines.append({"custom_id": "req-bad", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "gpt-4o-mini"}})  # no messages: this line fails
    uploaded = client.files.create(file=("requests.jsonl", _jsonl(lines)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(_jsonl(lines))
    assert client.files.content(uploaded.id).content == _jsonl(lines)

    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h", metadata={"job": "nightly"})
    assert created.status in ("validating", "in_progress")
    done = _wait_for(client, created.id, {"completed", "failed"})

    assert done.status == "completed", done.errors
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (4, 3, 1)
    online = [client.chat.completions.create(**line["body"]) for line in lines[:3]]
    assert done.usage.input_tokens == sum(r.usage.prompt_tokens for r in online)
    assert done.usage.output_tokens == sum(r.usage.completion_tokens for r in online)
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    assert done.usage.model_extra["prompt_tokens"] == done.usage.input_tokens  # the chat-style names too
    assert done.usage.model_extra["completion_tokens"] == done.usage.output_tokens
    assert done.metadata == {"job": "nightly"}

    output = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in output] == ["req-0", "req-1", "req-2"]
    for o, r in zip(output, online, strict=True):
        assert o["response"]["status_code"] == 200
        assert o["response"]["body"]["choices"][0]["message"]["content"] == r.choices[0].message.content
        assert o["response"]["body"]["usage"]["total_tokens"] == r.usage.total_tokens
    errors = [json.loads(line) for line in client.files.content(done.error_file_id).text.splitlines()]
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [("req-bad", 400)]


def test_batch_of_embeddings_sums_the_inputs(client: OpenAI):
    lines = [{"custom_id": str(i), "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "text-embedding-3-small", "input": ["one two", "three"]}} for i in range(5)]
    uploaded = client.files.create(file=("emb.jsonl", _jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    done = _wait_for(client, batch.id, {"completed", "failed"})
    assert done.request_counts.completed == 5 and done.usage.input_tokens == 15 and done.usage.output_tokens == 0


def test_batch_with_invalid_lines_fails_validation(client: OpenAI):
    content = _jsonl([{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}]) + b"not json\n"
    uploaded = client.files.create(file=("bad.jsonl", content), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    failed = _wait_for(client, batch.id, {"completed", "failed"})
    assert failed.status == "failed"
    assert {(e.code, e.line) for e in failed.errors.data} == {("mismatched_endpoint", 1), ("invalid_json_line", 2)}


def test_batch_over_the_line_limit_fails():
    with running_sim(SimConfig(max_batch_lines=3)) as url, OpenAI(base_url=url, api_key="k", max_retries=0) as c:
        line = {"method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}}
        content = _jsonl([{**line, "custom_id": str(i)} for i in range(4)])
        uploaded = c.files.create(file=("big.jsonl", content), purpose="batch")
        batch = c.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
        failed = _wait_for(c, batch.id, {"completed", "failed"})
        assert failed.status == "failed" and failed.errors.data[0].code == "too_many_requests"


def test_batch_can_be_cancelled_while_in_progress(client: OpenAI):
    lines = [{"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}}]
    uploaded = client.files.create(file=("one.jsonl", _jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h",
                                  extra_headers={"X-Sim-Batch-Delay-Ms": "5000"})
    _wait_for(client, batch.id, {"in_progress"})
    assert client.batches.cancel(batch.id).status == "cancelling"
    assert _wait_for(client, batch.id, {"cancelled", "completed"}).status == "cancelled"


def test_a_batch_cancelled_midway_keeps_the_lines_it_ran(client: OpenAI, sim_url: str):
    lines = [{"custom_id": str(i), "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "m", "input": "one two three"}} for i in range(40)]
    uploaded = client.files.create(file=("slow.jsonl", _jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h",
                                  extra_headers={"X-Sim-Batch-Line-Delay-Ms": "50"})
    deadline = time.monotonic() + 10
    while client.batches.retrieve(batch.id).request_counts.completed < 2:
        assert time.monotonic() < deadline, "no line ran"
        time.sleep(0.02)
    client.batches.cancel(batch.id)
    cancelled = _wait_for(client, batch.id, {"cancelled", "completed"})
    assert cancelled.status == "cancelled" and cancelled.cancelled_at
    ran = cancelled.request_counts.completed
    assert 2 <= ran < 40 and cancelled.request_counts.total == 40
    assert cancelled.usage.input_tokens == 3 * ran
    assert len(client.files.content(cancelled.output_file_id).text.splitlines()) == ran
    record = httpx.get(sim_url.removesuffix("/v1") + "/sim/usage", params={"limit": 10_000}).json()["data"]
    [job] = [r for r in record if r["request_id"] == batch.id]
    assert (job["status"], job["inputs"], job["prompt_tokens"]) == ("cancelled", ran, 3 * ran)


def test_files_and_batches_are_listed_newest_first_in_pages():
    with running_sim() as url, OpenAI(base_url=url, api_key="k", max_retries=0) as c:
        line = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}}
        files = [c.files.create(file=(f"f{i}.jsonl", _jsonl([line])), purpose="batch") for i in range(5)]
        batches = [c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
                   for f in files[:3]]
        first = c.files.list(limit=2, purpose="batch")
        assert [f.id for f in first.data] == [files[4].id, files[3].id] and first.has_more
        assert [f.id for f in c.files.list(limit=2, purpose="batch")] == [f.id for f in reversed(files)]
        assert [f.id for f in c.files.list(order="asc", purpose="batch").data] == [f.id for f in files]
        assert [b.id for b in c.batches.list(limit=1)] == [b.id for b in reversed(batches)]
        c.files.delete(files[0].id)
        with pytest.raises(openai.NotFoundError):
            c.files.retrieve(files[0].id)
        assert c.files.retrieve(files[1].id).filename == "f1.jsonl"
        with pytest.raises(openai.BadRequestError):
            c.batches.list(limit=101)


def test_unknown_batch_and_file_are_404(client: OpenAI):
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-nope")


# ---------------------------------------------------------------- failure switches


@pytest.mark.parametrize(("status", "exception", "code"), [
    (400, openai.BadRequestError, "invalid_request"),
    (401, openai.AuthenticationError, "invalid_api_key"),
    (429, openai.RateLimitError, "rate_limit_exceeded"),
    (500, openai.InternalServerError, "server_error"),
    (503, openai.InternalServerError, "service_unavailable"),
])
def test_error_switch_raises_the_sdk_exception_for_the_status(client: OpenAI, status, exception, code):
    with pytest.raises(exception) as caught:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, extra_headers={"X-Sim-Error": str(status)})
    assert caught.value.status_code == status
    assert caught.value.code == code
    assert caught.value.body["message"]


def test_error_switch_applies_to_streams_and_embeddings(client: OpenAI):
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, stream=True,
                                       extra_headers={"X-Sim-Error": "429"})
    with pytest.raises(openai.InternalServerError):
        client.embeddings.create(model="text-embedding-3-small", input="x", extra_headers={"X-Sim-Error": "503"})


def test_error_rate_one_fails_every_request():
    with running_sim(SimConfig(error_rate=1.0)) as url, OpenAI(base_url=url, api_key="k", max_retries=0) as c:
        for _ in range(3):
            with pytest.raises(openai.InternalServerError):
                c.chat.completions.create(model="gpt-4o", messages=QUESTION)


def test_error_rate_draws_are_replayable_with_a_seed():
    def outcomes(seed: int) -> list[int]:
        with running_sim(SimConfig(error_rate=0.5, seed=seed)) as url:
            return [httpx.get(f"{url}/models").status_code for _ in range(20)]

    first = outcomes(7)
    assert first == outcomes(7)
    assert set(first) == {200, 500}


def test_latency_header_delays_the_reply(client: OpenAI):
    started = time.monotonic()
    client.chat.completions.create(model="gpt-4o", messages=QUESTION, extra_headers={"X-Sim-Latency-Ms": "200"})
    assert time.monotonic() - started >= 0.2


def test_chunk_delay_spaces_out_a_stream(client: OpenAI):
    started = time.monotonic()
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=QUESTION, stream=True, max_tokens=4,
                                                 extra_headers={"X-Sim-Chunk-Delay-Ms": "30"}))
    assert len(chunks) == 6  # role, 4 tokens, finish
    assert time.monotonic() - started >= 6 * 0.03


def test_bad_switch_header_is_a_clear_400(client: OpenAI):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, extra_headers={"X-Sim-Error": "oops"})
    assert "x-sim-error" in caught.value.message


# ---------------------------------------------------------------- bad requests


def test_missing_messages_is_a_400_naming_the_parameter(client: OpenAI):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[])
    assert caught.value.param == "messages"


def test_stream_options_without_stream_is_refused_like_openai(client: OpenAI):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, stream_options={"include_usage": True})
    assert caught.value.param == "stream_options"


def test_unknown_route_answers_in_openai_shape(sim_url: str):
    response = httpx.post(f"{sim_url}/nope", json={})
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_url"


def test_request_over_the_size_limit_is_413():
    with running_sim(SimConfig(max_request_bytes=2048)) as url:
        response = httpx.post(f"{url}/chat/completions",
                              json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 4096}]})
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


# ---------------------------------------------------------------- the simulator's own routes


def test_usage_log_lists_served_requests_with_their_usage(client: OpenAI, sim_url: str):
    reply = client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    root = sim_url.removesuffix("/v1")
    page = httpx.get(f"{root}/sim/usage", params={"after": 0, "limit": 10_000}).json()
    (record,) = [r for r in page["data"] if r["request_id"] == reply.id]
    assert (record["prompt_tokens"], record["completion_tokens"], record["total_tokens"]) == (
        reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens)
    assert record["status"] == "ok" and record["endpoint"] == "/v1/chat/completions"
    assert httpx.get(f"{root}/healthz").status_code == 200
    assert "tollhouse_sim_requests_total" in httpx.get(f"{root}/metrics").text


def test_cli_starts_the_simulator(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "upstream-sim", "--port", str(port),
                             "--latency-ms", "1", "--seed", "3"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the CLI did not start the simulator"
            time.sleep(0.05)
        with OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0) as c:
            assert c.chat.completions.create(model="gpt-4o", messages=QUESTION).usage.total_tokens > 0
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_refuses_a_bad_flag_value():
    result = subprocess.run([sys.executable, "-m", "services.cli", "upstream-sim", "--error-rate", "2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "error_rate" in result.stderr
