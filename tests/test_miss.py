"""Smarter misses: compute on the host when the cost model says so, or use a low-bit copy."""

from __future__ import annotations

import pytest
import torch

from runtime.miss import CostModel, MissHandler
from tests.helpers import load_small, reference_model

PROMPT = [5, 17, 42, 99, 7, 128, 64, 3, 250, 11]


def _handler(device: str, host: bool = True) -> MissHandler:
    """A handler over a stand-in cache (layer 0 has no slot) and store: 1 MB experts."""
    handler = MissHandler.__new__(MissHandler)
    handler.cost = CostModel(link_bandwidth=1e9, link_latency=1e-5, host_fixed_s=1e-4, host_per_token_s=1e-4)
    handler.host, handler.low_store = host, None
    handler.store = type("S", (), {"layout": type("L", (), {"nbytes": 10**6})()})()
    handler.cache = type("C", (), {"capacity": lambda self, layer: layer, "device": torch.device(device)})()
    return handler


def test_cost_model_decides_between_copy_and_host():
    handler = _handler("cpu")
    assert handler.cost.copy_s(10**6) == 1e-5 + 1e-3
    w = torch.tensor([[0.5]])

    def route(layer: int, tokens: int) -> str:
        return handler.routes(layer, [(0, tokens, w)])[0]

    assert route(1, 1) == "host"  # 0.2 ms on the host < 1.01 ms to copy
    assert route(1, 20) == "copy"  # 2.1 ms on the host > 1.01 ms
    assert route(0, 20) == "stream"  # the same, where the layer has no slot
    assert route(0, 1) == "host"
    # the CPU computes what it copies, too: each miss is weighed alone
    assert handler.routes(1, [(e, 6, w) for e in range(4)]) == dict.fromkeys(range(4), "host")
    handler.host = False
    assert route(1, 1) == "copy"


def test_low_bit_copies_cost_the_link_their_own_bytes():
    """Beside a GPU a low-bit copy (a quarter of the bytes here) keeps the link busy for its
    own size, so more misses go to the link than if it cost a whole expert."""
    handler = _handler("cuda")
    handler.low_store = type("S", (), {"layout": type("L", (), {"nbytes": 250_000})()})()
    handler.threshold = 0.3
    low = torch.tensor([[0.1]])  # below the threshold: may use the low-bit copy
    # host done at 0.7, 1.4 ms; low-bit copies (0.26 ms each) at 0.26, 0.52 ms
    routes = handler.routes(1, [(e, 6, low) for e in range(4)])
    assert routes == {0: "host", 1: "low-bit", 2: "low-bit", 3: "host"}, routes


def test_beside_a_gpu_misses_are_shared_between_the_host_and_the_link():
    """Host and link work at once beside a GPU: each miss goes where it would be done first.
    At 6 tokens the host takes 0.7 ms an expert, the link 1.01 ms."""
    handler = _handler("cuda")
    w = torch.tensor([[0.5]])
    routes = handler.routes(1, [(e, 6, w) for e in range(5)])
    # host done at 0.7, 1.4, 2.1 ms; link at 1.01, 2.02 ms
    assert routes == {0: "host", 1: "copy", 2: "host", 3: "copy", 4: "host"}
    assert handler.routes(0, [(e, 6, w) for e in range(2)]) == {0: "host", 1: "stream"}
    assert _handler("cuda", host=False).routes(1, [(e, 6, w) for e in range(3)]) == dict.fromkeys(
        range(3), "copy"
    )


def test_host_misses_are_exact(tiny_model):
    path = tiny_model("qwen2_moe")
    ref = reference_model(path)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want = ref(ids).logits
    # a slow emulated link: copying an expert costs far more than computing it here
    lm = load_small(path, quant="none", slots_per_layer=2, predictor="none", host_misses=True,
                    link_bandwidth=1e6, link_latency=1e-3)  # fmt: skip
    try:
        cost = lm.runtime.miss_handler.cost
        assert (cost.link_bandwidth, cost.link_latency) == (1e6, 1e-3)  # the emulated link's, as given
        assert cost.copy_s(lm.store.layout.nbytes) > cost.host_s(1)
        with torch.no_grad():
            got = lm.model(ids).logits
            after_prefill = lm.cache.stats.total().cpu_computed
            lm.model(ids[:, :1])  # one token: its misses served on the host too
        assert ((got - want).norm() / want.norm()).item() < 1e-4
        st = lm.cache.stats.total()
        assert 0 < after_prefill < st.cpu_computed and st.uses == st.hits + st.late + st.misses
    finally:
        lm.close()


def test_load_model_refuses_low_bit_copies_no_smaller_than_the_experts(tiny_model):
    """The library's own check, not only the CLI's: bench's low-bit row loads through it."""
    from runtime.errors import UsageError

    with pytest.raises(UsageError, match="no smaller than the experts"):
        load_small(tiny_model("mixtral"), quant="int4", slots_per_layer=2, low_bit="int8")


def test_low_bit_copies_serve_low_weight_misses_with_bounded_error(tiny_model):
    path = tiny_model("mixtral")
    ref = reference_model(path)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want = ref(ids).logits
    for threshold, expect_low in ((0.0, False), (1.01, True)):
        lm = load_small(path, quant="none", slots_per_layer=2, predictor="none", low_bit="int4",
                        low_bit_threshold=threshold)  # fmt: skip
        try:
            with torch.no_grad():
                got = lm.model(ids).logits
            st = lm.cache.stats.total()
            rel = ((got - want).norm() / want.norm()).item()
            if expect_low:
                assert st.low_bit_loads > 0 and 0 < rel < 0.2, rel  # int4 copies: bounded error
                assert st.bytes_moved < st.misses * lm.store.layout.nbytes  # fewer bytes than full copies
            else:
                assert st.low_bit_loads == 0 and rel < 1e-4
        finally:
            lm.close()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_order_of_copies_and_host_computes(tiny_model, device):
    """In each invocation the host's inputs are taken first, then every miss that goes into a
    slot has its copy started (none for the host's misses), before any expert computes.
    Beside a GPU the host's misses come last, after every device expert is issued; on the
    CPU, which computes both, they come before the copied misses, hiding those copies. With
    the routes mixed so, the output is still the reference's. ("cuda": the order the cache
    of a CUDA device gets, on CPU tensors.)"""
    path = tiny_model("qwen2_moe")
    ref = reference_model(path)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want = ref(ids[:, :1]).logits
    lm = load_small(path, quant="none", slots_per_layer=2, predictor="none", host_misses=True,
                    link_bandwidth=1e9)  # fmt: skip
    try:
        handler, cache = lm.runtime.miss_handler, lm.cache
        cache.device = torch.device(device)
        log: list[tuple[str, int, int]] = []
        routed: dict[int, dict[int, str]] = {}

        def alternate(layer, misses):  # host, copy, host, ...: both kinds in every layer
            routed[layer] = {e: ("host", "copy")[i % 2] for i, (e, _, _) in enumerate(misses)}
            return routed[layer]

        def spy(name, fn):
            def wrapped(layer, e, *args, **kwargs):
                log.append((name, layer, e))
                return fn(layer, e, *args, **kwargs)

            return wrapped

        handler.routes = alternate
        cache.load_ahead = spy("ahead", cache.load_ahead)
        cache.acquire = spy("acquire", cache.acquire)
        handler.compute_on_host = spy("host", handler.compute_on_host)
        with torch.no_grad():
            got = lm.model(ids[:, :1]).logits  # one token: top-k distinct experts, all missing
        assert ((got - want).norm() / want.norm()).item() < 1e-4
        for layer in lm.spec.moe_layers:
            events = [(kind, e) for kind, lay, e in log if lay == layer]
            kinds = [kind for kind, _ in events]
            copied = {e for e, r in routed[layer].items() if r == "copy"}
            assert {e for kind, e in events if kind == "ahead"} == copied, events  # none for the host's
            first_compute = min(i for i, k in enumerate(kinds) if k != "ahead")
            assert all(k == "ahead" for k in kinds[:first_compute]) and "ahead" not in kinds[first_compute:]
            computes = [(kind, e) for kind, e in events if kind != "ahead"]
            host_at = [i for i, (kind, _) in enumerate(computes) if kind == "host"]
            if device == "cuda":  # the host's misses last
                assert host_at == list(range(len(computes) - len(host_at), len(computes))), events
            else:  # the host's misses before the copied misses
                copied_at = [i for i, (kind, e) in enumerate(computes) if kind == "acquire" and e in copied]
                assert max(host_at) < min(copied_at), events
    finally:
        lm.close()


def test_low_bit_copies_also_serve_layers_without_a_slot(tiny_model):
    """A layer with no slot streams its misses through one buffer that the low-bit copies
    share: of a token's two experts (gate weights summing to 1) the one below 0.5 moves its
    low-bit copy, the other the whole expert, and the output stays within the low-bit bound."""
    from runtime.loader import LoadOptions, load_model
    from tests.helpers import budget_for_slots

    path = tiny_model("mixtral")
    ref = reference_model(path)
    fixed = budget_for_slots(path, "none", 0)
    expert = (budget_for_slots(path, "none", 1) - fixed) // 4  # the tiny Mixtral's 4 MoE layers
    lm = load_model(str(path), LoadOptions(quant="none", vram=fixed + 2 * expert, device="cpu", predictor="none",
                                           low_bit="int4", low_bit_threshold=0.5))  # fmt: skip
    try:
        assert len(lm.plan.streamed_layers) == 3
        copy_now = lm.cache.transfer.copy_now  # no link here: make each buffer copy stall 10 ms
        lm.cache.transfer.copy_now = lambda src, dst, layer: copy_now(src, dst, layer) + 0.01
        for token in PROMPT:  # one token a forward: two experts a layer
            ids = torch.tensor([[token]])
            with torch.no_grad():
                want, got = ref(ids).logits, lm.model(ids).logits
            assert ((got - want).norm() / want.norm()).item() < 0.2
        full_bytes, low_bytes = lm.store.layout.nbytes, lm.runtime.miss_handler.low_store.layout.nbytes
        for layer in lm.plan.streamed_layers:
            st = lm.cache.stats.layer(layer)
            assert st.uses == st.misses == 2 * len(PROMPT) and st.low_bit_loads == len(PROMPT)
            assert st.bytes_moved == len(PROMPT) * (full_bytes + low_bytes)  # both through the one buffer
            assert st.stall_s == pytest.approx(0.01 * st.uses)  # every buffer copy's stall is counted
    finally:
        lm.close()


def test_a_miss_is_copied_low_bit_only_when_every_token_weighs_it_below_the_threshold():
    handler = _handler("cpu", host=False)
    handler.low_store = type("S", (), {"layout": type("L", (), {"nbytes": 250_000})()})()
    handler.threshold = 0.3
    assert handler.routes(1, [(0, 2, torch.tensor([[0.1], [0.9]]))]) == {0: "copy"}
    assert handler.routes(1, [(0, 2, torch.tensor([[0.1], [0.2]]))]) == {0: "low-bit"}


def test_calibrate_fits_the_hosts_fixed_and_per_token_cost(monkeypatch):
    import runtime.miss as miss
    import runtime.offload as offload
    from tests.test_prefetch import FakeClock

    clock = FakeClock()
    monkeypatch.setattr(miss.time, "perf_counter", clock)

    def expert_mlp(x, *args):  # 1 ms, plus 0.1 ms a token
        clock.now += 1e-3 + 1e-4 * x.shape[0]

    monkeypatch.setattr(offload, "expert_mlp", expert_mlp)
    layout = type("L", (), {"shape": type("Sh", (), {"hidden": 4})(), "nbytes": 16})()
    store = type("S", (), {"layers": [0], "layout": layout, "weights": lambda self, layer, e: None})()
    cost = miss.calibrate(store, None, torch.device("cpu"), (1e9, 1e-5), None)
    assert cost.host_fixed_s == pytest.approx(1e-3)
    assert cost.host_per_token_s == pytest.approx(1e-4)
    assert (cost.link_bandwidth, cost.link_latency) == (1e9, 1e-5)


def test_a_low_bit_miss_takes_no_slot(tiny_model):
    lm = load_small(tiny_model("mixtral"), quant="none", slots_per_layer=2, predictor="none",
                    low_bit="int4", low_bit_threshold=1.01)  # fmt: skip
    try:
        with torch.no_grad():
            lm.model(torch.tensor([PROMPT[:4]]))
            lm.model(torch.tensor([PROMPT[:4]]))  # the same experts again: still not cached
        st = lm.cache.stats.total()
        assert all(lm.cache.resident(layer) == [] for layer in lm.spec.moe_layers)
        assert st.hits == 0 and st.low_bit_loads == st.misses == st.uses > 0
    finally:
        lm.close()


def test_a_tie_goes_to_the_link_and_a_weight_at_the_threshold_is_copied_whole():
    """The host takes a miss only when it would finish strictly sooner, and a low-bit copy
    serves only weights strictly below the threshold (figures exact in binary)."""
    handler = _handler("cpu")
    handler.cost = CostModel(link_bandwidth=1e6, link_latency=0.0, host_fixed_s=0.25, host_per_token_s=0.25)
    w = torch.tensor([[0.75]])
    assert handler.cost.copy_s(10**6) == 1.0 == handler.cost.host_s(3)
    assert handler.routes(1, [(0, 3, w)]) == {0: "copy"}  # 1 s either way
    assert handler.routes(1, [(0, 2, w)]) == {0: "host"}  # 0.75 s on the host
    handler.host = False
    handler.low_store = type("S", (), {"layout": type("L", (), {"nbytes": 250_000})()})()
    handler.threshold = 0.5
    assert handler.routes(1, [(0, 1, torch.tensor([[0.5]]))]) == {0: "copy"}
    assert handler.routes(1, [(0, 1, torch.tensor([[0.25]]))]) == {0: "low-bit"}


def test_low_bit_routes_beside_a_gpu_need_no_cost_model():
    """Without host misses the loader builds no cost model (nothing weighs costs): routing
    low-bit misses beside a GPU must not consult one."""
    handler = _handler("cuda", host=False)
    handler.cost = None
    handler.low_store = type("S", (), {"layout": type("L", (), {"nbytes": 250_000})()})()
    handler.threshold = 0.3
    misses = [(0, 1, torch.tensor([[0.1]])), (1, 1, torch.tensor([[0.9]]))]
    assert handler.routes(1, misses) == {0: "low-bit", 1: "copy"}
    assert handler.routes(0, misses) == {0: "low-bit", 1: "stream"}


def _calibrate(monkeypatch, link, expert_s, copy_s=0.0):
    """calibrate() on a fake clock: ``expert_s(tokens, call)`` is how long the host takes
    for each expert computed (call counts from 0 per token count), ``copy_s`` a memcpy."""
    import runtime.miss as miss
    import runtime.offload as offload
    from tests.test_prefetch import FakeClock

    clock = FakeClock()
    monkeypatch.setattr(miss.time, "perf_counter", clock)
    calls: dict[int, int] = {}

    def expert_mlp(x, *args):
        n = x.shape[0]
        clock.now += expert_s(n, calls.get(n, 0))
        calls[n] = calls.get(n, 0) + 1

    def row(self, layer, e):  # the memcpy's source, fetched inside the timed copy
        clock.now += copy_s
        return torch.zeros(16, dtype=torch.uint8)

    monkeypatch.setattr(offload, "expert_mlp", expert_mlp)
    layout = type("L", (), {"shape": type("Sh", (), {"hidden": 4})(), "nbytes": 16})()
    store = type(
        "S", (), {"layers": [0], "layout": layout, "weights": lambda self, layer, e: None, "row": row}
    )()
    return miss.calibrate(store, None, torch.device("cpu"), link, None)


def test_calibrate_takes_the_median_after_warm_up(monkeypatch):
    """The first (warm-up) runs are slow and one later run is an outlier: neither moves the
    fit, 1 ms plus 0.1 ms a token."""

    def expert_s(tokens, call):
        base = 1e-3 + 1e-4 * tokens
        return base + (1.0 if call < 3 else 0.0) + (0.5 if call == 7 else 0.0)

    cost = _calibrate(monkeypatch, (1e9, 1e-5), expert_s)
    assert cost.host_fixed_s == pytest.approx(1e-3)
    assert cost.host_per_token_s == pytest.approx(1e-4)


def test_calibrate_never_fits_a_negative_cost_per_token(monkeypatch):
    """Noise that makes 16 tokens time faster than 1 gives no cost per token (not a
    negative one, which would make longer prompts look cheaper on the host)."""
    cost = _calibrate(monkeypatch, (1e9, 1e-5), lambda tokens, call: 2e-3 if tokens == 1 else 1e-3)
    assert cost.host_per_token_s == 0.0
    assert cost.host_fixed_s == pytest.approx(2e-3)
    assert cost.host_s(16) >= cost.host_s(1)


def test_calibrate_times_a_memcpy_on_the_cpu_without_an_emulated_link(monkeypatch):
    """No emulated link on the CPU: the link is a memcpy of a row, timed (16 bytes in 2 ms:
    8 kB/s), with the latency given; an emulated link's figures are taken as they are."""
    cost = _calibrate(monkeypatch, (None, 0.0), lambda tokens, call: 1e-3, copy_s=2e-3)
    assert cost.link_bandwidth == pytest.approx(16 / 2e-3)
    assert cost.link_latency == 0.0
    assert cost.copy_s(16) == pytest.approx(2e-3)
    cost = _calibrate(monkeypatch, (1e6, 1e-4), lambda tokens, call: 1e-3, copy_s=2e-3)
    assert (cost.link_bandwidth, cost.link_latency) == (1e6, 1e-4)
