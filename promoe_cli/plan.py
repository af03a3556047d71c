"""``promoe plan``: what would live on the device, and how many experts fit, without loading weights."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from promoe_cli import options as o
from promoe_cli.console import err, out
from promoe_cli.errors import handle_errors


def _shipped_names() -> str:
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "profiles"
    return ", ".join(sorted(p.stem for p in folder.glob("*.toml"))) or "none"


EXAMPLES = (
    "[bold]Examples[/]\n\n"
    "[cyan]promoe plan mixtral --profile rtx3060-laptop-6gb[/]  does Mixtral fit a 6 GB laptop GPU, and how many experts\n\n"
    "[cyan]promoe plan ./my-olmoe --vram 4GB --quant int3 --context 2048 --json[/]  the same figures as JSON\n\n"
    f"Shipped profiles: {_shipped_names()}; yours (promoe profile-device --write NAME) live in "
    "$PROMOE_HOME/profiles and are found first. Explicit --vram, --link-bandwidth and --link-latency win over "
    "the profile; --vram is then the whole budget (no reserve). Without CUDA a GPU profile is emulated: its "
    "memory sizes the budget and its link is emulated."
)


def plan(
    model: o.ModelArg = None,
    quant: o.Quant = "int4",
    vram: o.Vram = None,
    profile: o.Profile = None,
    context: o.Context = None,
    device: o.Device = "auto",
    dtype: o.Dtype = None,
    slot_split: o.SlotSplit = "uniform",
    link_bandwidth: o.LinkBandwidth = None,
    link_latency: o.LinkLatency = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the plan as JSON (bytes) on stdout.")
    ] = False,
) -> None:
    """Show the device memory plan (weights, KV cache, expert slots) before loading anything."""
    with handle_errors():
        from promoe_cli.loading import load_options, offline_environment

        gpu = _cuda_asked_without_one(device)  # planning for a GPU elsewhere: no weight is loaded
        if gpu and vram is None and not profile:
            from runtime.errors import UsageError

            raise UsageError(f"--device {device}: this machine has no CUDA device, so the GPU's size is unknown",
                             hint="say how much memory the GPU you plan for has: --vram 6GB, or "
                                  "--profile rtx3060-laptop-6gb")  # fmt: skip
        # a GPU's plan is arithmetic: its budget and dtype are what differ from the CPU's
        opts = load_options(quant=quant, vram=vram, profile=profile, context=context,
                            device="cpu" if gpu else device, dtype=dtype, policy="lru", slot_split=slot_split,
                            prefetch="none", link_bandwidth=link_bandwidth, link_latency=link_latency)  # fmt: skip
        for_gpu = dtype is None and (gpu or _gpu_profile_on_this_cpu(profile, opts))
        if for_gpu:  # what the question is: does it fit that GPU, which computes in bf16
            opts.dtype = "bfloat16"
        offline_environment()
        from runtime.errors import InsufficientMemoryError
        from runtime.memory_plan import plan_load

        try:
            lp = plan_load(model, opts, shipped_config=True)
        except InsufficientMemoryError as exc:
            if vram is not None and not (gpu or profile or dtype) and not _cuda_here():
                # planned as this CPU computes, in fp32: perhaps not the question
                exc.hint = (exc.hint + "; " if exc.hint else "") + (
                    "planning for a GPU this machine lacks? add --device cuda (bf16, as it computes)"
                )
            if as_json:  # a script still gets the figures; the error follows on stderr, exit 4
                out.print_json(json.dumps({"fits": False, "needed": exc.needed, "budget": exc.available,
                                           "error": str(exc), "hint": exc.hint}))  # fmt: skip
            raise
        if as_json:
            out.print_json(json.dumps(_json(lp, opts, profile, gpu)))
        else:
            _render(lp, opts, profile, for_gpu, gpu)


def _cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuda_asked_without_one(device: str) -> bool:
    """``--device cuda`` or ``cuda:N`` where torch sees no CUDA device."""
    import torch

    try:
        asked = torch.device(device).type == "cuda"
    except RuntimeError:  # not a device name: load_options says so
        return False
    return asked and not _cuda_here()


def _gpu_profile_on_this_cpu(profile: str | None, opts) -> bool:
    """A GPU profile planned on a machine whose device resolves to the CPU (no CUDA, or --device cpu)."""
    if not profile:
        return False
    from runtime.device_profile import load_profile
    from runtime.loader import pick_device

    return load_profile(profile).device_type == "cuda" and pick_device(opts.device).type == "cpu"


def _link(opts) -> str | None:
    from runtime.sizes import format_link

    return format_link(opts.link_bandwidth, opts.link_latency)


def _json(lp, opts, profile: str | None, gpu: bool = False) -> dict:
    return {
        "fits": True,
        "model": lp.resolved.label,
        "model_path": str(lp.resolved.path),
        "architecture": lp.spec.arch.model_type,
        "quant": opts.quant,
        "device": "cuda" if gpu else str(lp.device),
        "dtype": str(lp.dtype).removeprefix("torch."),
        "profile": profile,
        "slot_split": opts.split,
        "emulated_link": None
        if _link(opts) is None
        else {"bandwidth": opts.link_bandwidth, "latency_s": opts.link_latency},
        **lp.plan.to_json(),
    }


def _render(lp, opts, profile: str | None, for_gpu: bool = False, gpu: bool = False) -> None:
    from rich.table import Table

    from runtime.sizes import format_bytes

    p, spec = lp.plan, lp.spec
    budget = format_bytes(p.budget) if p.budget is not None else "unlimited"
    where = f"profile {profile}" if profile else f"budget {budget}"
    device = "the profile's GPU" if for_gpu and profile else "a CUDA GPU" if gpu else lp.device
    table = Table(title=f"{lp.resolved.label} · {spec.arch.model_type} · {opts.quant} experts · "
                        f"{str(lp.dtype).removeprefix('torch.')} on {device} · {where}",
                  title_justify="left")  # fmt: skip
    table.add_column("item")
    table.add_column("size", justify="right")
    table.add_column("note", style="dim")
    for item, nbytes, note in p.rows():
        table.add_row(item, format_bytes(nbytes), note)
    table.add_section()
    table.add_row("[bold]device total[/]", f"[bold]{format_bytes(p.device_total)}[/]", "")
    if p.budget is not None:
        table.add_row("budget", budget, f"{format_bytes(p.budget - p.device_total)} left (less than one expert)"
                      if p.budget - p.device_total < p.expert_bytes else "")  # fmt: skip
    if p.host_memory is not None and not p.in_place:
        table.add_section()
        whose = f"profile {profile}" if opts.host_memory else "this machine"
        table.add_row("host expert store", format_bytes(p.store_bytes),
                      f"of {format_bytes(p.host_memory)} host memory ({whose})")  # fmt: skip
    out.print(table)
    per_layer = " ".join(f"{layer}:{n}" for layer, n in p.slots_per_layer.items())
    out.print(f"slots per MoE layer ({opts.split}): {per_layer}")
    link = _link(opts)
    if link:
        out.print(f"{'link' if for_gpu else 'emulated link'}: {link}")
    for note in p.notes:
        out.print(f"note: {note}")
    if p.in_place:
        err.print("[dim]no budget given: the CPU reads every expert in place from the host store; "
                  "use --profile or --vram to plan a device's cache[/]")  # fmt: skip
    elif p.budget is None:
        err.print("[dim]no budget given: every expert resident; use --profile or --vram to size the cache[/]")
    elif gpu:
        err.print(f"[dim]planned for a CUDA GPU, which this machine does not have"
                  f"{', in bfloat16, as it computes (--dtype sets another)' if for_gpu else ''}[/]")  # fmt: skip
    elif for_gpu:
        err.print("[dim]planned in bfloat16, as the profile's GPU computes; here on the CPU, chat and bench "
                  "emulate it in float32 (--dtype float32 shows their plan)[/]")  # fmt: skip
    elif lp.device.type == "cpu" and opts.link_bandwidth is not None and str(lp.dtype) == "torch.float32":
        err.print(f"[dim]planned in {str(lp.dtype).removeprefix('torch.')}, as the CPU computes; "
                  "--dtype bfloat16 shows the plan for the device itself[/]")  # fmt: skip
