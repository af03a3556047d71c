"""Parse and print byte sizes, bandwidths and durations: "6GB", "8GB/s", "20us".

Units follow SI and IEC: ``GB`` is 10**9 bytes and ``GiB`` is 2**30 bytes, so
``--vram 6GB`` on a card sold as "6 GB" (6 GiB) leaves a little headroom, never less.
"""

from __future__ import annotations

import math
import re

from runtime.errors import InvalidSizeError

_BYTE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}  # fmt: skip
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*"


def parse_size(text: str | int) -> int:
    """``"6GB"`` -> 6_000_000_000, ``"512MiB"`` -> 536_870_912; a bare number is bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(_NUMBER + r"([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None and re.fullmatch(r"\s*-" + _NUMBER + r"[a-zA-Z]*\s*", str(text)):
        raise InvalidSizeError(f"'{text}' is negative: a size is a number of bytes",
                               hint="write a positive number and a unit, e.g. 6GB or 512MiB")  # fmt: skip
    if m is None or unit not in _BYTE_UNITS:
        raise InvalidSizeError(
            f"'{text}' is not a size",
            hint="write a number and a unit, e.g. 6GB, 6GiB, 512MB (GB = 10^9 bytes, GiB = 2^30)",
        )
    value = float(m.group(1)) * _BYTE_UNITS[unit]
    if not math.isfinite(value):
        raise InvalidSizeError(f"'{text}' is too large to be a size",
                               hint="write a number and a unit, e.g. 6GB or 512MiB")  # fmt: skip
    if unit in ("", "b") and value != int(value):
        raise InvalidSizeError(
            f"'{text}' is a fraction of a byte",
            hint=f"add a unit: {m.group(1)}GB, {m.group(1)}GiB... (a bare number is bytes; e.g. 6GB)",
        )
    return int(value)


def parse_bandwidth(text: str) -> float:
    """``"8GB/s"`` -> 8e9 bytes per second (more than zero)."""
    hint = "write bytes per second, e.g. 8GB/s or 500MB/s"
    m = re.fullmatch(r"(.+?)\s*/\s*s\s*", str(text))
    try:
        value = float(parse_size(m.group(1))) if m else None
    except InvalidSizeError:
        value = None
    if not value:
        raise InvalidSizeError(f"'{text}' is not a bandwidth", hint=hint)
    return value


def parse_duration(text: str) -> float:
    """``"20us"`` -> 2e-05 seconds."""
    m = re.fullmatch(_NUMBER + r"([a-zµ]*)\s*", str(text).lower())
    if m is None or m.group(2) not in _TIME_UNITS or not math.isfinite(float(m.group(1))):
        raise InvalidSizeError(
            f"'{text}' is not a duration", hint="write a number and s, ms, us or ns, e.g. 20us"
        )
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def format_bytes(n: float, *, up: bool = False) -> str:
    """Human-readable, SI: 88_000_000 -> '88.0 MB'. ``up`` rounds up instead of to nearest,
    for a figure that is needed: what is printed is then always enough."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB", "EB"):
        if abs(n) < 1000 or unit == "EB":
            if unit == "B":
                return f"{math.ceil(n) if up else n:.0f} {unit}"
            return f"{math.ceil(n * 10) / 10 if up else n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """Human-readable: 2e-05 -> '20 us', 0.02 -> '20.0 ms', 1.5 -> '1.50 s'."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def format_link(bandwidth: float | None, latency: float | None) -> str | None:
    """An emulated link: '8.0 GB/s, 20 us per copy'; None when there is none."""
    if bandwidth is None and not latency:
        return None
    bw = f"{format_bytes(bandwidth)}/s" if bandwidth else "unlimited"
    return f"{bw}, {format_duration(latency or 0.0)} per copy"
