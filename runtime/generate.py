"""Streaming generation: prefill, then decode token by token, yielding typed events.

``stream_generate`` is the one generation loop: the chat REPL, the one-shot command,
``bench`` and the tests all read its events. Each :class:`TokenEvent` carries the new
text and a :class:`GenerationStats` snapshot (tokens/s, hit rate, bytes moved...); the
last event is a :class:`DoneEvent` with the finish reason. Ctrl-C during generation ends
the stream with ``finish_reason="interrupted"``; the model and its cache stay usable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

from runtime.conversation import PromptTooLongError, context_limit, model_positions
from runtime.kv_cache import PromptCache, new_kv_cache
from runtime.loader import LoadedModel
from runtime.memory_plan import DEFAULT_PREFILL_CHUNK
from runtime.stats import LayerCounters
from runtime.trace import TraceWriter

#: seeds are 0 to SEED_LIMIT - 1: what a torch.Generator takes as a signed 64-bit seed
SEED_LIMIT = 2**63


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.95
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks, tests against a reference)


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    cached_prompt_tokens: int  # of them, taken from the conversation's KV cache (not computed again)
    generated_tokens: int
    prefill_s: float
    decode_s: float
    ttft_s: float  # time to first token: prefill and the first sample
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    hit_rate: float  # at the moment of use (see runtime.stats)
    uses: int
    hits: int
    late: int
    misses: int
    bytes_moved: int
    prefetches: int
    wasted_prefetch_bytes: int
    prediction_precision: float | None
    prediction_recall: float | None
    stall_s: float
    low_bit_loads: int  # misses served by a low-bit copy (runtime.miss)
    host_computed: int  # misses computed on the host (runtime.miss)
    cache_slots: int
    cache_bytes: int
    device_memory_bytes: int  # allocated on CUDA; the plan's device total on the CPU

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TokenEvent:
    text: str  # new text since the last event ("" while a multi-byte character is incomplete)
    token_id: int
    stats: GenerationStats


@dataclass(frozen=True)
class DoneEvent:
    text: str  # the whole completion
    token_ids: list[int]
    finish_reason: str  # "stop", "length" (max_new_tokens), "context" (the context is full) or "interrupted"
    stats: GenerationStats


def encode_prompt(tokenizer, text: str, chat_template: bool = True, system: str | None = None) -> list[int]:
    """Token ids for a single-turn prompt: the model's chat template if it has one."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]
    return encode_messages(tokenizer, messages, chat_template)


def encode_messages(tokenizer, messages: Sequence[dict], chat_template: bool = True) -> list[int]:
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    # no template: plain continuation. An answer was generated straight after the text
    # before it, so it is joined to it as it was; anything else starts a new paragraph.
    text = ""
    for m in messages:
        text += ("" if m["role"] == "assistant" or not text else "\n\n") + m["content"]
    return list(tokenizer(text)["input_ids"])


def stop_token_ids(lm: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(lm.model, "generation_config", None), lm.spec.config, lm.tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(e) for e in eos)
    return ids


class _Detokenizer:
    """Incremental decoding that never emits half of a multi-byte character."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]


def _sample(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> int:
    """``logits [V]`` -> one token id (greedy at temperature 0, else top-p sampling).

    Softmax and the nucleus cut run where the logits are; only the nucleus (often a few
    dozen tokens; all V when top-p is 1) goes to the host, where the draw uses the
    seed's host generator (a CUDA tensor cannot be sampled with it), so a seed draws the
    same tokens from the same logits on any device.
    """
    if cfg.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)  # [V]
    order = None
    if cfg.top_p < 1.0:
        # the nucleus from the k most likely tokens, k grown until they hold top-p: a sort
        # of the few dozen that matter, not of the whole vocabulary (the same set, in order)
        k = min(64, probs.numel())
        while True:
            top, order = probs.topk(k)  # [k], descending
            if k == probs.numel() or float(top.sum()) >= cfg.top_p:
                break
            k = min(8 * k, probs.numel())
        keep = int((top.cumsum(-1) - top < cfg.top_p).sum())  # always keeps the top token
        probs, order = top[:keep], order[:keep]  # [K]
    pick = int(torch.multinomial(probs.cpu(), 1, generator=gen))
    return pick if order is None else int(order[pick])


class _Clock:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            # read clocks only after the compute issued so far has run; not a device-wide
            # synchronize, which would also wait for prefetches still copying on the side
            # streams and stop them overlapping the next token
            torch.cuda.current_stream(self.device).synchronize()
        return time.perf_counter()


def _snapshot(
    lm: LoadedModel, before: LayerCounters, n_prompt: int, n_cached: int, n_gen: int, t: dict[str, float]
) -> GenerationStats:
    lm.cache.collect_stall()  # the clock synchronized the compute stream: the last token's events are done
    tot = lm.cache.stats.total().since(before)
    decode_tokens = t["steps"]  # decode forwards timed so far (the first token comes from prefill)
    mem = torch.cuda.memory_allocated(lm.device) if lm.device.type == "cuda" else lm.plan.device_total
    return GenerationStats(
        prompt_tokens=n_prompt,
        cached_prompt_tokens=n_cached,
        generated_tokens=n_gen,
        prefill_s=t["prefill"],
        decode_s=t["decode"],
        ttft_s=t["ttft"],
        prefill_tokens_per_s=(n_prompt - n_cached) / t["prefill"] if t["prefill"] > 0 else 0.0,
        decode_tokens_per_s=decode_tokens / t["decode"] if t["decode"] > 0 else 0.0,
        hit_rate=tot.hit_rate,
        uses=tot.uses,
        hits=tot.hits,
        late=tot.late,
        misses=tot.misses,
        bytes_moved=tot.bytes_moved,
        prefetches=tot.prefetches,
        wasted_prefetch_bytes=tot.wasted_bytes,
        prediction_precision=tot.prediction_precision,
        prediction_recall=tot.prediction_recall,
        stall_s=tot.stall_s,
        low_bit_loads=tot.low_bit_loads,
        host_computed=tot.cpu_computed,
        cache_slots=lm.cache.num_slots,
        cache_bytes=lm.cache.nbytes,
        device_memory_bytes=int(mem),
    )


def stream_generate(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    cfg: SamplingConfig = SamplingConfig(),
    *,
    trace: TraceWriter | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    should_stop: Callable[[], bool] | None = None,
    prompt_cache: PromptCache | None = None,
) -> Iterator[TokenEvent | DoneEvent]:
    """Generate from ``prompt_ids``, yielding a TokenEvent per token and a DoneEvent last.

    ``should_stop`` is polled between prefill chunks and decode steps, a safe point to
    stop (``finish_reason="interrupted"``); a KeyboardInterrupt raised inside the model
    ends the stream the same way, and the cache is made whole again on the next run.
    With ``prompt_cache`` (a chat's), the prompt's prefix that cache holds is not computed
    again, and the cache keeps this prompt and answer for the next call; without it the
    KV cache is new and dropped at the end.
    """
    if not prompt_ids:
        raise ValueError("empty prompt")
    limit = context_limit(lm)  # the KV cache the plan made room for, at most the model's positions
    if len(prompt_ids) >= limit:
        raise PromptTooLongError(len(prompt_ids), limit, model_positions(lm))
    model, rt = lm.model, lm.runtime
    lm.cache.recover()
    stops = set() if cfg.ignore_eos else stop_token_ids(lm)
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    detok = _Detokenizer(lm.tokenizer)
    clock = _Clock(lm.device)
    before = lm.cache.stats.total()
    if rt.prefetcher is not None:
        rt.prefetcher.reset()
    if rt.tracer is not None:
        rt.tracer.discard()
    if prompt_cache is None:
        cached = 0
        _, kv_args = new_kv_cache(model)
    else:
        cached = prompt_cache.begin(list(prompt_ids))
        kv_args = prompt_cache.kv_args
    times = {"prefill": 0.0, "decode": 0.0, "ttft": 0.0, "steps": 0}
    generated: list[int] = []
    text = ""
    reason = "length"
    pos = cached
    t0 = clock.now()

    def stats() -> GenerationStats:
        return _snapshot(lm, before, len(prompt_ids), cached, len(generated), times)

    def forward(ids: list[int]) -> torch.Tensor:
        nonlocal pos
        x = torch.tensor([ids], device=lm.device)
        try:
            out = model(input_ids=x, **kv_args, logits_to_keep=1)
        except BaseException:  # cut off half-way: its layers may hold different lengths
            if prompt_cache is not None:
                prompt_cache.reset()
            raise
        if prompt_cache is not None:
            prompt_cache.fed(ids)
        if trace is not None and rt.tracer is not None:
            trace.write(rt.tracer.flush(pos))
        pos += len(ids)
        return out.logits[0, -1]

    try:
        with torch.inference_mode():
            ids = list(prompt_ids)
            for i in range(cached, len(ids), prefill_chunk):
                if should_stop is not None and should_stop():
                    raise KeyboardInterrupt
                logits = forward(ids[i : i + prefill_chunk])
            while True:
                token = _sample(logits, cfg, gen)
                now = clock.now()
                if not generated:
                    times["prefill"] = times["ttft"] = now - t0
                    t_decode = now
                else:
                    times["decode"] = now - t_decode
                    times["steps"] += 1
                if token in stops:
                    reason = "stop"
                    break
                generated.append(token)
                piece = detok.add(token)
                text += piece
                hit = next((s for s in cfg.stop_strings if s in text), None)
                if hit is not None:
                    text = text[: text.index(hit)]
                    reason = "stop"
                    break
                yield TokenEvent(piece, token, stats())
                if len(prompt_ids) + len(generated) >= limit:
                    reason = "context"
                    break
                if len(generated) >= cfg.max_new_tokens:
                    break
                if should_stop is not None and should_stop():
                    raise KeyboardInterrupt
                logits = forward([token])
    except KeyboardInterrupt:
        reason = "interrupted"
        if rt.tracer is not None:
            rt.tracer.discard()
    yield DoneEvent(text, generated, reason, stats())


def generate(
    lm: LoadedModel, prompt_ids: Sequence[int], cfg: SamplingConfig = SamplingConfig(), **kw
) -> DoneEvent:
    """Run :func:`stream_generate` to the end and return its DoneEvent."""
    for ev in stream_generate(lm, prompt_ids, cfg, **kw):
        if isinstance(ev, DoneEvent):
            return ev
    raise AssertionError("stream_generate always ends with a DoneEvent")
