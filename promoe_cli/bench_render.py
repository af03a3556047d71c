"""Rendering of a BenchReport: a rich table, and an optional PNG chart."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from promoe_cli.console import err, out


def _fmt(v: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def _cell(r, metric: str, spec: str, scale: float = 1.0) -> str:
    med, span = r.median(metric), r.span(metric)
    if med is None:
        return "-"
    text = _fmt(med, spec, scale)
    if span and r.runs and len(r.runs) > 1 and span[0] != span[1]:
        text += f" [dim]({_fmt(span[0], spec, scale)}–{_fmt(span[1], spec, scale)})[/]"
    return text


#: the table's column headers (the keys of :func:`_cells`); "config" heads both halves of a narrow one
COLUMNS = ("config", "prefill tok/s", "decode tok/s", "speedup", "TTFT s", "hit rate", "pred P/R", "MB/tok",
           "stall ms/tok", "device mem")  # fmt: skip
SPEED = COLUMNS[:5]  # on a terminal too narrow for one table: speed, then the cache's figures
CACHE = COLUMNS[:1] + COLUMNS[5:]


def _cells(r) -> dict[str, str]:
    from runtime.sizes import format_bytes

    p, rc = r.median("prediction_precision"), r.median("prediction_recall")
    mem = r.median("peak_device_bytes")
    return {
        "config": r.name,
        "prefill tok/s": _fmt(r.median("prefill_tokens_per_s"), ".0f"),
        "decode tok/s": _cell(r, "decode_tokens_per_s", ".1f"),
        "speedup": "-" if r.speedup_decode is None else f"{r.speedup_decode:.2f}x",
        "TTFT s": _fmt(r.median("ttft_s"), ".3f"),
        "hit rate": _fmt(r.median("decode_hit_rate"), ".3f"),
        "pred P/R": "-" if p is None else f"{p:.2f}/{rc:.2f}",
        "MB/tok": _fmt(r.median("bytes_per_token"), ".2f", 1e-6),
        "stall ms/tok": _fmt(r.median("stall_ms_per_token"), ".2f"),
        "device mem": format_bytes(mem) if mem is not None else "-",
    }


def _table(columns, rows: list[dict[str, str]], caption: str | None) -> Table:
    table = Table(caption=caption)
    for col in columns:
        table.add_column(col, justify="left" if col == "config" else "right", no_wrap=col == "config")
    for row in rows:
        table.add_row(*(row[col] for col in columns))
    return table


def render_report(report) -> None:
    from runtime.sizes import format_bytes

    budget = format_bytes(report.budget) if report.budget is not None else "unlimited"
    cache = f" (cache {report.cache_experts} experts)" if report.cache_experts else ""
    out.print(f"[bold]{report.model}[/] on {report.device} · {report.quant} experts · budget {budget}{cache} "
              f"· link {report.link}")  # fmt: skip
    runs = f"{report.repeats} run{'' if report.repeats == 1 else 's'}"
    caption = (f"{report.prompt_len}-token prompts, {report.gen_len} generated tokens; median (min–max) of {runs}; "
               "speedup: decode tok/s against on-demand in this run; hit rate, MB and stall per token: decode phase")  # fmt: skip
    rows = [_cells(r) for r in report.results if r.status == "ok"]
    whole = _table(COLUMNS, rows, caption)
    if out.measure(whole, options=out.options.update_width(10_000)).maximum <= out.width:  # its natural width
        out.print(whole)
    else:  # its columns would be cut to a few letters: two tables, each whole
        out.print(_table(SPEED, rows, None))
        out.print(_table(CACHE, rows, None))
        out.print(caption, style="dim")
    for r in report.results:
        if r.status == "ok" and r.note:
            out.print(f"[dim]{r.name}: {r.note}[/]")
    for r in report.results:
        if r.status != "ok":
            out.print(f"[warn]{r.name} skipped:[/] {r.note}")


def check_plot(path: Path) -> None:
    """Refuse ``--plot path`` now, before the benchmark runs, if it could not be written after it."""
    from runtime.errors import UsageError

    try:
        import matplotlib
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib, which is not installed", hint="pip install 'promoe[plot]'"
        ) from None
    del matplotlib
    from promoe_cli.loading import check_output_file

    check_output_file(path, "--plot")


def plot_report(report, path: Path) -> None:
    check_plot(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report.results if r.status == "ok"]
    names = [r.name for r in ok]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    dec = [r.median("decode_tokens_per_s") or 0 for r in ok]
    lo = [d - (r.span("decode_tokens_per_s") or (d, d))[0] for d, r in zip(dec, ok, strict=True)]
    hi = [(r.span("decode_tokens_per_s") or (d, d))[1] - d for d, r in zip(dec, ok, strict=True)]
    ax1.bar(names, dec, yerr=[lo, hi], color="tab:blue", capsize=3)
    ax1.set_ylabel("decode tokens/s (median, min-max)")
    ax2.bar(names, [r.median("decode_hit_rate") or 0 for r in ok], color="tab:green")
    ax2.set_ylabel("hit rate at use (decode)")
    ax2.set_ylim(0, 1)
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(f"{report.model} on {report.device}, {report.quant}, link {report.link}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    err.print(f"[dim]chart: {len(ok)} configuration{'' if len(ok) == 1 else 's'}[/]")
