"""Usage capture and estimation at the gateway (pure functions)."""

from __future__ import annotations

import orjson

from services.gateway.batches import estimated_prompt_done, parse_multipart
from services.gateway.sse import SSEParser
from services.gateway.usage import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    IMAGE_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    StreamMeter,
    Usage,
    completion_allowance,
    count_inputs,
    estimate_call,
    estimate_prompt_tokens,
    estimated_usage,
    summarize_batch_file,
    tokens_from_bytes,
    usage_from,
)


def test_usage_from_chat_reply_with_details() -> None:
    usage = usage_from({
        "prompt_tokens": 19, "completion_tokens": 9, "total_tokens": 28,
        "prompt_tokens_details": {"cached_tokens": 5}, "completion_tokens_details": {"reasoning_tokens": 3},
    })
    assert usage == Usage(19, 9, 5, 3)
    assert usage.total_tokens == 28


def test_usage_from_batch_names() -> None:
    usage = usage_from({"input_tokens": 100, "output_tokens": 40, "input_tokens_details": {"cached_tokens": 10},
                        "output_tokens_details": {"reasoning_tokens": 4}, "total_tokens": 140})
    assert usage == Usage(100, 40, 10, 4)


def test_embeddings_usage_has_no_completion() -> None:
    assert usage_from({"prompt_tokens": 8, "total_tokens": 8}) == Usage(8, 0)


def test_unusable_usage_is_none_and_sub_counts_are_clamped() -> None:
    assert usage_from(None) is None
    assert usage_from({"completion_tokens": 3}) is None
    assert usage_from({"prompt_tokens": -1, "completion_tokens": 3}) is None
    assert usage_from({"prompt_tokens": True, "completion_tokens": 3}) is None
    clamped = usage_from({"prompt_tokens": 2, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 9},
                          "completion_tokens_details": {"reasoning_tokens": 9}})
    assert clamped == Usage(2, 1, 2, 1)


def test_bytes_over_four_rounded_up() -> None:
    assert [tokens_from_bytes(n) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


def test_chat_prompt_estimate_counts_text_images_and_tools() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "abcd" * 10},  # 40 bytes → 10
            {"role": "user", "content": [{"type": "text", "text": "abcdefgh"},  # 2
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10_000}}]},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    }
    tools_tokens = tokens_from_bytes(len(orjson.dumps(body["tools"])))
    assert estimate_prompt_tokens(CHAT, body) == 2 * MESSAGE_OVERHEAD_TOKENS + 10 + 2 + IMAGE_TOKENS + tools_tokens


def test_completion_allowance_uses_the_callers_limit_and_choices() -> None:
    assert completion_allowance(CHAT, {}, 1024) == 1024
    assert completion_allowance(CHAT, {"max_tokens": 50, "n": 2}, 1024) == 100
    assert completion_allowance(CHAT, {"max_completion_tokens": 7, "max_tokens": 50}, 1024) == 7
    assert completion_allowance(COMPLETIONS, {"prompt": ["a", "b", "c"], "max_tokens": 10}, 1024) == 30
    assert completion_allowance(EMBEDDINGS, {"input": "x"}, 1024) == 0


def test_inputs_of_prompt_and_input_arrays() -> None:
    assert count_inputs(COMPLETIONS, {"prompt": "one"}) == 1
    assert count_inputs(COMPLETIONS, {"prompt": ["a", "b", "c"]}) == 3
    assert count_inputs(COMPLETIONS, {"prompt": [1, 2, 3]}) == 1  # one prompt, as token ids
    assert count_inputs(COMPLETIONS, {"prompt": [[1, 2], [3]]}) == 2
    assert count_inputs(EMBEDDINGS, {"input": ["a", "b"]}) == 2
    assert count_inputs(CHAT, {"messages": [{}, {}]}) == 1


def test_estimate_call_reserves_prompt_and_completion() -> None:
    prompt, reserve = estimate_call(EMBEDDINGS, {"input": ["abcd", "abcdefgh"]}, 1024)
    assert (prompt, reserve) == (3, 3)


def _stream(*chunks: dict | str) -> list:
    raw = b"".join(b"data: " + (c.encode() if isinstance(c, str) else orjson.dumps(c)) + b"\n\n" for c in chunks)
    return SSEParser().feed(raw)


CHUNKS = (
    {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello"}}], "usage": None},
    {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"name": "get", "arguments": "{\"a\":1}"}}]}}], "usage": None},
    {"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}},
    "[DONE]",
)


def test_stream_meter_strips_the_usage_chunk_the_client_did_not_ask_for() -> None:
    meter = StreamMeter(client_wants_usage=False)
    forwarded = [meter.observe(e) for e in _stream(*CHUNKS)]
    assert forwarded == [True, True, False, True]
    assert meter.usage == Usage(10, 4)
    assert meter.response_id == "chatcmpl-1"
    assert meter.done
    assert meter.completion_bytes == len("Hello") + len("get") + len('{"a":1}')


def test_stream_meter_keeps_the_usage_chunk_when_asked() -> None:
    meter = StreamMeter(client_wants_usage=True)
    assert all(meter.observe(e) for e in _stream(*CHUNKS))


def test_a_cut_stream_is_estimated_from_streamed_bytes() -> None:
    meter = StreamMeter(client_wants_usage=False)
    for event in _stream(*CHUNKS[:1]):
        meter.observe(event)
    assert meter.usage is None and not meter.done
    assert estimated_usage(40, meter.completion_bytes) == Usage(40, 2)  # "Hello" = 5 bytes → 2 tokens


def test_completions_stream_text_counts() -> None:
    meter = StreamMeter(client_wants_usage=False)
    for event in _stream({"id": "cmpl-1", "choices": [{"text": "abcdefgh", "index": 0}]}):
        meter.observe(event)
    assert meter.completion_bytes == 8


def test_odd_chunks_are_metered_like_the_usual_ones() -> None:
    usual = StreamMeter(client_wants_usage=False)
    odd = StreamMeter(client_wants_usage=False)
    forwarded_usual = [usual.observe(e) for e in _stream(
        {"id": "c-1", "choices": [{"delta": {"content": "héllo", "refusal": "no", "reasoning_content": "hm",
                                              "function_call": {"name": "f", "arguments": "{}"}}}]},
        {"id": "c-1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})]
    forwarded_odd = [odd.observe(e) for e in _stream(
        {"id": "c-1", "choices": [{"delta": {"content": "héllo", "refusal": "no", "reasoning_content": "hm",
                                              "function_call": {"name": "f", "arguments": "{}"}},
                                    "logprobs": {"content": [1, "x"]}, "text": None}], "extra": [1, {"a": 2}]},
        {"id": "c-1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
         "error": "not an object"},  # not the usual shape: the general path
        {"id": 7, "choices": [{"delta": {"content": ["not", "text"]}}]})]
    assert forwarded_usual == forwarded_odd[:2] == [True, False]
    for meter in (usual, odd):
        assert meter.completion_bytes == len("héllo".encode()) + len("no") + len("hm") + len("f") + len("{}")
        assert (meter.response_id, meter.usage, meter.error) == ("c-1", Usage(3, 2), None)


def test_batch_file_summary() -> None:
    lines = b"\n".join(orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                     "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "abcd"}],
                                              "max_tokens": 10}}) for i in range(3))
    summary = summarize_batch_file(lines, 1024)
    assert (summary.model, summary.lines) == ("gpt-4o", 3)
    assert summary.prompt_estimate == 3 * (MESSAGE_OVERHEAD_TOKENS + 1)
    assert summary.reserve_estimate == summary.prompt_estimate + 30


def test_batch_file_with_two_models_is_refused() -> None:
    lines = b"\n".join(orjson.dumps({"url": "/v1/chat/completions", "body": {"model": m, "messages": []}})
                       for m in ("a", "b"))
    try:
        summarize_batch_file(lines, 1024)
    except ValueError as exc:
        assert "one model" in str(exc)
    else:
        raise AssertionError("accepted")


def test_multipart_form_parts() -> None:
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n"
            b"Content-Type: application/jsonl\r\n\r\nline1\r\nline2\r\n--XyZ--\r\n")
    parts = parse_multipart("multipart/form-data; boundary=XyZ", body)
    assert parts["purpose"].content == b"batch"
    assert parts["file"].filename == "in.jsonl"
    assert parts["file"].content == b"line1\r\nline2"


def test_a_batch_without_usage_is_billed_the_estimate_of_the_lines_it_ran() -> None:
    counts = {"total": 40, "completed": 10, "failed": 0}
    assert estimated_prompt_done(4_000, "ok", counts) == 4_000
    assert estimated_prompt_done(4_000, "cancelled", counts) == 1_000
    assert estimated_prompt_done(4_000, "cancelled", {"total": 40, "completed": 0}) == 0
    assert estimated_prompt_done(4_000, "cancelled", {}) == 4_000  # says nothing: the whole estimate
    assert estimated_prompt_done(4_000, "error", counts) == 0
