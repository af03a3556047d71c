"""What the chat shows: answers streamed under a live status line, summaries, /stats, /help.

Two ways to show an answer, one interface (``with view: view.add(piece, stats)``):

* :class:`LiveAnswer` on a terminal: the answer streams on stdout with a transient
  status line under it (hit rate, tokens/s, prefetch accuracy, device memory);
* :class:`PlainAnswer` for pipes and ``TERM=dumb``: the text only, no escape codes.

The figures come from the events of :func:`runtime.generate.stream_generate`; this
module only renders them.
"""

from __future__ import annotations

import re
import time

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from promoe_cli.console import out

try:  # word-wrap offsets into the original string (rich's own wrapping, so rows match the screen)
    from rich._wrap import divide_line
except ImportError:  # pragma: no cover - rich moved it: then only whole lines are committed
    divide_line = None

# Control characters a model might emit, which would drive the terminal (ESC sequences, bells...)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def sanitize(text: str) -> str:
    """Model text without terminal control characters (tabs and newlines stay)."""
    return _CONTROL.sub("", text)


def pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def _bytes(n: int | None) -> str:
    from runtime.sizes import format_bytes

    return "unlimited" if n is None else format_bytes(n)


def status_text(
    stats,
    *,
    prompt_tokens: int,
    cached_tokens: int = 0,
    elapsed: float,
    budget: int | None,
    stopping: bool = False,
    width: int | None = None,
) -> Text:
    """The live status line: prefill progress, then tokens/s, hit rate, prefetch accuracy, memory.

    Within ``width`` cells (a terminal's, less the spinner): a line that wraps would leave
    a stray row behind each redraw, so the least useful parts go first (the Ctrl-C
    reminder, memory, prefetch accuracy), then the rest is cut with an ellipsis.
    """
    parts: list[Text] = []  # in display order
    droppable: list[int] = []  # indices into parts, first dropped first
    if stopping:
        parts = [Text("stopping after this token", style="warn"), Text("Ctrl-C again to stop now")]
    elif stats is None or stats.generated_tokens == 0:
        reading = f"reading {prompt_tokens} prompt tokens"
        if cached_tokens:
            reading = f"reading {prompt_tokens - cached_tokens} new prompt tokens ({cached_tokens} cached)"
        parts = [Text(reading), Text(f"{elapsed:.1f}s")]
    else:
        n = stats.generated_tokens
        tps = f"{stats.decode_tokens_per_s:.1f}" if stats.decode_tokens_per_s else "–"
        hit = Text("hit rate ")
        hit.append(pct(stats.hit_rate), style="good" if stats.hit_rate >= 0.9 else "warn")
        parts = [Text(f"{n} token{'' if n == 1 else 's'}"), Text(f"{tps} tok/s"), hit]
        if stats.prediction_precision is not None:
            parts.append(Text(f"prefetch {pct(stats.prediction_precision)}"))
            droppable.insert(0, len(parts) - 1)
        parts.append(Text(f"memory {_bytes(stats.device_memory_bytes)} / {_bytes(budget)}"))
        droppable.insert(0, len(parts) - 1)
    if not stopping:
        parts.append(Text("Ctrl-C stops", style="dim italic"))
        droppable.insert(0, len(parts) - 1)

    def joined(keep: list[Text]) -> Text:
        return Text(" · ", style="dim").join(keep)

    dropped: set[int] = set()
    line = joined(parts)
    for i in droppable:
        if width is None or line.cell_len <= width:
            break
        dropped.add(i)
        line = joined([p for j, p in enumerate(parts) if j not in dropped])
    line.stylize("dim")
    line.no_wrap = True
    if width is not None and line.cell_len > width:
        line.truncate(max(width, 1), overflow="ellipsis")
    return line


def summary_text(done, hint: bool = True) -> str:
    """One line after each answer (rich markup): tokens, tok/s, hit rate, time to first token,
    and how much of the prompt the KV cache kept from the last answer held. ``hint`` adds how
    to let a stopped answer go on (the chat gives it once)."""
    s = done.stats
    notes = {
        "length": f" · [warn]stopped at {s.generated_tokens} tokens[/]"
        + (" (/set max-new-tokens N)" if hint else ""),
        "context": f" · [warn]the context is full at {s.prompt_tokens + s.generated_tokens} tokens[/]",
        "interrupted": " · [warn]interrupted[/]",
    }
    parts = [
        f"{s.generated_tokens} token{'' if s.generated_tokens == 1 else 's'}",
        f"{s.decode_tokens_per_s:.1f} tok/s" if s.decode_tokens_per_s else None,
        f"hit rate {pct(s.hit_rate)}",
        f"prefetch {pct(s.prediction_precision)}" if s.prediction_precision is not None else None,
        f"first token {s.ttft_s:.2f}s" if s.generated_tokens else None,
        f"{s.cached_prompt_tokens} of {s.prompt_tokens} prompt tokens cached" if s.cached_prompt_tokens else None,
    ]  # fmt: skip
    return "[dim]" + " · ".join(p for p in parts if p) + "[/]" + notes.get(done.finish_reason, "")


class PlainAnswer:
    """The answer as plain text on stdout, flushed token by token (pipes, ``TERM=dumb``)."""

    def __init__(self, console: Console = out) -> None:
        self.console = console
        self.text = ""

    def __enter__(self) -> PlainAnswer:
        return self

    def stopping(self) -> None:
        pass

    def add(self, piece: str, stats=None) -> None:
        piece = sanitize(piece)
        self.text += piece
        self.console.file.write(piece)
        self.console.file.flush()

    def __exit__(self, *exc) -> None:
        self.console.file.write("\n")
        self.console.file.flush()


class QuietAnswer(PlainAnswer):
    """The answer kept, not shown (``--jsonl`` writes it whole at the end)."""

    def add(self, piece: str, stats=None) -> None:
        self.text += piece

    def __exit__(self, *exc) -> None:
        pass


class LiveAnswer:
    """The answer streamed on a terminal, a transient status line under it.

    Finished lines (and the finished rows of a long wrapped line) are printed above rich's
    Live region and stay; only the row still being written and the status line are
    redrawn, so the region stays two rows high (no flicker) and a long answer is never
    cropped. Leaving the ``with`` block erases the status and prints the last row.
    """

    def __init__(self, *, prompt_tokens: int, budget: int | None, cached_tokens: int = 0,
                 console: Console = out) -> None:  # fmt: skip
        self.console = console
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens
        self.budget = budget
        self.pending = ""  # the row being written: not printed for good yet
        self.stats = None
        self.stop_requested = False
        self.t0 = time.perf_counter()
        self.spinner = Spinner("dots", style="accent")
        self.live = Live(self, console=console, transient=True, refresh_per_second=12)

    def __enter__(self) -> LiveAnswer:
        self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        self.live.stop()
        if self.pending:
            self.console.print(Text(self.pending), soft_wrap=False)
            self.pending = ""

    def stopping(self) -> None:
        """Ctrl-C was pressed: say so until the answer ends (called from a signal handler)."""
        self.stop_requested = True

    def add(self, piece: str, stats=None) -> None:
        self.stats = stats
        text = self.pending + sanitize(piece)
        finished: list[str] = []
        if "\n" in text:
            *lines, text = text.split("\n")
            finished += lines
        rows = self._finished_rows(text)
        if rows:
            finished += [r.rstrip(" ") for r in rows]
            text = text[sum(len(r) for r in rows) :]
        self.pending = text
        if finished:  # printed above the Live region, for good
            self.console.print(Text("\n".join(finished)), soft_wrap=False)

    def _finished_rows(self, line: str) -> list[str]:
        """The rows of ``line`` that word-wrapping has closed already (all but the last)."""
        width = self.console.width
        if divide_line is None or cell_len(line) <= width or "\t" in line:
            return []
        bounds = [0, *divide_line(line, width, fold=True)]
        return [line[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.pending:
            yield Text(self.pending)
        elapsed = time.perf_counter() - self.t0
        self.spinner.update(
            text=status_text(
                self.stats,
                prompt_tokens=self.prompt_tokens,
                cached_tokens=self.cached_tokens,
                elapsed=elapsed,
                budget=self.budget,
                stopping=self.stop_requested,
                width=max(options.max_width - 2, 10),  # the spinner and its space take 2 cells
            )
        )
        yield self.spinner


def stats_table(stats, slots_per_layer: dict[int, int]) -> Table:
    """Per MoE layer and in total: cache hits and misses, hit rate, prefetch and prediction accuracy."""
    table = Table(header_style="bold", box=None,
                  pad_edge=False, padding=(0, 0, 0, 1))  # fmt: skip
    for name in ("layer", "slots", "uses", "hits", "late", "misses", "hit rate", "prefetched", "used",
                 "precision", "recall"):  # fmt: skip
        table.add_column(name, justify="left" if name == "layer" else "right", no_wrap=True)

    def row(label: str, c, slots: int) -> list[str]:
        used = c.prefetch_used / c.prefetches if c.prefetches else None
        hit_rate = c.hit_rate if c.uses else None  # no uses yet: no rate, not 0%
        return [label, str(slots), str(c.uses), str(c.hits), str(c.late), str(c.misses), pct(hit_rate),
                str(c.prefetches), pct(used), pct(c.prediction_precision), pct(c.prediction_recall)]  # fmt: skip

    for layer in sorted(set(slots_per_layer) | set(stats.layers)):
        table.add_row(*row(str(layer), stats.layer(layer), slots_per_layer.get(layer, 0)))
    table.add_section()
    table.add_row(*row("total", stats.total(), sum(slots_per_layer.values())), style="bold")
    return table


def stats_footer(stats) -> str:
    """Totals that do not fit the table: bytes moved, stall time, wasted prefetches."""
    from runtime.sizes import format_bytes

    t = stats.total()
    return (f"moved {format_bytes(t.bytes_moved)} to the device · compute waited {1000 * t.stall_s:.0f} ms "
            f"for copies · {t.prefetch_wasted} prefetches evicted unused ({format_bytes(t.wasted_bytes)})")  # fmt: skip


STATS_LEGEND = (
    "[dim]hits: resident when used · late: its prefetch was still copying · misses: loaded on demand · "
    "prefetched: copies the predictor started; used: the share used before eviction · "
    "precision, recall: predicted experts against those then used[/]"
)


def key_value_grid(rows: list[tuple[str, str]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="accent", no_wrap=True)
    grid.add_column()
    for k, v in rows:
        grid.add_row(k, v)
    return grid
