"""The CUDA paths end to end (all skipped without a CUDA device).

The offloaded model on the GPU, its experts copied from pinned host memory by
CudaStreamCopy on a side stream, gives the reference model's greedy tokens, with and
without prefetch; under a one-slot budget and aggressive prefetch no slot is read while
a copy into it is in flight or overwritten while compute reads it; quantized experts on
the GPU (Triton kernels where they apply) agree with the same format on the CPU; and
``profile-device`` measures a host-to-device link.
"""

from __future__ import annotations

import pytest
import torch

from runtime.generate import SamplingConfig, generate
from runtime.loader import LoadOptions, load_model
from tests.conftest import cuda
from tests.helpers import budget_for_slots, load_small, reference_model

pytestmark = cuda

PROMPT = [5, 17, 42, 99, 7, 128, 64, 3, 250, 11]
GREEDY = SamplingConfig(max_new_tokens=16, temperature=0, ignore_eos=True)


def load_cuda(path, quant: str = "none", slots: int = 2, **kw):
    # float32, as the CPU reference; the budget is the one that gives ``slots`` per layer on
    # the CPU: on the GPU (same dtype and context) that is about as many, far fewer than the
    # experts, which is all these tests need
    vram = budget_for_slots(path, quant, slots)
    return load_model(str(path), LoadOptions(quant=quant, vram=vram, device="cuda", dtype="float32", **kw))


def cuda_greedy(path, n: int) -> list[int]:
    model = reference_model(path).to("cuda")
    x = torch.tensor([PROMPT], device="cuda")
    out = model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[0, len(PROMPT) :].tolist()


@pytest.mark.parametrize("predictor", ["none", "cross-layer"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_offloaded_on_cuda_matches_transformers(tiny_model, arch, predictor):
    from runtime.transfer import CudaStreamCopy

    path = tiny_model(arch)
    want = cuda_greedy(path, GREEDY.max_new_tokens)
    lm = load_cuda(path, slots=2, predictor=predictor)
    try:
        assert isinstance(lm.cache.transfer, CudaStreamCopy) and lm.store.pinned
        assert generate(lm, PROMPT, GREEDY).token_ids == want
        st = lm.cache.stats.total()
        assert st.misses > 0 and st.bytes_moved > 0  # the experts really were offloaded
        if predictor != "none":
            assert st.prefetches > 0
    finally:
        lm.close()


def test_stream_copies_never_race_compute(tiny_model, monkeypatch):
    """One slot per layer and three extra predicted experts: every slot read holds exactly
    its expert's row (a read before the copy's event, or a copy into a slot still being
    read, would show here or in the tokens)."""
    path = tiny_model("mixtral")
    want = cuda_greedy(path, GREEDY.max_new_tokens)
    lm = load_cuda(path, slots=1, predictor="cross-layer", predictor_extra=3, lookahead=3)
    cache, store = lm.cache, lm.store
    checked = {"n": 0}
    acquire = cache.acquire

    def checked_acquire(layer, e):
        w = acquire(layer, e)
        slot = cache.slot_of(layer, e)
        # .cpu() runs on the compute stream, after its wait on the copy's event
        assert torch.equal(cache.slots[slot].cpu(), store.row(layer, e)), f"slot of ({layer}, {e}) is wrong"
        checked["n"] += 1
        return w

    monkeypatch.setattr(cache, "acquire", checked_acquire)
    try:
        assert generate(lm, PROMPT, GREEDY).token_ids == want
        st = cache.stats.total()
        assert checked["n"] > 0 and st.prefetches > 0
        assert generate(lm, PROMPT, GREEDY).token_ids == want  # and again, from a warm cache
    finally:
        lm.close()


def test_copies_wait_for_compute_that_lags_behind_the_host(tiny_model, monkeypatch):
    """The check above syncs the host at every acquire, so the host never runs ahead of the
    GPU there. Here the compute stream sleeps before each expert's kernels and nothing syncs
    the host: with one slot per layer, the next miss reuses the slot whose expert's kernels
    have not run yet, so its copy must wait for them on the GPU (rule 2 of CudaStreamCopy).
    Dropping that wait gives wrong tokens here."""
    path = tiny_model("mixtral")
    want = cuda_greedy(path, GREEDY.max_new_tokens)
    lm = load_cuda(path, slots=1, predictor="cross-layer", predictor_extra=3, lookahead=3)
    cache = lm.cache
    acquire = cache.acquire

    def lagging_acquire(layer, e):
        w = acquire(layer, e)
        torch.cuda._sleep(1_000_000)  # about half a millisecond of GPU time before the kernels
        return w

    monkeypatch.setattr(cache, "acquire", lagging_acquire)
    try:
        assert generate(lm, PROMPT, GREEDY).token_ids == want
        assert cache.stats.total().misses > GREEDY.max_new_tokens  # slots really were reused
    finally:
        lm.close()


def test_seeded_sampling_on_cuda(tiny_model):
    """Sampling draws on the host with the seed's host generator (a CUDA tensor cannot be
    sampled with it): the same seed gives the same tokens, and another seed others."""
    lm = load_cuda(tiny_model("mixtral"), slots=2)
    try:
        cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
        a, b = generate(lm, PROMPT, cfg), generate(lm, PROMPT, cfg)
        assert len(a.token_ids) == 12 and a.token_ids == b.token_ids
        other = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=8, ignore_eos=True)
        assert generate(lm, PROMPT, other).token_ids != a.token_ids
    finally:
        lm.close()


@pytest.mark.parametrize("quant", ["int8", "int4", "nf4"])
def test_quantized_experts_on_cuda_agree_with_the_cpu(tiny_model, quant):
    if quant == "nf4":
        pytest.importorskip("bitsandbytes")
    path = tiny_model("mixtral")
    x = torch.tensor([PROMPT])
    cpu = load_small(path, quant=quant, slots_per_layer=2)
    gpu = load_cuda(path, quant=quant, slots=2)
    try:
        with torch.inference_mode():
            want = cpu.model(input_ids=x).logits[0].float()
            got = gpu.model(input_ids=x.to("cuda")).logits[0].float().cpu()
        rel = (got - want).norm() / want.norm()
        assert rel < 1e-2, f"{quant}: relative logit error {rel:.2e} between CUDA and CPU"
    finally:
        cpu.close()
        gpu.close()


def test_host_misses_on_cuda_compute_from_the_cpu_layout(tiny_model, monkeypatch):
    """--host-misses beside a GPU: one host store in torch's CPU layout; misses computed by the
    CPU from it, hits by the GPU's kernels for that layout; logits as the CPU's int4-cpu."""
    import quant.kernels.cpu_layout as kc
    from quant.cpu_int4 import Int4CpuPacked, kernel_available
    from runtime.miss import MissHandler

    if not kernel_available():
        pytest.skip("this torch has no CPU int4 kernel")
    gpu_calls = []
    real = kc.gemv
    monkeypatch.setattr(kc, "gemv", lambda *a, **k: gpu_calls.append(1) or real(*a, **k))
    # a one-token miss is computed on the host, a prefill one copied into a slot, so both
    # paths run (the cost model's choice is tested in test_miss.py)
    monkeypatch.setattr(
        MissHandler,
        "routes",
        lambda self, layer, misses: {e: "host" if n == 1 else "copy" for e, n, _ in misses},
    )
    path = tiny_model("mixtral", intermediate_size=128)
    x = torch.tensor([PROMPT])
    cpu = load_model(str(path), LoadOptions(quant="int4", device="cpu"))
    gpu = load_cuda(path, quant="int4", slots=2, host_misses=True)
    try:
        assert gpu.store.path.name == "int4-cpu" and isinstance(gpu.runtime.fmt, Int4CpuPacked)
        with torch.inference_mode():
            want = cpu.model(input_ids=x).logits[0].float()
            got = gpu.model(input_ids=x.to("cuda")).logits[0].float().cpu()
            for t in PROMPT[:4]:  # one token at a time: the GEMV on the GPU, misses on the host
                gpu.model(input_ids=torch.tensor([[t]], device="cuda"))
        assert ((got - want).norm() / want.norm()).item() < 2e-2
        st = gpu.cache.stats.total()
        assert st.cpu_computed > 0 and st.hits > 0 and gpu_calls
    finally:
        cpu.close()
        gpu.close()


def test_profile_device_measures_the_link():
    from runtime.device_probe import QUICK, probe_device

    r = probe_device("cuda", QUICK)
    pinned = [c for c in r.copies if c.pinned]
    assert r.device_type == "cuda" and r.device_memory > 0 and pinned
    assert all(c.bandwidth > 1e9 for c in pinned)  # any PCIe or NVLink moves more than 1 GB/s
    assert 0 < r.latency < 1e-2 and r.matmul_flops > 0 and r.dequant


def test_the_cuda_error_of_a_refused_page_lock_is_cleared():
    """What _page_locked relies on after a refused cudaHostRegister: the cudart torch loaded
    is found, and a refused registration leaves no error for the next kernel to report."""
    from runtime.expert_store import _clear_cuda_error

    torch.zeros(1, device="cuda")  # torch has loaded its cudart
    err = int(torch.cuda.cudart().cudaHostRegister(0, 4096, 0))  # a null pointer: refused
    assert err != 0
    assert _clear_cuda_error()
    torch.ones(1024, device="cuda").sum().item()  # the next kernel launch reports nothing


def test_a_store_the_host_cannot_page_lock_stays_mapped_and_still_gives_the_reference(
    tiny_model, monkeypatch
):
    """With no host memory to spare the store is not page-locked at all: copies come from the
    memory-mapped files (synchronous, slower) and the greedy tokens are still the reference's."""
    from runtime import expert_store

    monkeypatch.setattr(expert_store, "_available_host", lambda: 10 << 20)
    path = tiny_model("mixtral")
    lm = load_cuda(path, slots=1, predictor="cross-layer")
    try:
        assert lm.store.unpinned_layers == len(lm.store.layers) and not lm.store.pinned
        assert generate(lm, PROMPT, GREEDY).token_ids == cuda_greedy(path, GREEDY.max_new_tokens)
    finally:
        lm.close()


def test_layers_without_a_slot_stream_on_the_gpu(tiny_model):
    """Fewer slots than MoE layers on CUDA: the layers without one copy each expert through
    the stream buffer (on the compute stream, after the kernels that read it), and the
    greedy tokens are still the reference's."""
    from runtime.checkpoint import Checkpoint
    from runtime.model_spec import describe_model

    path = tiny_model("mixtral")
    layers = len(describe_model(Checkpoint(path)).moe_layers)
    fixed, one_each = budget_for_slots(path, "none", 0), budget_for_slots(path, "none", 1)
    expert = (one_each - fixed) // layers
    vram = fixed + (layers // 2 + 1) * expert
    lm = load_model(str(path), LoadOptions(quant="none", vram=vram, device="cuda", dtype="float32"))
    try:
        assert len(lm.plan.streamed_layers) == layers // 2
        assert generate(lm, PROMPT, GREEDY).token_ids == cuda_greedy(path, GREEDY.max_new_tokens)
        st = lm.cache.stats.layer(lm.plan.streamed_layers[0])
        assert st.uses == st.misses > 0
    finally:
        lm.close()
