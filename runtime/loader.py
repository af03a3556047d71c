"""Load a checkpoint with its experts offloaded, without ever materializing the whole model.

1. resolve the reference to a local folder (:mod:`runtime.resolve`), read config.json;
2. build transformers' own model on the meta device (:mod:`runtime.model_spec`);
3. plan device memory (:mod:`runtime.memory_plan`): fail early, with the numbers;
4. open or convert the host expert store (:mod:`runtime.expert_store`);
5. replace every ``mlp.experts`` with :class:`runtime.offload.OffloadedExperts`, the one
   documented hook (same forward signature), backed by one :class:`ExpertCache`;
6. materialize the rest on the device and copy the non-expert weights in, shard by
   shard; recompute non-persistent buffers (rotary tables) with transformers' own
   ``_init_weights``; tie embeddings; refuse to run if anything is missing.
"""

from __future__ import annotations

import shlex
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quant import available_formats, get_format
from quant.cpu_int4 import cpu_variant
from runtime.checkpoint import Checkpoint
from runtime.errors import CheckpointError, UnknownNameError, UsageError
from runtime.expert_cache import ExpertCache
from runtime.expert_store import ExpertStore, ProgressFn, StoreReport, open_store
from runtime.memory_plan import (
    MemoryPlan,
    budget_inputs,
    check_host_memory,
    default_context,
    experts_in_place,
    plan_memory,
)
from runtime.model_spec import ModelSpec, describe_model
from runtime.offload import OffloadedExperts, OffloadRuntime, RoutingTracer
from runtime.policies import policy_class
from runtime.prefetch import Prefetcher, check_predictor, make_predictor
from runtime.resolve import ResolvedModel, promoe_home, resolve_model
from runtime.transfer import CudaStreamCopy, EmulatedLink, InlineCopy, TransferEngine

DEFAULT_CONTEXT = 4096


@dataclass
class LoadOptions:
    quant: str = "int4"
    vram: int | None = None  # device budget in bytes; None: a profile's, the free CUDA memory, or unlimited
    reserved: int = 0  # bytes the OS/driver keeps (from a profile)
    unified: bool = False  # host and device share one pool (Jetson)
    context: int | None = None  # tokens the KV cache is planned for (default: min(model max, 4096))
    device: str = "auto"
    dtype: str | None = None  # compute dtype; default fp32 on CPU, the checkpoint's half type on CUDA
    policy: str = "lru"
    split: str = "uniform"
    predictor: str = "none"
    predictor_extra: int = 0
    lookahead: int = 1
    link_bandwidth: float | None = None  # bytes/s of an emulated host->device link (CPU)
    link_latency: float = 0.0  # seconds per copy of the emulated link
    retain: bool = True  # False: on-demand, nothing kept between invocations
    max_slots: int | None = None
    low_bit: str | None = None  # a low-bit format whose copy serves misses of low gate weight
    low_bit_threshold: float = 0.3
    host_misses: bool = False  # compute a miss on the host when that beats copying it
    host_memory: int | None = None  # host RAM of the machine planned for (a profile's); None: this one
    home: Path | None = None
    trace: bool = False

    @property
    def emulates_link(self) -> bool:
        """A host-to-device link is modelled (on the CPU): copies take time on a timeline."""
        return bool(self.link_bandwidth or self.link_latency)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec
    resolved: ResolvedModel
    store: ExpertStore
    store_report: StoreReport
    cache: ExpertCache
    plan: MemoryPlan
    runtime: OffloadRuntime
    device: torch.device
    dtype: torch.dtype
    options: LoadOptions
    timings: dict[str, float] = field(default_factory=dict)
    low_store_report: StoreReport | None = None  # the low-bit copies' store (--low-bit), if opened

    @property
    def name(self) -> str:
        return self.resolved.label

    @property
    def all_loaded(self) -> bool:
        """Every expert was copied into the cache at load (it has a slot for each): nothing
        is evicted, predicted or missed from then on."""
        return holds_every_expert(self.options, self.plan, self.spec)

    def close(self) -> None:
        self.cache.transfer.close()


def holds_every_expert(opts: LoadOptions, plan: MemoryPlan, spec: ModelSpec) -> bool:
    """A cache that keeps experts (not on-demand mode) with a slot for every one of them."""
    return opts.retain and not plan.in_place and plan.slots >= spec.total_experts


def always_resident(opts: LoadOptions, plan: MemoryPlan, spec: ModelSpec) -> bool:
    """Every expert is resident whenever it is used: read in place, or in a cache filled at
    load with a slot for each. Nothing misses (no miss handler, no low-bit store), nothing
    is predicted."""
    return plan.in_place or holds_every_expert(opts, plan, spec)


def expert_format(fmt, spec: ModelSpec, device: torch.device, opts: LoadOptions, plan: MemoryPlan):
    """The format the experts are stored and computed in: ``fmt``, or int4 in torch's CPU
    layout (where its kernel runs here) when the CPU computes experts: every one (the CPU
    is the device), or, with ``--host-misses`` beside a GPU, the misses it is quicker at.
    The GPU then reads that layout too (:mod:`quant.kernels.cpu_layout`): one host store,
    not a second copy of it. A cache that holds every expert never misses: ``fmt`` stays."""
    if device.type == "cpu" or (opts.host_misses and not always_resident(opts, plan, spec)):
        return cpu_variant(fmt, list(spec.expert_shape.matrices().values()))
    return fmt


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA if there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``
    (which also becomes the current CUDA device)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index):
        raise UnknownNameError(f"unknown device '{name}'", hint="use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for, but this torch build sees no CUDA device",
                          hint="use --device cpu, or install a CUDA build of torch")  # fmt: skip
    if dev.type == "cuda" and dev.index is not None:
        count = torch.cuda.device_count()
        if dev.index >= count:
            raise UsageError(
                f"--device {name}: this machine has {count} CUDA device{'s' if count != 1 else ''}",
                hint=f"use cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}",
            )
        # kernels (Triton's among them) launch on the current device, not the tensors' own
        torch.cuda.set_device(dev)
    return dev


def parse_dtype(name: str) -> torch.dtype:
    """``--dtype``: float32, bfloat16 or float16."""
    dt = getattr(torch, name, None)
    if dt not in (torch.float32, torch.bfloat16, torch.float16):
        raise UnknownNameError(f"unknown dtype '{name}'", hint="use float32, bfloat16 or float16")
    return dt


def check_low_bit(low_bit: str, quant: str) -> None:
    """A low-bit copy must be smaller than the expert it stands in for (and both formats known)."""
    low, main = get_format(low_bit), get_format(quant)  # an unknown name fails here, with the list

    def bits(fmt) -> float:
        return fmt.bits_per_weight((4096, 4096), torch.bfloat16)  # barely depends on the shape

    if bits(low) >= bits(main):
        fewer = sorted((f for f in map(get_format, available_formats()) if bits(f) < bits(main)), key=bits)
        hint = (
            f"pick a format with fewer bits, e.g. --low-bit {fewer[0].name}"
            if fewer
            else f"no format has fewer bits than {quant}: drop --low-bit, or keep the experts in more "
            "bits (e.g. --quant int4 --low-bit int2)"
        )
        raise UsageError(
            f"--low-bit {low_bit} ({bits(low):.2g} bits per weight) is no smaller than the experts "
            f"themselves (--quant {quant}, {bits(main):.2g} bits)",
            hint=hint,
        )


def pick_dtype(device: torch.device, expert_dtype: torch.dtype, override: str | None) -> torch.dtype:
    if override:
        return parse_dtype(override)
    if device.type == "cpu":
        return torch.float32  # bf16 matmuls are several times slower on CPUs without AMX
    if expert_dtype == torch.float16 or not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16  # GPUs before Ampere (a T4, Jetson Xavier) emulate bf16 slowly
    return torch.bfloat16


def make_transfer(device: torch.device, num_slots: int, opts: LoadOptions) -> TransferEngine:
    if device.type == "cuda":
        return CudaStreamCopy(device, num_slots)
    if opts.emulates_link:
        return EmulatedLink(opts.link_bandwidth, opts.link_latency)
    return InlineCopy()


def load_model(
    ref: str | None, opts: LoadOptions | None = None, progress: ProgressFn | None = None
) -> LoadedModel:
    opts = opts or LoadOptions()
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    resolved = resolve_model(ref)
    ckpt = Checkpoint(resolved.path)
    spec = describe_model(ckpt)
    device = pick_device(opts.device)
    dtype = pick_dtype(device, spec.expert_shape.dtype, opts.dtype)
    fmt = get_format(opts.quant)
    policy_cls = policy_class(opts.policy)
    check_predictor(opts.predictor)
    context = default_context(spec.config, opts.context)
    budget, reserved, unified = budget_inputs(device, opts)
    plan = plan_memory(spec, fmt, budget=budget, dtype=dtype, context=context, reserved=reserved,
                       unified=unified, split=opts.split, max_slots=opts.max_slots,
                       in_place=experts_in_place(device, opts))  # fmt: skip
    check_host_memory(plan, spec, opts, device)
    timings["resolve_s"] = time.perf_counter() - t_start

    # what is cheap to check goes before the store's conversion, which can take minutes
    _check_non_expert_shapes(spec, ckpt)
    tokenizer = load_tokenizer(resolved.path)
    home = opts.home or promoe_home()
    fmt = expert_format(fmt, spec, device, opts, plan)
    store, report = open_store(ckpt, spec, fmt, home=home, pin=device.type == "cuda",
                               quantize_device=device if device.type == "cuda" else None,
                               progress=progress)  # fmt: skip
    timings["store_s"] = report.seconds

    t0 = time.perf_counter()
    transfer = make_transfer(device, plan.slots, opts)
    cache = ExpertCache(plan.slots_per_layer, lambda layer, cap: policy_cls(cap), store=store, device=device,
                        transfer=transfer, retain=opts.retain, in_place=plan.in_place)  # fmt: skip
    rt = OffloadRuntime(cache, store.layout, fmt, tracer=RoutingTracer() if opts.trace else None)
    model = spec.meta_model
    for layer in spec.moe_layers:
        mlp = model.model.layers[layer].mlp
        mlp.experts = OffloadedExperts(layer, mlp.experts, rt)
    _materialize(model, spec, ckpt, device, dtype, progress)
    resident = always_resident(opts, plan, spec)  # then no miss handler and no predictor
    low_report = None
    if not resident:
        rt.miss_handler, low_report = _miss_handler(
            opts, ckpt, spec, store, fmt, cache, device, model, home, progress, plan
        )
    ckpt.close()
    predictor = None if resident else make_predictor(
        opts.predictor, model=model, spec=spec, extra=opts.predictor_extra, lookahead=opts.lookahead,
        learned_path=store.path, model_ref=shlex.quote(ref) if ref else "")  # fmt: skip
    if predictor is not None:
        rt.prefetcher = Prefetcher(predictor, cache)
    if holds_every_expert(opts, plan, spec):
        cache.fill()  # copied now, not miss by miss in the first answer
        cache.stats.reset()  # the figures count from the first answer, as for every cache
    timings["weights_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    return LoadedModel(model, tokenizer, spec, resolved, store, report, cache, plan, rt, device, dtype, opts,
                       timings, low_report)  # fmt: skip


def _miss_handler(opts: LoadOptions, ckpt, spec, store, fmt, cache, device, model, home, progress, plan):
    if opts.low_bit is None and not opts.host_misses and not plan.streamed_layers:
        return None, None
    from runtime.miss import MissHandler, calibrate

    low_store = low_fmt = low_report = None
    if opts.low_bit is not None:
        check_low_bit(opts.low_bit, opts.quant)
        low_fmt = get_format(opts.low_bit)
        low_store, low_report = open_store(ckpt, spec, low_fmt, home=home, pin=device.type == "cuda",
                                           quantize_device=device if device.type == "cuda" else None,
                                           progress=progress)  # fmt: skip
    cost = None
    if opts.host_misses:  # the only route that weighs costs
        link = (opts.link_bandwidth, opts.link_latency)
        gate_fn = model.model.layers[spec.moe_layers[0]].mlp.experts._gate_fn
        cost = calibrate(store, fmt, device, link, gate_fn)
    handler = MissHandler(cache, store, fmt, cost, host=opts.host_misses, low_store=low_store, low_fmt=low_fmt,
                          threshold=opts.low_bit_threshold)  # fmt: skip
    return handler, low_report


def _targets(model) -> dict[str, torch.Tensor]:
    """The model's tensors that a checkpoint holds (parameters and persistent buffers)."""
    non_persistent = {n for n, _ in model.named_non_persistent_buffers()}
    return {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if n not in non_persistent}


def _non_expert_keys(spec: ModelSpec, ckpt: Checkpoint, targets: dict) -> list[tuple[str, str]]:
    """(checkpoint key, module name) of each non-expert tensor the model takes from the checkpoint."""
    pairs, keys = [], ckpt.keys()
    for key in keys:
        name = spec.arch.to_module_key(key)
        # experts are served by the expert store; keys the model lacks are e.g.
        # multi-token-prediction layers or the rotary tables of old checkpoints
        if ".mlp.experts." not in name and name in targets:
            pairs.append((key, name))
    return pairs


def _check_non_expert_shapes(spec: ModelSpec, ckpt: Checkpoint) -> None:
    """From the safetensors headers alone: every non-expert tensor has the shape the model
    that config.json describes expects (checked before the experts are converted)."""
    targets = _targets(spec.meta_model)
    for key, name in _non_expert_keys(spec, ckpt, targets):
        if tuple(ckpt.shape(key)) != tuple(targets[name].shape):
            raise CheckpointError(
                f"{key} has shape {tuple(ckpt.shape(key))}, the model its config.json describes expects "
                f"{tuple(targets[name].shape)}",
                hint="the config.json does not match the weights; use the one that came with the checkpoint",
            )


def _materialize(model, spec: ModelSpec, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
                 progress: ProgressFn | None) -> None:  # fmt: skip
    for name, p in model.named_parameters():  # pick each tensor's dtype while still on meta
        if p.is_floating_point():
            p.data = p.data.to(spec.load_dtype(name, dtype))
    model.to_empty(device=device)
    targets = _targets(model)
    loaded: set[str] = set()
    pairs = _non_expert_keys(spec, ckpt, targets)  # shapes checked by _check_non_expert_shapes
    with torch.no_grad():
        for i, (key, name) in enumerate(pairs):
            targets[name].copy_(ckpt.get(key))
            loaded.add(name)
            if progress and (i % 16 == 0 or i == len(pairs) - 1):
                progress("Loading non-expert weights", i + 1, len(pairs))
    missing = set(targets) - loaded
    if missing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.tie_weights(missing_keys=missing)
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks {len(missing)} weight(s) the model needs, e.g. {sorted(missing)[0]}",
            hint="the checkpoint and its config.json do not match; re-download or re-export it",
        )
    for module in model.modules():  # rotary tables: transformers' own init recomputes them
        if module._non_persistent_buffers_set:
            model._init_weights(module)
    model.eval()
    model.requires_grad_(False)


#: a folder holds a tokenizer when it has one of these (fast, sentencepiece, BPE, WordPiece, tiktoken)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "*.tiktoken",
)
_TOKENIZER_HINT = (
    "copy its model's tokenizer files (tokenizer.json and tokenizer_config.json) into the folder"
)


def load_tokenizer(path: Path):
    """The model's tokenizer, or a CheckpointError: without its files transformers would build
    an empty one for some models (a vocabulary of one or two tokens) and every prompt would
    encode to nothing."""
    from transformers import AutoTokenizer

    if not any(next(path.glob(pattern), None) for pattern in TOKENIZER_FILES):
        raise CheckpointError(f"{path} has no tokenizer (no tokenizer.json, tokenizer.model or vocab.json)",
                              hint=_TOKENIZER_HINT)  # fmt: skip
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CheckpointError(
            f"could not load the tokenizer from {path} ({first})", hint=_TOKENIZER_HINT
        ) from None
    if len(tok) < 16:
        raise CheckpointError(f"the tokenizer in {path} has only {len(tok)} tokens", hint=_TOKENIZER_HINT)
    return tok
