"""Measure expert-store conversion: time and peak resident memory, against the store's size.

Builds a random Mixtral-architecture checkpoint with GBs of bf16 experts (offline, seeded),
then, each in a fresh process so peak RSS is that process's own:

1. converts it (``open_store``, int4 by default) from nothing;
2. starts again, which maps and verifies the existing store instead.

Prints a JSON object and a Markdown table row for README.md. Takes a few minutes on a
2-core CPU; needs ~2x the checkpoint's size in free disk.

    python scripts/measure_conversion.py --out /tmp/big-moe --quant int4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
from pathlib import Path
from quant import get_format
from runtime.checkpoint import Checkpoint
from runtime.expert_store import open_store
from runtime.model_spec import describe_model
t0 = time.perf_counter()
ckpt = Checkpoint(sys.argv[1])
store, report = open_store(ckpt, describe_model(ckpt), get_format(sys.argv[2]), home=Path(sys.argv[3]))
wall = time.perf_counter() - t0
print(json.dumps({"action": report.action, "seconds": report.seconds, "wall_seconds": wall,
                  "store_bytes": store.nbytes,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def build(out: Path, args) -> None:
    import torch

    from runtime.tiny import build_tiny_model

    if (out / "config.json").is_file():
        return
    t0 = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    build_tiny_model(
        "mixtral", out, seed=0, dtype="bfloat16", max_shard_size="1GB",
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
    )  # fmt: skip
    print(f"built {out} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)


def child(ckpt: Path, quant: str, home: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), quant, str(home)], capture_output=True, text=True,
                       env=env, check=True)  # fmt: skip
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "promoe-big-moe")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        build(args.out, args)
        return
    # built in a process of its own: a child forked from a process that grew to GBs while
    # building would report that as its own peak (Linux carries the RSS high-water mark
    # over fork and exec)
    subprocess.run([sys.executable, __file__, *sys.argv[1:], "--build-only"], check=True)
    ckpt_bytes = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    with tempfile.TemporaryDirectory() as home:
        convert = child(args.out, args.quant, Path(home))
        reuse = child(args.out, args.quant, Path(home))
    result = {
        "checkpoint_bytes": ckpt_bytes,
        "expert_params": 8 * args.layers * 3 * args.hidden * args.intermediate,
        "quant": args.quant,
        "cpus": os.cpu_count(),
        "convert": convert,
        "reuse": reuse,
    }
    print(json.dumps(result, indent=1))
    gb = 1e9
    print(
        f"| {ckpt_bytes / gb:.2f} GB bf16 ({result['expert_params'] / 1e9:.2f}B expert params) | {args.quant} | "
        f"{convert['store_bytes'] / gb:.2f} GB | {convert['seconds']:.0f} s | {convert['peak_rss_bytes'] / gb:.2f} GB | "
        f"{reuse['seconds']:.1f} s | {reuse['peak_rss_bytes'] / gb:.2f} GB |"
    )


if __name__ == "__main__":
    main()
