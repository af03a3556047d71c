"""Streaming generation: events, sampling, stop conditions, Ctrl-C."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from runtime.generate import DoneEvent, SamplingConfig, TokenEvent, _Detokenizer, generate, stream_generate
from runtime.kv_cache import PromptCache
from runtime.transfer import EmulatedLink
from tests.helpers import load_small

PROMPT = [5, 17, 42, 99, 7, 128, 64, 3]


@pytest.fixture(scope="module")
def lm(tiny_dir):
    from runtime.tiny import build_tiny_model

    path = tiny_dir / "gen-mixtral"
    if not path.exists():
        build_tiny_model("mixtral", path, seed=3)
    model = load_small(path, quant="int8", slots_per_layer=3, predictor="cross-layer")
    yield model
    model.close()


def test_events_stream_text_and_live_stats(lm):
    t0 = time.perf_counter()
    events = list(
        stream_generate(lm, PROMPT, SamplingConfig(max_new_tokens=10, temperature=0, ignore_eos=True))
    )
    wall = time.perf_counter() - t0
    tokens, done = events[:-1], events[-1]
    assert all(isinstance(e, TokenEvent) for e in tokens) and isinstance(done, DoneEvent)
    assert len(tokens) == 10 and done.finish_reason == "length"
    assert "".join(e.text for e in tokens) == done.text
    assert [e.token_id for e in tokens] == done.token_ids
    assert [e.stats.generated_tokens for e in tokens] == list(range(1, 11))
    uses = [e.stats.uses for e in tokens]
    assert uses == sorted(uses) and uses[0] > 0  # counters grow as tokens come
    s = done.stats
    assert s.prompt_tokens == len(PROMPT) and s.hits + s.late + s.misses == s.uses
    assert s.decode_tokens_per_s > 0 and s.prefill_tokens_per_s > 0 and s.ttft_s > 0
    # durations of this run, from its start: they fit in the time the call took
    assert s.ttft_s == s.prefill_s and s.prefill_s + s.decode_s <= wall
    # rates over what each phase computed: the prompt's tokens, and the 9 tokens after the first
    assert s.prefill_tokens_per_s == pytest.approx(len(PROMPT) / s.prefill_s)
    assert s.decode_tokens_per_s == pytest.approx(9 / s.decode_s)


def test_each_generation_counts_only_its_own_expert_uses(lm):
    """The stats of a generation are the cache's counters since it started, not since load."""
    cfg = SamplingConfig(max_new_tokens=6, temperature=0, ignore_eos=True)
    start = lm.cache.stats.total().uses
    first = generate(lm, PROMPT, cfg).stats
    second = generate(lm, PROMPT, cfg).stats
    assert first.uses == second.uses > 0  # the same prompt and tokens: the same uses
    assert lm.cache.stats.total().uses == start + first.uses + second.uses
    assert second.hits + second.late + second.misses == second.uses


def test_seeded_sampling_is_reproducible(lm):
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    a, b = generate(lm, PROMPT, cfg), generate(lm, PROMPT, cfg)
    assert a.token_ids == b.token_ids
    c = generate(
        lm, PROMPT, SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=8, ignore_eos=True)
    )
    assert c.token_ids != a.token_ids


def test_tiny_top_p_is_greedy(lm):
    greedy = generate(lm, PROMPT, SamplingConfig(max_new_tokens=8, temperature=0, ignore_eos=True))
    nucleus = generate(lm, PROMPT, SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=1,
                                                  ignore_eos=True))  # fmt: skip
    assert nucleus.token_ids == greedy.token_ids


def test_stop_token_and_stop_string(lm):
    greedy = generate(lm, PROMPT, SamplingConfig(max_new_tokens=12, temperature=0, ignore_eos=True))
    stop_at = greedy.token_ids[4]
    lm.spec.config.eos_token_id = stop_at
    try:
        done = generate(lm, PROMPT, SamplingConfig(max_new_tokens=12, temperature=0))
    finally:
        lm.spec.config.eos_token_id = 0
    first = greedy.token_ids.index(stop_at)
    assert done.finish_reason == "stop" and done.token_ids == greedy.token_ids[:first]
    text = greedy.text
    needle = text[len(text) // 2 : len(text) // 2 + 2]
    if needle:
        done = generate(lm, PROMPT, SamplingConfig(max_new_tokens=12, temperature=0, ignore_eos=True,
                                                   stop_strings=(needle,)))  # fmt: skip
        assert done.finish_reason == "stop" and needle not in done.text and text.startswith(done.text)


def test_ctrl_c_mid_generation_keeps_the_model_usable(lm):
    cfg = SamplingConfig(max_new_tokens=12, temperature=0, ignore_eos=True)
    want = generate(lm, PROMPT, cfg)
    calls = {"n": 0}

    def interrupt(layer, hidden):
        calls["n"] += 1
        if calls["n"] == 20:  # somewhere inside a decode step
            raise KeyboardInterrupt

    lm.runtime.hooks.append(interrupt)
    try:
        events = list(stream_generate(lm, PROMPT, cfg))
    finally:
        lm.runtime.hooks.remove(interrupt)
    done = events[-1]
    assert done.finish_reason == "interrupted" and 0 < len(done.token_ids) < 12
    assert done.token_ids == want.token_ids[: len(done.token_ids)]
    assert generate(lm, PROMPT, cfg).token_ids == want.token_ids  # nothing left pinned or broken


def _count_fed(model) -> tuple[list[int], object]:
    """The lengths of the input ids of each forward of ``model`` (and the hook's handle)."""
    fed: list[int] = []

    def pre(module, args, kwargs):
        fed.append(kwargs["input_ids"].shape[1])

    return fed, model.register_forward_pre_hook(pre, with_kwargs=True)


def test_a_prompt_cache_computes_only_the_new_tokens(lm):
    cfg = SamplingConfig(max_new_tokens=5, temperature=0, ignore_eos=True)
    pc = PromptCache(lm.model)
    first = generate(lm, PROMPT, cfg, prompt_cache=pc)
    follow = PROMPT + first.token_ids + [11, 12, 13]
    fed, handle = _count_fed(lm.model)
    try:
        second = generate(lm, follow, cfg, prompt_cache=pc)
    finally:
        handle.remove()
    assert second.stats.cached_prompt_tokens == len(PROMPT) + 4
    assert fed == [4] + [1] * 4  # the answer's last token and the new message, then decode
    assert second.token_ids == generate(lm, follow, cfg).token_ids  # what a fresh cache gives
    assert second.stats.prefill_tokens_per_s == pytest.approx(4 / second.stats.prefill_s)  # computed ones


def test_should_stop_is_polled_before_each_prefill_chunk_and_decode_step(lm):
    cfg = SamplingConfig(max_new_tokens=10, temperature=0, ignore_eos=True)
    want = generate(lm, PROMPT, cfg).token_ids

    def run(polls_before_stop: int):
        polls = []
        fed, handle = _count_fed(lm.model)
        try:
            events = list(stream_generate(lm, PROMPT, cfg, prefill_chunk=3,
                                          should_stop=lambda: polls.append(1) or len(polls) > polls_before_stop))  # fmt: skip
        finally:
            handle.remove()
        assert events[-1].finish_reason == "interrupted"
        return fed, events[-1].token_ids

    assert run(2) == ([3, 3], [])  # the prompt's 8 tokens go in chunks of 3: stopped before the third
    assert run(3 + 2) == ([3, 3, 2, 1, 1], want[:3])  # three tokens sampled, two fed back
    assert generate(lm, PROMPT, cfg).token_ids == want  # and the model goes on as before


def test_a_prompt_cache_is_dropped_when_a_forward_is_cut_off(lm):
    cfg = SamplingConfig(max_new_tokens=8, temperature=0, ignore_eos=True)
    want = generate(lm, PROMPT, cfg)
    pc = PromptCache(lm.model)
    calls = {"n": 0}

    def interrupt(layer, hidden):
        calls["n"] += 1
        if calls["n"] == 3 * len(lm.spec.moe_layers) + 1:  # inside the third decode step
            raise KeyboardInterrupt

    lm.runtime.hooks.append(interrupt)
    try:
        done = list(stream_generate(lm, PROMPT, cfg, prompt_cache=pc))[-1]
    finally:
        lm.runtime.hooks.remove(interrupt)
    assert done.finish_reason == "interrupted"
    assert pc.ids == [] and pc.kv is None  # its layers hold different lengths now: never reused
    again = generate(lm, PROMPT, cfg, prompt_cache=pc)
    assert again.stats.cached_prompt_tokens == 0 and again.token_ids == want.token_ids


def test_a_prompt_cache_whose_layers_disagree_with_its_tokens_starts_afresh(lm):
    """Layers holding another length than the tokens recorded (a forward that never said
    what it fed) are never reused: the prefix is computed again, and the answer is right."""
    cfg = SamplingConfig(max_new_tokens=5, temperature=0, ignore_eos=True)
    pc = PromptCache(lm.model)
    generate(lm, PROMPT, cfg, prompt_cache=pc)
    pc.ids.append(7)  # recorded, but no layer holds it
    follow = pc.ids + [11, 12]
    second = generate(lm, follow, cfg, prompt_cache=pc)
    assert second.stats.cached_prompt_tokens == 0
    assert second.token_ids == generate(lm, follow, cfg).token_ids


def _traced(lm, path, ids, cfg, **kw):
    """Generate with a trace written to ``path``: (the DoneEvent, the records read back)."""
    from runtime.trace import TraceWriter, read_trace

    writer = TraceWriter(path)
    try:
        done = generate(lm, ids, cfg, trace=writer, **kw)
    finally:
        writer.close()
    return done, read_trace(path)


def test_a_chats_trace_numbers_tokens_by_their_place_in_the_conversation(tiny_model, tmp_path):
    """With a prompt cache, a turn's trace starts at the first token it computes, numbered
    as in the whole conversation: the records a fresh run of that prompt gives from there."""
    lm = load_small(tiny_model("mixtral"), trace=True)
    cfg = SamplingConfig(max_new_tokens=5, temperature=0, ignore_eos=True)
    pc = PromptCache(lm.model)
    first, _ = _traced(lm, tmp_path / "turn1.jsonl", PROMPT, cfg, prompt_cache=pc)
    follow = PROMPT + first.token_ids + [11, 12, 13]
    second, turn2 = _traced(lm, tmp_path / "turn2.jsonl", follow, cfg, prompt_cache=pc)
    _, fresh = _traced(lm, tmp_path / "fresh.jsonl", follow, cfg)
    cached = second.stats.cached_prompt_tokens
    assert cached == len(PROMPT) + 4
    fed = range(cached, len(follow) + len(second.token_ids) - 1)  # the last token is never fed
    assert sorted({r.token for r in turn2}) == list(fed)
    want = [r for r in fresh if r.token >= cached]
    assert [(r.token, r.layer, r.experts) for r in turn2] == [(r.token, r.layer, r.experts) for r in want]
    for got, ref in zip(turn2, want, strict=True):
        assert got.weights == pytest.approx(ref.weights, abs=1e-4)


def test_a_forward_cut_off_leaves_nothing_in_the_next_trace(tiny_model, tmp_path):
    from runtime.trace import TraceWriter

    lm = load_small(tiny_model("mixtral"), trace=True)
    cfg = SamplingConfig(max_new_tokens=3, temperature=0, ignore_eos=True)

    def cut(layer, hidden):
        if layer == lm.spec.moe_layers[1]:  # the first MoE layer was recorded, the rest never ran
            raise KeyboardInterrupt

    writer = TraceWriter(tmp_path / "cut.jsonl")  # stays empty: the forward never finished
    lm.runtime.hooks.append(cut)
    try:
        assert generate(lm, PROMPT, cfg, trace=writer).finish_reason == "interrupted"
    finally:
        lm.runtime.hooks.remove(cut)
        writer.close()
    _, got = _traced(lm, tmp_path / "next.jsonl", PROMPT, cfg)
    _, want = _traced(lm, tmp_path / "fresh.jsonl", PROMPT, cfg)
    assert [(r.token, r.layer, r.experts) for r in got] == [(r.token, r.layer, r.experts) for r in want]


def test_stall_measured_after_the_fact_belongs_to_its_own_run(lm, monkeypatch):
    """On CUDA a copy's stall is read from events once they complete, after the forward that
    queued them: the last forward's must count in its run's figures (the clock synchronized
    the stream before them), and what an interrupted run left must not count in the next."""
    layer = lm.spec.moe_layers[0]
    done_events: dict[int, float] = {}

    def deferred_stall():
        out = dict(done_events)
        done_events.clear()
        return out

    def forward_done(module, args, kwargs, out):  # each forward's events complete after it
        done_events[layer] = done_events.get(layer, 0.0) + 100.0

    monkeypatch.setattr(lm.cache.transfer, "deferred_stall", deferred_stall)
    handle = lm.model.register_forward_hook(forward_done, with_kwargs=True)
    try:
        done = generate(lm, PROMPT, SamplingConfig(max_new_tokens=4, temperature=0, ignore_eos=True))
        forwards = 1 + 3  # the prefill, then a forward for each token but the last
        assert forwards * 100.0 <= done.stats.stall_s < forwards * 100.0 + 1.0
        done_events[layer] = 50.0  # left by a run cut short: counted before the next run starts
        again = generate(lm, PROMPT, SamplingConfig(max_new_tokens=4, temperature=0, ignore_eos=True))
        assert forwards * 100.0 <= again.stats.stall_s < forwards * 100.0 + 1.0
    finally:
        handle.remove()


def test_detokenizer_never_splits_a_character(lm):
    tok = lm.tokenizer
    ids = tok("héllo wörld → ok")["input_ids"]
    d = _Detokenizer(tok)
    pieces = [d.add(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == "héllo wörld → ok"
    assert not any("\ufffd" in p for p in pieces)


def test_a_special_token_mid_answer_keeps_the_space_of_the_next_word():
    """SentencePiece-style tokenizers (Mixtral's) drop the leading space of a word decoded
    on its own; a special token that decodes to nothing must not become the point the
    next word is decoded from."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "[INST]": 1, "▁hello": 2, "▁world": 3, "▁again": 4}
    sp = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    sp.pre_tokenizer, sp.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=sp, unk_token="<unk>", additional_special_tokens=["[INST]"]
    )
    ids = [2, 1, 3, 4]
    d = _Detokenizer(tok)
    pieces = [d.add(i) for i in ids]
    assert pieces == ["hello", "", " world", " again"]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)


def test_interrupts_anywhere_never_corrupt_the_cache(tiny_model):
    """Ctrl-C at random moments (SIGALRM raising KeyboardInterrupt, inside copies, bookkeeping,
    prefetch): every later uninterrupted run is exact and every slot is accounted for."""
    import random
    import signal

    lm = load_small(tiny_model("mixtral"), quant="int8", slots_per_layer=2, predictor="cross-layer",
                    predictor_extra=2, link_latency=2e-3)  # fmt: skip
    # a latency alone is an emulated link too: copies take time, so interrupts land inside them
    assert isinstance(lm.cache.transfer, EmulatedLink) and lm.cache.transfer.bandwidth is None
    cfg = SamplingConfig(max_new_tokens=10, temperature=0, ignore_eos=True)
    want = generate(lm, PROMPT, cfg).token_ids
    rng = random.Random(0)

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        interrupted = 0
        for _ in range(25):
            try:
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.001, 0.15))
                try:
                    events = list(stream_generate(lm, PROMPT, cfg))
                    interrupted += events[-1].finish_reason == "interrupted"
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except KeyboardInterrupt:  # landed outside the generator's own handling
                interrupted += 1
        assert interrupted > 5
        assert generate(lm, PROMPT, cfg).token_ids == want
        for layer in lm.spec.moe_layers:
            part = lm.cache._parts[layer]
            assert len(part.entries) + len(part.free) == part.capacity
            assert {en.slot for en in part.entries.values()}.isdisjoint(part.free)
    finally:
        signal.signal(signal.SIGALRM, old)
        lm.close()


def test_interrupt_between_taking_a_slot_and_recording_it(tiny_model, monkeypatch):
    """The narrowest window: Ctrl-C inside the copy submission, after the slot was taken."""
    lm = load_small(tiny_model("mixtral"), quant="int8", slots_per_layer=2, predictor="cross-layer")
    cfg = SamplingConfig(max_new_tokens=8, temperature=0, ignore_eos=True)
    want = generate(lm, PROMPT, cfg).token_ids
    submit = lm.cache.transfer.submit
    for n in (1, 4, 9, 15):
        calls = {"n": 0}

        def flaky(*args, n=n, calls=calls, **kw):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return submit(*args, **kw)

        monkeypatch.setattr(lm.cache.transfer, "submit", flaky)
        assert list(stream_generate(lm, PROMPT, cfg))[-1].finish_reason == "interrupted"
    monkeypatch.setattr(lm.cache.transfer, "submit", submit)
    try:
        assert generate(lm, PROMPT, cfg).token_ids == want
        for layer in lm.spec.moe_layers:
            part = lm.cache._parts[layer]
            assert len(part.entries) + len(part.free) == part.capacity
    finally:
        lm.close()


def test_generation_stops_when_the_context_is_full(tiny_model, monkeypatch):
    """Prompt plus answer never exceed the planned context; a prompt that fills it is refused."""
    from runtime.conversation import PromptTooLongError

    lm = load_small(tiny_model("mixtral"), quant="none", slots_per_layer=2)
    try:
        monkeypatch.setattr(lm.plan, "context", len(PROMPT) + 5)
        done = generate(lm, PROMPT, SamplingConfig(max_new_tokens=50, temperature=0, ignore_eos=True))
        assert done.finish_reason == "context" and len(done.token_ids) == 5
        monkeypatch.setattr(lm.plan, "context", len(PROMPT))
        with pytest.raises(PromptTooLongError, match=f"the prompt is {len(PROMPT)} tokens"):
            generate(lm, PROMPT, SamplingConfig(max_new_tokens=5))
    finally:
        lm.close()


def test_generation_never_passes_the_models_positions(tiny_model, monkeypatch):
    """A plan with a longer KV cache than the model attends to stops at the model's positions."""
    from runtime.conversation import PromptTooLongError

    lm = load_small(tiny_model("mixtral"), quant="none", slots_per_layer=2)
    try:
        monkeypatch.setattr(lm.plan, "context", 10_000)
        monkeypatch.setattr(lm.spec.config, "max_position_embeddings", len(PROMPT) + 3)
        done = generate(lm, PROMPT, SamplingConfig(max_new_tokens=50, temperature=0, ignore_eos=True))
        assert done.finish_reason == "context" and len(done.token_ids) == 3
        monkeypatch.setattr(lm.spec.config, "max_position_embeddings", len(PROMPT))
        with pytest.raises(PromptTooLongError, match=f"the context holds {len(PROMPT)}") as err:
            generate(lm, PROMPT, SamplingConfig(max_new_tokens=5))
        assert "all this model can attend to" in err.value.hint  # no larger --context would help
    finally:
        lm.close()


def test_kv_cache_goes_under_the_name_the_model_takes(lm):
    """transformers renamed forward's past_key_values to cache in 5.x: each version gets its own name."""
    import inspect

    from transformers import DynamicCache

    from runtime.kv_cache import new_kv_cache

    class Old(torch.nn.Module):
        config = lm.model.config

        def forward(self, input_ids=None, past_key_values=None, use_cache=None): ...

    class New(Old):
        def forward(self, input_ids=None, cache=None, use_cache=None): ...

    for model, name in ((Old(), "past_key_values"), (New(), "cache")):
        kv, kwargs = new_kv_cache(model)
        assert isinstance(kv, DynamicCache) and kwargs == {name: kv, "use_cache": True}
    installed = inspect.signature(type(lm.model).forward).parameters
    _, kwargs = new_kv_cache(lm.model)
    assert set(kwargs) - {"use_cache"} <= set(installed)
    with warnings.catch_warnings():  # the installed transformers' deprecated name would warn here
        warnings.filterwarnings("error", message=".*past_key_values.*")
        done = generate(lm, PROMPT, SamplingConfig(max_new_tokens=3, temperature=0, ignore_eos=True))
    assert len(done.token_ids) == 3


def test_the_clock_on_cuda_waits_for_compute_only(monkeypatch):
    """Reading the clock must not wait for prefetches on the side streams (a device-wide
    synchronize would, and stop them overlapping the next token)."""
    from runtime.generate import _Clock

    synced = []

    class Stream:
        def synchronize(self):
            synced.append("compute")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append("device"))
    _Clock(torch.device("cuda")).now()
    assert synced == ["compute"]


def test_without_a_template_an_answer_is_re_fed_as_it_was_generated(lm):
    """The next turn's prompt holds the earlier answer exactly where the model wrote it,
    straight after the text it continued; a new message starts a new paragraph."""
    from runtime.generate import encode_messages

    msgs = [{"role": "system", "content": "# utils"}, {"role": "user", "content": "def f(x):"},
            {"role": "assistant", "content": "\n    return x"}, {"role": "user", "content": "def g(y):"}]  # fmt: skip
    want = lm.tokenizer("# utils\n\ndef f(x):\n    return x\n\ndef g(y):")["input_ids"]
    assert encode_messages(lm.tokenizer, msgs, chat_template=False) == list(want)


def test_the_nucleus_is_the_one_a_full_sort_gives():
    """Top-p sampling from the k most likely tokens (k grown as needed) draws exactly what the
    plain recipe draws: sort everything, keep the smallest prefix holding top-p, sample it."""
    from runtime.generate import _sample

    def reference(logits, cfg, gen):
        probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
        p, order = probs.sort(descending=True)
        keep = int((p.cumsum(-1) - p < cfg.top_p).sum())
        return int(order[int(torch.multinomial(p[:keep], 1, generator=gen))])

    rng = torch.Generator().manual_seed(0)
    for scale, top_p, vocab in [(0.1, 0.95, 5000), (3.0, 0.9, 8192), (10.0, 0.5, 300), (1.0, 0.999, 70)]:
        cfg = SamplingConfig(max_new_tokens=1, temperature=0.7, top_p=top_p)
        for trial in range(20):
            logits = torch.randn(vocab, generator=rng) * scale
            a, b = torch.Generator().manual_seed(trial), torch.Generator().manual_seed(trial)
            assert _sample(logits, cfg, a) == reference(logits, cfg, b), (scale, top_p, trial)


@pytest.mark.parametrize("room_for_all", [True, False])
def test_a_cache_that_holds_the_model_is_filled_at_load(tiny_model, room_for_all):
    """When every expert fits, loading copies them all, so the first answer never misses
    and nothing predicts or handles misses; with one slot per layer fewer, nothing is
    copied before it is needed."""
    path = tiny_model("mixtral")
    from runtime.checkpoint import Checkpoint
    from runtime.model_spec import describe_model

    n = describe_model(Checkpoint(path)).num_experts
    lm = load_small(path, quant="int8", slots_per_layer=n if room_for_all else n - 1, predictor="cross-layer",
                    host_misses=True)  # fmt: skip
    try:
        loaded = sum(len(lm.cache.resident(layer)) for layer in lm.spec.moe_layers)
        assert loaded == (lm.spec.total_experts if room_for_all else 0)
        # nothing can miss: no predictor runs, no miss handler was built
        assert (lm.runtime.prefetcher is None and lm.runtime.miss_handler is None) == room_for_all
        assert lm.cache.stats.total().bytes_moved == 0  # the figures count from the first answer
        done = generate(lm, PROMPT, SamplingConfig(max_new_tokens=4, temperature=0))
        assert (done.stats.misses == 0) == room_for_all
    finally:
        lm.close()


def test_stop_tokens_include_every_listed_eos():
    """generation_config's eos_token_id is often a list (end of text, end of turn): each stops."""
    from types import SimpleNamespace as NS

    from runtime.generate import stop_token_ids

    lm = NS(model=NS(generation_config=NS(eos_token_id=[7, 9])), spec=NS(config=NS(eos_token_id=None)),
            tokenizer=NS(eos_token_id=None))  # fmt: skip
    assert stop_token_ids(lm) == {7, 9}
