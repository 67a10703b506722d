"""The simulator's tokenizer: the counting rule is documented, and cutting or streaming a text
never changes its count."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.upstream_sim.tokenizer import count_tokens, pieces, truncate

texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=200)


def test_words_and_punctuation_are_one_token_each():
    assert count_tokens("Hello, world!") == 4


def test_whitespace_is_free():
    assert count_tokens("  a \n\t b  ") == 2
    assert count_tokens("") == 0
    assert count_tokens(" \n ") == 0


def test_a_run_of_letters_digits_and_underscores_is_one_token():
    assert count_tokens("snake_case_name42") == 1


def test_each_cjk_character_is_one_token():
    assert count_tokens("你好世界") == 4
    assert count_tokens("abc你好def") == 4  # abc, 你, 好, def
    assert count_tokens("こんにちは") == 5
    assert count_tokens("안녕") == 2


def test_symbols_and_emoji_are_one_token_per_character():
    assert count_tokens("{}") == 2
    assert count_tokens("a+b=c") == 5
    assert count_tokens("🙂🙂") == 2


def test_truncate_keeps_the_first_tokens():
    assert truncate("Hello, world!", 2) == ("Hello,", 2)
    assert truncate("Hello, world!", 0) == ("", 0)
    assert truncate("Hello, world!", 99) == ("Hello, world!", 4)


def test_pieces_are_one_token_each_with_leading_whitespace():
    assert pieces("Hello, world!") == ["Hello", ",", " world", "!"]
    assert pieces("  ") == []


@given(texts)
def test_pieces_join_back_and_count_as_the_text(text):
    parts = pieces(text)
    if count_tokens(text):
        assert "".join(parts) == text
    assert len(parts) == count_tokens(text)
    assert all(count_tokens(p) == 1 for p in parts)


@given(texts, st.integers(min_value=0, max_value=300))
def test_truncate_gives_a_prefix_counted_as_it_says(text, limit):
    prefix, count = truncate(text, limit)
    assert text.startswith(prefix)
    assert count == count_tokens(prefix) == min(limit, count_tokens(text))


@given(texts, texts)
def test_counting_is_deterministic_and_whitespace_separated_texts_add_up(a, b):
    assert count_tokens(a) == count_tokens(a)
    assert count_tokens(a + " " + b) == count_tokens(a) + count_tokens(b)
