"""Benchmarks: every configuration and the alternatives, side by side, on the same prompts.

Each configuration is loaded fresh (its own cache, cold), warmed up with one short
generation, then timed over ``repeats`` runs of ``prompt_len`` prompt tokens and
``gen_len`` greedy tokens (end-of-sequence ignored, so every run generates the same
count). Clocks are read after a device synchronize. Figures are medians over the
repeats, with min and max; speedups are ratios against ``on-demand`` measured in the
same run. Decode-phase figures (hit rate at use, bytes moved and stall per token) exclude
the prefill, whose one invocation per layer touches nearly every expert.

Configurations:

* ``resident``: every expert on the device, preloaded (the upper bound);
* ``on-demand``: nothing kept beyond the current layer's experts (what naive offloading
  does; no cross-token hits by construction);
* ``lru``, ``lfu``, ``arc``: reactive caching within the budget, no prefetch;
* ``cross-layer``, ``learned``: prefetch with the best of lru/lfu/arc in this run;
* ``low-bit``, ``host-misses``: cross-layer prefetch, and misses served by a low-bit copy
  (gate weight below a threshold) or computed on the host when cheaper (runtime.miss);
* ``transformers``: the same model in plain transformers, every weight on the device;
* ``accelerate``: transformers + accelerate's offload at the same budget (CUDA only).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from runtime.baselines import bench_hf
from runtime.bench_configs import BASELINES, PREFETCHING, REACTIVE, fallback_config, select_configs
from runtime.bench_report import BenchReport, ConfigResult, emulated_budget, host_rss
from runtime.device_probe import BUSY_SHARE, CpuSample, others_cpu_share
from runtime.errors import InsufficientMemoryError, PromoeError, StoreError, UsageError
from runtime.loader import LoadedModel, LoadOptions, load_model
from runtime.memory_plan import default_context

DEFAULT_PROMPT_LEN = 512
# -- prompts ----------------------------------------------------------------------------------


def bench_prompts(tokenizer, prompt_len: int, repeats: int) -> list[list[int]]:
    """``repeats + 1`` prompts (the first warms up) of exactly ``prompt_len`` tokens.

    The text is promoe's own source code, so every machine and Python version gets the
    same prompts; for the bundled code model it is in-distribution.
    """
    root = Path(__file__).resolve().parent
    text = "\n\n".join(p.read_text() for p in sorted(root.glob("*.py")))
    ids = tokenizer(text)["input_ids"]
    need = (repeats + 1) * prompt_len
    while len(ids) < need:
        ids = ids + ids
    return [ids[i * prompt_len : (i + 1) * prompt_len] for i in range(repeats + 1)]


def fit_prompt_len(limit: int | None, prompt_len: int | None, gen_len: int) -> int:
    """``prompt_len`` (default 512, shortened to fit), checked against the model's ``limit`` positions."""
    if prompt_len is None:
        prompt_len = min(DEFAULT_PROMPT_LEN, limit - gen_len) if limit else DEFAULT_PROMPT_LEN
        if prompt_len < 1:
            raise UsageError(f"--gen-len {gen_len} leaves no room for a prompt in a context of {limit} tokens",
                              hint=f"use --gen-len {limit - 1} or less")  # fmt: skip
    elif limit and prompt_len + gen_len > limit:
        raise UsageError(
            f"--prompt-len {prompt_len} + --gen-len {gen_len} is longer than the context of {limit} tokens",
            hint=f"use --prompt-len {max(limit - gen_len, 1)} or a shorter --gen-len",
        )
    return prompt_len


# -- one run ----------------------------------------------------------------------------------


def _run_promoe(lm: LoadedModel, prompt: list[int], gen_len: int) -> dict[str, float | None]:
    from runtime.generate import DoneEvent, SamplingConfig, stream_generate

    cfg = SamplingConfig(max_new_tokens=gen_len, temperature=0, ignore_eos=True)
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(lm.device)
    first = None
    done = None
    for ev in stream_generate(lm, prompt, cfg):
        if isinstance(ev, DoneEvent):
            done = ev
        elif first is None:
            first = ev.stats  # after prefill and the first sample
    s = done.stats
    dec_tokens = max(s.generated_tokens - 1, 1)
    dec_uses = s.uses - first.uses
    dec_hits = s.hits - first.hits
    peak = torch.cuda.max_memory_allocated(lm.device) if lm.device.type == "cuda" else lm.plan.device_total
    if done.finish_reason == "interrupted":
        raise KeyboardInterrupt
    return {
        "prefill_tokens_per_s": s.prefill_tokens_per_s,
        "decode_tokens_per_s": s.decode_tokens_per_s,
        "ttft_s": s.ttft_s,
        "hit_rate": s.hit_rate,
        "decode_hit_rate": dec_hits / dec_uses if dec_uses else None,
        "prediction_precision": s.prediction_precision,
        "prediction_recall": s.prediction_recall,
        "bytes_per_token": (s.bytes_moved - first.bytes_moved) / dec_tokens,
        "stall_ms_per_token": 1e3 * (s.stall_s - first.stall_s) / dec_tokens,
        "peak_device_bytes": float(peak),
        "host_rss_bytes": float(host_rss()),
        "uses": float(s.uses),
        "hits": float(s.hits),
        "low_bit_loads": float(s.low_bit_loads),
        "host_computed": float(s.host_computed),
    }


def _promoe_options(
    name: str,
    base: LoadOptions,
    best_policy: str,
    total_experts: int,
    top_k_slots: int,
    low_bit: str = "int2",
    low_bit_threshold: float = 0.3,
) -> LoadOptions:
    if name == "resident":
        return dataclasses.replace(base, predictor="none", max_slots=total_experts)
    if name == "on-demand":
        return dataclasses.replace(base, predictor="none", retain=False, max_slots=top_k_slots, policy="lru")
    if name in REACTIVE:
        return dataclasses.replace(base, predictor="none", policy=name)
    if name == "low-bit":
        return dataclasses.replace(base, predictor="cross-layer", policy=best_policy, low_bit=low_bit,
                                   low_bit_threshold=low_bit_threshold)  # fmt: skip
    if name == "host-misses":
        return dataclasses.replace(base, predictor="cross-layer", policy=best_policy, host_misses=True)
    return dataclasses.replace(base, predictor=name, policy=best_policy)


def budget_for_fraction(ref: str | None, base: LoadOptions, fraction: float) -> int:
    """The budget whose expert cache holds ``fraction`` of all experts (beside everything else),
    at most what the device has (on CUDA, its free memory; the CPU has no such limit)."""
    from runtime.memory_plan import plan_load

    lp = plan_load(ref, dataclasses.replace(base, vram=None, max_slots=None))
    p = lp.plan
    # The budget returned becomes --vram, and a load with --vram keeps back only base.reserved
    # (a profile's), not the headroom (5% of the GPU) a plan of the free CUDA memory reserves:
    # counted in, that headroom would be slots too (7 GiB on an H200: every expert).
    fixed = base.reserved + p.non_expert + p.kv_cache + p.workspace
    slots = max(round(fraction * p.total_experts), len(lp.spec.moe_layers))
    wanted = fixed + slots * p.expert_bytes
    return wanted if p.budget is None else min(wanted, p.budget - p.reserved + base.reserved)


class BusyMachineWarning(UserWarning):
    """Something else is using the machine: calibration timings varied widely, or other
    processes used a large share of the CPU while they were taken."""


def calibrate_link(ref: str | None, base: LoadOptions, ratio: float = 4.0) -> tuple[float, float]:
    """An emulated link on which one expert copy takes ``ratio`` times one expert's decode compute.

    Times one expert (random weights of the model's expert shape, in the run's format) on
    one token: the median of the runs after 10 of warm-up (60 runs, and half a second at
    least). Returns (bytes per second, compute seconds); warns (BusyMachineWarning) when the median is over twice the fastest run, or, on the
    CPU, when other processes used over a quarter of the machine's CPU time meanwhile (a
    load that never lets up slows every run alike, which the spread cannot show).
    """
    from quant import get_format
    from runtime.expert_layout import ExpertLayout
    from runtime.memory_plan import plan_load
    from runtime.offload import expert_mlp

    lp = plan_load(ref, dataclasses.replace(base, vram=None))
    fmt = get_format(base.quant)
    layout = ExpertLayout(lp.spec.expert_shape, fmt)
    gen = torch.Generator().manual_seed(0)
    tensors = {
        k: torch.randn(shape, generator=gen) * 0.02 for k, shape in lp.spec.expert_shape.matrices().items()
    }
    tensors.update({k: torch.zeros(shape) for k, shape in lp.spec.expert_shape.biases().items()})
    row = layout.pack(tensors).to(lp.device)
    w = layout.views(row)
    x = torch.randn(1, lp.spec.expert_shape.hidden, device=lp.device, dtype=lp.dtype)

    def gate(h: torch.Tensor) -> torch.Tensor:
        g, u = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(g) * u

    times = []
    start = CpuSample.now()
    with torch.inference_mode():
        i = 0  # 60 runs, and for at least half a second: CPU times are counted in 10 ms ticks
        while i < 60 or (time.perf_counter() - start.wall < 0.5 and i < 20_000):
            i += 1
            if lp.device.type == "cuda":
                torch.cuda.synchronize(lp.device)
            t0 = time.perf_counter()
            expert_mlp(x, w, fmt, layout, gate)
            if lp.device.type == "cuda":
                torch.cuda.synchronize(lp.device)
            if i > 10:
                times.append(time.perf_counter() - t0)
    others = others_cpu_share(start, CpuSample.now()) if lp.device.type == "cpu" else 0.0
    compute = statistics.median(times)
    if others > BUSY_SHARE:
        warnings.warn(
            f"the machine looks busy: other processes used {others:.0%} of its CPU time while one "
            f"expert's compute was timed ({compute * 1e3:.2f} ms); the figures will be slower than "
            "this machine alone gives, and noisy if that load changes",
            BusyMachineWarning,
            stacklevel=2,
        )
    elif compute > 2 * min(times):
        warnings.warn(
            f"the machine looks busy: one expert's compute took {min(times) * 1e3:.2f} to "
            f"{max(times) * 1e3:.2f} ms (median {compute * 1e3:.2f}); timings will be noisy",
            BusyMachineWarning,
            stacklevel=2,
        )
    return layout.nbytes / (ratio * compute), compute


def check_lengths(ref: str | None, base: LoadOptions, prompt_len: int | None, gen_len: int) -> None:
    """Refuse prompt and generation lengths the model cannot hold, before any measuring."""
    header: dict = {}
    _describe(ref, header)
    fit_prompt_len(default_context(header["spec"].config, base.context), prompt_len, gen_len)


def run_bench(
    ref: str | None,
    base: LoadOptions,
    configs: list[str],
    *,
    prompt_len: int | None = None,
    gen_len: int = 128,
    repeats: int = 3,
    progress: Callable[[str, int, int], None] | None = None,
    on_result: Callable[[ConfigResult], None] | None = None,
    trace_out: Path | None = None,
    low_bit: str = "int2",
    low_bit_threshold: float = 0.3,
) -> BenchReport:
    configs = select_configs(configs)
    results: list[ConfigResult] = []
    best_policy = base.policy
    prompts: list[list[int]] | None = None
    header: dict = {}
    _describe(ref, header)
    limit = default_context(header["spec"].config, base.context)  # --context, at most the model's positions
    prompt_len = fit_prompt_len(limit, prompt_len, gen_len)
    for i, name in enumerate(configs):
        if progress:
            progress(f"Benchmarking {name}", i, len(configs))
        res = ConfigResult(name)
        try:
            if name in ("transformers", "accelerate"):
                bench_hf(name, ref, base, header, prompts, gen_len, res)
            else:
                if name in PREFETCHING:
                    ok = [r for r in results if r.name in REACTIVE and r.status == "ok"]
                    if ok:
                        best_policy = max(ok, key=lambda r: r.median("decode_hit_rate") or 0).name
                lm = _load_for(name, base, best_policy, header, low_bit, low_bit_threshold)
                if lm is None:
                    res.status, res.note = "skipped", header.pop("skip_note")
                else:
                    try:
                        if prompts is None:
                            prompts = bench_prompts(lm.tokenizer, prompt_len, repeats)
                        _run_promoe(lm, prompts[0][: max(prompt_len // 4, 8)], min(gen_len, 8))  # warm-up
                        res.runs = [_run_promoe(lm, p, gen_len) for p in prompts[1:]]
                        if name in PREFETCHING:
                            res.note = f"policy {best_policy}"
                        if name in ("low-bit", "host-misses"):
                            res.note += f"; {_route_note(res.runs)}"
                        res.note = header.pop("resident_note", res.note)
                    finally:
                        lm.close()
        except PromoeError as exc:
            # bench has no --prefetch: its cross-layer prefetch is a configuration of its own
            hint = exc.hint.replace("--prefetch cross-layer", "the cross-layer configuration")
            res.status, res.note = "skipped", f"{exc}" + (f"; {hint}" if hint else "")
            res.error = exc.with_traceback(None)  # not its frames: they can hold pinned memory
            exc.__context__ = exc.__cause__ = None
        results.append(res)
        if on_result:
            on_result(res)
    if trace_out is not None and prompts is not None and "path" in header:
        _record_trace(header["path"], base, prompts[1], gen_len, trace_out)
    if progress:
        progress("Benchmark done", len(configs), len(configs))
    base_res = next((r for r in results if r.name == "on-demand" and r.status == "ok"), None)
    for r in results:
        if base_res is not None and r.status == "ok":
            d0, p0 = base_res.median("decode_tokens_per_s"), base_res.median("prefill_tokens_per_s")
            d, p = r.median("decode_tokens_per_s"), r.median("prefill_tokens_per_s")
            r.speedup_decode = d / d0 if d and d0 else None
            r.speedup_prefill = p / p0 if p and p0 else None
    return BenchReport(
        model=header.get("model", str(ref)),
        device=header.get("device", "?"),
        quant=base.quant,
        budget=header.get("budget"),
        cache_experts=header.get("cache_experts"),
        link=_describe_link(base),
        prompt_len=prompt_len,
        gen_len=gen_len,
        repeats=repeats,
        results=results,
    )


def nothing_ran_error(results: list[ConfigResult]) -> PromoeError | None:
    """The error to report when no configuration ran, or None when one did.

    When every promoe configuration tried failed for lack of memory (the baselines can
    only run after one of them), that is the error: the budget one, with the smallest
    figure needed. When one failed on a damaged file of promoe's cache, that error. Otherwise
    a usage error listing why each was skipped, whose hint never
    names a configuration that was tried.
    """
    if not results or any(r.status == "ok" for r in results):
        return None
    ours = [r for r in results if r.name not in BASELINES]
    short = [r.error for r in ours if isinstance(r.error, InsufficientMemoryError)]
    if ours and len(short) == len(ours):
        return min(short, key=lambda e: e.needed)
    damaged = [r.error for r in ours if isinstance(r.error, StoreError)]
    if damaged:  # a file of promoe's cache to repair (a learned predictor): its own error and exit code
        return damaged[0]
    why = "; ".join(f"{r.name}: {r.note}" for r in results)
    if short:  # another configuration would not fit either
        hint = min(short, key=lambda e: e.needed).hint
    elif spare := fallback_config([r.name for r in results]):
        hint = f"add one that can, e.g. --configs {spare}"
    else:
        hint = "each configuration's reason is given above"
    return UsageError(f"no configuration could run here ({why})", hint=hint)


def _describe_link(opts: LoadOptions) -> str:
    from runtime.sizes import format_link

    link = format_link(opts.link_bandwidth, opts.link_latency)
    return "real" if link is None else f"emulated {link}"


def _route_note(runs: list[dict]) -> str:
    uses = sum(r["uses"] for r in runs)
    low = sum(r["low_bit_loads"] for r in runs)
    host = sum(r["host_computed"] for r in runs)
    return (
        f"{low / uses:.1%} of uses from low-bit copies, {host / uses:.1%} computed on the host"
        if uses
        else ""
    )


def _describe(ref, header: dict) -> None:
    """Resolve the model once per run; every configuration loads from ``header["path"]``."""
    from runtime.checkpoint import Checkpoint
    from runtime.model_spec import describe_model
    from runtime.resolve import resolve_model

    resolved = resolve_model(ref)
    header["path"] = resolved.path
    header["model"] = resolved.label
    header["spec"] = describe_model(Checkpoint(resolved.path))


def _load_for(name: str, base: LoadOptions, best_policy: str, header: dict, low_bit: str = "int2",
              low_bit_threshold: float = 0.3) -> LoadedModel | None:  # fmt: skip
    spec = header["spec"]
    opts = _promoe_options(name, base, best_policy, spec.total_experts, spec.top_k * len(spec.moe_layers), low_bit,
                           low_bit_threshold)  # fmt: skip
    if name == "resident" and emulated_budget(base):
        opts = dataclasses.replace(opts, vram=None)
    lm = load_model(str(header["path"]), opts)
    if name == "resident" and emulated_budget(base):
        header["resident_note"] = "upper bound: the emulated budget is lifted"
    # with a slot for every expert, load_model has filled the cache: resident is preloaded
    if name == "resident" and lm.cache.num_slots < spec.total_experts:
        lm.close()
        header["skip_note"] = (f"every expert does not fit the budget ({lm.cache.num_slots} of "
                               f"{spec.total_experts} slots)")  # fmt: skip
        return None
    header.setdefault("device", str(lm.device))
    header.setdefault("dtype", lm.dtype)
    header.setdefault("budget", base.vram if emulated_budget(base) else lm.plan.budget)
    if name not in ("resident", "on-demand"):
        header.setdefault("cache_experts", f"{lm.cache.num_slots} of {spec.total_experts}")
    return lm


def _record_trace(path: Path, base: LoadOptions, prompt: list[int], gen_len: int, out: Path) -> None:
    """One untimed run with routing recorded (tracing adds host syncs, so it never runs while timing)."""
    from runtime.generate import SamplingConfig, generate
    from runtime.trace import TraceWriter

    lm = load_model(str(path), dataclasses.replace(base, predictor="none", trace=True))
    writer = TraceWriter(out)
    try:
        generate(
            lm, prompt, SamplingConfig(max_new_tokens=gen_len, temperature=0, ignore_eos=True), trace=writer
        )
    finally:
        writer.close()
        lm.close()
