"""The memory plan: what must live on the device, and how many expert slots fit beside it.

From the model's config (through its meta-device :class:`ModelSpec`), the quantization,
the context length and a byte budget::

    budget
      - reserved        memory the OS / driver / CUDA context keeps (from the profile)
      - non-expert      every weight that is not a routed expert, in the compute dtype,
                        and the buffers the loader recomputes on the device (rotary tables)
      - KV cache        for ``context`` tokens (sliding-window layers: the window, plus one
                        prefill chunk that transformers keeps until the next step; MLA
                        layers cache their compressed latents)
      - workspace       activations of one prefill chunk, logits, and one expert
                        dequantized (the dequantize-then-GEMM path needs it)
      = for experts  -> slots = floor(for experts / bytes of one quantized expert)

The minimum is room for one expert beside the rest, not one per layer: when the budget
holds fewer slots than there are MoE layers, one expert's bytes become a *stream buffer*
and the layers left without a slot copy each expert they use through it (or compute it
on the host, ``--host-misses``). That is what lets Mixtral-8x7B run in 6 GB: its 32
layers' int4 experts would need 3.2 GB for one slot each, beside 3.2 GB of bf16
non-expert weights.

On a unified-memory device (Jetson, the CPU) host and device share one pool, so the host
expert store is also subtracted from the budget. Slots are then split over the MoE
layers, uniformly or shallow-favoring (Fate: early layers, where prediction is weakest,
get more), never more than a layer has experts.

Elsewhere the host store must fit host memory (a profile's, or this machine's):
:func:`check_host_memory` says when it does not (then what is not page-locked on CUDA, or
not in the page cache on the CPU, is read from disk) and which lower quantization fits.

With no budget on the CPU (and no link emulated) the experts are read *in place*: the
host store is the device's copy, every expert is resident and nothing is copied, since a
cache of slots would only hold the same bytes twice.

What is planned is what is allocated: the non-expert, expert-cache and KV-cache figures
equal the loaded model's bytes exactly for every tiny architecture
(``tests/test_memory_plan.py``); the workspace is an estimate of transient activations.
If the budget cannot hold one expert beside the rest,
:class:`InsufficientMemoryError` says how much is needed and which single change
(shorter context, lower quantization, half-precision weights, a bigger device) fits.

:func:`plan_load` makes the plan ``load_model`` would make, from the same options,
without reading a weight (``promoe plan``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from quant import QuantFormat, available_formats, get_format
from runtime.checkpoint import Checkpoint
from runtime.errors import InsufficientMemoryError, ModelNotFoundError, UnknownNameError, UsageError
from runtime.expert_layout import ExpertLayout
from runtime.expert_store import HOST_MARGIN
from runtime.model_spec import ModelSpec, describe_model
from runtime.resolve import ResolvedModel, known_config, resolve_model
from runtime.sizes import format_bytes

SPLITS = ("uniform", "shallow")
DEFAULT_PREFILL_CHUNK = 512


@dataclass
class MemoryPlan:
    budget: int | None  # None: unlimited (every expert resident)
    reserved: int
    non_expert: int
    kv_cache: int
    workspace: int
    expert_bytes: int  # one quantized expert
    store_bytes: int  # the whole host store
    total_experts: int
    slots_per_layer: dict[int, int]
    context: int
    unified: bool = False
    notes: list[str] = field(default_factory=list)
    in_place: bool = False  # the CPU reads every expert from the host store: no slots
    host_memory: int | None = None  # host RAM the store must fit in (None: not checked; unified)
    host_note: str | None = None  # what to do when the store does not fit it
    low_store_bytes: int = 0  # the --low-bit copies, in host memory beside the store

    @property
    def streamed_layers(self) -> list[int]:
        """MoE layers without a slot: their experts go through the stream buffer."""
        return [layer for layer, n in self.slots_per_layer.items() if n == 0]

    @property
    def stream_bytes(self) -> int:
        return self.expert_bytes if self.streamed_layers else 0

    @property
    def slots(self) -> int:
        return sum(self.slots_per_layer.values())

    @property
    def cache_bytes(self) -> int:
        return 0 if self.in_place else self.slots * self.expert_bytes

    @property
    def device_total(self) -> int:
        """Everything planned on the device (with the shared store on a unified device)."""
        total = self.reserved + self.non_expert + self.kv_cache + self.workspace + self.cache_bytes
        total += self.stream_bytes
        return total + (self.store_bytes if self.unified or self.in_place else 0)

    @property
    def resident_fraction(self) -> float:
        return self.slots / self.total_experts

    def rows(self) -> list[tuple[str, int, str]]:
        """(item, bytes, note) for a table."""
        rows = [
            ("reserved (OS, driver, context)", self.reserved, ""),
            ("non-expert weights", self.non_expert, "attention, embeddings, norms, routers, shared experts"),
            ("KV cache", self.kv_cache, f"{self.context} tokens"),
            ("workspace", self.workspace, "activations, logits, one dequantized expert"),
        ]
        if self.in_place:
            rows.append(("host expert store, read in place", self.store_bytes,
                         f"all {self.total_experts} experts, {format_bytes(self.expert_bytes)} each; nothing copied"))  # fmt: skip
            return rows
        rows.append(("expert cache", self.cache_bytes,
                     f"{self.slots} of {self.total_experts} experts ({100 * self.resident_fraction:.0f}%), "
                     f"{format_bytes(self.expert_bytes)} each"))  # fmt: skip
        if self.stream_bytes:
            n, total = len(self.streamed_layers), len(self.slots_per_layer)
            rows.append(("stream buffer", self.stream_bytes,
                         f"one expert, for the {n} of {total} MoE layers without a slot"))  # fmt: skip
        if self.unified:
            rows.append(("host expert store (shared pool)", self.store_bytes, "unified memory"))
        return rows

    def to_json(self) -> dict:
        """Every figure in bytes, for ``promoe plan --json``."""
        return {
            "budget": self.budget,
            "reserved": self.reserved,
            "non_expert": self.non_expert,
            "kv_cache": self.kv_cache,
            "workspace": self.workspace,
            "expert_bytes": self.expert_bytes,
            "cache_bytes": self.cache_bytes,
            "stream_bytes": self.stream_bytes,
            "store_bytes": self.store_bytes,
            "device_total": self.device_total,
            "unified": self.unified,
            "in_place": self.in_place,
            "context": self.context,
            "slots": self.slots,
            "total_experts": self.total_experts,
            "slots_per_layer": {str(k): v for k, v in self.slots_per_layer.items()},
            "streamed_layers": self.streamed_layers,
            "host_memory": self.host_memory,
            "low_store_bytes": self.low_store_bytes,
            "notes": list(self.notes),
        }


def kv_bytes_per_token(config, dtype: torch.dtype, context: int, prefill_chunk: int | None = None) -> int:
    """KV-cache bytes for ``context`` tokens, summed over layers (batch 1).

    Follows what transformers' ``DynamicCache`` holds: MLA layers (``kv_lora_rank``) keep
    the compressed latent and the shared rope key; a sliding-window layer keeps
    ``window - 1`` tokens, but after a forward of ``prefill_chunk`` tokens those are a view
    of the whole concatenation, so it holds up to ``window - 1 + prefill_chunk``.
    """
    size = dtype.itemsize
    n_layers = config.num_hidden_layers
    if getattr(config, "kv_lora_rank", None):  # MLA: compressed latent + shared rope key
        per_layer = config.kv_lora_rank + config.qk_rope_head_dim
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        per_layer = 2 * kv_heads * head_dim
    types = getattr(config, "layer_types", None) or ["full_attention"] * n_layers
    window = getattr(config, "sliding_window", None) or context
    chunk = DEFAULT_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
    total = 0
    for t in types[:n_layers]:
        tokens = min(context, window - 1 + chunk) if t == "sliding_attention" else context
        total += per_layer * tokens
    return total * size


def non_expert_bytes(spec: ModelSpec, dtype: torch.dtype) -> int:
    """Device bytes of everything but the routed experts: the checkpoint's non-expert weights in
    the compute dtype, plus the non-persistent buffers (rotary tables) at their own dtype."""
    total = spec.non_expert_bytes(dtype)
    seen: set[int] = set()
    for name, t in spec.meta_model.named_non_persistent_buffers():
        if ".mlp.experts." not in name and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def workspace_bytes(spec: ModelSpec, dtype: torch.dtype, prefill_chunk: int) -> int:
    size = dtype.itemsize
    c = spec.config
    d, i = spec.expert_shape.hidden, spec.expert_shape.intermediate
    acts = prefill_chunk * (8 * d + 3 * max(i, getattr(c, "intermediate_size", i) or i)) * size
    logits = c.vocab_size * 4 * 2  # last-position logits in fp32, and a sampling copy
    dequant = spec.expert_shape.num_weights * size  # one expert, dequantized
    return acts + logits + dequant


def split_slots(total: int, layers: list[int], num_experts: int, split: str) -> dict[int, int]:
    """Divide ``total`` slots over ``layers``: at most ``num_experts`` each, and at least 1
    each when there are as many slots as layers. Fewer slots than layers go one to a layer:
    evenly spaced (uniform), or to the first layers (shallow); the others get none."""
    n = len(layers)
    if split == "uniform":
        weights = [1.0] * n
    elif split == "shallow":  # Fate: linearly from 2x (first layer) down to 1x (last)
        weights = [2.0 - (i / (n - 1) if n > 1 else 0.0) for i in range(n)]
    else:
        raise UnknownNameError(f"unknown slot split '{split}'", hint=f"choose one of: {', '.join(SPLITS)}")
    total = max(min(total, n * num_experts), 0)
    if total < n:
        chosen = set(range(total)) if split == "shallow" else {k * n // total for k in range(total)}
        return {layer: int(k in chosen) for k, layer in enumerate(layers)}
    raw = [total * w / sum(weights) for w in weights]
    alloc = [min(num_experts, max(1, math.floor(r))) for r in raw]
    # settle what rounding (and the floor of one) left, a slot at a time: to the layer
    # furthest below its share, from the one furthest above it; the shallower on a tie
    while sum(alloc) < total:
        k = max((k for k in range(n) if alloc[k] < num_experts), key=lambda k: (raw[k] - alloc[k], -k))
        alloc[k] += 1
    while sum(alloc) > total:
        k = min((k for k in range(n) if alloc[k] > 1), key=lambda k: (raw[k] - alloc[k], -k))
        alloc[k] -= 1
    return dict(zip(layers, alloc, strict=True))


@dataclass(frozen=True)
class _Fixed:
    """What the device holds before any expert slot, for one choice of settings."""

    fmt: QuantFormat
    dtype: torch.dtype
    context: int
    reserved: int
    non_expert: int
    kv: int
    workspace: int
    expert_bytes: int
    store_bytes: int
    unified: bool

    @property
    def total(self) -> int:
        return (
            self.reserved
            + self.non_expert
            + self.kv
            + self.workspace
            + (self.store_bytes if self.unified else 0)
        )

    @property
    def minimum(self) -> int:
        return self.total + self.expert_bytes  # room for one expert: a slot, or the stream buffer


def _store_bytes(spec: ModelSpec, fmt: QuantFormat) -> int:
    """The host expert store of ``spec`` in ``fmt``: every expert, quantized."""
    return ExpertLayout(spec.expert_shape, fmt).nbytes * spec.total_experts


def _fixed(spec, fmt, dtype, context, reserved, unified, prefill_chunk) -> _Fixed:
    expert_bytes = ExpertLayout(spec.expert_shape, fmt).nbytes
    chunk = min(prefill_chunk, context)
    return _Fixed(fmt, dtype, context, reserved, non_expert_bytes(spec, dtype),
                  kv_bytes_per_token(spec.config, dtype, context, chunk), workspace_bytes(spec, dtype, chunk),
                  expert_bytes, expert_bytes * spec.total_experts, unified)  # fmt: skip


def plan_memory(
    spec: ModelSpec,
    fmt: QuantFormat,
    *,
    budget: int | None,
    dtype: torch.dtype,
    context: int,
    reserved: int = 0,
    unified: bool = False,
    split: str = "uniform",
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    max_slots: int | None = None,
    in_place: bool = False,
) -> MemoryPlan:
    """Plan the device memory (see module doc). Raises InsufficientMemoryError with the numbers."""
    fx = _fixed(spec, fmt, dtype, context, reserved, unified, prefill_chunk)
    n_layers = len(spec.moe_layers)
    if budget is None:
        slots = spec.total_experts
    else:
        minimum = fx.minimum
        if budget < minimum:
            store = f", the {format_bytes(fx.store_bytes)} expert store (shared pool)" if unified else ""
            raise InsufficientMemoryError(
                f"{format_bytes(budget)} is not enough: this model needs at least {format_bytes(minimum, up=True)} on the "
                f"device ({format_bytes(fx.non_expert)} non-expert weights in {_dtype_name(dtype)}, "
                f"{format_bytes(fx.kv)} KV cache for {context} tokens, {format_bytes(fx.workspace)} workspace, "
                f"{format_bytes(reserved)} reserved{store}, room for one {format_bytes(fx.expert_bytes)} expert)",
                needed=minimum,
                available=budget,
                hint=_fit_hint(spec, fx, budget, prefill_chunk),
            )
        slots = (budget - fx.total) // fx.expert_bytes
        if slots < n_layers:  # some layers go without a slot: one expert's room streams theirs
            slots -= 1
    if max_slots is not None:
        slots = min(slots, max_slots)
    per_layer = split_slots(int(slots), spec.moe_layers, spec.num_experts, split)
    notes = []
    if budget is not None and sum(per_layer.values()) == spec.total_experts:
        notes.append("every expert fits: the cache holds the whole model")
    streamed = sum(1 for n in per_layer.values() if n == 0)
    if streamed:
        every = fx.total + n_layers * fx.expert_bytes
        notes.append(
            f"{streamed} of {n_layers} MoE layers have no slot: each expert they use is copied through the "
            f"stream buffer (--host-misses computes it on the host instead, when that is quicker); "
            f"a slot in every layer needs {format_bytes(every, up=True)}"
        )
    in_place = in_place and budget is None and sum(per_layer.values()) == spec.total_experts
    return MemoryPlan(budget, reserved, fx.non_expert, fx.kv, fx.workspace, fx.expert_bytes, fx.store_bytes,
                      spec.total_experts, per_layer, context, unified, notes, in_place)  # fmt: skip


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fit_hint(spec: ModelSpec, fx: _Fixed, budget: int, prefill_chunk: int) -> str:
    """Each single change that would make the plan fit, then the device size that would."""

    def fits(**change) -> bool:
        alt = dict(fmt=fx.fmt, dtype=fx.dtype, context=fx.context, reserved=fx.reserved, unified=fx.unified)
        alt.update(change)
        return _fixed(spec, prefill_chunk=prefill_chunk, **alt).minimum <= budget

    tips = []
    ctx = 1 << (fx.context - 1).bit_length() - 1  # largest power of two below context
    while ctx >= 256 and not fits(context=ctx):
        ctx //= 2
    if ctx >= 256:
        tips.append(f"--context {ctx} (the KV cache for {fx.context} tokens takes {format_bytes(fx.kv)})")
    smaller = [get_format(q) for q in available_formats()]
    smaller = [f for f in smaller if ExpertLayout(spec.expert_shape, f).nbytes < fx.expert_bytes]
    smaller.sort(key=lambda f: ExpertLayout(spec.expert_shape, f).nbytes, reverse=True)
    quant = next((f for f in smaller if fits(fmt=f)), None)
    if quant is not None:
        tips.append(f"--quant {quant.name} (smaller experts than {fx.fmt.name})")
    if fx.dtype == torch.float32 and fits(dtype=torch.bfloat16):
        tips.append(
            f"--dtype bfloat16 (the non-expert weights take {format_bytes(fx.non_expert)} in float32)"
        )
    device = f"a device with at least {format_bytes(fx.minimum, up=True)} (--vram or a larger --profile)"
    if tips:
        return "any one of these fits: " + "; ".join(tips) + f"; or {device}"
    # no single change: the mildest combination, keeping the most bits, then the longest context
    dtypes = [fx.dtype] + ([torch.bfloat16] if fx.dtype == torch.float32 else [])
    contexts = [fx.context] + [c for c in (1 << k for k in range(20, 7, -1)) if 256 <= c < fx.context]
    for f in [fx.fmt, *smaller]:
        for dt in dtypes:
            ctx = next((c for c in contexts if fits(fmt=f, dtype=dt, context=c)), None)
            if ctx is None:
                continue
            flags = [f"--quant {f.name}"] if f is not fx.fmt else []
            flags += ["--dtype bfloat16"] if dt != fx.dtype else []
            flags += [f"--context {ctx}"] if ctx != fx.context else []
            return f"no single change fits, but together {' '.join(flags)} do; or {device}"
    return f"no shorter context or lower quantization fits; use {device}"


# -- the plan load_model would make -----------------------------------------------------
@dataclass
class LoadPlan:
    resolved: ResolvedModel
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    plan: MemoryPlan


def default_context(config, context: int | None) -> int:
    """``--context``, or the model's maximum, at most the loader's DEFAULT_CONTEXT."""
    from runtime.loader import DEFAULT_CONTEXT  # imported here: the loader imports this module

    limit = getattr(config, "max_position_embeddings", None)
    if context and limit and context > limit:
        raise UsageError(f"--context {context} is longer than this model's {limit} positions",
                          hint=f"use --context {limit} or less")  # fmt: skip
    return context or min(limit or DEFAULT_CONTEXT, DEFAULT_CONTEXT)


def experts_in_place(device: torch.device, opts) -> bool:
    """Read the experts where they lie (see module doc): the CPU, no budget, no link emulated,
    and experts kept between invocations (on-demand mode forgets them by design)."""
    return device.type == "cpu" and opts.vram is None and not opts.emulates_link and opts.retain


def device_budget(device: torch.device, vram: int | None) -> int | None:
    """``--vram`` (or a profile's), else what CUDA can give, else None (unlimited on the CPU)."""
    if vram is not None or device.type != "cuda":
        return vram
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)


#: kept back when the budget is all of the GPU's free memory (no --vram, no profile): the
#: caching allocator's fragmentation, cuBLAS workspaces and kernel modules are not planned
CUDA_HEADROOM_MIN = 256 << 20
CUDA_HEADROOM_FRACTION = 0.05


def budget_inputs(device: torch.device, opts) -> tuple[int | None, int, bool]:
    """``(budget, reserved, unified)`` for :func:`plan_memory`, the same for the loader and
    ``promoe plan``. A budget measured from free CUDA memory keeps some headroom back, and
    an integrated GPU (Jetson) is unified memory even without a profile that says so."""
    budget = device_budget(device, opts.vram)
    reserved, unified = opts.reserved, opts.unified
    if device.type == "cuda":
        unified = unified or bool(getattr(torch.cuda.get_device_properties(device), "is_integrated", False))
        if opts.vram is None and not reserved and budget is not None:
            reserved = max(CUDA_HEADROOM_MIN, int(budget * CUDA_HEADROOM_FRACTION))
    return budget, reserved, unified


def host_memory_note(spec: ModelSpec, plan: MemoryPlan, quant: str, pinned: bool) -> str | None:
    """What to do when the host store (and the low-bit copies) do not fit ``plan.host_memory``
    with HOST_MARGIN left."""
    low = plan.low_store_bytes
    if plan.host_memory is None or plan.store_bytes + low + HOST_MARGIN <= plan.host_memory:
        return None
    # by size, and of two the same size the one listed first (int4 before nf4)
    names = available_formats()
    stores = sorted((_store_bytes(spec, get_format(q)), -i, q) for i, q in enumerate(names))
    fits = [(b, q) for b, _, q in stores if b + low + HOST_MARGIN <= plan.host_memory]
    if fits:
        tip = f"--quant {fits[-1][1]} makes it {format_bytes(fits[-1][0])}"
    else:
        need = format_bytes(stores[0][0] + low + HOST_MARGIN, up=True)
        tip = f"no quantization fits; the smallest store needs {need} of host memory"
    then = ("the layers that cannot be page-locked stay memory-mapped: slower copies, from disk"
            if pinned else "memory-mapped, what does not fit is read from disk")  # fmt: skip
    beside = f" (and {format_bytes(low)} of low-bit copies)" if low else ""
    return (f"the {format_bytes(plan.store_bytes)} {quant} expert store{beside} does not fit in "
            f"{format_bytes(plan.host_memory)} of host memory with {HOST_MARGIN / 2**30:g} GiB left to the system "
            f"({then}): {tip}")  # fmt: skip


def plan_load(ref: str | None, opts, *, shipped_config: bool = False) -> LoadPlan:
    """The plan ``runtime.loader.load_model(ref, opts)`` makes, without reading a weight.

    Same rules as the loader: device, dtype (fp32 on the CPU, also when a GPU profile is
    emulated there), context default and budget. The model is built on the meta device.
    With ``shipped_config`` (``promoe plan`` only: nothing else can run such a model), a
    model that is not on this machine is planned from its shipped config.json, if promoe
    has one (:func:`runtime.resolve.known_config`).
    """
    from runtime.loader import pick_device, pick_dtype  # imported here: the loader imports this module

    try:
        resolved = resolve_model(ref)
    except ModelNotFoundError:
        # promoe's copy of the config.json of what names the model: the reference, or the default's
        asked = ref if ref is not None else os.environ.get("PROMOE_DEFAULT_MODEL")
        resolved = known_config(asked) if shipped_config and asked else None
        if resolved is None:
            raise
    ckpt = Checkpoint(resolved.path)
    try:
        spec = describe_model(ckpt, weights=resolved.source != "config")
    finally:
        ckpt.close()
    device = pick_device(opts.device)
    dtype = pick_dtype(device, spec.expert_shape.dtype, opts.dtype)
    budget, reserved, unified = budget_inputs(device, opts)
    plan = plan_memory(spec, get_format(opts.quant), budget=budget, dtype=dtype,
                       context=default_context(spec.config, opts.context), reserved=reserved,
                       unified=unified, split=opts.split, max_slots=opts.max_slots,
                       in_place=experts_in_place(device, opts))  # fmt: skip
    check_host_memory(plan, spec, opts, device)
    return LoadPlan(resolved, spec, device, dtype, plan)


def check_host_memory(plan: MemoryPlan, spec: ModelSpec, opts, device: torch.device) -> None:
    """Record the host memory the store must fit (a profile's, else this machine's), and a
    note when it does not; not on one shared pool, where the budget counted the store."""
    if plan.unified:
        return
    plan.host_memory = opts.host_memory or _this_machine_memory()
    if opts.low_bit and plan.slots < plan.total_experts:  # else nothing misses: no low-bit store
        plan.low_store_bytes = _store_bytes(spec, get_format(opts.low_bit))
    # page-locked beside a GPU (a real one, or one a profile's link emulates)
    plan.host_note = host_memory_note(spec, plan, opts.quant, device.type == "cuda" or opts.emulates_link)
    if plan.host_note:
        plan.notes.append(plan.host_note)


def _this_machine_memory() -> int:
    import psutil

    return psutil.virtual_memory().total
