"""Usage capture and estimation for the gateway. Pure: no I/O.

Usage comes from what upstream reports (``usage`` in a reply, the last chunk of a stream,
a Batch API job). Estimates are used twice: before a call, to reserve room for it at
metering, and after a stream that broke off before upstream reported usage, to bill
what was generated so far (``usage_estimated: true``). The estimate is deliberately
cheap and documented (docs/gateway.md): UTF-8 bytes / 4, rounded up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson

from services.gateway.sse import SSEEvent

BYTES_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators of one chat message
IMAGE_TOKENS = 765  # a high-detail 1024×1024 image at OpenAI; a flat allowance per image part
AUDIO_TOKENS = 1_000  # a flat allowance per input_audio part
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_ESTIMATE = 10**9  # what POST /v1/authorize accepts

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one call. ``cached_tokens`` is part of ``prompt_tokens`` and
    ``reasoning_tokens`` part of ``completion_tokens`` (as in OpenAI's ``usage``)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


ZERO = Usage(0, 0)


def tokens_from_bytes(size: int) -> int:
    return math.ceil(size / BYTES_PER_TOKEN) if size > 0 else 0


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def usage_from(obj: Any) -> Usage | None:
    """OpenAI ``usage`` → ``Usage``; None when there is none or it is not usable.

    Accepts the Chat/Completions/Embeddings names (``prompt_tokens``, ``completion_tokens``,
    ``*_details``) and the Responses/Batch names (``input_tokens``, ``output_tokens``).
    Sub-counts are clamped to their parent so an odd upstream never makes an event that
    metering must dead-letter.
    """
    if not isinstance(obj, dict):
        return None
    prompt = _count(obj.get("prompt_tokens", obj.get("input_tokens")))
    completion = _count(obj.get("completion_tokens", obj.get("output_tokens", 0)))
    if prompt is None:
        return None
    if completion is None:
        completion = 0
    prompt_details = obj.get("prompt_tokens_details") or obj.get("input_tokens_details") or {}
    completion_details = obj.get("completion_tokens_details") or obj.get("output_tokens_details") or {}
    cached = _count(prompt_details.get("cached_tokens", 0)) if isinstance(prompt_details, dict) else 0
    reasoning = _count(completion_details.get("reasoning_tokens", 0)) if isinstance(completion_details, dict) else 0
    return Usage(prompt, completion, min(cached or 0, prompt), min(reasoning or 0, completion))


# Estimates before the call


def _text_bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    return 0


def _content_tokens(content: Any) -> int:
    """A message's ``content``: a string, or an array of parts (text, image_url, input_audio, …)."""
    if isinstance(content, str):
        return tokens_from_bytes(_text_bytes(content))
    if not isinstance(content, list):
        return 0
    tokens = 0
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in ("image_url", "input_image", "image"):
            tokens += IMAGE_TOKENS
        elif kind in ("input_audio", "audio"):
            tokens += AUDIO_TOKENS
        else:
            tokens += tokens_from_bytes(_text_bytes(part.get("text")) or _text_bytes(part.get("refusal")))
    return tokens


def _json_tokens(value: Any) -> int:
    if not value:
        return 0
    try:
        return tokens_from_bytes(len(orjson.dumps(value)))
    except TypeError:
        return 0


def _prompt_list_tokens(prompt: Any) -> int:
    """``prompt`` / ``input``: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return tokens_from_bytes(_text_bytes(prompt))
    if not isinstance(prompt, list):
        return 0
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return len(prompt)  # already tokens
    tokens = 0
    for item in prompt:
        if isinstance(item, str):
            tokens += tokens_from_bytes(_text_bytes(item))
        elif isinstance(item, list):
            tokens += len(item)
    return tokens


def count_inputs(endpoint: str, body: dict) -> int:
    """How many inputs one call carries: a list of prompts or an ``input`` array is one
    request with several inputs (DESIGN §1, "batches count as one request")."""
    if endpoint == COMPLETIONS:
        value = body.get("prompt")
    elif endpoint == EMBEDDINGS:
        value = body.get("input")
    else:
        return 1
    if isinstance(value, list) and value and not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return len(value)  # strings or token lists; a flat list of ints is one tokenized input
    return 1


def estimate_prompt_tokens(endpoint: str, body: dict) -> int:
    if endpoint == CHAT:
        tokens = 0
        for message in body.get("messages") or ():
            if not isinstance(message, dict):
                continue
            tokens += MESSAGE_OVERHEAD_TOKENS + _content_tokens(message.get("content"))
            tokens += tokens_from_bytes(_text_bytes(message.get("name")))
            tokens += _json_tokens(message.get("tool_calls")) + _json_tokens(message.get("function_call"))
        tokens += _json_tokens(body.get("tools")) + _json_tokens(body.get("functions"))
        tokens += _json_tokens(body.get("response_format"))
        return min(tokens, MAX_ESTIMATE)
    if endpoint == COMPLETIONS:
        return min(_prompt_list_tokens(body.get("prompt")), MAX_ESTIMATE)
    if endpoint == EMBEDDINGS:
        return min(_prompt_list_tokens(body.get("input")), MAX_ESTIMATE)
    return 0


def completion_allowance(endpoint: str, body: dict, default_allowance: int) -> int:
    """Completion tokens to reserve: the caller's own limit when given, else the default
    allowance; times ``n`` choices (and, for completions, times the number of prompts)."""
    if endpoint == EMBEDDINGS:
        return 0
    limit = _count(body.get("max_completion_tokens"))
    if limit is None:
        limit = _count(body.get("max_tokens"))
    if limit is None:
        limit = default_allowance
    choices = _count(body.get("n")) or 1
    if endpoint == COMPLETIONS:
        choices = max(choices, _count(body.get("best_of")) or 1) * count_inputs(endpoint, body)
    return min(limit * choices, MAX_ESTIMATE)


def estimate_call(endpoint: str, body: dict, default_allowance: int) -> tuple[int, int]:
    """(prompt estimate, tokens to reserve) for one call."""
    prompt = estimate_prompt_tokens(endpoint, body)
    return prompt, min(prompt + completion_allowance(endpoint, body, default_allowance), MAX_ESTIMATE)


def estimated_usage(prompt_estimate: int, completion_bytes: int) -> Usage:
    """Usage of a call that ended before upstream reported it: the prompt estimate and
    what was generated so far, bytes / 4."""
    return Usage(prompt_estimate, tokens_from_bytes(completion_bytes))


# Replies


def reply_completion_bytes(reply: Any) -> int:
    """Generated bytes in a non-streamed reply (only used when upstream sent no usage)."""
    if not isinstance(reply, dict):
        return 0
    size = 0
    for choice in reply.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        size += _text_bytes(choice.get("text"))
        message = choice.get("message")
        if isinstance(message, dict):
            size += _delta_bytes(message)
    return size


def _delta_bytes(delta: dict) -> int:
    size = _text_bytes(delta.get("content")) + _text_bytes(delta.get("refusal"))
    size += _text_bytes(delta.get("reasoning_content"))
    for call in delta.get("tool_calls") or ():
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            size += _text_bytes(call["function"].get("name")) + _text_bytes(call["function"].get("arguments"))
    function_call = delta.get("function_call")
    if isinstance(function_call, dict):
        size += _text_bytes(function_call.get("name")) + _text_bytes(function_call.get("arguments"))
    return size


class StreamMeter:
    """Watches a streamed reply event by event: the response id, generated bytes, the
    usage chunk, ``[DONE]`` and in-stream errors. ``observe`` says whether to forward the
    event to the client: the usage-only chunk is dropped when the client did not ask for
    it (the gateway always asks upstream for it)."""

    def __init__(self, client_wants_usage: bool) -> None:
        self.client_wants_usage = client_wants_usage
        self.response_id: str | None = None
        self.usage: Usage | None = None
        self.completion_bytes = 0
        self.done = False
        self.error: dict | None = None

    def observe(self, event: SSEEvent) -> bool:
        data = event.data
        if data is None:
            return True
        if event.is_done:
            self.done = True
            return True
        try:
            typed = _decode_chunk(data)
        except msgspec.MsgspecError:  # not JSON, or not the usual shape: the general path
            return self._observe_any(data)
        if self.response_id is None and typed.id:
            self.response_id = typed.id
        if typed.error is not None:
            self.error = typed.error
        for choice in typed.choices or ():
            if choice.text is not None:
                self.completion_bytes += len(choice.text.encode("utf-8"))
            if choice.delta is not None:
                self.completion_bytes += choice.delta.generated_bytes()
        return self._took_usage(typed.usage, typed.choices)

    def _observe_any(self, data: str) -> bool:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(chunk, dict):
            return True
        if self.response_id is None and isinstance(chunk.get("id"), str) and chunk["id"]:
            self.response_id = chunk["id"]
        if isinstance(chunk.get("error"), dict):
            self.error = chunk["error"]
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                self.completion_bytes += _text_bytes(choice.get("text"))
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    self.completion_bytes += _delta_bytes(delta)
        return self._took_usage(chunk.get("usage"), choices)

    def _took_usage(self, reported: Any, choices: Any) -> bool:
        """Note the usage a chunk reports; False for the usage-only chunk the client did not ask for."""
        usage = usage_from(reported)
        if usage is not None:
            self.usage = usage
            if not self.client_wants_usage and not choices:
                return False
        return True


# The fields of a stream chunk the meter reads, decoded without building the rest
# (a chunk of another shape, e.g. array content, takes the general path).


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[_ToolCall] | None = None
    function_call: _Function | None = None

    def generated_bytes(self) -> int:
        texts = [self.content, self.refusal, self.reasoning_content]
        for call in self.tool_calls or ():
            if call.function is not None:
                texts += (call.function.name, call.function.arguments)
        if self.function_call is not None:
            texts += (self.function_call.name, self.function_call.arguments)
        return sum(len(t.encode("utf-8")) for t in texts if t)


class _Choice(msgspec.Struct):
    text: str | None = None
    delta: _Delta | None = None


class _Chunk(msgspec.Struct):
    id: str | None = None
    choices: list[_Choice] | None = None
    usage: dict | None = None
    error: dict | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


def summarize_batch_file(content: bytes, default_allowance: int) -> "BatchFileSummary":
    """A Batch API input file (JSONL, one request per line) → its model, line count and
    estimates. Raises ValueError with a reason a person can act on."""
    models: set[str] = set()
    endpoints: set[str] = set()
    lines = 0
    prompt = 0
    reserve = 0
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            request = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise ValueError(f"line {number} of the batch file is not valid JSON") from None
        body = request.get("body") if isinstance(request, dict) else None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
            raise ValueError(f"line {number} of the batch file has no body.model")
        endpoint = request.get("url") if isinstance(request.get("url"), str) else CHAT
        models.add(body["model"])
        endpoints.add(endpoint)
        lines += 1
        p, r = estimate_call(endpoint, body, default_allowance)
        prompt += p
        reserve += r
    if lines == 0:
        raise ValueError("the batch file has no requests")
    if len(models) > 1:
        raise ValueError(f"a batch file must use one model; this one uses {', '.join(sorted(models))}")
    return BatchFileSummary(models.pop(), lines, min(prompt, MAX_ESTIMATE), min(reserve, MAX_ESTIMATE))


@dataclass(frozen=True, slots=True)
class BatchFileSummary:
    model: str
    lines: int
    prompt_estimate: int
    reserve_estimate: int
