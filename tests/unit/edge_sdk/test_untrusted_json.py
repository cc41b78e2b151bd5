"""edge_sdk.untrusted_json: the one bounded parser every untrusted JSON document goes through."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from edge_sdk.errors import ConfigError, JsonError, JsonTooLargeError, UntrustedInputError
from edge_sdk.untrusted_json import (
    DEFAULT_MAX_DEPTH,
    JsonLimits,
    is_int,
    is_number,
    is_text,
    parse_json,
    parse_json_object,
)

LIMITS = JsonLimits(max_bytes=1 << 16)


def _nested(levels: int) -> Any:
    """A document of exactly ``levels`` levels: ``levels - 1`` objects around a scalar."""
    value: Any = 1
    for _ in range(levels - 1):
        value = {"n": value}
    return value


def test_values_of_every_top_level_type_parse() -> None:
    assert parse_json(b'{"a": [1, 2.5, "x", true, null]}', LIMITS, what="doc") == {"a": [1, 2.5, "x", True, None]}
    assert parse_json(b"[1]", LIMITS, what="doc") == [1]
    assert parse_json(b'"s"', LIMITS, what="doc") == "s"
    assert parse_json_object(b'{"a": 1}', LIMITS, what="doc") == {"a": 1}


def test_json_errors_are_untrusted_input() -> None:
    assert issubclass(JsonTooLargeError, JsonError)
    assert issubclass(JsonError, UntrustedInputError)


def test_size_is_checked_before_decoding() -> None:
    with pytest.raises(JsonTooLargeError, match=r"doc is 11 bytes \(limit 10\)") as info:
        parse_json(b"\xff" * 11, JsonLimits(max_bytes=10), what="doc")  # not UTF-8: size came first
    assert info.value.details == {"size": 11, "limit": 10}
    assert parse_json(b"[" + b"1," * 3 + b"1]", JsonLimits(max_bytes=9), what="doc") == [1, 1, 1, 1]


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_constants_are_refused(constant: bytes) -> None:
    with pytest.raises(JsonError, match="not UTF-8 JSON") as info:
        parse_json(b'{"x": ' + constant + b"}", LIMITS, what="doc")
    assert not isinstance(info.value, JsonTooLargeError)


@pytest.mark.parametrize("data", [b"", b"{", b"not json", b"\xc3\x28", b"\xff\xfe{}"], ids=repr)
def test_bytes_that_are_not_utf8_json_are_refused(data: bytes) -> None:
    with pytest.raises(JsonError, match="doc is not UTF-8 JSON"):
        parse_json(data, LIMITS, what="doc")


def test_depth_counts_every_value_and_the_limit_is_inclusive() -> None:
    limits = JsonLimits(max_bytes=1 << 16, max_depth=4)
    assert parse_json(json.dumps(_nested(4)).encode(), limits, what="doc") == _nested(4)
    with pytest.raises(JsonError, match="doc nests deeper than 4 levels") as info:
        parse_json(json.dumps(_nested(5)).encode(), limits, what="doc")
    assert info.value.details == {"max_depth": 4}
    # Lists count like objects, and an empty container adds no level below it.
    assert parse_json(b"[[[[]]]]", limits, what="doc") == [[[[]]]]
    with pytest.raises(JsonError, match="deeper"):
        parse_json(b"[[[[1]]]]", limits, what="doc")


def test_the_bracket_count_shortcut_never_lets_a_deep_document_through() -> None:
    # Fewer opening brackets than the limit cannot nest past it, so those skip the walk;
    # brackets inside strings only raise the count, and then the walk decides.
    limits = JsonLimits(max_bytes=1 << 16, max_depth=4)
    assert parse_json(b"[[[1]]]", limits, what="doc") == [[[1]]]
    assert parse_json(b'[["[{[{"]]', limits, what="doc") == [["[{[{"]]
    with pytest.raises(JsonError, match="deeper than 4"):
        parse_json(b'[[[["x"]]]]', limits, what="doc")
    with pytest.raises(JsonError, match="deeper than 4"):
        parse_json(b'{"a":{"b":{"c":{"d":1}}}}', limits, what="doc")


def test_the_default_depth_is_sixteen() -> None:
    assert JsonLimits(max_bytes=1).max_depth == DEFAULT_MAX_DEPTH == 16


def test_nesting_that_would_exhaust_the_decoder_is_refused() -> None:
    with pytest.raises(JsonError):
        parse_json(b"[" * 60_000 + b"]" * 60_000, JsonLimits(max_bytes=1 << 20), what="doc")


@pytest.mark.parametrize("data", [b"[]", b"null", b"1", b'"x"', b"true"], ids=repr)
def test_object_is_required_where_asked(data: bytes) -> None:
    assert parse_json(data, LIMITS, what="doc") == json.loads(data)
    with pytest.raises(JsonError, match="doc must be a JSON object"):
        parse_json_object(data, LIMITS, what="doc")


@pytest.mark.parametrize("field", ["max_bytes", "max_depth"])
@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_limits_must_be_positive_integers(field: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"max_bytes": 10, "max_depth": 4, field: value}
    with pytest.raises(ConfigError, match=field):
        JsonLimits(**kwargs)


def test_value_predicates_read_json_types_as_json_means_them() -> None:
    assert is_int(0) and is_int(-3) and not is_int(True) and not is_int(1.0) and not is_int("1")
    assert is_number(1) and is_number(1.5) and is_number(float("nan")) and not is_number(False)
    assert not is_number("1.5") and not is_number(None)
    assert is_text("a") and not is_text("") and not is_text(b"a") and not is_text(None)
    assert is_text("abc", max_len=3) and not is_text("abcd", max_len=3)
    pattern = re.compile(r"[a-z]+")
    assert is_text("abc", pattern=pattern) and not is_text("abc1", pattern=pattern)
    assert not is_text("ab\n", pattern=re.compile(r"^[a-z]+$"))  # the whole string must match
