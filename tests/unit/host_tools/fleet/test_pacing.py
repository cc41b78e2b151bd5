"""host_tools.fleet.pacing: rates read from the operator's words, and a token bucket on a fake clock."""

from __future__ import annotations

import math

import pytest

from edge_sdk.errors import ConfigError
from host_tools.fleet.pacing import TokenBucket, parse_rate


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("200KB/s", 200_000.0),
        ("200kB/s", 200_000.0),
        ("1.5MB/s", 1_500_000.0),
        ("64KiB/s", 65_536.0),
        ("2MiB/s", 2_097_152.0),
        ("50000B/s", 50_000.0),
        (" 200 KB/s ", 200_000.0),
        (".5KiB/s", 512.0),
    ],
)
def test_rates_in_decimal_and_binary_units(text: str, expected: float) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "is not a rate"),
        ("200", "is not a rate"),
        ("200KB", "is not a rate"),
        ("KB/s", "is not a rate"),
        ("fast", "is not a rate"),
        ("200KB/min", "is not a rate"),
        ("1e3KB/s", "is not a rate"),
        ("nan KB/s", "is not a rate"),
        ("-200KB/s", "cannot be negative"),
        ("0KB/s", "more than zero"),
        ("0.0B/s", "more than zero"),
        ("200GB/s", "unknown unit 'GB'"),
        ("200Kb/s", "bits are not accepted"),
        ("8kbit/s", "bits are not accepted"),
        ("200KB/s;rm", "is not a rate"),
    ],
)
def test_junk_zero_and_negative_rates_are_refused_naming_the_text(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_rate(text)
    assert repr(text) in caught.value.message and says in caught.value.message
    assert caught.value.details["rate"] == text


def test_a_huge_rate_text_is_refused_without_being_echoed_whole() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_rate("9" * 10_000 + "KB/s")
    assert len(caught.value.message) < 300


def test_a_full_bucket_sends_a_burst_at_once_then_paces_at_the_rate() -> None:
    bucket = TokenBucket(1000, 500)
    assert bucket.delay(500, now=0.0) == 0.0
    bucket.spend(500, now=0.0)
    assert bucket.delay(500, now=0.0) == pytest.approx(0.5)
    assert bucket.delay(500, now=0.25) == pytest.approx(0.25)  # a quarter second refilled 250 bytes
    assert bucket.delay(100, now=0.25) == 0.0
    assert bucket.delay(500, now=0.5) == 0.0
    assert bucket.tokens(now=100.0) == 500  # never above the burst, however long it idles


def test_a_send_larger_than_the_burst_waits_for_a_full_bucket_and_leaves_a_debt() -> None:
    bucket = TokenBucket(1000, 500)
    bucket.spend(300, now=0.0)
    assert bucket.delay(2000, now=0.0) == pytest.approx(0.3)  # waits for the bucket to be full, not for 2000
    bucket.spend(2000, now=0.3)
    assert bucket.tokens(now=0.3) == pytest.approx(-1500)
    assert bucket.delay(1, now=0.3) == pytest.approx(1.501)  # the debt is repaid first


@pytest.mark.parametrize("chunk", [100, 64 * 1024, 1 << 20])
def test_the_long_run_rate_holds_whatever_the_chunk_size(chunk: int) -> None:
    rate, burst, total = 200_000.0, 128 * 1024, 20 << 20
    bucket, now, sent = TokenBucket(rate, burst), 0.0, 0
    for _ in range(total // chunk + 1):  # bounded: one send per chunk
        if sent >= total:
            break
        now += bucket.delay(chunk, now)
        bucket.spend(chunk, now)
        sent += chunk
    ideal = (sent - min(burst, chunk)) / rate  # the first chunk goes at once
    assert now == pytest.approx(ideal, rel=0.01, abs=chunk / rate)


def test_time_going_backwards_counts_as_no_time() -> None:
    bucket = TokenBucket(1000, 500)
    bucket.spend(500, now=10.0)
    assert bucket.delay(500, now=5.0) == pytest.approx(0.5)  # not 5.5: no refill, no debt from the past
    assert bucket.delay(500, now=10.25) == pytest.approx(0.25)


def test_sending_what_delay_allows_never_exceeds_rate_times_time_plus_burst() -> None:
    rate, burst = 1000.0, 300.0
    bucket, now, sent = TokenBucket(rate, burst), 0.0, 0
    sizes = [50, 280, 10, 300, 120, 7, 299, 1] * 20
    for size in sizes:
        now += bucket.delay(size, now)
        bucket.spend(size, now)
        sent += size
        assert sent <= rate * now + burst + 1e-6


@pytest.mark.parametrize(
    ("rate", "burst"), [(0, 1), (-1, 1), (1, 0), (math.inf, 1), (1, math.nan), (True, 1), ("10", 1)]
)
def test_a_bucket_needs_a_positive_finite_rate_and_burst(rate: object, burst: object) -> None:
    with pytest.raises(ConfigError, match="must be a positive finite number"):
        TokenBucket(rate, burst)  # type: ignore[arg-type]


def test_negative_sizes_and_a_time_that_is_not_finite_are_refused() -> None:
    bucket = TokenBucket(1000, 500)
    with pytest.raises(ConfigError, match="negative"):
        bucket.delay(-1, now=0.0)
    with pytest.raises(ConfigError, match="negative"):
        bucket.spend(-1, now=0.0)
    with pytest.raises(ConfigError, match="finite"):
        bucket.delay(1, now=math.nan)
