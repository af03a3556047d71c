"""Turn command-line options into LoadOptions, load with a progress display, print the banner."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from promoe_cli.console import err


def offline_environment() -> None:
    """promoe never downloads: make the Hugging Face libraries agree, and keep them quiet."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # bitsandbytes' CPU backend warns, when imported, that it could not fetch an optional
    # kernel from the Hugging Face hub (`kernels`); promoe fetches nothing, by design
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def load_options(
    *,
    quant: str,
    vram: str | None,
    profile: str | None,
    context: int | None,
    device: str,
    dtype: str | None,
    policy: str,
    slot_split: str,
    prefetch: str,
    link_bandwidth: str | None,
    link_latency: str | None,
    trace: bool = False,
    **extra,
):
    """Validate and convert every loading option (sizes, profile) before anything heavy runs.

    A ``--profile`` is applied first, then the explicit flags, so flags win over the
    profile (see runtime.device_profile); an explicit ``--vram`` is the whole budget.
    """
    from runtime.loader import LoadOptions, check_low_bit, parse_dtype, pick_device
    from runtime.sizes import parse_bandwidth, parse_duration, parse_size

    # what the loader would refuse anyway, refused here before anything is read or converted
    pick_device(device)
    if dtype:
        parse_dtype(dtype)
    if extra.get("low_bit"):
        check_low_bit(extra["low_bit"], quant)
    opts = LoadOptions(quant=quant, context=context, device=device, dtype=dtype, policy=policy, split=slot_split,
                       predictor=prefetch, trace=trace, **extra)  # fmt: skip
    if profile:
        from runtime.device_profile import apply_profile

        apply_profile(opts, profile)
    if vram is not None:
        opts.vram, opts.reserved = parse_size(vram), 0
        if vram.strip().isdigit() and opts.vram < 1 << 20:  # bytes, as parse_size reads a bare number
            from runtime.errors import UsageError

            raise UsageError(
                f"--vram {vram} has no unit, so it means {vram} bytes",
                hint=f"add a unit, e.g. --vram {vram}GB",
            )
    if link_bandwidth is not None:
        opts.link_bandwidth = parse_bandwidth(link_bandwidth)
    if link_latency is not None:
        opts.link_latency = parse_duration(link_latency)
    return opts


class _Count(ProgressColumn):
    """``done/total``, blank for a task without a total (the overall spinner)."""

    def render(self, task) -> Text:
        return Text(
            "" if task.total is None else f"{task.completed:.0f}/{task.total:.0f}", style="progress.download"
        )


class _Remaining(TimeRemainingColumn):
    def render(self, task) -> Text:
        return Text("") if task.total is None else super().render(task)


@contextmanager
def progress_display(enabled: bool = True, title: str | None = None):
    """A transient progress display on stderr; yields a ``progress(desc, done, total)`` callback.

    With a ``title``, a spinner line (the title and the time so far) stays up throughout;
    each phase reported (converting experts, loading the store, the non-expert weights)
    gets a bar under it. When stderr is not a terminal, a conversion still running after
    a few seconds prints how far it got, then again every half minute (plain lines).
    """
    if not enabled:
        yield None
        return
    if not err.is_terminal:  # no bars; a line now and then while a long conversion runs
        yield _conversion_notes()
        return
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), _Count(), TimeElapsedColumn(),
               _Remaining()]  # fmt: skip
    with Progress(*columns, console=err, transient=True) as bar:
        if title:
            bar.add_task(title, total=None)
        tasks: dict[str, int] = {}

        def update(desc: str, done: int, total: int) -> None:
            if desc not in tasks:
                tasks[desc] = bar.add_task(desc, total=total)
            bar.update(tasks[desc], completed=done, total=total)

        yield update


#: without a terminal, a conversion still running after this many seconds says so, and
#: then how far it got every NOTE_EVERY_S seconds (a quick one stays quiet)
NOTE_AFTER_S, NOTE_EVERY_S = 3.0, 30.0


def _conversion_notes():
    """A progress callback for stderr that is not a terminal: plain lines, only for the
    conversions (which can take minutes for a large model), and only once they run long."""
    import time

    started: dict[str, float] = {}
    last: dict[str, float] = {}

    def note(desc: str, done: int, total: int) -> None:
        if not desc.startswith(("Converting", "Rebuilding")):
            return
        now = time.monotonic()
        if desc not in started and desc.startswith("Rebuilding"):  # a damaged or stale store: say why, always
            err.print(f"[warn]{escape(desc)}[/]", soft_wrap=True)
            last[desc] = now
        t0 = started.setdefault(desc, now)
        due = last.get(desc, t0 + NOTE_AFTER_S - NOTE_EVERY_S) + NOTE_EVERY_S
        if now >= due and done < total:
            last[desc] = now
            err.print(
                f"[dim]{escape(desc)}: {done}/{total} experts, {now - t0:.0f}s so far[/]", soft_wrap=True
            )
        elif done == total and desc in last:  # it was said to be running: say it finished
            del last[desc]
            err.print(f"[dim]{escape(desc)}: done, {total} experts in {now - t0:.0f}s[/]", soft_wrap=True)

    return note


def load(ref: str | None, opts, *, show_progress: bool = True):
    from runtime.loader import load_model

    title = f"Loading {escape(ref) if ref else 'the default model'}"
    with progress_display(show_progress, title) as progress:
        lm = load_model(ref, opts, progress=progress)
    if lm.resolved.source == "random":  # said every time, --prompt included: its answers are nonsense
        err.print(
            "[warn]warning:[/] the bundled model (models/tiny-code-moe) is not here, so this is a random "
            "model that writes nonsense; pass a model folder, or run promoe from a full checkout "
            "(pip install -e .; a plain pip install does not carry the model)",
            soft_wrap=True,
        )
    if lm.plan.host_note:  # on the CPU: the store is memory-mapped, and read from disk
        err.print(f"[warn]warning:[/] {escape(lm.plan.host_note)}", soft_wrap=True)
    if lm.device.type == "cuda" and lm.store.unpinned_layers:
        err.print(
            f"[warn]warning:[/] {lm.store.unpinned_layers} of {len(lm.store.layers)} layers of the expert store "
            "could not be page-locked (host memory): they stay memory-mapped, and copies from them are slower",
            soft_wrap=True,
        )
    return lm


#: the options that act only on misses: (parameter, flag)
MISS_OPTIONS = (("prefetch", "--prefetch"), ("policy", "--policy"), ("slot_split", "--slot-split"),
                ("low_bit", "--low-bit"), ("low_bit_threshold", "--low-bit-threshold"),
                ("host_misses", "--host-misses"))  # fmt: skip


def miss_options_given(ctx) -> dict[str, str]:
    """The options of MISS_OPTIONS typed on the command line: flag -> value ('' for a switch)."""
    given = {}
    for param, flag in MISS_OPTIONS:
        # by name: typer 0.29 carries a click of its own, whose enum is not click's
        if param in ctx.params and getattr(ctx.get_parameter_source(param), "name", "") == "COMMANDLINE":
            value = ctx.params[param]
            given[flag] = "" if isinstance(value, bool) else str(value)
    return given


def unused_options(lm, given: dict[str, str]) -> str | None:
    """'--policy arc, --host-misses' when those were given and nothing can miss (every expert
    read in place, or loaded into a cache that holds them all); else None."""
    if not given or not (lm.plan.in_place or lm.all_loaded):
        return None
    return ", ".join(f"{flag} {value}" if value else flag for flag, value in given.items())


def banner(lm, profile: str | None = None, *, given: dict[str, str] | None = None) -> None:
    """Three lines on stderr: the model and its experts; the cache, device and budget; load time.
    ``given``: the options typed that act only on misses (:func:`miss_options_given`), said to
    go unused when nothing can miss."""
    from runtime.sizes import format_bytes

    plan, spec, rep, opts = lm.plan, lm.spec, lm.store_report, lm.options
    n, total = lm.cache.num_slots, spec.total_experts
    budget = "unlimited budget" if plan.budget is None else f"budget {format_bytes(plan.budget)}"
    where = f"{lm.device}" + (f" as profile [accent]{escape(profile)}[/]" if profile else "")
    link = ""
    if lm.device.type == "cpu" and opts.link_bandwidth:
        link = f" · emulated link {format_bytes(opts.link_bandwidth)}/s"
    from quant.cpu_int4 import Int4CpuPacked

    kernel = ""
    if isinstance(lm.runtime.fmt, Int4CpuPacked):  # the CPU computes experts with torch's int4 kernel
        kernel = "torch's CPU int4 kernel, " if lm.device.type == "cpu" else "torch's CPU int4 layout, "
    store = _store_said(rep, "expert store")
    if lm.low_store_report is not None:
        store += " · " + _store_said(lm.low_store_report, f"{opts.low_bit} copies' store")
    err.print(
        f"[bold accent]{escape(lm.name)}[/]  {spec.arch.name} · {spec.num_layers} layers · "
        f"{spec.num_experts} experts, top-{spec.top_k} · [bold]{opts.quant}[/] experts "
        f"({kernel}{format_bytes(plan.expert_bytes)} each)",
        soft_wrap=False,
    )
    idle = unused_options(lm, given or {})
    unused = f" · nothing can miss ({idle} unused)" if idle else ""
    if plan.in_place:  # nothing to cache or prefetch: the CPU computes from the host store
        cache = f"all {total} experts read in place from host memory · {where}, {budget}{unused}"
    elif lm.all_loaded:  # filled at load: nothing to evict or predict
        cache = (f"cache [bold]{n} of {total}[/] experts ({format_bytes(lm.cache.nbytes)}), all loaded · "
                 f"{where}, {budget}{link}{unused}")  # fmt: skip
    else:
        cache = (f"cache [bold]{n} of {total}[/] experts ({100 * n / total:.0f}%, {format_bytes(lm.cache.nbytes)}) · "
                 f"{where}, {budget}{link} · {opts.policy} eviction · prefetch {opts.predictor}")  # fmt: skip
    err.print(cache, soft_wrap=False)
    if plan.streamed_layers:  # its own line: the cache line is long already
        tip = "" if opts.host_misses else "; --host-misses computes them on the host when that is quicker"
        err.print(f"{len(plan.streamed_layers)} of {spec.num_moe_layers} MoE layers have no slot and stream "
                  f"their experts through one buffer{tip}", soft_wrap=True)  # fmt: skip
    handler = lm.runtime.miss_handler
    routes = []
    if handler is not None and opts.low_bit is not None:
        routes.append(
            f"from {opts.low_bit} copies when their gate weight is below {opts.low_bit_threshold:g}"
        )
    if handler is not None and opts.host_misses:
        routes.append("computed on the host when that is quicker than the copy")
    if routes:
        err.print(f"misses: {' · '.join(routes)}", soft_wrap=True)
    err.print(f"[dim]loaded in {lm.timings['total_s']:.1f}s · {escape(store)}[/]", soft_wrap=False)


def _store_said(rep, what: str) -> str:
    """'expert store reused', or converted / rebuilt, from what, how long it took, where."""
    return {
        "reused": f"{what} reused",
        "converted": f"{what} converted from {rep.source} in {rep.seconds:.1f}s, in {rep.path}",
        "rebuilt": f"{what} rebuilt from {rep.source} in {rep.seconds:.1f}s ({rep.reason}), in {rep.path}",
    }[rep.action]


def check_output_file(path: Path | None, flag: str) -> None:
    """A file promoe will write: not a folder, in a folder that exists (none is made)."""
    from runtime.errors import UsageError

    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder", hint=f"give a file path, e.g. {path / 'out.json'}")
    if not path.parent.is_dir():
        raise UsageError(
            f"{flag} {path}: the folder {path.parent} does not exist",
            hint="create it first, or give another path",
        )
    # found out now, not after a long run, touching nothing: an existing file (or a link to
    # one) is asked, never opened; a new one is made and removed; anything else (a FIFO whose
    # reader an open would end, /dev/stdout, a dangling link) is left to the run itself
    error = None
    if path.is_file():
        if not os.access(path, os.W_OK):
            error = "permission denied"
    elif not os.path.lexists(path):
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except OSError as exc:
            error = exc.strerror or type(exc).__name__
        else:
            path.unlink(missing_ok=True)
    if error is not None:
        raise UsageError(f"{flag} {path}: cannot write there ({error})",
                         hint="give a path in a folder you can write to")  # fmt: skip
