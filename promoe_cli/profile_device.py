"""``promoe profile-device``: measure this machine, print the figures, optionally save a profile."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from promoe_cli.console import err, out
from promoe_cli.errors import handle_errors

EXAMPLES = (
    "[bold]Examples[/]\n\n"
    "[cyan]promoe profile-device[/]  measure and print (under half a minute on a 2-core CPU)\n\n"
    "[cyan]promoe profile-device --write my-laptop[/]  save it; then [cyan]promoe chat --profile my-laptop[/]\n\n"
    "[cyan]promoe profile-device --quick --json[/]  fewer, smaller measurements; JSON on stdout"
)


def profile_device(
    write: Annotated[
        str | None,
        typer.Option(
            "--write", metavar="NAME", help="Save the figures as profile NAME under $PROMOE_HOME/profiles."
        ),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="Fewer and smaller measurements (copies up to 16 MB): a rough profile fast."
        ),
    ] = False,
    device: Annotated[
        str, typer.Option("--device", metavar="DEVICE", help="auto, cpu or cuda[:N].")
    ] = "auto",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the measurements as JSON on stdout.")
    ] = False,
) -> None:
    """Measure device memory, host-to-device copies, latency, matmul and dequantization throughput."""
    with handle_errors():
        from runtime.device_profile import check_name

        if write is not None:
            from runtime.resolve import promoe_home

            check_name(write)
            promoe_home()  # where it will be saved: refused before measuring, not after
        from promoe_cli.loading import offline_environment, progress_display
        from runtime.device_probe import QUICK, ProbeSettings, probe_device

        offline_environment()
        busy = _others_cpu_percent()
        from runtime.device_probe import BUSY_SHARE

        if busy > 100 * BUSY_SHARE:
            err.print(
                f"[warn]warning:[/] the machine looks busy: {busy:.0f}% of its CPU is in use by other "
                "processes; copy and compute figures will come out low"
                + (f" (profile {write} is saved anyway: measure again when it is quiet)" if write else "")
            )

        with progress_display() as progress:
            result = probe_device(device, QUICK if quick else ProbeSettings(), progress=progress)
        if as_json:
            out.print_json(json.dumps(_json(result)))
        else:
            _render(result)
        if write is not None:
            from runtime.device_profile import write_profile

            path = write_profile(result.to_profile(write), write)
            err.print(f"wrote profile [accent]{write}[/] to {path}; use it with --profile {write}")


def _others_cpu_percent() -> float:
    """How much of the CPU (percent) other processes use while promoe waits half a second."""
    from runtime.device_probe import others_cpu_share_now

    return 100 * others_cpu_share_now(0.5)


def _json(r) -> dict:
    return {
        "device": r.device,
        "device_name": r.device_name,
        "unified": r.unified,
        "device_memory": r.device_memory,
        "device_free": r.device_free,
        "host_memory": r.host_memory,
        "host_available": r.host_available,
        "copies": [
            {"bytes": c.size, "pinned": c.pinned, "seconds": c.seconds, "bandwidth": c.bandwidth}
            for c in r.copies
        ],  # fmt: skip
        "link_latency_s": r.latency,
        "device_bandwidth": r.device_bandwidth,
        "matmul_flops": r.matmul_flops,
        "matmul_dtype": r.matmul_dtype,
        "dequant_weights_per_s": r.dequant,
        "quick": r.settings.quick,
        "not_applicable": r.not_applicable,
    }


def _render(r) -> None:
    from rich.table import Table

    from runtime.sizes import format_bytes

    cuda = r.device.startswith("cuda")
    table = Table(title=f"{r.device_name} ({r.device})", title_justify="left")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    table.add_column("note", style="dim")
    mem = "device memory" if cuda else "device memory (= host memory)"
    table.add_row(mem, format_bytes(r.device_memory), f"{format_bytes(r.device_free)} free"
                  + (", unified with the host" if cuda and r.unified else ""))  # fmt: skip
    if cuda:
        table.add_row(
            "host memory", format_bytes(r.host_memory), f"{format_bytes(r.host_available)} available"
        )
    table.add_section()
    link = "host -> device" if cuda else "host memory copy (the link on a CPU)"
    for c in r.copies:
        kind = "pinned" if c.pinned else "pageable"
        table.add_row(f"{link}, {kind}, {format_bytes(c.size)}", f"{format_bytes(c.bandwidth)}/s",
                      f"{c.seconds * 1e3:.2f} ms per copy")  # fmt: skip
    table.add_row("per-copy latency", f"{r.latency * 1e6:.1f} us", "median of 4 KiB copies")
    table.add_section()
    table.add_row("device memory bandwidth", f"{format_bytes(r.device_bandwidth)}/s", "copy, read + write")
    n = r.settings.matmul_n
    table.add_row(f"matmul {n}x{n}", f"{r.matmul_flops / 1e12:.3f} TFLOPS", r.matmul_dtype)
    shape = "x".join(map(str, r.settings.dequant_shape))
    for fname, rate in r.dequant.items():
        table.add_row(f"dequantize {fname}", f"{rate / 1e9:.3g} G weights/s",
                      f"{r.settings.dequant_shape[0] * r.settings.dequant_shape[1] / rate * 1e3:.2f} ms per {shape}")  # fmt: skip
    out.print(table)
    for line in r.not_applicable:
        out.print(f"not applicable: {line}")
    if r.settings.quick:
        err.print(
            "[dim]--quick: copies up to 16 MB and a small matmul; run without it for the profile you keep[/]"
        )
