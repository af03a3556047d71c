"""Turn command-line options into LoadOptions, load with a progress display, print the banner."""

from __future__ import annotations

import os
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

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
    from runtime.loader import LoadOptions
    from runtime.sizes import parse_bandwidth, parse_duration, parse_size

    opts = LoadOptions(quant=quant, context=context, device=device, dtype=dtype, policy=policy, split=slot_split,
                       predictor=prefetch, trace=trace, **extra)  # fmt: skip
    if profile:
        from runtime.device_profile import apply_profile

        apply_profile(opts, profile)
    if vram:
        opts.vram, opts.reserved = parse_size(vram), 0
    if link_bandwidth:
        opts.link_bandwidth = parse_bandwidth(link_bandwidth)
    if link_latency:
        opts.link_latency = parse_duration(link_latency)
    return opts


@contextmanager
def progress_display(enabled: bool = True):
    """A transient rich progress display on stderr; yields a ``progress(desc, done, total)`` callback."""
    if not enabled or not err.is_terminal:
        yield None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns, console=err, transient=True) as bar:
        tasks: dict[str, int] = {}

        def update(desc: str, done: int, total: int) -> None:
            if desc not in tasks:
                tasks[desc] = bar.add_task(desc, total=total)
            bar.update(tasks[desc], completed=done, total=total)

        yield update


def load(ref: str | None, opts, *, show_progress: bool = True):
    from runtime.loader import load_model

    with progress_display(show_progress) as progress:
        return load_model(ref, opts, progress=progress)


def banner(lm) -> None:
    """Model, architecture, quantization, cache size, device, load times: one block on stderr."""
    from runtime.sizes import format_bytes

    plan, spec, rep = lm.plan, lm.spec, lm.store_report
    n, total = lm.cache.num_slots, spec.total_experts
    store_line = {
        "reused": f"mapped existing expert store in {rep.seconds:.1f}s",
        "converted": f"converted experts in {rep.seconds:.1f}s",
        "rebuilt": f"rebuilt expert store in {rep.seconds:.1f}s ({rep.reason})",
    }[rep.action]
    budget = format_bytes(plan.budget) if plan.budget is not None else "unlimited"
    pred = lm.options.predictor
    err.print(
        f"[accent]{lm.name}[/]  [dim]{spec.arch.name} · {spec.num_layers} layers · "
        f"{spec.num_experts} experts top-{spec.top_k} · {lm.options.quant} experts ({format_bytes(plan.expert_bytes)} each)[/]"
    )
    err.print(
        f"[dim]cache {n} of {total} experts ({100 * n / total:.0f}%, {format_bytes(lm.cache.nbytes)}) · "
        f"budget {budget} on {lm.device} · policy {lm.options.policy} · prefetch {pred}[/]"
    )
    err.print(f"[dim]{store_line}; loaded in {lm.timings['total_s']:.1f}s · store {rep.path}[/]")
