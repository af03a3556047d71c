"""``promoe bench``: every configuration and the alternatives side by side, or a trace replay."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from promoe_cli import options as o
from promoe_cli.console import err, out
from promoe_cli.errors import handle_errors
from runtime.bench_configs import ALL_CONFIGS, select_configs

EXAMPLES = (
    "[bold]Examples[/]\n\n"
    "[cyan]promoe bench[/]  the bundled model, a cache of half the experts, a link emulated so a copy costs 4x compute\n\n"
    "[cyan]promoe bench mixtral --vram 6GB --gen-len 64[/]  on a GPU, real copies\n\n"
    "[cyan]promoe bench --configs on-demand,lru,cross-layer --repeats 5 --json[/]\n\n"
    "[cyan]promoe bench --trace ../shared/traces/mixtral-8x7b-humaneval.jsonl --policy lfu --slots-per-layer 4[/]  "
    "replay a routing trace through the cache"
)


def _split(values: list[str] | None) -> list[str]:
    out_: list[str] = []
    for v in values or []:
        out_ += [x.strip() for x in v.split(",") if x.strip()]
    return out_


def bench(
    model: o.ModelArg = None,
    prompt_len: Annotated[
        int | None,
        typer.Option(
            "--prompt-len",
            metavar="N",
            min=1,
            show_default=False,
            help="Prompt tokens per run. \\[default: 512, shortened so prompt and answer fit the context]",
        ),
    ] = None,
    gen_len: Annotated[
        int,
        typer.Option("--gen-len", metavar="N", min=2, help="Generated tokens per run (end of text ignored)."),
    ] = 128,
    configs: Annotated[
        list[str] | None,
        typer.Option(
            "--configs",
            metavar="A,B,...",
            help="Comma-separated subset of: " + ", ".join(ALL_CONFIGS) + ". \\[default: all]",
        ),
    ] = None,  # fmt: skip
    repeats: Annotated[
        int,
        typer.Option("--repeats", metavar="N", min=1, help="Timed runs per configuration (medians shown)."),
    ] = 3,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            metavar="FILE.png",
            help="Write a PNG chart of tokens/s and hit rate (needs matplotlib).",
        ),
    ] = None,
    cache_fraction: Annotated[
        float,
        typer.Option(
            "--cache-fraction",
            metavar="F",
            min=0.0,
            max=1.0,
            help="Without --vram/--profile: size the cache to hold this share of the experts.",
        ),
    ] = 0.5,
    quality: Annotated[
        bool,
        typer.Option(
            "--quality",
            help="Instead of speed: perplexity and greedy agreement with --quant none for every "
            "format, and for int4 with low-bit copies on misses.",
            rich_help_panel="Quality",
        ),
    ] = False,  # fmt: skip
    quality_tokens: Annotated[
        int,
        typer.Option(
            "--quality-tokens",
            metavar="N",
            min=16,
            help="Tokens of text scored per format.",
            rich_help_panel="Quality",
        ),
    ] = 512,
    trace: Annotated[
        Path | None,
        typer.Option(
            "--trace",
            metavar="FILE",
            help="Replay this routing trace instead of running a model.",
            rich_help_panel="Trace replay",
        ),
    ] = None,
    slots_per_layer: Annotated[
        int,
        typer.Option(
            "--slots-per-layer",
            metavar="S",
            min=1,
            help="Cache slots per layer for --trace.",
            rich_help_panel="Trace replay",
        ),
    ] = 4,
    trace_out: o.TraceOut = None,
    quant: o.Quant = "int4",
    vram: o.Vram = None,
    profile: o.Profile = None,
    context: o.Context = None,
    device: o.Device = "auto",
    dtype: o.Dtype = None,
    policy: o.Policy = "lru",
    slot_split: o.SlotSplit = "uniform",
    link_bandwidth: Annotated[
        str | None,
        typer.Option(
            "--link-bandwidth",
            metavar="BW|auto|off",
            help="Emulated link on the CPU: a speed like 8GB/s, 'auto' (a copy costs 4x one "
            "expert's compute) or 'off'. \\[default: auto on the CPU without a profile]",
            rich_help_panel="Expert cache and prefetch",
        ),
    ] = None,  # fmt: skip
    link_latency: o.LinkLatency = None,
    low_bit: Annotated[
        str,
        typer.Option(
            "--low-bit",
            metavar="FORMAT",
            help="Format of the low-bit copies in the low-bit configuration.",
            rich_help_panel="Expert cache and prefetch",
        ),
    ] = "int2",  # fmt: skip
    low_bit_threshold: o.LowBitThreshold = 0.3,
) -> None:
    """Measure promoe's configurations against each other and the alternatives, in one run."""
    with handle_errors():
        if trace is not None:
            _refuse_with_trace(model=model, configs=configs, quality=quality, plot=plot, trace_out=trace_out)
            _replay(trace, policy, slots_per_layer, json_out)
            return
        from promoe_cli.loading import check_output_file
        from runtime.resolve import promoe_home

        promoe_home()  # a PROMOE_HOME that is a file: refused now, not once per configuration
        check_output_file(trace_out, "--trace-out")  # before any work, not after the whole benchmark
        if plot is not None:
            from promoe_cli.bench_render import check_plot

            check_plot(plot)
        from promoe_cli.loading import load_options, offline_environment, progress_display

        auto_link = link_bandwidth == "auto"
        bw = None if link_bandwidth in ("auto", "off") else link_bandwidth
        opts = load_options(quant=quant, vram=vram, profile=profile, context=context, device=device, dtype=dtype,
                            policy=policy, slot_split=slot_split, prefetch="none", link_bandwidth=bw,
                            link_latency=link_latency)  # fmt: skip
        names = select_configs(None if configs is None else _split(configs))  # refused before any work
        offline_environment()
        if quality and configs is not None:
            from runtime.errors import UsageError

            raise UsageError(
                "--quality compares the expert formats, not the configurations: --configs does not apply",
                hint="drop --configs, or run the configurations without --quality",
            )
        if quality:
            _quality(model, opts, quality_tokens, low_bit, low_bit_threshold, json_out)
            return
        import torch

        from runtime.bench import (
            budget_for_fraction,
            calibrate_link,
            check_lengths,
            nothing_ran_error,
            run_bench,
        )

        check_lengths(model, opts, prompt_len, gen_len)  # before the link is measured, not after
        if opts.vram is None and not profile:
            opts.vram = budget_for_fraction(model, opts, cache_fraction)
        on_cpu = opts.device == "cpu" or (opts.device == "auto" and not torch.cuda.is_available())
        if on_cpu and (auto_link or (link_bandwidth is None and opts.link_bandwidth is None)):
            import warnings

            from runtime.bench import BusyMachineWarning

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", BusyMachineWarning)
                opts.link_bandwidth, compute = calibrate_link(model, opts)
            for w in caught:
                if issubclass(w.category, BusyMachineWarning):
                    err.print(f"[warn]{w.message}[/]")
            opts.link_latency = opts.link_latency or 20e-6
            err.print(f"[dim]emulated link: one expert's decode compute takes {compute * 1e3:.2f} ms; "
                      "the link is set so that its copy takes 4x that[/]")  # fmt: skip
        with progress_display(not json_out) as progress:
            report = run_bench(model, opts, names, prompt_len=prompt_len, gen_len=gen_len, repeats=repeats,
                               progress=progress, on_result=_announce, trace_out=trace_out, low_bit=low_bit,
                               low_bit_threshold=low_bit_threshold)  # fmt: skip
        failure = nothing_ran_error(report.results)
        if failure is not None:
            raise failure
        if json_out:
            out.print_json(json.dumps(report.to_json()))
        else:
            from promoe_cli.bench_render import render_report

            render_report(report)
        if plot is not None:
            from promoe_cli.bench_render import plot_report

            plot_report(report, plot)
            err.print(f"[good]wrote[/] {plot}")


def _quality(model, opts, tokens: int, low_bit: str, threshold: float, json_out: bool) -> None:
    from promoe_cli.loading import progress_display
    from runtime.bench import bench_prompts
    from runtime.checkpoint import Checkpoint
    from runtime.errors import UsageError
    from runtime.loader import load_tokenizer
    from runtime.quality import evaluate_quality
    from runtime.resolve import resolve_model

    resolved = resolve_model(model)
    limit = Checkpoint(resolved.path).config.get("max_position_embeddings")
    if limit and tokens > limit:
        raise UsageError(f"--quality-tokens {tokens} is longer than this model's {limit} positions",
                          hint=f"use --quality-tokens {limit} or less")  # fmt: skip
    ids = bench_prompts(load_tokenizer(resolved.path), tokens, 0)[0]
    with progress_display(not json_out) as progress:
        rows = evaluate_quality(model, opts, ids, mixed=("int4", low_bit), mixed_threshold=threshold,
                                progress=progress)  # fmt: skip
    if json_out:
        out.print_json(
            json.dumps({"model": resolved.label, "tokens": len(ids), "rows": [r.to_json() for r in rows]})
        )
        return
    from rich.table import Table

    table = Table(title=f"{resolved.label}: {len(ids)} tokens of promoe's own source, teacher-forced token by token",
                  caption="agreement: share of positions whose greedy token equals --quant none's")  # fmt: skip
    for col in ("experts", "bits/weight", "perplexity", "agreement", "low-bit uses"):
        table.add_column(col, justify="left" if col == "experts" else "right")
    for r in rows:
        share = "-" if r.low_bit_share is None else f"{r.low_bit_share:.1%}"
        table.add_row(r.name, f"{r.bits_per_weight:.2f}", f"{r.perplexity:.3f}", f"{r.agreement:.1%}", share)
    out.print(table)


def _announce(res) -> None:
    """One line on stderr as each configuration finishes: a long run stopped early (Ctrl-C, a
    time limit) still leaves what it measured, and the table comes at the end."""
    if res.status != "ok":  # why, in the table's notes (or the error, if nothing ran)
        return
    decode, hit = res.median("decode_tokens_per_s"), res.median("decode_hit_rate")
    figures = [f"decode {decode:.1f} tok/s" if decode is not None else "decode -"]
    if hit is not None:
        figures.append(f"hit rate {hit:.3f}")
    err.print(f"[dim]{res.name}: {', '.join(figures)}[/]")


def _refuse_with_trace(*, model, configs, quality: bool, plot, trace_out) -> None:
    """A trace replay runs no model: refuse the options that only mean something for one."""
    from runtime.errors import UsageError

    given = {"a model": model is not None, "--configs": configs is not None, "--quality": quality,
             "--plot": plot is not None, "--trace-out": trace_out is not None}  # fmt: skip
    for what, present in given.items():
        if present:
            raise UsageError(
                f"--trace replays a routing trace without running a model, so {what} cannot go with it",
                hint=f"drop {'the model' if what == 'a model' else what}, or drop --trace to benchmark a model",
            )


def _replay(path: Path, policy: str, slots: int, json_out: bool) -> None:
    from runtime.policies import policy_class
    from runtime.trace import read_trace, replay

    policy_class(policy)  # a clear error for an unknown name, before reading anything
    records = read_trace(path)
    names = list(dict.fromkeys([policy, "lru", "lfu", "arc", "belady"]))
    rates = {name: replay(records, name, slots).hit_rate for name in names}
    tokens = len({r.token for r in records})
    layers = len({r.layer for r in records})
    if json_out:
        data = {"trace": str(path), "tokens": tokens, "layers": layers, "slots_per_layer": slots,
                "policy": policy, "hit_rate": rates}  # fmt: skip
        out.print_json(json.dumps(data))
        return
    from rich.table import Table

    table = Table(title=f"{path.name}: {tokens} tokens x {layers} layers, {slots} slots per layer")
    table.add_column("policy")
    table.add_column("hit rate", justify="right")
    table.add_column("of Belady's", justify="right")
    for name, rate in rates.items():
        label = f"[bold]{name}[/]" if name == policy else name
        if name == "belady":
            label += " (offline optimum)"
        table.add_row(label, f"{rate:.4f}", f"{rate / rates['belady']:.0%}" if rates["belady"] else "-")
    out.print(table)
