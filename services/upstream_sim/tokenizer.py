"""The simulator's tokenizer: a documented, deterministic stand-in for a BPE vocabulary.

A token is one of:

- one CJK ideograph, kana or hangul syllable (each character is a token);
- a run of other word characters (letters, digits, ``_``), however long;
- any other single non-space character (punctuation, symbols, emoji).

Whitespace is free. So ``"Hello, world!"`` is 4 tokens (``Hello`` ``,`` ``world`` ``!``) and
``"你好"`` is 2. Cutting a text right after a token never changes how the part before the cut
is counted, which is what lets the simulator truncate replies at ``max_tokens`` and stream
them one token per chunk with counts that add up.
"""

from __future__ import annotations

import re

# CJK Unified Ideographs (+ extension A and compatibility), kana, hangul syllables.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
TOKEN_PATTERN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")

# A fixed price for each image part of a chat message (OpenAI's low-detail image cost).
IMAGE_TOKENS = 85


def count_tokens(text: str) -> int:
    """How many tokens ``text`` is."""
    return len(TOKEN_PATTERN.findall(text))


def truncate(text: str, max_tokens: int) -> tuple[str, int]:
    """The longest prefix of ``text`` with at most ``max_tokens`` tokens, and its token count."""
    if max_tokens <= 0:
        return "", 0
    count = 0
    end = 0
    for match in TOKEN_PATTERN.finditer(text):
        if count == max_tokens:
            return text[:end], count
        count += 1
        end = match.end()
    return text, count


def pieces(text: str) -> list[str]:
    """``text`` cut into one piece per token (each with the whitespace before it).

    ``"".join(pieces(t)) == t`` and ``len(pieces(t)) == count_tokens(t)``, except that a text
    with no token at all gives no piece.
    """
    out: list[str] = []
    start = 0
    for match in TOKEN_PATTERN.finditer(text):
        out.append(text[start : match.end()])
        start = match.end()
    if out and start < len(text):
        out[-1] += text[start:]
    return out
