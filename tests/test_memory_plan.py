"""The memory plan against what is really allocated, its error with the needed figure, and `promoe plan`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from promoe_cli.main import app
from quant import get_format
from runtime.checkpoint import Checkpoint
from runtime.errors import InsufficientMemoryError, ModelNotFoundError
from runtime.kv_cache import new_kv_cache
from runtime.loader import LoadOptions, load_model
from runtime.memory_plan import kv_bytes_per_token, plan_load, plan_memory
from runtime.model_spec import describe_model
from tests.conftest import ARCHS
from tests.helpers import budget_for_slots, load_small
from tests.test_cli import one_line_error

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _device_bytes_of_non_experts(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if ".mlp.experts." in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.untyped_storage().nbytes()
    return total


def _kv_bytes_after_prefill(lm, n_tokens: int, chunk: int) -> int:
    """Bytes of the storages a DynamicCache holds after prefilling ``n_tokens`` in chunks."""
    kv, kv_args = new_kv_cache(lm.model)
    ids = torch.randint(
        1, lm.model.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        for i in range(0, n_tokens, chunk):
            lm.model(input_ids=ids[:, i : i + chunk], **kv_args, logits_to_keep=1)
    storages = {}
    for layer in kv.layers:
        for t in (layer.keys, layer.values):
            if t is not None and t.numel():
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_plan_matches_allocated_bytes(tiny_model, arch):
    """Plan vs allocation on a loaded tiny model, float32 on CPU. Tolerance: 0 bytes.

    Non-expert: the plan equals the bytes of every parameter and buffer outside the
    experts (tied tensors counted once, rotary tables included). Expert cache: equals
    ``cache.slots.numel()``. KV cache: equals the bytes of the storages a transformers
    DynamicCache holds after a chunked prefill; deepseek_v3 caches compressed MLA
    latents, gpt_oss's sliding layers keep ``window - 1`` tokens as a view of the last
    concatenation (hence ``window - 1 + chunk`` tokens of storage).
    """
    path = tiny_model(arch)
    lm = load_small(path, quant="int8", slots_per_layer=2, predictor="none")
    try:
        assert lm.plan.non_expert == _device_bytes_of_non_experts(lm.model)
        assert lm.plan.cache_bytes == lm.cache.slots.numel() == lm.cache.nbytes
        for n_tokens, chunk in [(40, 512), (96, 48)]:  # one prefill; chunks (gpt_oss window 32 < 96)
            planned = kv_bytes_per_token(lm.model.config, torch.float32, n_tokens, chunk)
            assert planned == _kv_bytes_after_prefill(lm, n_tokens, chunk), (n_tokens, chunk)
    finally:
        lm.close()


def test_half_precision_plan_matches(tiny_model):
    """bfloat16 weights, but modules transformers keeps in fp32 stay fp32 (gpt_oss): still exact."""
    path = tiny_model("gpt_oss")
    spec = describe_model(Checkpoint(path))
    free = plan_memory(spec, get_format("int4"), budget=None, dtype=torch.bfloat16, context=64)
    budget = free.non_expert + free.kv_cache + free.workspace + 2 * len(spec.moe_layers) * free.expert_bytes
    lm = load_model(
        str(path), LoadOptions(quant="int4", vram=budget, device="cpu", dtype="bfloat16", context=64)
    )
    try:
        assert lm.plan.non_expert == _device_bytes_of_non_experts(lm.model)
        assert lm.cache.num_slots == 2 * len(spec.moe_layers)
    finally:
        lm.close()


def test_needed_figure_is_the_exact_minimum(tiny_model):
    path = tiny_model("deepseek_v3")
    spec = describe_model(Checkpoint(path))
    fmt = get_format("int4")
    free = plan_memory(spec, fmt, budget=None, dtype=torch.float32, context=256, reserved=1000)
    needed = (
        1000 + free.non_expert + free.kv_cache + free.workspace + free.expert_bytes
    )  # room for one expert
    with pytest.raises(InsufficientMemoryError) as exc:
        plan_memory(spec, fmt, budget=needed - 1, dtype=torch.float32, context=256, reserved=1000)
    assert exc.value.needed == needed and exc.value.available == needed - 1
    assert "needs at least" in str(exc.value) and "KV cache for 256 tokens" in str(exc.value)
    fits = plan_memory(spec, fmt, budget=needed, dtype=torch.float32, context=256, reserved=1000)
    assert set(fits.slots_per_layer.values()) == {0}  # every layer streams its experts
    assert fits.stream_bytes == free.expert_bytes and fits.device_total == needed


@pytest.mark.parametrize("split", ["uniform", "shallow"])
def test_fewer_slots_than_layers_stream_through_one_buffer(tiny_model, split):
    """Between room for one expert and one slot per layer, every budget plans within itself:
    the slots go one to a layer (spread out, or to the first layers with shallow), and one
    expert's room is the stream buffer of the layers without one."""
    spec = describe_model(Checkpoint(tiny_model("mixtral")))  # 8 MoE layers
    fmt, n = get_format("int4"), len(spec.moe_layers)
    free = plan_memory(spec, fmt, budget=None, dtype=torch.float32, context=256)
    fixed = free.non_expert + free.kv_cache + free.workspace
    for room in range(1, n + 1):  # experts' worth of room beside the rest
        p = plan_memory(spec, fmt, budget=fixed + room * free.expert_bytes, dtype=torch.float32, context=256,
                        split=split)  # fmt: skip
        assert p.device_total <= p.budget
        with_slot = [layer for layer, k in p.slots_per_layer.items() if k]
        if room == n:  # one slot each: nothing streams
            assert p.stream_bytes == 0 and len(with_slot) == n and not p.streamed_layers
            continue
        assert set(p.slots_per_layer.values()) <= {0, 1} and len(with_slot) == room - 1
        assert p.stream_bytes == free.expert_bytes and p.streamed_layers == sorted(
            set(spec.moe_layers) - set(with_slot)
        )
        assert any(f"{n - room + 1} of {n} MoE layers have no slot" in note for note in p.notes)
        if split == "shallow":
            assert with_slot == spec.moe_layers[: room - 1]
        elif room > 2:
            assert with_slot[-1] - with_slot[0] >= n // 2  # spread over the depth, not bunched
        assert p.to_json()["streamed_layers"] == p.streamed_layers


#: total parameters as each model card states them (runtime/known_configs/README.md)
PUBLISHED_TOTALS = {"mixtral": 46.7e9, "qwen1.5-moe": 14.3e9, "qwen3-moe": 30.5e9, "olmoe": 6.9e9,
                    "deepseek-v2-lite": 15.7e9, "phi-moe": 41.9e9, "gpt-oss": 20.9e9}  # fmt: skip


@pytest.mark.parametrize("alias", sorted(PUBLISHED_TOTALS))
def test_shipped_configs_describe_the_models_they_name(alias, tmp_path, monkeypatch):
    """The model built on the meta device from an alias's shipped config.json has the
    published number of parameters (to 0.5%): a wrong dimension would not."""
    from runtime.loader import LoadOptions

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError):  # only `promoe plan` plans a model that is not here
        plan_load(alias, LoadOptions())
    lp = plan_load(alias, LoadOptions(vram=6 * 10**9, dtype="bfloat16"), shipped_config=True)
    assert lp.resolved.source == "config"
    total = sum(p.numel() for p in lp.spec.meta_model.parameters())
    assert abs(total / PUBLISHED_TOTALS[alias] - 1) < 0.005, total


def test_every_alias_has_a_shipped_config():
    from runtime.resolve import ALIASES, known_config

    assert {a: known_config(a) is not None for a in ALIASES} == dict.fromkeys(ALIASES, True)
    assert {ALIASES[a] for a in PUBLISHED_TOTALS} == set(ALIASES.values())  # the test above covers each model
    assert known_config("someone/unknown-moe") is None


def test_a_model_not_downloaded_is_planned_from_its_shipped_config(tmp_path, monkeypatch):
    """`promoe plan mixtral` answers before a 90 GB download, from promoe's copy of its
    config.json; the figures are Mixtral-8x7B's own: 46.7B parameters, 12.9B active per token
    (Mistral AI's model card), and with bf16 weights 6 GB holds it only by streaming."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing downloaded
    r = invoke("plan", "mixtral", "--vram", "6GB", "--dtype", "bfloat16", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["model"].startswith("mistralai/Mixtral-8x7B-Instruct-v0.1 (not on this machine")
    expert_weights = 3 * 4096 * 14336
    total = data["non_expert"] // 2 + data["total_experts"] * expert_weights  # bf16: 2 bytes a weight
    active = data["non_expert"] // 2 + 32 * 2 * expert_weights  # top-2 of 8 in each of 32 layers
    assert abs(total / 46.7e9 - 1) < 0.005 and abs(active / 12.9e9 - 1) < 0.01, (total, active)
    assert data["budget"] == 6 * 10**9 and data["device_total"] <= data["budget"]
    assert 0 < data["slots"] < 32 and len(data["streamed_layers"]) == 32 - data["slots"]
    # chat cannot run it, and says where to look first
    one_line_error(invoke("chat", "mixtral", "--prompt", "x"), 2, "hf download", "promoe plan mixtral")


def test_a_default_model_not_downloaded_is_planned_from_its_shipped_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("PROMOE_DEFAULT_MODEL", "mixtral")
    r = invoke("plan", "--vram", "6GB", "--dtype", "bfloat16", "--json")
    assert r.exit_code == 0, r.output
    model = json.loads(r.output)["model"]
    assert model.startswith("mistralai/Mixtral-8x7B-Instruct-v0.1 (not on this machine")


def test_hint_names_the_change_that_fits(tiny_model):
    spec = describe_model(Checkpoint(tiny_model("mixtral")))

    def error(fmt: str, context: int, budget: int) -> InsufficientMemoryError:
        with pytest.raises(InsufficientMemoryError) as exc:
            plan_memory(spec, get_format(fmt), budget=budget, dtype=torch.float32, context=context)
        return exc.value

    def minimum(fmt: str, context: int, dtype=torch.float32) -> int:
        with pytest.raises(InsufficientMemoryError) as exc:
            plan_memory(spec, get_format(fmt), budget=0, dtype=dtype, context=context)
        return exc.value.needed

    # a budget that holds the model at 1024 tokens but not at 4096: shorten the context
    err = error("int8", 4096, minimum("int8", 1024))
    assert "--context 1024" in err.hint and "at least" in err.hint
    # a budget that int4 fits and int8 does not, whatever the context: lower the quantization
    err = error("none", 256, minimum("int4", 256))
    assert "--quant int4" in err.hint
    # half-precision non-expert weights
    err = error("int2", 256, minimum("int2", 256, torch.bfloat16))
    assert "--dtype bfloat16" in err.hint
    # no single change fits: the mildest combination, keeping the most bits, then the longest
    # context (the old hint cut the context to 256 and the experts to int2 at once)
    budget = minimum("int8", 512, torch.bfloat16)
    # the premise: neither the shortest context, nor the lowest bits, nor bf16 alone fits
    assert min(minimum("int8", 256), minimum("int2", 4096), minimum("int8", 4096, torch.bfloat16)) > budget
    with pytest.raises(InsufficientMemoryError) as exc:
        plan_memory(spec, get_format("int8"), budget=budget, dtype=torch.float32, context=4096)
    hint = exc.value.hint
    assert "any one of" not in hint and "--quant" not in hint, hint  # int8 itself fits, in bf16
    assert "together --dtype bfloat16 --context 512 do" in hint, hint


def test_unified_memory_counts_the_store(tiny_model):
    """On one shared pool the whole host store comes off the budget before any slot."""
    spec = describe_model(Checkpoint(tiny_model("olmoe")))
    fmt = get_format("int8")
    free = plan_memory(spec, fmt, budget=None, dtype=torch.float32, context=256)
    fixed = free.non_expert + free.kv_cache + free.workspace
    budget = fixed + free.store_bytes + 10 * free.expert_bytes
    split = plan_memory(spec, fmt, budget=budget, dtype=torch.float32, context=256)
    shared = plan_memory(spec, fmt, budget=budget, dtype=torch.float32, context=256, unified=True)
    assert split.slots == spec.total_experts and shared.slots == 10
    assert shared.device_total <= budget < shared.device_total + free.expert_bytes


def _small_profile(home, name: str, memory: int | str, host: int | str = "16GB") -> None:
    """A GPU profile of ``memory`` under $PROMOE_HOME/profiles (so also a user-profile lookup)."""
    d = home / "profiles"
    d.mkdir(parents=True, exist_ok=True)
    figures = {"device_memory": memory, "reserved_memory": "0", "host_memory": host, "link_bandwidth": "2GB/s",
               "link_latency": "20us", "device_bandwidth": "100GB/s", "compute": "1TFLOPS"}  # fmt: skip
    text = 'description = "test"\ndevice_type = "cuda"\nunified = false\n'
    for k, v in figures.items():
        text += f'[{k}]\nvalue = "{v}"\nsource = "estimate: a test"\n'
    (d / f"{name}.toml").write_text(text)


def test_plan_command_predicts_the_loaded_plan(tiny_model, home):
    """`promoe plan` (plan_load) makes exactly the plan load_model makes, here with an emulated profile."""
    path = tiny_model("qwen2_moe")
    spec = describe_model(Checkpoint(path))
    free = plan_memory(spec, get_format("int4"), budget=None, dtype=torch.float32, context=128)
    _small_profile(
        home, "small-gpu", free.non_expert + free.kv_cache + free.workspace + 13 * free.expert_bytes
    )
    from promoe_cli.loading import load_options

    opts = load_options(quant="int4", vram=None, profile="small-gpu", context=128, device="cpu", dtype=None,
                        policy="lru", slot_split="shallow", prefetch="none", link_bandwidth=None, link_latency=None)  # fmt: skip
    planned = plan_load(str(path), opts).plan
    assert planned.slots == 13 and planned.total_experts == 32  # a partial cache, split shallow
    lm = load_model(str(path), opts)
    try:
        assert lm.plan.to_json() == planned.to_json()
        assert lm.cache.num_slots == planned.slots
    finally:
        lm.close()
    r = invoke("plan", path, "--profile", "small-gpu", "--quant", "int4", "--context", 128, "--slot-split",
               "shallow", "--device", "cpu", "--dtype", "float32", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["slots"] == planned.slots and data["non_expert"] == planned.non_expert
    assert data["slots_per_layer"] == {str(k): v for k, v in planned.slots_per_layer.items()}
    assert data["emulated_link"] == {"bandwidth": 2e9, "latency_s": pytest.approx(20e-6)}
    r = invoke(
        "plan", path, "--profile", "small-gpu", "--context", 128, "--device", "cpu", "--dtype", "float32"
    )
    assert r.exit_code == 0 and "expert cache" in r.stdout and "emulated link" in r.stdout
    # without --dtype a GPU profile is planned as that GPU computes, in bf16: what `plan` is asked
    r = invoke("plan", path, "--profile", "small-gpu", "--context", 128, "--device", "cpu", "--json")
    half = json.loads(r.stdout)
    assert (
        half["dtype"] == "bfloat16"
        and half["non_expert"] < planned.non_expert
        and half["slots"] > planned.slots
    )
    r = invoke("plan", path, "--profile", "small-gpu", "--context", 128, "--device", "cpu")
    assert r.exit_code == 0 and "bfloat16 on the profile's GPU" in " ".join(r.stdout.split())
    assert "planned in bfloat16, as the profile's GPU computes" in " ".join(r.stderr.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans a GPU this machine lacks")
def test_plan_for_a_cuda_gpu_this_machine_lacks(tiny_model):
    """`plan --device cuda` without one answers for a GPU of the size given, in bf16 as it
    computes (the figures a CUDA machine plans: budget and dtype are all that differ); with
    no size it says what to add."""
    path = tiny_model("mixtral")
    vram = budget_for_slots(path, "int4", 3)
    r = invoke("plan", path, "--vram", vram, "--device", "cuda", "--json")
    assert r.exit_code == 0, r.output
    gpu = json.loads(r.stdout)
    assert gpu["device"] == "cuda" and gpu["dtype"] == "bfloat16" and gpu["budget"] == vram
    want = plan_load(str(path), LoadOptions(vram=vram, device="cpu", dtype="bfloat16")).plan
    assert gpu["non_expert"] == want.non_expert and gpu["slots"] == want.slots > 0
    assert not gpu["in_place"]  # a cache of slots, as on the device
    r = invoke("plan", path, "--vram", vram, "--device", "cuda:0")
    assert r.exit_code == 0 and "on a CUDA GPU" in " ".join(r.stdout.split())
    assert "planned for a CUDA GPU, which this machine does not have, in bfloat16" in " ".join(
        r.stderr.split()
    )
    r = invoke("plan", path, "--vram", vram, "--device", "cuda", "--dtype", "float32", "--json")
    assert json.loads(r.stdout)["dtype"] == "float32"
    one_line_error(invoke("plan", path, "--device", "cuda"), 2, "no CUDA device", "--vram 6GB")
    # fp32 on this CPU does not fit: perhaps the question was a GPU's plan, and the hint says how
    small = f"{budget_for_slots(path, 'int4', 1) // 2}B"
    one_line_error(invoke("plan", path, "--vram", small), 4, "is not enough", "add --device cuda")
    assert "--device cuda" not in invoke("plan", path, "--vram", small, "--dtype", "float32").stderr
    one_line_error(invoke("chat", path, "--device", "cuda", "--prompt", "x"), 2, "sees no CUDA device")


def test_plan_on_the_cpu_without_a_budget_reads_experts_in_place(tiny_model, home):
    """No budget on the CPU: the plan counts the host store once, read in place (no slots);
    a budget, or an emulated link, plans a cache of slots as on a device."""
    path = tiny_model("mixtral")
    r = invoke("plan", path, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["in_place"] and data["cache_bytes"] == 0
    fixed = data["non_expert"] + data["kv_cache"] + data["workspace"] + data["reserved"]
    assert data["device_total"] == fixed + data["store_bytes"]
    r = invoke("plan", path, "--device", "cpu")
    assert "read in place" in r.stdout and "expert cache" not in r.stdout
    for extra in (["--vram", data["device_total"]], ["--link-bandwidth", "1GB/s"]):
        data = json.loads(invoke("plan", path, "--device", "cpu", "--json", *extra).stdout)
        assert not data["in_place"] and data["cache_bytes"] == data["slots"] * data["expert_bytes"]


def test_plan_that_cannot_fit_via_plan_and_chat(tiny_model, home):
    path = tiny_model("mixtral")
    _small_profile(home, "too-small", "300KB")
    for args in (["plan", path], ["chat", path, "--prompt", "x"]):
        r = invoke(*args, "--profile", "too-small")
        one_line_error(r, 4, "needs at least", "non-expert weights", "device with at least")
    r = invoke("plan", path, "--vram", "300KB")
    one_line_error(r, 4, "300.0 KB is not enough")
    r = invoke("plan", path, "--vram", "300KB", "--json")  # a script still gets the figures, on stdout
    assert r.exit_code == 4 and "error: 300.0 KB is not enough" in r.stderr
    data = json.loads(r.stdout)
    assert not data["fits"] and data["budget"] == 300_000 and data["needed"] > 300_000
    fits = json.loads(invoke("plan", path, "--vram", "1GB", "--json").stdout)
    assert fits["fits"] and data["needed"] == sum(
        fits[k] for k in ("reserved", "non_expert", "kv_cache", "workspace", "expert_bytes")
    )  # the fixed part and room for one expert


def test_a_cuda_budget_from_free_memory_keeps_headroom_and_an_integrated_gpu_is_unified(monkeypatch):
    """On CUDA with no --vram the budget is the free memory, and the plan keeps some of it
    back for what it does not model (allocator fragmentation, cuBLAS workspaces); an
    integrated GPU (Jetson) shares the host's memory even when no profile says so."""
    from types import SimpleNamespace

    from runtime.memory_plan import CUDA_HEADROOM_MIN, budget_inputs

    gib = 1 << 30
    props = SimpleNamespace(is_integrated=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * gib, 24 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert budget_inputs(cuda, LoadOptions()) == (20 * gib, gib, False)  # 5% of 20 GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * gib, 6 * gib))
    assert budget_inputs(cuda, LoadOptions()) == (2 * gib, CUDA_HEADROOM_MIN, False)
    assert budget_inputs(cuda, LoadOptions(vram=4 * gib)) == (4 * gib, 0, False)  # the user's budget
    assert budget_inputs(cuda, LoadOptions(vram=4 * gib, reserved=gib)) == (4 * gib, gib, False)
    props.is_integrated = True
    assert budget_inputs(cuda, LoadOptions(vram=4 * gib))[2] is True
    assert budget_inputs(cpu, LoadOptions()) == (None, 0, False)


def test_compute_dtype_defaults(monkeypatch):
    """fp32 on the CPU; on CUDA the checkpoint's half type, fp16 where bf16 is not native."""
    from runtime.loader import pick_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert pick_dtype(cpu, torch.bfloat16, None) == torch.float32
    assert pick_dtype(cpu, torch.bfloat16, "bfloat16") == torch.bfloat16
    native = {"bf16": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native["bf16"])
    assert pick_dtype(cuda, torch.bfloat16, None) == torch.bfloat16
    assert pick_dtype(cuda, torch.float16, None) == torch.float16
    native["bf16"] = False  # a T4 or a Jetson Xavier
    assert pick_dtype(cuda, torch.bfloat16, None) == torch.float16


def test_the_plan_says_when_the_store_does_not_fit_host_memory(tiny_model, home, monkeypatch):
    """The host store must fit host memory beside 1 GiB for the system: the profile's, else
    this machine's. When it does not, a note names the largest quantization that fits."""
    from runtime import memory_plan
    from runtime.memory_plan import HOST_MARGIN

    path = tiny_model("olmoe")
    spec = describe_model(Checkpoint(path))

    def store(q: str) -> int:
        return plan_memory(spec, get_format(q), budget=None, dtype=torch.float32, context=64).store_bytes

    def notes(vram: int = 10**9, **kw) -> list[str]:
        lp = plan_load(str(path), LoadOptions(quant="none", device="cpu", context=64, vram=vram, **kw))
        return [n for n in lp.plan.notes if "host memory" in n]

    assert store("int8") < store("none")
    tight = HOST_MARGIN + store("int8")  # room for the int8 store, not the unquantized one
    [note] = notes(host_memory=tight)
    assert "does not fit" in note and "--quant int8 makes it" in note and "read from disk" in note, note
    assert notes(host_memory=HOST_MARGIN + store("none")) == []
    assert "cannot be page-locked stay memory-mapped" in notes(host_memory=tight, link_bandwidth=1e9)[0]
    assert notes(host_memory=HOST_MARGIN, unified=True) == []  # one pool: the budget counts the store
    this_machine = memory_plan._this_machine_memory
    monkeypatch.setattr(memory_plan, "_this_machine_memory", lambda: HOST_MARGIN)  # no profile: this machine
    assert "no quantization fits; the smallest store needs" in notes()[0]
    monkeypatch.setattr(memory_plan, "_this_machine_memory", this_machine)
    # the low-bit copies live in host memory too, while experts can miss
    low = plan_memory(spec, get_format("int2"), budget=None, dtype=torch.float32, context=64).store_bytes
    one_each = budget_for_slots(path, "none", 1, context=64)  # experts can miss
    assert notes(host_memory=HOST_MARGIN + store("none"), low_bit="int2") == []  # all resident: no copies
    [note] = notes(one_each, host_memory=HOST_MARGIN + store("none"), low_bit="int2")
    assert "of low-bit copies" in note and "--quant int8 makes it" in note, note
    assert store("int8") + low + HOST_MARGIN <= HOST_MARGIN + store("none")  # the premise
    # the table shows the store beside the profile's host memory
    _small_profile(home, "roomy", "1GB", host="64GB")
    r = invoke("plan", path, "--profile", "roomy")
    assert r.exit_code == 0, r.output
    assert "host expert store" in r.output and "host memory (profile roomy)" in r.output
    assert (
        json.loads(invoke("plan", path, "--profile", "roomy", "--json").output)["host_memory"] == 64 * 10**9
    )
    # chat runs, and warns
    _small_profile(home, "cramped", "1GB", host="100MB")
    r = invoke("chat", path, "--profile", "cramped", "--prompt", "x", "--max-new-tokens", 2)
    assert r.exit_code == 0, r.output
    assert "warning: the " in r.output and "does not fit in 100.0 MB of host memory" in r.output, r.output


def test_chat_says_which_layers_stream_and_what_would_help(tiny_model):
    """A budget with fewer slots than layers: chat's banner says how many layers stream, and
    points at --host-misses unless it is on."""
    path = tiny_model("mixtral")  # 4 MoE layers
    fixed = budget_for_slots(path, "none", 0)
    expert = (budget_for_slots(path, "none", 1) - fixed) // 4
    args = ["chat", str(path), "--quant", "none", "--vram", f"{fixed + 3 * expert}B"]
    r = runner.invoke(app, args, input="/quit\n")
    assert r.exit_code == 0, r.output
    assert (
        "2 of 4 MoE layers have no slot and stream their experts" in r.output and "--host-misses" in r.output
    )
    r = runner.invoke(app, [*args, "--host-misses"], input="/quit\n")
    assert (
        r.exit_code == 0 and "2 of 4 MoE layers have no slot" in r.output and "--host-misses" not in r.output
    )


def test_the_shallow_split_gives_early_layers_more_slots():
    from runtime.memory_plan import split_slots

    slots = list(split_slots(12, list(range(8)), 8, "shallow").values())
    assert sum(slots) == 12 and slots == sorted(slots, reverse=True) and slots[0] > slots[-1]
    # shares 2, 1.67, 1.33, 1 of 6: the largest remainder gets the spare slot
    assert split_slots(6, [0, 1, 2, 3], 8, "shallow") == {0: 2, 1: 2, 2: 1, 3: 1}


def test_split_slots_keeps_its_rules_for_every_total():
    """Every total is handed out in full (up to every expert), no layer gets more slots than
    it has experts, every layer gets one once there are as many as layers, and shallow never
    gives a deeper layer more than a shallower one."""
    from runtime.memory_plan import split_slots

    for n in range(1, 9):
        for experts in (2, 4, 8):
            for total in range(0, n * experts + 3):
                for split in ("uniform", "shallow"):
                    got = list(split_slots(total, list(range(n)), experts, split).values())
                    assert sum(got) == min(total, n * experts), (n, experts, total, split)
                    assert max(got) <= experts and (total < n or min(got) >= 1), (n, experts, total, split)
                    if split == "shallow":
                        assert got == sorted(got, reverse=True), (n, experts, total)


def test_max_slots_caps_the_plan_and_a_capped_cpu_plan_is_not_in_place(tiny_model):
    """bench's on-demand and resident rows cap the slots; a CPU plan that cannot hold every
    expert must not read them in place (the cache would refuse it)."""
    spec = describe_model(Checkpoint(tiny_model("mixtral")))
    fmt, n = get_format("int4"), len(spec.moe_layers)
    capped = plan_memory(spec, fmt, budget=None, dtype=torch.float32, context=64, max_slots=n, in_place=True)
    assert capped.slots == n and not capped.in_place
    whole = plan_memory(spec, fmt, budget=None, dtype=torch.float32, context=64, in_place=True)
    assert whole.slots == spec.total_experts and whole.in_place
    budget = whole.device_total + 3 * whole.expert_bytes  # room for every expert, capped lower
    assert (
        plan_memory(spec, fmt, budget=budget, dtype=torch.float32, context=64, max_slots=2 * n).slots == 2 * n
    )


def test_a_context_shorter_than_the_prefill_chunk_plans_a_chunk_of_the_context(tiny_model):
    spec = describe_model(Checkpoint(tiny_model("mixtral")))
    fmt = get_format("int4")

    def plan(context, chunk=512):
        return plan_memory(spec, fmt, budget=None, dtype=torch.float32, context=context, prefill_chunk=chunk)

    assert plan(64).workspace == plan(64, chunk=64).workspace < plan(512).workspace


def test_the_workspace_grows_with_a_dense_mlp_wider_than_an_expert(tiny_model, tmp_path):
    """qwen2-moe's shared expert and deepseek's dense layers are wider than a routed expert:
    a prefill chunk's activations through them must be planned, not just the experts'."""
    src = tiny_model("deepseek_v3")
    specs = {}
    for width in (128, 256):  # the routed experts are 32 wide
        d = tmp_path / str(width)
        d.mkdir()
        config = json.loads((src / "config.json").read_text())
        config["intermediate_size"] = width
        (d / "config.json").write_text(json.dumps(config))
        specs[width] = describe_model(Checkpoint(d), weights=False)
    chunk = 64

    def workspace(width):
        return plan_memory(specs[width], get_format("int4"), budget=None, dtype=torch.float32,
                           context=chunk, prefill_chunk=chunk).workspace  # fmt: skip

    assert workspace(256) - workspace(128) == chunk * 3 * (256 - 128) * 4  # float32 activations


def test_a_context_as_long_as_the_model_is_accepted_and_one_longer_refused(tiny_model):
    from runtime.errors import UsageError
    from runtime.memory_plan import default_context

    config = describe_model(Checkpoint(tiny_model("mixtral"))).config
    limit = config.max_position_embeddings
    assert default_context(config, limit) == limit
    with pytest.raises(UsageError, match=f"longer than this model's {limit} positions"):
        default_context(config, limit + 1)


def _said(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines at the test console's width


def test_the_plan_table_says_what_it_planned(tiny_model, home):
    """The table's title, rows and lines under it say the budget's source, what is left of it,
    the slots of each layer, the link, the plan's notes and how it was computed."""
    path = tiny_model("mixtral")
    vram = budget_for_slots(path, "int4", 3)
    _small_profile(home, "small-gpu", vram * 4)
    r = invoke("plan", path, "--profile", "small-gpu", "--slot-split", "shallow", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["profile"] == "small-gpu" and data["slot_split"] == "shallow"
    r = invoke("plan", path, "--profile", "small-gpu", "--slot-split", "shallow")
    said = _said(r.stdout)
    assert "· profile small-gpu" in said and "budget" in said
    per_layer = " ".join(f"{layer}:{n}" for layer, n in data["slots_per_layer"].items())
    assert f"slots per MoE layer (shallow): {per_layer}" in said
    assert "link: 2.0 GB/s" in said and "emulated link" not in said  # the profile's own link, planned for it
    # a budget: named in the title; what is left of it, when less than an expert
    r = invoke("plan", path, "--vram", f"{vram}B", "--device", "cpu")
    said = _said(r.stdout)
    assert r.exit_code == 0, r.output
    assert "· budget " in said and "· profile" not in said
    assert "left (less than one expert)" in said
    assert "slots per MoE layer (uniform): " + " ".join(f"{layer}:3" for layer in range(4)) in said
    assert "of " in said and "host memory (this machine)" in said
    roomy = invoke("plan", path, "--vram", "1GB", "--device", "cpu")  # every expert fits: nothing to say
    assert roomy.exit_code == 0 and "less than one expert" not in _said(roomy.stdout)
    # in place on the CPU: the store is the device's row, not a second one beside host memory
    r = invoke("plan", path, "--device", "cpu")
    said = _said(r.stdout)
    assert "host expert store, read in place" in said and "host memory (this machine)" not in said
    # no budget, but a link: every expert resident, which the plan says
    r = invoke("plan", path, "--device", "cpu", "--link-bandwidth", "1GB/s")
    assert "no budget given: every expert resident" in _said(r.stderr)
    assert "emulated link: 1.0 GB/s" in _said(r.stdout)
    # an emulated link under a budget, computed in fp32 as the CPU does: it says so
    r = invoke("plan", path, "--device", "cpu", "--vram", f"{vram}B", "--link-bandwidth", "1GB/s")
    assert "planned in float32, as the CPU computes; --dtype bfloat16" in _said(r.stderr)
    # the plan's notes are printed under the table
    _small_profile(home, "cramped", "1GB", host="100MB")
    r = invoke("plan", path, "--profile", "cramped")
    notes = [line for line in r.stdout.splitlines() if line.startswith("note: ")]
    assert any("host memory" in n for n in notes), r.stdout


def test_plan_help_lists_the_shipped_profiles():
    r = invoke("plan", "--help")
    assert r.exit_code == 0
    assert "Shipped profiles: cpu, jetson-agx-orin-64gb, jetson-orin-nano-8gb" in _said(r.stdout)
