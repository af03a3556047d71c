"""int4 in torch's CPU layout: the reference dequantizer, torch's kernel against it, and
when the loader picks it (experts read in place on the CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from quant import get_format
from quant.cpu_int4 import Int4CpuPacked, cpu_variant, kernel_available

needs_kernel = pytest.mark.skipif(not kernel_available(), reason="this torch has no CPU int4 kernel")
SHAPES = [(64, 64), (192, 256), (128, 640)]


def _weight(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_the_layout_holds_int4s_codes_scales_and_zeros(shape):
    """Dequantized, the CPU layout is int4's own weight, up to the bf16 rounding of its
    scales and shifted zeros."""
    w = _weight(shape)
    int4, cpu = get_format("int4"), Int4CpuPacked()
    want = int4.dequantize(int4.quantize(w), shape, torch.float32)
    got = cpu.dequantize(cpu.quantize(w), shape, torch.float32)
    assert ((got - want).norm() / want.norm()).item() < 1e-2
    assert ((got - w.float()).norm() / w.float().norm()).item() < 0.12  # int4's own bound


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", [1, 5])
def test_the_kernel_equals_its_reference(shape, tokens):
    cpu = Int4CpuPacked()
    g = torch.Generator().manual_seed(tokens)
    parts = cpu.quantize(_weight(shape, seed=tokens))
    x, b = torch.randn(tokens, shape[1], generator=g), torch.randn(shape[0], generator=g)
    want = x @ cpu.dequantize(parts, shape, torch.float32).T + b
    got = cpu.linear(x, parts, shape, b)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert ((got - want).norm() / want.norm()).item() < 1e-2  # bf16 activations


@needs_kernel
@pytest.mark.parametrize("kernels", ["1", "0"])
def test_linear_runs_the_kernel_unless_kernels_are_off(kernels, monkeypatch):
    import quant.cpu_int4 as cpu_int4

    calls = []
    real = cpu_int4._kernel_mm
    monkeypatch.setattr(cpu_int4, "_kernel_mm", lambda *a: calls.append(a[0].dtype) or real(*a))
    monkeypatch.setenv("PROMOE_KERNELS", kernels)
    cpu = Int4CpuPacked()
    parts = cpu.quantize(_weight((128, 64)))
    cpu.linear(torch.randn(1, 64), parts, (128, 64))
    assert calls == ([torch.bfloat16] if kernels == "1" else [])


@needs_kernel
def test_without_kernels_it_is_the_reference_a_block_of_rows_at_a_time(monkeypatch):
    import quant.base

    monkeypatch.setattr(quant.base, "CPU_BLOCK_ELEMENTS", 100 * 64)  # 100 rows: blocks of 64
    monkeypatch.setenv("PROMOE_KERNELS", "0")
    cpu, shape = Int4CpuPacked(), (192, 64)
    parts = cpu.quantize(_weight(shape))
    shapes = []
    real = cpu.dequantize
    monkeypatch.setattr(cpu, "dequantize", lambda p, s, d: shapes.append(s) or real(p, s, d))
    x = torch.randn(2, 64)
    got = cpu.linear(x, parts, shape)
    assert shapes == [(64, 64)] * 3
    torch.testing.assert_close(got, x @ real(parts, shape, torch.float32).T)


@needs_kernel
def test_quantizing_a_block_of_rows_at_a_time_gives_the_same_bytes(monkeypatch):
    import quant.base

    cpu, w = Int4CpuPacked(), _weight((320, 128), seed=2)
    whole = cpu.quantize(w)
    monkeypatch.setattr(quant.base, "CPU_BLOCK_ELEMENTS", 130 * 128)  # 130 rows: blocks of 128, then 64
    out = {k: torch.zeros_like(v) for k, v in whole.items()}
    cpu.quantize_into(w, out, torch.bfloat16)
    for k, v in whole.items():
        assert torch.equal(out[k], v), k
    assert cpu.row_block(whole, (320, 128), 32, 96) is None  # not whole blocks of 64 rows


def test_the_loader_s_choice(monkeypatch):
    shapes = [(192, 64), (64, 128)]
    assert isinstance(cpu_variant(get_format("int4"), shapes), Int4CpuPacked) == kernel_available()
    for other in ("int8", "nf4", "int3", "int2", "none"):
        assert cpu_variant(get_format(other), shapes).name == other
    assert not isinstance(cpu_variant(get_format("int4"), [(192, 64), (64, 96)]), Int4CpuPacked)
    monkeypatch.setenv("PROMOE_KERNELS", "0")
    assert not isinstance(cpu_variant(get_format("int4"), shapes), Int4CpuPacked)


@needs_kernel
def test_the_cpu_as_device_uses_the_cpu_layout_and_stays_near_int4(tiny_model, monkeypatch):
    """With the CPU as the device (experts read in place, or slots within a budget), int4
    experts go through torch's kernel, from a store of their own; the logits stay within
    2% of int4's reference path (the int4 store: same codes, fp16 scales, fp32 compute)."""
    from runtime.loader import LoadOptions, load_model
    from tests.helpers import budget_for_slots

    path = tiny_model("mixtral", intermediate_size=128)
    ids = torch.tensor([[5, 17, 42, 99, 7, 128, 64, 3]])
    slots = LoadOptions(quant="int4", device="cpu", vram=budget_for_slots(path, "int4", 2), predictor="none")
    runs = {"in place": ("1", LoadOptions(quant="int4", device="cpu")), "slots": ("1", slots),
            "reference": ("0", LoadOptions(quant="int4", device="cpu"))}  # fmt: skip
    logits = {}
    for name, (kernels, opts) in runs.items():
        monkeypatch.setenv("PROMOE_KERNELS", kernels)
        lm = load_model(str(path), opts)
        try:
            assert (lm.store.path.name == "int4-cpu") == (name != "reference")
            assert isinstance(lm.runtime.fmt, Int4CpuPacked) == (name != "reference")
            with torch.inference_mode():
                logits[name] = lm.model(ids).logits.float()
        finally:
            lm.close()
    want = logits["reference"]
    for name in ("in place", "slots"):
        assert ((logits[name] - want).norm() / want.norm()).item() < 0.02, name


def test_the_kernel_is_used_wherever_torch_has_it():
    """Not a skip where it should run: on x86 CPUs torch 2.13 packs in one of LAYOUTS."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX2", "DEFAULT"):
        pytest.skip("another CPU: its layout is not known here")
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no CPU int4 kernel")
    assert kernel_available()


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_each_cpu_s_layout_is_read_right(capability):
    """torch packs for AVX-512, AVX2 and the plain build differently; each is found and
    read right (torch told, as for a CPU without AVX-512, to use the lesser code)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from quant import get_format\n"
        "from quant.cpu_int4 import Int4CpuPacked, _probe\n"
        f"assert _probe() == {capability!r}, _probe()\n"
        "cpu, int4 = Int4CpuPacked(), get_format('int4')\n"
        "w = torch.randn(128, 192).bfloat16(); x = torch.randn(3, 192)\n"
        "p = cpu.quantize(w)\n"
        "ref = int4.dequantize(int4.quantize(w), (128, 192), torch.float32)\n"
        "got = cpu.dequantize(p, (128, 192), torch.float32)\n"
        "assert ((got - ref).norm() / ref.norm()) < 1e-2\n"
        "y, want = cpu.linear(x, p, (128, 192)), x @ got.T\n"
        "assert ((y - want).norm() / want.norm()) < 1e-2\n"
        "print('ok')\n"
    )
    import os

    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    if "no CPU int4 kernel" in r.stderr or (
        r.returncode and "_probe() == " in r.stderr and "None" in r.stderr
    ):
        pytest.skip("this torch has no CPU int4 kernel")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@needs_kernel
def test_a_torch_that_packs_otherwise_makes_the_store_stale_or_is_not_used(tiny_model, home, monkeypatch):
    import quant.cpu_int4 as cpu_int4
    from runtime.checkpoint import Checkpoint
    from runtime.expert_store import open_store
    from runtime.model_spec import describe_model

    ckpt = Checkpoint(tiny_model("mixtral", intermediate_size=128))
    spec = describe_model(ckpt)
    _, first = open_store(ckpt, spec, Int4CpuPacked(), home=home)
    assert first.action == "converted" and first.path.name == "int4-cpu"

    def first_layout(home):
        import json

        return json.loads((first.path / "manifest.json").read_text())["quant"]["params"]["packing"]

    other = "avx2" if first_layout(home) != "avx2" else "default"  # as packed on another CPU
    monkeypatch.setattr(cpu_int4, "_probe", lambda: other)
    _, again = open_store(ckpt, spec, Int4CpuPacked(), home=home)
    assert again.action == "rebuilt" and "quantization settings changed" in again.reason
    monkeypatch.setattr(cpu_int4, "_probe", lambda: None)  # no kernel, or one that packs unlike _unpack_codes
    assert not isinstance(cpu_variant(get_format("int4"), [(256, 64), (64, 128)]), Int4CpuPacked)


@needs_kernel
@pytest.mark.parametrize("kernels", ["1", "0"])
def test_the_banner_names_the_kernel_only_when_it_runs(kernels, tiny_model, monkeypatch, capsys):
    from promoe_cli.loading import banner
    from runtime.loader import LoadOptions, load_model

    monkeypatch.setenv("PROMOE_KERNELS", kernels)
    lm = load_model(
        str(tiny_model("mixtral", intermediate_size=128)), LoadOptions(quant="int4", device="cpu")
    )
    try:
        banner(lm)
        assert ("torch's CPU int4 kernel" in capsys.readouterr().err) == (kernels == "1")
    finally:
        lm.close()


@needs_kernel
def test_host_misses_beside_a_gpu_keep_one_store_in_the_cpu_layout(tiny_model, monkeypatch):
    """With --host-misses on a GPU, the CPU computes misses from the host store, so the store
    is in torch's CPU layout (the GPU reads it too): only while experts can miss."""
    from runtime.checkpoint import Checkpoint
    from runtime.loader import LoadOptions, expert_format
    from runtime.memory_plan import default_context, plan_memory
    from runtime.model_spec import describe_model
    from tests.helpers import budget_for_slots

    path = tiny_model("mixtral", intermediate_size=128)
    spec, int4 = describe_model(Checkpoint(path)), get_format("int4")
    ctx = default_context(spec.config, None)
    few = plan_memory(spec, int4, budget=budget_for_slots(path, "int4", 2), dtype=torch.float32, context=ctx)
    every = plan_memory(spec, int4, budget=None, dtype=torch.float32, context=ctx)
    assert few.slots < spec.total_experts <= every.slots
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU

    def stored(device, plan, **kw):
        return expert_format(int4, spec, device, LoadOptions(quant="int4", **kw), plan).store_name

    assert stored(cuda, few, host_misses=True) == "int4-cpu"
    assert stored(cuda, few) == "int4"  # no host misses: the GPU's own layout
    assert stored(cuda, every, host_misses=True) == "int4"  # nothing can miss
    assert stored(cuda, every, host_misses=True, retain=False) == "int4-cpu"  # on-demand: everything misses
    assert stored(cpu, few) == "int4-cpu"
    monkeypatch.setenv("PROMOE_KERNELS", "0")
    assert stored(cuda, few, host_misses=True) == "int4"


@needs_kernel
def test_packing_a_block_of_rows_at_a_time_gives_the_same_bytes(monkeypatch):
    """quantize() of a whole matrix (as a conversion on a GPU calls it) packs its codes for
    torch a block of rows at a time, keeping int32 codes to a block's size: same bytes."""
    import quant.base
    import quant.cpu_int4 as cpu_int4

    cpu, w = Int4CpuPacked(), _weight((320, 128), seed=3)
    whole = cpu.quantize(w)
    sizes = []
    real = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    monkeypatch.setattr(quant.base, "CPU_BLOCK_ELEMENTS", 130 * 128)  # blocks of 128 rows, then 64
    monkeypatch.setattr(cpu_int4.torch.ops.aten, "_convert_weight_to_int4pack_for_cpu",
                        lambda c, k: sizes.append(c.shape[0]) or real(c, k), raising=False)  # fmt: skip
    blocks = cpu.quantize(w)
    assert sizes == [128, 128, 64]
    for k, v in whole.items():
        assert torch.equal(blocks[k], v), k


@needs_kernel
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])  # gpt_oss: experts with biases
def test_int4_cpu_is_repacked_from_an_int4_store_bit_for_bit(arch, tiny_model, home, monkeypatch):
    """An int4-cpu store is built from a valid int4 store of the same checkpoint (the same
    codes, repacked; the checkpoint is not read), with the bytes a conversion from the
    checkpoint gives; a damaged int4 store is never repacked."""
    import runtime.expert_store as es
    from runtime.checkpoint import Checkpoint
    from runtime.expert_store import open_store
    from runtime.model_spec import describe_model
    from runtime.store_paths import model_dir

    path = tiny_model(arch, intermediate_size=128)
    ckpt = Checkpoint(path)
    spec = describe_model(ckpt)
    assert spec.expert_shape.has_bias == (arch == "gpt_oss")
    direct, rep = open_store(ckpt, spec, Int4CpuPacked(), home=home)  # from the checkpoint
    assert rep.source == "the checkpoint"
    want = {layer: direct.rows(layer).clone() for layer in spec.moe_layers}
    es.discard(direct.path)

    open_store(ckpt, spec, get_format("int4"), home=home)
    reads = []
    real = es.read_expert
    monkeypatch.setattr(es, "read_expert", lambda *a: reads.append(a[2:]) or real(*a))
    repacked, rep = open_store(ckpt, spec, Int4CpuPacked(), home=home)
    assert rep.action == "converted" and rep.source == "the int4 store" and reads == []
    assert repacked.manifest["converted_from"] == "the int4 store"
    for layer in spec.moe_layers:
        assert torch.equal(repacked.rows(layer), want[layer]), layer
    es.discard(repacked.path)

    int4_manifest = model_dir(home, path) / "int4" / "manifest.json"
    good = int4_manifest.read_text()
    for key, value in (("source", {"config_sha256": "another checkpoint"}), ("quant", {"name": "int4"})):
        stale = json.loads(good)
        stale[key] = value  # an int4 store of another checkpoint, or other settings: not repacked
        int4_manifest.write_text(json.dumps(stale))
        other, rep = open_store(ckpt, spec, Int4CpuPacked(), home=home)
        assert rep.source == "the checkpoint", key
        es.discard(other.path)
    for damage in ("[]", '{"files": []}', "not json"):  # damaged: never a crash, the checkpoint is read
        int4_manifest.write_text(damage)
        other, rep = open_store(ckpt, spec, Int4CpuPacked(), home=home)
        assert rep.source == "the checkpoint", damage
        es.discard(other.path)
    int4_manifest.write_text(good)
    int4_file = model_dir(home, path) / "int4" / "layer-000.safetensors"
    data = bytearray(int4_file.read_bytes())
    data[-100] ^= 0xFF  # a damaged int4 store: converted from the checkpoint instead
    int4_file.write_bytes(bytes(data))
    rebuilt, rep = open_store(ckpt, spec, Int4CpuPacked(), home=home)
    assert rep.source == "the checkpoint" and reads
    for layer in spec.moe_layers:
        assert torch.equal(rebuilt.rows(layer), want[layer]), layer
