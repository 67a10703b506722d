"""The simulated model: deterministic replies and their ``usage`` from a request body.

Pure: no I/O, no clock, no randomness. The HTTP handlers and the batch runner both call it,
so a line of a batch gets exactly the reply (and usage) the same request gets online. The
rules are listed in docs/upstream-sim.md; in short:

- tokens are counted by :mod:`services.upstream_sim.tokenizer`;
- chat prompt = 3 + for each message (3 + role + name + content + tool calls) + tools;
  an image part counts ``IMAGE_TOKENS``;
- the reply echoes the start of the last user message; ``max_tokens`` cuts it
  (``finish_reason: "length"``); with ``tools``/``functions`` the reply is a call of the
  first (or the chosen) function, unless the last message is a tool result;
- reasoning models (``o1``…, ``o3``…, names containing ``reasoning``) think 2 tokens per
  reply token, inside ``completion_tokens``;
- prompts of 1024 tokens or more have half of them, rounded down to a multiple of 128,
  reported as ``cached_tokens``.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import orjson

from services.upstream_sim.errors import SimError, invalid_request
from services.upstream_sim.tokenizer import IMAGE_TOKENS, count_tokens, pieces, truncate

PRIMING_TOKENS = 3  # every chat prompt: the assistant's reply is primed
MESSAGE_TOKENS = 3  # every chat message: its framing
ECHO_TOKENS = 24  # how much of the prompt the natural reply repeats
REASONING_PER_TOKEN = 2
CACHE_MIN_PROMPT = 1024
CACHE_BLOCK = 128
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # /v1/completions, as at OpenAI
SYSTEM_FINGERPRINT = "fp_tollhouse_sim"
ID_PREFIXES = {"/v1/chat/completions": "chatcmpl-", "/v1/completions": "cmpl-", "/v1/embeddings": "emb-"}
REPLY_LEAD = "This is a simulated reply."

_REASONING_MODEL = re.compile(r"(?:^|[^a-z0-9])o\d|reasoning", re.IGNORECASE)


@dataclass(frozen=True)
class Options:
    """Per-request knobs that come from the config or X-Sim-* headers, not from the body."""

    reply_tokens: int | None = None
    cached_tokens: int | None = None
    embedding_dimensions: int = 8
    max_choices: int = 16
    max_reply_tokens: int = 100_000


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        self.reasoning_tokens += other.reasoning_tokens

    def as_openai(self) -> dict[str, Any]:
        assert 0 <= self.cached_tokens <= self.prompt_tokens
        assert 0 <= self.reasoning_tokens <= self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }


@dataclass
class Choice:
    """One reply: text, or a call of one function (``tool_call``/``function_call``)."""

    index: int
    text: str  # the content, or the function-call arguments
    finish_reason: str
    function_name: str | None = None
    call_id: str | None = None
    legacy_function: bool = False  # `functions` in the request: answer with `function_call`
    prefix: str = ""  # /v1/completions `echo`: the prompt, shown before the text

    @property
    def stream_pieces(self) -> list[str]:
        return pieces(self.text)


# A stream chunk, and whether it is a content chunk (one token of text or arguments).
StreamEvent = tuple[bool, dict[str, Any]]


@dataclass
class Plan:
    """What the model answers to one request, before it is written as JSON or as a stream."""

    model: str
    choices: list[Choice]
    usage: Usage
    inputs: int = 1


# ---------------------------------------------------------------- helpers


def is_reasoning_model(model: str) -> bool:
    return _REASONING_MODEL.search(model) is not None


def cached_tokens_for(prompt_tokens: int, options: Options) -> int:
    if options.cached_tokens is not None:
        return max(0, min(options.cached_tokens, prompt_tokens))
    if prompt_tokens < CACHE_MIN_PROMPT:
        return 0
    return (prompt_tokens // 2) // CACHE_BLOCK * CACHE_BLOCK


def natural_reply(source: str) -> str:
    """The reply to ``source``: a fixed lead and the first ``ECHO_TOKENS`` tokens of it."""
    echo, count = truncate(" ".join(source.split()), ECHO_TOKENS)
    if count == 0:
        return REPLY_LEAD
    end = "" if echo[-1] in ".!?。！？" else "."
    return f"{REPLY_LEAD} You said: {echo}{end}"


def fixed_length_reply(source: str, tokens: int) -> str:
    """A reply of exactly ``tokens`` tokens: the natural reply, repeated as often as needed."""
    base = pieces(natural_reply(source))
    out = []
    for i in range(tokens):
        piece = base[i % len(base)]
        if i and i % len(base) == 0:
            piece = " " + piece.lstrip()
        out.append(piece)
    return "".join(out)


def reply_text(source: str, options: Options) -> str:
    if options.reply_tokens is None:
        return natural_reply(source)
    return fixed_length_reply(source, min(options.reply_tokens, options.max_reply_tokens))


def _require_model(body: Any) -> str:
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_request("You must provide a model parameter.", param="model")
    return model


def _positive_int(body: dict, name: str, *, default: int | None = None, upper: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid_request(f"'{name}' must be a positive integer, got {value!r}.", param=name)
    if upper is not None and value > upper:
        raise invalid_request(f"'{name}' must be at most {upper}, got {value}.", param=name)
    return value


def _completion_limit(body: dict) -> int | None:
    limit = _positive_int(body, "max_completion_tokens")
    return limit if limit is not None else _positive_int(body, "max_tokens")


def _json_tokens(value: Any) -> int:
    return count_tokens(orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode())


def _call_id(name: str, arguments: str, index: int) -> str:
    digest = hashlib.blake2b(f"{index}\0{name}\0{arguments}".encode(), digest_size=12).hexdigest()
    return f"call_{digest}"


# ---------------------------------------------------------------- chat


def _content_text_and_tokens(content: Any, where: str) -> tuple[str, int]:
    """The text of a message's content (for the echo) and its token count."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, count_tokens(content)
    if not isinstance(content, list):
        raise invalid_request(f"{where}.content must be a string or an array of parts.", param=f"{where}.content")
    texts = []
    tokens = 0
    for i, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid_request(f"{where}.content[{i}] must be an object with a 'type'.",
                                  param=f"{where}.content[{i}]")
        kind = part["type"]
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid_request(f"{where}.content[{i}].text must be a string.",
                                      param=f"{where}.content[{i}].text")
            texts.append(text)
            tokens += count_tokens(text)
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise invalid_request(f"{where}.content[{i}].image_url.url must be a string.",
                                      param=f"{where}.content[{i}].image_url")
            tokens += IMAGE_TOKENS
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            tokens += count_tokens(part["refusal"])
        else:
            tokens += _json_tokens(part)  # audio, files, parts yet to come: priced by their JSON
    return " ".join(texts), tokens


def _chat_prompt(messages: Any) -> tuple[int, str, str | None]:
    """Prompt tokens, the text to echo (last user message), and the last message's role."""
    if not isinstance(messages, list) or not messages:
        raise invalid_request("'messages' must be a non-empty array.", param="messages")
    tokens = PRIMING_TOKENS
    echo = ""
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid_request(f"{where} must be an object with a 'role'.", param=where)
        text, content_tokens = _content_text_and_tokens(message.get("content"), where)
        tokens += MESSAGE_TOKENS + count_tokens(message["role"]) + content_tokens
        if isinstance(message.get("name"), str):
            tokens += 1 + count_tokens(message["name"])
        for key in ("tool_calls", "function_call"):
            if message.get(key) is not None:
                tokens += _json_tokens(message[key])
        if message["role"] == "user":
            echo = text
    return tokens, echo, messages[-1]["role"]


def _function_schemas(body: dict) -> tuple[list[dict], bool]:
    """The callable functions (name, parameters) and whether they came as legacy `functions`."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid_request("'tools' must be an array.", param="tools")
        functions = []
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise invalid_request(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': …}}}}.",
                                      param=f"tools[{i}]")
            functions.append(function)
        return functions, False
    functions = body.get("functions")
    if functions is None:
        return [], False
    if not isinstance(functions, list) or not all(isinstance(f, dict) and isinstance(f.get("name"), str)
                                                  for f in functions):
        raise invalid_request("'functions' must be an array of objects with a 'name'.", param="functions")
    return functions, True


def _chosen_function(body: dict, functions: list[dict], legacy: bool) -> dict | None:
    choice = body.get("function_call" if legacy else "tool_choice")
    if not functions or choice == "none":
        return None
    wanted = None
    if isinstance(choice, dict):
        wanted = choice.get("name") if legacy else (choice.get("function") or {}).get("name")
    if wanted is None:
        return functions[0]
    for function in functions:
        if function["name"] == wanted:
            return function
    param = "function_call" if legacy else "tool_choice"
    raise invalid_request(f"The chosen function '{wanted}' is not among the request's functions.", param=param)


def arguments_for(parameters: Any, source: str) -> str:
    """Deterministic JSON arguments that fit a function's JSON-schema ``parameters``."""
    properties = parameters.get("properties") if isinstance(parameters, dict) else None
    if not isinstance(properties, dict):
        return "{}"
    required = parameters.get("required")
    names = [n for n in required if n in properties] if isinstance(required, list) and required else list(properties)
    snippet, _ = truncate(" ".join(source.split()), 8)
    words = count_tokens(source)
    arguments: dict[str, Any] = {}
    for name in names[:16]:
        schema = properties[name] if isinstance(properties[name], dict) else {}
        kind = schema.get("type")
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            arguments[name] = schema["enum"][0]
        elif kind == "string":
            arguments[name] = snippet or "simulated"
        elif kind in ("integer", "number"):
            arguments[name] = words
        elif kind == "boolean":
            arguments[name] = True
        elif kind == "array":
            arguments[name] = []
        elif kind == "object":
            arguments[name] = {}
        else:
            arguments[name] = None
    return orjson.dumps(arguments).decode()


def _budget(limit: int | None, wanted_visible: int, reasoning: bool) -> tuple[int, int | None]:
    """Reasoning tokens, and how many visible tokens may follow (None: no limit)."""
    thinking = REASONING_PER_TOKEN * wanted_visible if reasoning else 0
    if limit is None:
        return thinking, None
    thinking = min(thinking, limit)
    return thinking, limit - thinking


def plan_chat(body: Any, options: Options) -> Plan:
    model = _require_model(body)
    prompt_tokens, source, last_role = _chat_prompt(body.get("messages"))
    n = _positive_int(body, "n", default=1, upper=options.max_choices)
    limit = _completion_limit(body)
    functions, legacy = _function_schemas(body)
    if functions:
        prompt_tokens += _json_tokens(functions)
    # After a tool result the model answers in words, as a real one would; else agents loop.
    function = None if last_role in ("tool", "function") else _chosen_function(body, functions, legacy)
    reasoning = is_reasoning_model(model)

    if function is not None:
        name = function["name"]
        full = arguments_for(function.get("parameters"), source)
    else:
        name = None
        full = reply_text(source, options)
    # A function call's name counts as reply tokens too; it is never cut, only the arguments.
    name_tokens = count_tokens(name) if name else 0
    wanted = name_tokens + count_tokens(full)
    thinking, visible_budget = _budget(limit, wanted, reasoning)
    if visible_budget is None:
        text, visible = full, wanted
    else:
        text, shown = truncate(full, max(0, visible_budget - name_tokens))
        visible = min(name_tokens, visible_budget) + shown
    if visible < wanted:
        finish = "length"
    elif name is None:
        finish = "stop"
    else:
        finish = "function_call" if legacy else "tool_calls"
    per_choice = thinking + visible

    choices = [
        Choice(index=i, text=text, finish_reason=finish, function_name=name,
               call_id=_call_id(name, full, i) if name and not legacy else None, legacy_function=legacy)
        for i in range(n)
    ]
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=per_choice * n,
                  cached_tokens=cached_tokens_for(prompt_tokens, options), reasoning_tokens=thinking * n)
    return Plan(model=model, choices=choices, usage=usage)


def chat_message(choice: Choice) -> dict[str, Any]:
    if choice.function_name is None:
        return {"role": "assistant", "content": choice.text, "refusal": None}
    call = {"name": choice.function_name, "arguments": choice.text}
    if choice.legacy_function:
        return {"role": "assistant", "content": None, "refusal": None, "function_call": call}
    return {"role": "assistant", "content": None, "refusal": None,
            "tool_calls": [{"id": choice.call_id, "type": "function", "function": call}]}


def chat_response(plan: Plan, request_id: str, created: int) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": plan.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {"index": c.index, "message": chat_message(c), "logprobs": None, "finish_reason": c.finish_reason}
            for c in plan.choices
        ],
        "usage": plan.usage.as_openai(),
        "service_tier": "default",
    }


def _chunk_head(kind: str, plan: Plan, request_id: str, created: int, include_usage: bool) -> dict[str, Any]:
    """The fields every chunk of one stream carries; with the usage chunk asked for, each
    other chunk says ``"usage": null``, as OpenAI's do."""
    head: dict[str, Any] = {"id": request_id, "object": kind, "created": created, "model": plan.model,
                            "system_fingerprint": SYSTEM_FINGERPRINT}
    if include_usage:
        head["usage"] = None
    return head


def chat_stream_events(plan: Plan, request_id: str, created: int, *, include_usage: bool) -> list[StreamEvent]:
    """The stream's chunks in order: per choice a role chunk, one content chunk per token
    (text or function arguments), a finish chunk; then the usage chunk when asked for."""
    head = _chunk_head("chat.completion.chunk", plan, request_id, created, include_usage)

    def chunk(index: int, delta: dict, finish: str | None = None) -> dict:
        return {**head, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    events: list[StreamEvent] = []
    for c in plan.choices:
        if c.function_name is None:
            events.append((False, chunk(c.index, {"role": "assistant", "content": "", "refusal": None})))
            events.extend((True, chunk(c.index, {"content": p})) for p in c.stream_pieces)
        elif c.legacy_function:
            events.append((False, chunk(c.index, {"role": "assistant", "content": None, "refusal": None,
                                                  "function_call": {"name": c.function_name, "arguments": ""}})))
            events.extend((True, chunk(c.index, {"function_call": {"arguments": p}})) for p in c.stream_pieces)
        else:
            first = {"index": 0, "id": c.call_id, "type": "function",
                     "function": {"name": c.function_name, "arguments": ""}}
            events.append((False, chunk(c.index, {"role": "assistant", "content": None, "refusal": None,
                                                  "tool_calls": [first]})))
            events.extend((True, chunk(c.index, {"tool_calls": [{"index": 0, "function": {"arguments": p}}]}))
                          for p in c.stream_pieces)
        events.append((False, chunk(c.index, {}, c.finish_reason)))
    if include_usage:
        events.append((False, {**head, "choices": [], "usage": plan.usage.as_openai()}))
    return events


# ---------------------------------------------------------------- completions


def _prompts(value: Any) -> list[tuple[str, int]]:
    """Each prompt as (text to echo, tokens). Token-id prompts have no text to echo."""
    if isinstance(value, str):
        return [(value, count_tokens(value))]
    if isinstance(value, list) and value:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return [("", len(value))]
        if all(isinstance(p, str) for p in value):
            return [(p, count_tokens(p)) for p in value]
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in value):
            return [("", len(p)) for p in value]
    raise invalid_request("'prompt' must be a string, an array of strings, an array of token ids, or an array "
                          "of token-id arrays, and not empty.", param="prompt")


def plan_completions(body: Any, options: Options) -> Plan:
    model = _require_model(body)
    prompts = _prompts(body.get("prompt"))
    n = _positive_int(body, "n", default=1, upper=options.max_choices)
    limit = _positive_int(body, "max_tokens", default=COMPLETIONS_DEFAULT_MAX_TOKENS)
    echo = body.get("echo") is True
    usage = Usage()
    choices = []
    for p, (source, prompt_tokens) in enumerate(prompts):
        full = reply_text(source, options)
        wanted = count_tokens(full)
        text, visible = truncate(full, limit)
        finish = "length" if visible < wanted else "stop"
        usage.add(Usage(prompt_tokens=prompt_tokens, completion_tokens=visible * n,
                        cached_tokens=cached_tokens_for(prompt_tokens, options)))
        for j in range(n):
            choices.append(Choice(index=p * n + j, text=text, finish_reason=finish,
                                  prefix=source if echo else ""))
    return Plan(model=model, choices=choices, usage=usage, inputs=len(prompts))


def _completions_usage(usage: Usage) -> dict[str, Any]:
    out = usage.as_openai()
    out["completion_tokens_details"] = {"reasoning_tokens": 0, "audio_tokens": 0,
                                        "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    return out


def completions_response(plan: Plan, request_id: str, created: int) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": plan.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {"text": c.prefix + c.text, "index": c.index, "logprobs": None, "finish_reason": c.finish_reason}
            for c in plan.choices
        ],
        "usage": _completions_usage(plan.usage),
    }


def completions_stream_events(plan: Plan, request_id: str, created: int, *, include_usage: bool) -> list[StreamEvent]:
    head = _chunk_head("text_completion", plan, request_id, created, include_usage)

    def chunk(index: int, text: str, finish: str | None = None) -> dict:
        return {**head, "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}]}

    events: list[StreamEvent] = []
    for c in plan.choices:
        if c.prefix:
            events.append((False, chunk(c.index, c.prefix)))
        events.extend((True, chunk(c.index, p)) for p in c.stream_pieces)
        events.append((False, chunk(c.index, "", c.finish_reason)))
    if include_usage:
        events.append((False, {**head, "choices": [], "usage": _completions_usage(plan.usage)}))
    return events


# ---------------------------------------------------------------- embeddings


def _embedding_inputs(value: Any) -> list[tuple[bytes, int]]:
    """Each input as (bytes its vector is derived from, tokens)."""
    def tokens_key(ids: list[int]) -> bytes:
        return b"ids:" + ",".join(map(str, ids)).encode()

    if isinstance(value, str) and value:
        return [(value.encode(), count_tokens(value))]
    if isinstance(value, list) and value:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return [(tokens_key(value), len(value))]
        if all(isinstance(s, str) and s for s in value):
            return [(s.encode(), count_tokens(s)) for s in value]
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in value):
            return [(tokens_key(p), len(p)) for p in value]
    raise invalid_request("'input' must be a non-empty string, an array of non-empty strings, an array of token "
                          "ids, or an array of token-id arrays.", param="input")


def embedding_vector(model: str, key: bytes, dimensions: int) -> list[float]:
    """A unit vector derived from a hash of (model, input): same input, same vector."""
    seed = model.encode() + b"\0" + key
    raw = bytearray()
    block = 0
    while len(raw) < 2 * dimensions:
        raw += hashlib.blake2b(seed, digest_size=64, person=block.to_bytes(8, "little")).digest()
        block += 1
    values = struct.unpack_from(f"<{dimensions}h", raw)
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def embeddings_response(body: Any, options: Options) -> tuple[dict[str, Any], Usage, int]:
    """The embeddings reply, its usage, and how many inputs it carried."""
    model = _require_model(body)
    inputs = _embedding_inputs(body.get("input"))
    dimensions = _positive_int(body, "dimensions", default=options.embedding_dimensions, upper=4096)
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise invalid_request("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    data = []
    prompt_tokens = 0
    for i, (key, tokens) in enumerate(inputs):
        vector = embedding_vector(model, key, dimensions)
        if encoding == "base64":
            embedding: Any = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        else:
            embedding = vector
        data.append({"object": "embedding", "index": i, "embedding": embedding})
        prompt_tokens += tokens
    usage = Usage(prompt_tokens=prompt_tokens)
    body_out = {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
    return body_out, usage, len(inputs)


# ---------------------------------------------------------------- one request, as a batch line runs it


def answer(endpoint: str, body: Any, options: Options, request_id: str, created: int) -> tuple[dict, Usage, int]:
    """The non-streaming reply to ``body`` at ``endpoint``, its usage and its number of inputs."""
    if endpoint == "/v1/chat/completions":
        plan = plan_chat(body, options)
        return chat_response(plan, request_id, created), plan.usage, plan.inputs
    if endpoint == "/v1/completions":
        plan = plan_completions(body, options)
        return completions_response(plan, request_id, created), plan.usage, plan.inputs
    if endpoint == "/v1/embeddings":
        return embeddings_response(body, options)
    raise SimError(404, f"The simulator does not serve {endpoint}.", type="invalid_request_error",
                   code="unknown_url")
