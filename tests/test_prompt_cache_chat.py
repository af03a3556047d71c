"""A chat through its prompt cache gives, answer for answer, what a fresh KV cache gives."""

from __future__ import annotations

import os
import signal

import pytest

import runtime.generate as generation
from promoe_cli.repl import run_chat
from runtime.generate import DoneEvent, SamplingConfig
from runtime.kv_cache import sliding_past_recording_works
from tests.helpers import load_small
from tests.test_repl import TEMPLATE, script


def _common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("arch", ["gpt_oss", "deepseek_v3"])  # a 32-token sliding window; MLA
def test_chat_through_the_prompt_cache_matches_fresh_generations(arch, tiny_model, monkeypatch):
    lm = load_small(tiny_model(arch), quant="none", slots_per_layer=1, predictor="cross-layer")
    real = generation.stream_generate
    calls: list[dict] = []

    def spy(lm_, prompt_ids, cfg, **kw):
        pc = kw["prompt_cache"]
        call = {"ids": list(prompt_ids), "cfg": cfg, "held": list(pc.ids), "done": None, "tokens": []}
        calls.append(call)
        for ev in real(lm_, prompt_ids, cfg, **kw):
            if isinstance(ev, DoneEvent):
                call["done"] = ev
            else:
                call["tokens"].append(ev.token_id)
            yield ev
        layers = pc.kv.layers if pc.kv is not None else []
        assert all(layer.get_seq_length() == len(pc.ids) <= 96 for layer in layers)  # never past the context

    def raise_on(nth: int, press: bool = False):
        count = {"n": 0}

        def hook(layer, hidden):
            count["n"] += 1
            if count["n"] == nth:
                if press:  # Ctrl-C once: stop after this token
                    os.kill(os.getpid(), signal.SIGINT)
                else:  # cut off inside the model
                    raise KeyboardInterrupt

        return lambda: lm.runtime.hooks.append(hook)

    n = len(lm.spec.moe_layers)
    monkeypatch.setattr(lm.plan, "context", 96)  # turns get dropped; gpt-oss goes past its window
    monkeypatch.setattr(generation, "stream_generate", spy)
    lm.tokenizer.chat_template = TEMPLATE
    words = [
        "def",
        "fibonacci(n):",
        "return",
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
    ]
    say = [" ".join(words[(3 * i) % 7 :][: 2 + i % 6]) for i in range(8)]
    try:
        run_chat(lm, SamplingConfig(max_new_tokens=8, temperature=0, stop_strings=("x",)), read=script(
            say[0], say[1], raise_on(3 * n + 2), say[2], lm.runtime.hooks.clear, say[3],
            raise_on(2 * n + 1, press=True), say[4], lm.runtime.hooks.clear, "/set max-new-tokens 3", say[5],
            "/system be brief", say[6], "/reset", say[7], "/system none", say[0] + " " + say[1] * 3, say[2],
        ), live=False)  # fmt: skip
    finally:
        lm.runtime.hooks.clear()
        monkeypatch.setattr(generation, "stream_generate", real)
    assert len(calls) == 10
    assert any(c["done"] is not None and c["done"].finish_reason == "interrupted" for c in calls)
    assert any(c["done"] is None for c in calls)  # the first Ctrl-C: the chat stopped reading
    reused = sum(c["done"] is not None and c["done"].stats.cached_prompt_tokens > 0 for c in calls)
    # gpt-oss's layers hold 32 tokens: a turn after a drop (the 96-token context drops often)
    # cuts back past them and starts afresh; cutting back into the last answer works
    assert reused >= (int(sliding_past_recording_works()) if arch == "gpt_oss" else 3)
    for c in calls:
        want = generation.generate(lm, c["ids"], c["cfg"])  # a fresh KV cache
        got = c["done"].token_ids if c["done"] is not None else c["tokens"]
        if c["done"] is None or c["done"].finish_reason == "interrupted":
            assert want.token_ids[: len(got)] == got
            continue
        assert (got, c["done"].finish_reason) == (want.token_ids, want.finish_reason)
        cached = c["done"].stats.cached_prompt_tokens
        assert cached in (0, min(_common(c["held"], c["ids"]), len(c["ids"]) - 1))
    lm.close()
