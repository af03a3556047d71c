from __future__ import annotations

import pytest

from runtime.errors import InvalidSizeError
from runtime.sizes import format_bytes, parse_bandwidth, parse_duration, parse_size


@pytest.mark.parametrize(
    "text,value",
    [("6GB", 6 * 10**9), ("6gb", 6 * 10**9), ("6GiB", 6 * 2**30), ("5.5 GiB", int(5.5 * 2**30)),
     ("512MB", 512 * 10**6), ("512MiB", 512 * 2**20), ("1024", 1024), ("8G", 8 * 10**9)],
)  # fmt: skip
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_every_unit_is_its_power_of_ten_or_of_two():
    """SI units are powers of 1000, IEC units (KiB...TiB) powers of 1024, bare letters SI."""
    for k, prefix in enumerate("kmgt", start=1):
        assert parse_size(f"3{prefix}") == parse_size(f"3{prefix}b") == 3 * 1000**k, prefix
        assert parse_size(f"3{prefix.upper()}iB") == 3 * 1024**k, prefix
    assert parse_size("3B") == parse_size("3") == 3


@pytest.mark.parametrize("text", ["6XB", "", "GB", "six GB", "6 G B", "-1GB", "1.5", "1e999GB", "1e400"])
def test_bad_sizes_raise_with_a_hint(text):
    with pytest.raises(InvalidSizeError) as exc:
        parse_size(text)
    assert repr(text)[1:-1] in str(exc.value) and "6GB" in exc.value.hint


def test_a_negative_size_is_called_negative():
    with pytest.raises(InvalidSizeError, match="'-1GB' is negative") as exc:
        parse_size("-1GB")
    assert "6GB" in exc.value.hint


def test_bandwidth_and_duration():
    assert parse_bandwidth("8GB/s") == 8e9
    assert parse_bandwidth("500 MB/s") == 5e8
    assert parse_duration("20us") == pytest.approx(20e-6)
    assert parse_duration("1.5ms") == pytest.approx(1.5e-3)
    for bad in ("8GB", "0GB/s", "-5GB/s", "/s", "1e999GB/s"):
        with pytest.raises(InvalidSizeError, match=f"'{bad}' is not a bandwidth"):
            parse_bandwidth(bad)
    for bad in ("20 parsecs", "1e999s"):
        with pytest.raises(InvalidSizeError, match=f"'{bad}' is not a duration"):
            parse_duration(bad)


def test_format_bytes():
    assert format_bytes(88_000_000) == "88.0 MB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(3.2e12) == "3.2 TB" and format_bytes(5e21) == "5000.0 EB"  # none past EB


def test_a_needed_figure_rounds_up_so_that_it_is_enough():
    """'needs at least 34.9 MB' must be a budget that works: 34,849,920 B printed as 34.8 MB did not."""
    import random

    assert format_bytes(34_849_920) == "34.8 MB" and format_bytes(34_849_920, up=True) == "34.9 MB"
    for n in (123_400, 34_800_000, 66_600_000, 1_100_000_000, 2_500_000_000, 7_300_000_000_000):
        assert format_bytes(n, up=True) == format_bytes(n), n  # exact tenths print as they are
    rng = random.Random(0)
    for n in [rng.randrange(1, 10**13) for _ in range(2000)] + [999, 1000, 1001, 34_800_000]:
        assert parse_size(format_bytes(n, up=True)) >= n, n


def test_format_bytes_moves_to_the_next_unit_at_1000():
    printed = [format_bytes(n) for n in (999, 1000, 999_000, 1_000_000)]
    assert printed == ["999 B", "1.0 KB", "999.0 KB", "1.0 MB"]


def test_format_duration():
    from runtime.sizes import format_duration

    assert [format_duration(t) for t in (2e-5, 0.02, 1.5)] == ["20 us", "20.0 ms", "1.50 s"]
    assert [format_duration(t) for t in (999e-6, 1e-3, 1.0)] == ["999 us", "1.0 ms", "1.00 s"]


def test_format_link():
    from runtime.sizes import format_link

    assert format_link(None, None) is None and format_link(None, 0.0) is None
    assert format_link(8e9, 2e-5) == "8.0 GB/s, 20 us per copy"
    assert format_link(None, 0.02) == "unlimited, 20.0 ms per copy"
