"""Quality accounting: what each expert format (and low-bit misses) costs in accuracy.

For every format, the model is run teacher-forced over the same text, token by token:
perplexity, and
greedy-token agreement with ``--quant none`` (the fraction of positions whose argmax is
the exact model's). The mixed-precision row keeps ``base`` experts in a small cache and
serves misses of low gate weight from ``low_bit`` copies (:mod:`runtime.miss`), so it
shows what that policy costs at the rate it actually fires.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from runtime.kv_cache import new_kv_cache
from runtime.loader import LoadOptions, load_model

DEFAULT_FORMATS = ("none", "int8", "int4", "nf4", "int3", "int2")


@dataclass
class QualityRow:
    name: str
    perplexity: float
    agreement: float  # greedy-token agreement with "none"
    bits_per_weight: float
    low_bit_share: float | None = None  # mixed row: share of expert uses served low-bit

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _score(lm, ids: list[int]) -> tuple[float, torch.Tensor]:
    """Mean negative log-likelihood over ``ids`` and the argmax at each position.

    Token by token with a KV cache, as in decoding, so each MoE layer invocation sees one
    token and misses (and the low-bit policy) happen at the rate they do in a chat.
    """
    lm.cache.recover()
    _, kv_args = new_kv_cache(lm.model)
    nll, argmax = 0.0, []
    with torch.inference_mode():
        for i in range(len(ids) - 1):
            x = torch.tensor([[ids[i]]], device=lm.device)
            logits = lm.model(input_ids=x, **kv_args).logits[0, -1].float()
            nll -= torch.log_softmax(logits, -1)[ids[i + 1]].item()
            argmax.append(int(logits.argmax()))
    return nll / (len(ids) - 1), torch.tensor(argmax)


def evaluate_quality(
    ref: str | None,
    base: LoadOptions,
    ids: list[int],
    formats: tuple[str, ...] = DEFAULT_FORMATS,
    mixed: tuple[str, str] | None = ("int4", "int2"),
    mixed_threshold: float = 0.3,
    mixed_fraction: float = 0.25,
    progress=None,
) -> list[QualityRow]:
    """One row per format (every expert resident), then the mixed-precision row."""
    rows: list[QualityRow] = []
    exact: torch.Tensor | None = None
    steps = len(formats) + (1 if mixed else 0)
    for i, name in enumerate(formats):
        lm = load_model(ref, dataclasses.replace(base, quant=name, predictor="none", vram=None))
        try:
            nll, top = _score(lm, ids)
            if exact is None:
                if name != "none":
                    raise ValueError("the first format must be 'none' (the reference for agreement)")
                exact = top
            bits = _stored_bits(lm)
            rows.append(QualityRow(name, math.exp(nll), (top == exact).float().mean().item(), bits))
        finally:
            lm.close()
        if progress:
            progress("Quality", i + 1, steps)
    if mixed is not None:
        main, low = mixed
        lm = load_model(ref, dataclasses.replace(base, quant=main, predictor="cross-layer", low_bit=low,
                                                 low_bit_threshold=mixed_threshold, vram=None,
                                                 max_slots=_slots_for(ref, base, mixed_fraction)))  # fmt: skip
        try:
            nll, top = _score(lm, ids)
            st = lm.cache.stats.total()
            bits = _stored_bits(lm)
            rows.append(QualityRow(f"{main} + {low} misses (w < {mixed_threshold})", math.exp(nll),
                                   (top == exact).float().mean().item(), bits,
                                   st.low_bit_loads / st.uses if st.uses else 0.0))  # fmt: skip
        finally:
            lm.close()
        if progress:
            progress("Quality", steps, steps)
    return rows


def _stored_bits(lm) -> float:
    """Bits of one stored expert row (scales, zero points, biases, alignment) per expert weight."""
    return 8 * lm.store.layout.nbytes / lm.spec.expert_shape.num_weights


def _slots_for(ref, base: LoadOptions, fraction: float) -> int:
    from runtime.memory_plan import plan_load

    lp = plan_load(ref, dataclasses.replace(base, vram=None))
    return max(round(fraction * lp.spec.total_experts), len(lp.spec.moe_layers))
