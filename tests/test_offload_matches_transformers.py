"""The oracle is transformers itself: offloaded model == reference model.

With ``--quant none`` and a budget that holds only two experts per layer, logits match
the full transformers model within 1e-4 relative (float32, CPU) and 32 greedy tokens
are identical; with int8 the greedy tokens agree on at least 95% of positions.
"""

from __future__ import annotations

import pytest
import torch

from runtime.generate import SamplingConfig, generate
from tests.conftest import ARCHS
from tests.helpers import greedy_ids, load_small, reference_model

PROMPT = [5, 17, 42, 99, 7, 128, 64, 3, 250, 11, 77, 19]


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_offload_matches_reference(arch, tiny_model):
    path = tiny_model(arch)
    ref = reference_model(path)
    lm = load_small(path, quant="none", slots_per_layer=2, predictor="none")
    try:
        assert set(lm.cache.slots_per_layer().values()) == {2}
        assert lm.cache.num_slots < lm.spec.total_experts  # really offloaded
        ids = torch.tensor([PROMPT * 2])
        with torch.no_grad():
            want = ref(ids).logits
            got = lm.model(ids).logits
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 1e-4, rel
        assert lm.cache.stats.total().misses > 0  # experts were loaded on demand

        want_tokens = greedy_ids(ref, PROMPT, 32)
        done = generate(lm, PROMPT, SamplingConfig(max_new_tokens=32, temperature=0, ignore_eos=True))
        assert done.token_ids == want_tokens
    finally:
        lm.close()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_int8_greedy_agreement(arch, tiny_model):
    """Teacher-forced on the reference's own greedy continuation: argmax agrees >= 95%."""
    path = tiny_model(arch)
    ref = reference_model(path)
    seq = PROMPT + greedy_ids(ref, PROMPT, 32)
    lm = load_small(path, quant="int8", slots_per_layer=3, predictor="none")
    try:
        ids = torch.tensor([seq])
        with torch.no_grad():
            want = ref(ids).logits[0, len(PROMPT) - 1 : -1].argmax(-1)
            got = lm.model(ids).logits[0, len(PROMPT) - 1 : -1].argmax(-1)
        agreement = (want == got).float().mean().item()
        assert agreement >= 0.95, agreement
    finally:
        lm.close()


def test_int4_error_is_bounded(tiny_model):
    """int4 experts change the logits, but boundedly (stated: < 30% relative on tiny random models)."""
    path = tiny_model("mixtral")
    ref = reference_model(path)
    lm = load_small(path, quant="int4", slots_per_layer=2, predictor="none")
    try:
        ids = torch.tensor([PROMPT])
        with torch.no_grad():
            want, got = ref(ids).logits, lm.model(ids).logits
        rel = ((got - want).norm() / want.norm()).item()
        assert 0 < rel < 0.3, rel
    finally:
        lm.close()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_cpu_without_a_budget_reads_experts_in_place(arch, tiny_model):
    """The CPU with no --vram: compute reads the host store's own rows, so no expert is
    copied (a cache of slots would hold every expert twice), and the output is still the
    reference's."""
    from runtime.loader import LoadOptions, load_model

    path = tiny_model(arch)
    ref = reference_model(path)
    lm = load_model(str(path), LoadOptions(quant="none", device="cpu"))
    try:
        assert (
            lm.plan.in_place and lm.plan.cache_bytes == 0 and lm.cache.slots is None and lm.cache.nbytes == 0
        )
        assert lm.runtime.prefetcher is None  # nothing to predict: every expert is resident
        assert not lm.all_loaded  # nothing was copied into a cache at load: there is none
        assert not any(p.requires_grad for p in lm.model.parameters())  # inference: no autograd graph
        layer = lm.spec.moe_layers[0]
        row = lm.store.row(layer, 1)
        lm.cache.begin(layer, [1])
        w = lm.cache.acquire(layer, 1)
        lm.cache.release(layer, 1)
        lm.cache.end(layer)
        start, end = row.data_ptr(), row.data_ptr() + row.numel()
        for part in (*w.gate_up.values(), *w.down.values()):  # views of the store's row, not copies
            assert start <= part.data_ptr() < end
        done = generate(lm, PROMPT, SamplingConfig(max_new_tokens=16, temperature=0, ignore_eos=True))
        assert done.token_ids == greedy_ids(ref, PROMPT, 16)
        st = lm.cache.stats.total()
        assert st.uses > 0 and st.hits == st.uses and st.bytes_moved == 0
    finally:
        lm.close()


def test_on_demand_mode_is_never_in_place(tiny_model):
    """retain=False (on-demand: nothing kept between invocations) with no budget on the CPU
    keeps real slots, so its misses are real misses and none is served from a low-bit copy
    of an expert already in memory."""
    from runtime.loader import LoadOptions, load_model

    lm = load_model(str(tiny_model("mixtral")), LoadOptions(quant="int4", device="cpu", retain=False))
    try:
        assert not lm.plan.in_place and lm.cache.slots is not None
        generate(lm, PROMPT, SamplingConfig(max_new_tokens=4, temperature=0, ignore_eos=True))
        st = lm.cache.stats.total()
        assert st.misses == st.uses and st.bytes_moved == st.misses * lm.cache.expert_bytes
    finally:
        lm.close()


def test_in_place_has_no_miss_handler(tiny_model, monkeypatch):
    """In place nothing ever misses: --low-bit/--host-misses build no low-bit store and time nothing."""
    import runtime.loader as loader
    from runtime.loader import LoadOptions, load_model

    opened = []
    open_store = loader.open_store
    monkeypatch.setattr(loader, "open_store", lambda ckpt, spec, fmt, **kw: opened.append(fmt.name)
                        or open_store(ckpt, spec, fmt, **kw))  # fmt: skip
    lm = load_model(str(tiny_model("mixtral")), LoadOptions(quant="int4", device="cpu", low_bit="int2",
                                                           host_misses=True))  # fmt: skip
    try:
        assert lm.plan.in_place and lm.runtime.miss_handler is None
        assert opened == ["int4"]  # no low-bit store was opened or converted
    finally:
        lm.close()


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_layers_without_a_slot_stream_their_experts_exactly(arch, tiny_model):
    """A budget with room for fewer experts than there are MoE layers (Mixtral-8x7B in 6 GB):
    the layers without a slot copy each expert through the stream buffer, and the model
    still gives the reference's logits and greedy tokens. Nothing is prefetched for them,
    nothing stays resident there, and every one of their uses is a miss that moved an expert."""
    from runtime.loader import LoadOptions, load_model
    from tests.helpers import budget_for_slots

    path = tiny_model(arch)
    ref = reference_model(path)
    fixed = budget_for_slots(path, "none", 0)
    one = budget_for_slots(path, "none", 1) - fixed  # one slot in each layer
    lm0 = load_small(path, quant="none", slots_per_layer=1, predictor="none")
    layers = list(lm0.spec.moe_layers)
    expert = lm0.store.layout.nbytes
    lm0.close()
    assert one == len(layers) * expert
    vram = fixed + (len(layers) // 2 + 1) * expert  # half the layers get a slot, one expert streams
    lm = load_model(str(path), LoadOptions(quant="none", vram=vram, device="cpu", predictor="cross-layer"))
    try:
        streamed = lm.plan.streamed_layers
        assert len(streamed) == len(layers) - len(layers) // 2 and lm.cache.num_slots == len(layers) // 2
        ids = torch.tensor([PROMPT * 2])
        with torch.no_grad():
            want = ref(ids).logits
            got = lm.model(ids).logits
        assert ((got - want).norm() / want.norm()).item() < 1e-4
        done = generate(lm, PROMPT, SamplingConfig(max_new_tokens=24, temperature=0, ignore_eos=True))
        assert done.token_ids == greedy_ids(ref, PROMPT, 24)
        for layer in streamed:
            st = lm.cache.stats.layer(layer)
            assert st.uses > 0 and st.misses == st.uses and st.bytes_moved == st.uses * expert
            assert st.low_bit_loads == st.cpu_computed == 0  # plain streamed copies
            assert st.prefetches == 0 and lm.cache.resident(layer) == []
            assert st.pred_tp + st.pred_fp + st.pred_fn == 0  # no prediction is scored where none is made
        if len(layers) >= 4:  # a layer with a slot that follows another MoE layer is prefetched for
            assert (
                sum(lm.cache.stats.layer(layer).prefetches for layer in layers if layer not in streamed) > 0
            )
    finally:
        lm.close()


def _reference_logits_match(lm, ref, pc, seq: list[int]) -> int:
    """Take what ``pc`` holds of ``seq``, compute the rest through it: the reference's logits."""
    n = pc.begin(seq)
    with torch.no_grad():
        want = ref(torch.tensor([seq])).logits[0, n:]
        got = lm.model(input_ids=torch.tensor([seq[n:]]), **pc.kv_args).logits[0]
    pc.fed(seq[n:])
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-4, rel
    return n


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_cache_matches_reference(arch, tiny_model):
    """A chat's next turn computes only what the KV cache kept from the last one does not
    hold, extending it or cropping it to the common prefix, and still gives the reference's
    logits and greedy tokens."""
    from runtime.kv_cache import PromptCache

    path = tiny_model(arch)
    ref = reference_model(path)
    lm = load_small(path, quant="none", slots_per_layer=2, predictor="none")
    try:
        pc = PromptCache(lm.model)
        greedy = SamplingConfig(max_new_tokens=6, temperature=0, ignore_eos=True)
        first = generate(lm, PROMPT, greedy, prompt_cache=pc)
        assert first.stats.cached_prompt_tokens == 0
        assert pc.ids == PROMPT + first.token_ids[:-1]  # the last token was sampled, never fed

        turn = PROMPT + first.token_ids + [3, 250, 11]  # the answer, then a new message
        second = generate(lm, turn, greedy, prompt_cache=pc)
        assert second.stats.cached_prompt_tokens == len(PROMPT) + 5
        assert second.token_ids == greedy_ids(ref, turn, 6)

        other = PROMPT[:7] + [42, 99, 1, 2]  # shares 7 tokens: the rest is cropped
        third = generate(lm, other, greedy, prompt_cache=pc)
        assert third.stats.cached_prompt_tokens == 7
        assert third.token_ids == greedy_ids(ref, other, 6)

        assert _reference_logits_match(lm, ref, pc, other + third.token_ids + [5, 17]) == 7 + 4 + 5
        held = list(pc.ids)  # all of it held: the last token is computed again, for its logits
        assert _reference_logits_match(lm, ref, pc, held) == len(held) - 1
        assert _reference_logits_match(lm, ref, pc, PROMPT[:3] + [9, 9, 9]) == 3
    finally:
        lm.close()


def test_prompt_cache_past_a_sliding_window(tiny_model):
    """gpt-oss's sliding-window layers keep only their window: past it the cache can still
    be extended, but not cropped, so a shorter common prefix starts afresh."""
    from runtime.kv_cache import PromptCache, sliding_past_recording_works

    path = tiny_model("gpt_oss")  # a window of 32 tokens
    ref = reference_model(path)
    lm = load_small(path, quant="none", slots_per_layer=2, predictor="none")
    try:
        pc = PromptCache(lm.model)
        long = PROMPT * 3  # 36 tokens
        assert _reference_logits_match(lm, ref, pc, long) == 0
        assert _reference_logits_match(lm, ref, pc, long + [8, 9]) == 36  # extended past the window
        assert _reference_logits_match(lm, ref, pc, long[:20] + [1, 2]) == 0  # no crop past it: afresh
        assert _reference_logits_match(lm, ref, pc, long[:20] + [7, 7]) == 20  # within it: cropped

        # past the window, a prefill keeps the window and decoding adds to it: the next turn can
        # cut back into the answer (where templates re-render it differently), not before it
        # (where this transformers can record a sliding layer's past; 5.17 cannot: afresh there)
        recording = sliding_past_recording_works()
        greedy = SamplingConfig(max_new_tokens=6, temperature=0, ignore_eos=True)
        pc = PromptCache(lm.model)
        answer = generate(lm, long, greedy, prompt_cache=pc).token_ids
        window = lm.spec.config.sliding_window
        held = window - 1 + (5 if recording else 0)  # the 5 decoded tokens fed, where recorded
        assert all(lay.keys.shape[-2] == held for lay in pc._sliding)
        turn = long + answer[:2] + [3, 250]
        again = generate(lm, turn, greedy, prompt_cache=pc)
        assert again.stats.cached_prompt_tokens == (len(long) + 2 if recording else 0)
        assert again.token_ids == greedy_ids(ref, turn, 6)
        assert pc.reusable(long[:30] + [1, 2]) == 0  # what the status line is told, before trying
        assert generate(lm, long[:30] + [1, 2], greedy, prompt_cache=pc).stats.cached_prompt_tokens == 0

        pc = PromptCache(lm.model, decode_room=2)  # the decoded tokens past that are trimmed away
        answer = generate(lm, long, greedy, prompt_cache=pc).token_ids
        assert all(lay.keys.shape[-2] <= window - 1 + 2 for lay in pc._sliding)
        turn = long + answer[:2] + [3, 250]
        again = generate(lm, turn, greedy, prompt_cache=pc)
        assert again.stats.cached_prompt_tokens == 0 and again.token_ids == greedy_ids(ref, turn, 6)
    finally:
        lm.close()


def test_tied_embeddings_load_without_an_lm_head_in_the_checkpoint(tiny_model):
    """tie_word_embeddings: the checkpoint has no lm_head.weight; the head is the embedding
    (one tensor, as transformers ties it) and the logits are the reference's."""
    from runtime.checkpoint import Checkpoint

    path = tiny_model("qwen2_moe", tie_word_embeddings=True)
    assert "lm_head.weight" not in Checkpoint(path)
    ref = reference_model(path)
    lm = load_small(path, quant="none", slots_per_layer=2, predictor="none")
    try:
        assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()
        ids = torch.tensor([PROMPT])
        with torch.no_grad():
            want, got = ref(ids).logits, lm.model(ids).logits
        assert ((got - want).norm() / want.norm()).item() < 1e-4
    finally:
        lm.close()


def test_half_precision_keeps_transformers_fp32_modules(tiny_model):
    """In bfloat16, DeepSeek-V3's router and score-correction bias stay float32, as
    transformers keeps them (_keep_in_fp32_modules_strict): every non-expert tensor has the
    dtype transformers' own bf16 load gives it."""
    from transformers import AutoModelForCausalLM

    from runtime.loader import LoadOptions, load_model

    path = tiny_model("deepseek_v3")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    want = {
        n: t.dtype for n, t in [*ref.named_parameters(), *ref.named_buffers()] if ".mlp.experts." not in n
    }
    lm = load_model(str(path), LoadOptions(quant="none", device="cpu", dtype="bfloat16"))
    try:
        got = {n: t.dtype for n, t in [*lm.model.named_parameters(), *lm.model.named_buffers()]}
        assert torch.float32 in got.values() and torch.bfloat16 in got.values()
        assert got == want
    finally:
        lm.close()


def test_load_progress_ends_each_phase_at_its_total(tiny_model, home):
    """Every phase the load reports (converting experts, the non-expert weights) counts up
    to its total and ends there, so no bar is left short of full."""
    from runtime.loader import LoadOptions, load_model

    calls: dict[str, list[tuple[int, int]]] = {}
    lm = load_model(str(tiny_model("mixtral")), LoadOptions(quant="int8", device="cpu"),
                    progress=lambda desc, done, total: calls.setdefault(desc, []).append((done, total)))  # fmt: skip
    lm.close()
    assert "Loading non-expert weights" in calls and any(d.startswith("Converting") for d in calls)
    for desc, seen in calls.items():
        done = [d for d, _ in seen]
        assert done == sorted(done) and seen[-1][0] == seen[-1][1] > 0, (desc, seen)
