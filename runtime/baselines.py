"""Baseline rows of ``promoe bench``: the same model in plain transformers, and with accelerate.

They run the same timing loop as :func:`runtime.generate.stream_generate` (prefill, then
greedy decode with a DynamicCache, clocks read after a device synchronize: a plain
model has no side streams to wait for), on the prompts the promoe configurations used.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from runtime.bench_report import ConfigResult, emulated_budget, host_rss
from runtime.kv_cache import new_kv_cache
from runtime.loader import LoadOptions


def _run_hf(model, prompt: list[int], gen_len: int, device: torch.device) -> dict[str, float | None]:
    """The same timing loop as stream_generate, for a plain transformers model."""

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, kv_args = new_kv_cache(model)
    with torch.inference_mode():
        t0 = now()
        x = torch.tensor([prompt], device=device)
        logits = model(input_ids=x, **kv_args, logits_to_keep=1).logits[0, -1]
        token = int(logits.argmax())
        t1 = now()
        for _ in range(gen_len - 1):
            x = torch.tensor([[token]], device=device)
            logits = model(input_ids=x, **kv_args, logits_to_keep=1).logits[0, -1]
            token = int(logits.argmax())
        t2 = now()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "prefill_tokens_per_s": len(prompt) / (t1 - t0),
        "decode_tokens_per_s": (gen_len - 1) / (t2 - t1) if gen_len > 1 else None,
        "ttft_s": t1 - t0,
        "hit_rate": None,
        "decode_hit_rate": None,
        "prediction_precision": None,
        "prediction_recall": None,
        "bytes_per_token": None,
        "stall_ms_per_token": None,
        "peak_device_bytes": float(peak) if peak is not None else None,
        "host_rss_bytes": float(host_rss()),
    }


# -- the configurations ------------------------------------------------------------------------


def _load_hf(path: Path, device: torch.device, dtype: torch.dtype, budget: int | None, offload: bool):
    from transformers import AutoModelForCausalLM

    if not offload:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    max_memory = {device.index or 0: budget, "cpu": _host_total()}
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map="auto", max_memory=max_memory
    ).eval()


def _host_total() -> int:
    import psutil

    return psutil.virtual_memory().total


def bench_hf(
    name: str, ref, base: LoadOptions, header: dict, prompts, gen_len: int, res: ConfigResult
) -> None:
    from runtime.loader import pick_device, pick_dtype
    from runtime.resolve import resolve_model

    device = pick_device(base.device)
    if name == "accelerate" and device.type != "cuda":
        res.status, res.note = (
            "skipped",
            "accelerate's offload needs a CUDA device (on a CPU every weight is in host memory)",
        )
        return
    if prompts is None:
        res.status, res.note = "skipped", "runs after a promoe configuration (it needs the prompts)"
        return
    path = header.get("path") or resolve_model(ref).path
    spec = header.get("spec")
    dtype = header.get("dtype") or pick_dtype(
        device, spec.expert_shape.dtype if spec else torch.float32, base.dtype
    )
    budget = header.get("budget")
    if name == "transformers" and emulated_budget(base):
        res.note = "upper bound: the emulated budget is lifted"
    elif name == "transformers" and budget is not None and spec is not None:
        full = (
            spec.non_expert_bytes(dtype) + spec.total_experts * spec.expert_shape.num_weights * dtype.itemsize
        )
        if full > budget:
            res.status, res.note = "skipped", "the whole model does not fit the budget"
            return
    try:
        model = _load_hf(path, device, dtype, budget, offload=name == "accelerate")
    except (ImportError, ValueError, RuntimeError) as exc:
        res.status, res.note = "skipped", f"could not load with transformers: {exc}"
        return
    try:
        _run_hf(model, prompts[0][: max(len(prompts[0]) // 4, 8)], min(gen_len, 8), device)  # warm-up
        res.runs = [_run_hf(model, p, gen_len, device) for p in prompts[1:]]
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
