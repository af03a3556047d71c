"""Reusable option declarations (typer ``Annotated`` aliases), shared by the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

_LOAD = "Model and memory"
_CACHE = "Expert cache and prefetch"

ModelArg = Annotated[
    str | None,
    typer.Argument(
        help="A model folder, a Hugging Face repo id in your local cache, or an alias "
        "(mixtral, qwen1.5-moe, qwen3-moe, olmoe, deepseek-v2-lite, phi-moe, gpt-oss). "
        "Default: the bundled tiny-code-moe.",
        show_default=False,
        metavar="MODEL",
    ),
]
Quant = Annotated[
    str,
    typer.Option(
        "--quant",
        "-q",
        metavar="FORMAT",
        help="Expert format: none, int8, int4, int3, int2, nf4.",
        rich_help_panel=_LOAD,
    ),
]
Vram = Annotated[
    str | None,
    typer.Option(
        "--vram",
        metavar="SIZE",
        help="Device memory budget, e.g. 6GB or 5.5GiB (GB = 10^9 bytes).",
        rich_help_panel=_LOAD,
    ),
]
Profile = Annotated[
    str | None,
    typer.Option(
        "--profile",
        "-p",
        metavar="NAME",
        help="Device profile that sizes the cache: a shipped one ("
        + ", ".join(sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "profiles").glob("*.toml")))
        + ") or one saved by 'promoe profile-device --write NAME'.",
        rich_help_panel=_LOAD,
    ),
]
Context = Annotated[
    int | None,
    typer.Option("--context", metavar="N", help="Tokens of context to plan the KV cache for \\[default: model max, at most 4096].",
                 rich_help_panel=_LOAD, min=16),
]  # fmt: skip
Device = Annotated[
    str, typer.Option("--device", metavar="DEVICE", help="auto, cpu or cuda[:N].", rich_help_panel=_LOAD)
]
Dtype = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        metavar="DTYPE",
        help="Compute dtype \\[default: float32 on CPU, bfloat16/float16 on CUDA].",
        rich_help_panel=_LOAD,
    ),
]
Policy = Annotated[
    str,
    typer.Option(
        "--policy", metavar="POLICY", help="Eviction policy: lru, lfu or arc.", rich_help_panel=_CACHE
    ),
]
SlotSplit = Annotated[
    str,
    typer.Option(
        "--slot-split",
        metavar="SPLIT",
        help="Slots per layer: uniform, or shallow (early layers get more, Fate).",
        rich_help_panel=_CACHE,
    ),
]
Prefetch = Annotated[
    str,
    typer.Option("--prefetch", metavar="PREDICTOR", help="Expert predictor: cross-layer (Fate), learned (ProMoE; see train-predictor) or none.",
                 rich_help_panel=_CACHE),
]  # fmt: skip
LinkBandwidth = Annotated[
    str | None,
    typer.Option(
        "--link-bandwidth",
        metavar="BW",
        help="Emulate a host-to-device link of this speed on the CPU, e.g. 8GB/s.",
        rich_help_panel=_CACHE,
    ),
]
LinkLatency = Annotated[
    str | None,
    typer.Option(
        "--link-latency",
        metavar="T",
        help="Per-copy latency of the emulated link, e.g. 20us (bench: 20us when it emulates one).",
        rich_help_panel=_CACHE,
    ),
]
TraceOut = Annotated[
    Path | None,
    typer.Option(
        "--trace-out",
        metavar="FILE",
        help="Record expert routing to this JSONL file (format of shared/traces).",
    ),
]
LowBit = Annotated[
    str | None,
    typer.Option("--low-bit", metavar="FORMAT", help="Serve misses of low gate weight from a low-bit copy in this format, e.g. int2 (HOBBIT).",
                 rich_help_panel=_CACHE),
]  # fmt: skip
LowBitThreshold = Annotated[
    float,
    typer.Option("--low-bit-threshold", metavar="W", min=0.0, max=1.0, help="Gate weight below which a miss may use the low-bit copy.",
                 rich_help_panel=_CACHE),
]  # fmt: skip
HostMisses = Annotated[
    bool,
    typer.Option("--host-misses", help="Compute a miss on the host when the cost model says that beats copying it (Fiddler).",
                 rich_help_panel=_CACHE),
]  # fmt: skip
