"""The memory plan: what must live on the device, and how many expert slots fit beside it.

From the model's config (through its meta-device :class:`ModelSpec`), the quantization,
the context length and a byte budget::

    budget
      - reserved        memory the OS / driver / CUDA context keeps (from the profile)
      - non-expert      every weight that is not a routed expert, in the compute dtype
      - KV cache        for ``context`` tokens (sliding-window layers: the window;
                        MLA layers cache their compressed latents)
      - workspace       activations of one prefill chunk, logits, and one expert
                        dequantized (the dequantize-then-GEMM path needs it)
      = for experts  -> slots = floor(for experts / bytes of one quantized expert)

On a unified-memory device (Jetson) host and device share one pool, so the host expert
store is also subtracted from the budget. Slots are then split over the MoE layers,
uniformly or shallow-favoring (Fate: early layers, where prediction is weakest, get
more), never more than a layer has experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from quant import QuantFormat
from runtime.errors import InsufficientMemoryError
from runtime.expert_layout import ExpertLayout
from runtime.model_spec import ModelSpec
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

    @property
    def slots(self) -> int:
        return sum(self.slots_per_layer.values())

    @property
    def cache_bytes(self) -> int:
        return self.slots * self.expert_bytes

    @property
    def device_total(self) -> int:
        return self.reserved + self.non_expert + self.kv_cache + self.workspace + self.cache_bytes

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
            ("expert cache", self.cache_bytes,
             f"{self.slots} of {self.total_experts} experts ({100 * self.resident_fraction:.0f}%), "
             f"{format_bytes(self.expert_bytes)} each"),
        ]  # fmt: skip
        if self.unified:
            rows.append(("host expert store (shared pool)", self.store_bytes, "unified memory"))
        return rows


def kv_bytes_per_token(config, dtype: torch.dtype, context: int) -> int:
    """KV-cache bytes for ``context`` tokens, summed over layers (batch 1)."""
    size = torch.empty((), dtype=dtype).element_size()
    n_layers = config.num_hidden_layers
    if getattr(config, "kv_lora_rank", None):  # MLA: compressed latent + shared rope key
        per_layer = config.kv_lora_rank + config.qk_rope_head_dim
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        per_layer = 2 * kv_heads * head_dim
    types = getattr(config, "layer_types", None) or ["full_attention"] * n_layers
    window = getattr(config, "sliding_window", None) or context
    total = 0
    for t in types[:n_layers]:
        tokens = min(context, window) if t == "sliding_attention" else context
        total += per_layer * tokens
    return total * size


def workspace_bytes(spec: ModelSpec, dtype: torch.dtype, prefill_chunk: int) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    c = spec.config
    d, i = spec.expert_shape.hidden, spec.expert_shape.intermediate
    acts = prefill_chunk * (8 * d + 3 * max(i, getattr(c, "intermediate_size", i) or i)) * size
    logits = c.vocab_size * 4 * 2  # last-position logits in fp32, and a sampling copy
    dequant = spec.expert_shape.num_weights * size  # one expert, dequantized
    return acts + logits + dequant


def split_slots(total: int, layers: list[int], num_experts: int, split: str) -> dict[int, int]:
    """Divide ``total`` slots over ``layers``: at least 1 and at most ``num_experts`` each."""
    n = len(layers)
    if split == "uniform":
        weights = [1.0] * n
    elif split == "shallow":  # Fate: linearly from 2x (first layer) down to 1x (last)
        weights = [2.0 - (i / (n - 1) if n > 1 else 0.0) for i in range(n)]
    else:
        raise ValueError(f"unknown slot split '{split}' (choose {', '.join(SPLITS)})")
    total = max(min(total, n * num_experts), n)
    raw = [total * w / sum(weights) for w in weights]
    alloc = [min(num_experts, max(1, math.floor(r))) for r in raw]
    # hand out what rounding left, largest remainder first, respecting the caps
    order = sorted(range(n), key=lambda k: raw[k] - math.floor(raw[k]), reverse=True)
    while sum(alloc) < total:
        for k in order:
            if sum(alloc) < total and alloc[k] < num_experts:
                alloc[k] += 1
    while sum(alloc) > total:
        for k in reversed(order):
            if sum(alloc) > total and alloc[k] > 1:
                alloc[k] -= 1
    return dict(zip(layers, alloc, strict=True))


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
) -> MemoryPlan:
    """Plan the device memory (see module doc). Raises InsufficientMemoryError with the numbers."""
    expert_bytes = ExpertLayout(spec.expert_shape, fmt).nbytes
    store_bytes = expert_bytes * spec.total_experts
    non_expert = spec.non_expert_bytes(dtype)
    kv = kv_bytes_per_token(spec.config, dtype, context)
    ws = workspace_bytes(spec, dtype, min(prefill_chunk, context))
    fixed = reserved + non_expert + kv + ws + (store_bytes if unified else 0)
    n_layers = len(spec.moe_layers)
    if budget is None:
        slots = spec.total_experts
    else:
        minimum = fixed + n_layers * expert_bytes  # one slot per MoE layer
        if budget < minimum:
            raise InsufficientMemoryError(
                f"{format_bytes(budget)} is not enough: this model needs at least {format_bytes(minimum)} on the "
                f"device ({format_bytes(non_expert)} non-expert weights, {format_bytes(kv)} KV cache for "
                f"{context} tokens, {format_bytes(ws + reserved)} workspace and reserve, one expert slot per layer)",
                needed=minimum,
                available=budget,
                hint=_fit_hint(spec, fmt, kv, context, unified),
            )
        slots = (budget - fixed) // expert_bytes
    if max_slots is not None:
        slots = min(slots, max_slots)
    per_layer = split_slots(int(slots), spec.moe_layers, spec.num_experts, split)
    notes = []
    if budget is not None and sum(per_layer.values()) == spec.total_experts:
        notes.append("every expert fits: the cache holds the whole model")
    return MemoryPlan(budget, reserved, non_expert, kv, ws, expert_bytes, store_bytes, spec.total_experts,
                      per_layer, context, unified, notes)  # fmt: skip


def _fit_hint(spec: ModelSpec, fmt: QuantFormat, kv: int, context: int, unified: bool) -> str:
    tips = []
    if kv > 0 and context > 512:
        tips.append(f"a shorter --context (now {context}; the KV cache takes {format_bytes(kv)})")
    if unified:
        tips.append(f"a lower --quant than {fmt.name} (the expert store shares the pool)")
    elif fmt.name == "none":
        tips.append("--quant int4 (smaller slots)")
    tips.append("a device with more memory (--vram / --profile)")
    return "try " + ", or ".join(tips)
