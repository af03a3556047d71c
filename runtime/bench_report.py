"""What ``promoe bench`` reports: per-configuration runs, medians, spans, and the whole run."""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field

from runtime.errors import PromoeError
from runtime.loader import LoadOptions

METRICS = (
    "prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s", "hit_rate", "decode_hit_rate",
    "prediction_precision", "prediction_recall", "bytes_per_token", "stall_ms_per_token",
    "peak_device_bytes", "host_rss_bytes",
)  # fmt: skip


@dataclass
class ConfigResult:
    name: str
    status: str = "ok"  # "ok" or "skipped"
    note: str = ""
    runs: list[dict[str, float | None]] = field(default_factory=list)
    speedup_decode: float | None = None
    speedup_prefill: float | None = None
    error: PromoeError | None = field(
        default=None, repr=False, compare=False
    )  # why it was skipped, if raised

    def median(self, metric: str) -> float | None:
        vals = [r[metric] for r in self.runs if r.get(metric) is not None]
        return statistics.median(vals) if vals else None

    def span(self, metric: str) -> tuple[float, float] | None:
        vals = [r[metric] for r in self.runs if r.get(metric) is not None]
        return (min(vals), max(vals)) if vals else None

    def to_json(self) -> dict:
        out: dict = {"name": self.name, "status": self.status, "note": self.note}
        if self.status == "ok":
            for m in METRICS:
                span = self.span(m)
                out[m] = {"median": self.median(m), "min": span[0], "max": span[1]} if span else None
            out["speedup_decode_vs_on_demand"] = self.speedup_decode
            out["speedup_prefill_vs_on_demand"] = self.speedup_prefill
        return out


@dataclass
class BenchReport:
    model: str
    device: str
    quant: str
    budget: int | None
    cache_experts: str | None  # "N of M" when a cached configuration ran
    link: str
    prompt_len: int
    gen_len: int
    repeats: int
    results: list[ConfigResult]

    def to_json(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "results"},
                "configs": [r.to_json() for r in self.results]}  # fmt: skip


def host_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def emulated_budget(opts: LoadOptions) -> bool:
    """On the CPU the budget only emulates a device: upper-bound rows may ignore it."""
    from runtime.loader import pick_device

    return pick_device(opts.device).type == "cpu"
