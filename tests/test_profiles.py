"""Device profiles: shipped ones validate, broken ones name the field, lookup, apply rules, profile-device."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from promoe_cli.main import app
from runtime.device_profile import (
    FIGURES,
    DeviceProfile,
    apply_profile,
    available_profiles,
    check_name,
    load_profile,
    parse_flops,
    parse_profile,
    profile_to_toml,
    shipped_dir,
    write_profile,
)
from runtime.errors import InvalidSizeError, ProfileError
from runtime.loader import LoadOptions
from tests.test_cli import one_line_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

runner = CliRunner()
SHIPPED = ["jetson-orin-nano-8gb", "jetson-agx-orin-64gb", "rtx3060-laptop-6gb", "rtx4060-laptop-8gb",
           "rtx4090-24gb", "cpu"]  # fmt: skip
GIB = 2**30


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_validate(name):
    p = load_profile(name)
    assert p.path.parent == shipped_dir()
    assert set(FIGURES) - set(p.figures) <= {"link_bandwidth_pageable"}
    assert 0 < p.reserved_memory < p.device_memory
    assert all(f.kind in ("datasheet", "estimate") for f in p.figures.values())  # shipped: never "measured"
    assert p.unified == (name.startswith("jetson") or name == "cpu")
    assert p.device_type == ("cpu" if name == "cpu" else "cuda")


def test_shipped_figures_are_the_datasheets():
    nano, laptop, big = (
        load_profile("jetson-orin-nano-8gb"),
        load_profile("rtx3060-laptop-6gb"),
        load_profile("rtx4090-24gb"),
    )
    assert nano.device_memory == 8 * GIB and nano.value("device_bandwidth") == 68e9
    assert laptop.device_memory == 6 * GIB and laptop.value("device_bandwidth") == 336e9
    assert big.device_memory == 24 * GIB and big.value("device_bandwidth") == 1008e9
    assert laptop.link_bandwidth < 15.75e9  # achievable, below even a PCIe 4.0 x8 link's nominal rate


def _valid() -> dict:
    return tomllib.loads((shipped_dir() / "rtx3060-laptop-6gb.toml").read_text())


def _broken(change) -> dict:
    data = _valid()
    change(data)
    return data


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d["link_bandwidth"].update(value="fast"), "link_bandwidth.value"),
        (lambda d: d["link_latency"].update(value="10 parsecs"), "link_latency.value"),
        (lambda d: d.pop("device_memory"), "device_memory"),
        (lambda d: d.update(link_bandwith={"value": "1GB/s", "source": "estimate: x"}), "link_bandwith"),
        (lambda d: d["compute"].update(source="a blog"), "compute.source"),
        (lambda d: d["reserved_memory"].update(value="7GiB"), "reserved_memory"),
        (lambda d: d.update(device_type="tpu"), "device_type"),
        (lambda d: d.update(unified="yes"), "unified"),
        (lambda d: d.update(host_memory="16GB"), "host_memory"),
        (lambda d: d["device_memory"].update(unit="GB"), "device_memory.unit"),
        (lambda d: d.update(dequant={"int4": -1.0}), "dequant.int4"),
        (lambda d: d.update(description=5), "description"),
        (lambda d: d.update(unified=1), "unified"),  # a number is not a bool
        (lambda d: d["reserved_memory"].update(value="6GiB"), "reserved_memory"),  # equal is not smaller
        (lambda d: d["reserved_memory"].update(value=-1), "reserved_memory.value"),
        (lambda d: d["device_memory"].update(value=True), "device_memory.value"),
        (lambda d: d["compute"].update(value=False), "compute.value"),
        (lambda d: d["device_memory"].update(value="six"), "device_memory.value"),
        (lambda d: d["compute"].update(value="22TFLOPZ"), "compute.value"),  # not a FLOPS unit
        (lambda d: d["compute"].update(value="22TB/s"), "compute.value"),
        (lambda d: d["compute"].update(value="0TFLOPS"), "compute.value"),
        (lambda d: d["device_memory"].update(source="datasheet"), "device_memory.source"),  # no colon
        (lambda d: d["link_latency"].pop("source"), "link_latency.source"),
        (lambda d: d["compute"].update(source=5), "compute.source"),
        (lambda d: d["compute"].update(source="rumour: a blog"), "compute.source"),  # not a known kind
        (lambda d: d.update(link_bandwidth_pageable={"value": "fast", "source": "measured: x"}),
         "link_bandwidth_pageable.value"),  # an optional figure is validated too
        (lambda d: d.update(link_bandwidth_pageable="3GB/s"), "link_bandwidth_pageable"),
        (lambda d: d.update(dequant=5), "dequant"),
        (lambda d: d.update(dequant={"source": "measured: x", "int4": 0}), "dequant.int4"),
        (lambda d: d.update(dequant={"source": "measured: x", "int4": True}), "dequant.int4"),
        (lambda d: d.update(dequant={"source": "measured: x", "int4": "2e9"}), "dequant.int4"),
        (lambda d: d.update(dequant={"int4": 2e9}), "dequant.source"),
        (lambda d: d.update(dequant={"source": "a blog", "int4": 2e9}), "dequant.source"),
        (lambda d: d.update(dequant={"source": 5, "int4": 2e9}), "dequant.source"),
        (lambda d: d.update(dequant={"source": "rumour: a blog", "int4": 2e9}), "dequant.source"),
        (lambda d: d["compute"].update(value=float("inf")), "compute.value"),
        (lambda d: d["compute"].update(value="1e999TFLOPS"), "compute.value"),
        (lambda d: d["link_latency"].update(value="1e999s"), "link_latency.value"),
        (lambda d: d["device_memory"].update(value="1e999GB"), "device_memory.value"),  # was OverflowError
        (lambda d: d.update(reserved_memory={"value": 0, "source": "estimate: x"},
                            device_memory={"value": 0.5, "source": "estimate: x"}), "device_memory.value"),
        (lambda d: d["host_memory"].update(value=16e9 + 0.5), "host_memory.value"),
        (lambda d: d.update(dequant={"source": "measured: x", "int4": float("nan")}), "dequant.int4"),
        (lambda d: d.update(dequant={"source": "measured: x", "int4": float("inf")}), "dequant.int4"),
        (lambda d: d.update(dequant={"source": "measured", "int4": 2e9}), "dequant.source"),  # no colon
    ],
)  # fmt: skip
def test_broken_profile_names_the_field(change, field):
    with pytest.raises(ProfileError) as exc:
        parse_profile(_broken(change), name="broken")
    assert f"field '{field}'" in str(exc.value) and exc.value.hint


@pytest.mark.parametrize("fname", sorted(set(FIGURES) - {"reserved_memory"}))
@pytest.mark.parametrize("value", [0, 0.0, -1])
def test_a_figure_must_be_positive(fname, value):
    """A bare number is the base unit; zero or less is no figure (only a reserve may be 0)."""
    data = _broken(lambda d: d.update({fname: {"value": value, "source": "estimate: x"}}))
    with pytest.raises(ProfileError, match=f"field '{fname}.value' must be positive"):
        parse_profile(data, name="broken")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("unified"), "field 'unified' is missing"),
        (lambda d: d.pop("device_type"), "field 'device_type' is missing"),
        (lambda d: d.pop("compute"), "field 'compute' is missing"),
        (lambda d: d["compute"].pop("value"), "field 'compute.value' is missing"),
        (lambda d: d["host_memory"].update(value=True), "field 'host_memory.value' must be a number or"),
        (lambda d: d["compute"].update(value="22TFLOPZ"), "field 'compute.value' is not a flops"),
        (lambda d: d["reserved_memory"].update(value="6GiB"), "field 'reserved_memory' .* must be smaller"),
        (
            lambda d: d["link_bandwidth"].update(value=float("inf")),
            "field 'link_bandwidth.value' must be finite",
        ),
        (lambda d: d["host_memory"].update(value=0.5), "field 'host_memory.value' is a fraction of a byte"),
    ],
)
def test_a_broken_field_says_what_is_wrong(change, message):
    with pytest.raises(ProfileError, match=message):
        parse_profile(_broken(change), name="broken")


def test_what_a_profile_may_be_is_accepted():
    """The limits of the checks above: a reserve of 0, a bare number in the base unit, an
    optional figure, a dequant table with its source, a description left out."""

    def change(d):
        d.pop("description")
        d["reserved_memory"].update(value=0)
        d["device_memory"].update(value=6 * GIB)
        d["link_bandwidth"].update(value=12e9)
        d["link_bandwidth_pageable"] = {"value": "3GB/s", "source": "measured: x"}
        d["dequant"] = {"source": "measured: x", "int4": 2e9, "nf4": 1}

    p = parse_profile(_broken(change), name="ok")
    assert (p.reserved_memory, p.device_memory, p.link_bandwidth) == (0, 6 * GIB, 12e9)
    assert p.value("link_bandwidth_pageable") == 3e9 and p.description == ""
    assert p.dequant == {"int4": 2e9, "nf4": 1.0} and p.dequant_source == "measured: x"
    p = parse_profile(_broken(lambda d: d["reserved_memory"].update(value=6 * GIB - 1)), name="ok")
    assert p.reserved_memory == p.device_memory - 1


@pytest.mark.parametrize("text", ["22TFLOPZ", "fast", "-5TFLOPS", "22 TB/s", "TFLOPS"])
def test_parse_flops_refuses_what_is_not_a_compute_rate(text):
    with pytest.raises(InvalidSizeError, match="is not a compute rate"):
        parse_flops(text)


def test_parse_flops_reads_its_units():
    assert parse_flops("22TFLOPS") == 22e12 and parse_flops("500 gflops/s") == 500e9
    assert parse_flops("1.5e3MFLOPS") == 1.5e9 and parse_flops("7flops") == 7.0


@pytest.mark.parametrize("name", ["../evil", "a/b", "Big", "", "-lead", "x" * 65, "ok name"])
def test_a_profile_name_must_be_plain(name):
    with pytest.raises(ProfileError, match="is not a usable profile name"):
        check_name(name)
    assert check_name("my-box_2.0") == "my-box_2.0" and check_name("x" * 64)


def test_a_missing_profile_file_and_one_not_utf8(tmp_path):
    with pytest.raises(ProfileError, match="no device profile file"):
        load_profile(str(tmp_path / "nowhere.toml"))
    f = tmp_path / "latin.toml"
    f.write_bytes(b'description = "caf\xe9"\n')
    with pytest.raises(ProfileError, match="is not valid TOML"):
        load_profile(str(f))


def test_a_profile_that_would_not_load_is_not_written(home):
    p = load_profile("cpu")
    broken = DeviceProfile(p.name, p.description, p.device_type, p.unified,
                           {**p.figures, "reserved_memory": p.figures["device_memory"]})  # fmt: skip
    with pytest.raises(ProfileError, match="field 'reserved_memory'"):
        write_profile(broken, "broken")
    assert not (home / "profiles" / "broken.toml").exists()


def _write_user_profile(home, name: str, text: str):
    d = home / "profiles"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.toml").write_text(text)


def test_broken_profile_through_the_cli(tiny_model, home):
    text = (shipped_dir() / "rtx3060-laptop-6gb.toml").read_text().replace('"12GB/s"', '"twelve"')
    _write_user_profile(home, "broken", text)
    for args in (["plan", tiny_model("mixtral")], ["chat", tiny_model("mixtral"), "--prompt", "x"]):
        one_line_error(invoke(*args, "--profile", "broken"), 2, "field 'link_bandwidth.value'", "broken.toml")
    _write_user_profile(home, "notoml", "device_memory = [")
    one_line_error(invoke("plan", tiny_model("mixtral"), "--profile", "notoml"), 2, "not valid TOML")


def test_unknown_profile_lists_the_available_ones(tiny_model, home):
    _write_user_profile(home, "mine", (shipped_dir() / "cpu.toml").read_text())
    r = invoke("plan", tiny_model("mixtral"), "--profile", "rtx9090")
    one_line_error(
        r, 2, "unknown device profile 'rtx9090'", "rtx3060-laptop-6gb", "jetson-orin-nano-8gb", "mine"
    )


def test_user_profile_shadows_a_shipped_one(home):
    text = (shipped_dir() / "rtx4090-24gb.toml").read_text().replace('"24GiB"', '"20GiB"')
    _write_user_profile(home, "rtx4090-24gb", text)
    p = load_profile("rtx4090-24gb")
    assert p.device_memory == 20 * GIB and p.path.parent == home / "profiles"
    assert available_profiles()["rtx4090-24gb"] == p.path


def test_a_path_is_read_as_is(tmp_path):
    f = tmp_path / "box.toml"
    f.write_text((shipped_dir() / "cpu.toml").read_text())
    assert load_profile(str(f)).name == "box"


def test_gpu_profile_without_cuda_emulates_its_link():
    opts = LoadOptions()
    apply_profile(opts, "rtx3060-laptop-6gb", cuda_available=False)
    assert (opts.vram, opts.reserved, opts.unified) == (6 * GIB, 500_000_000, False)
    assert (opts.link_bandwidth, opts.link_latency) == (12e9, pytest.approx(10e-6))
    opts = LoadOptions(device="cpu")  # --device cpu on a CUDA machine: emulated too
    apply_profile(opts, "jetson-orin-nano-8gb", cuda_available=True)
    assert opts.unified and opts.link_bandwidth == 20e9


def test_gpu_profile_on_cuda_sizes_the_budget_only():
    opts = LoadOptions()
    apply_profile(opts, "rtx4090-24gb", cuda_available=True)
    assert opts.vram == 24 * GIB and opts.link_bandwidth is None and opts.link_latency == 0.0


def test_cpu_profile_picks_the_cpu_and_its_real_copy():
    opts = LoadOptions()
    apply_profile(opts, "cpu", cuda_available=True)
    assert opts.device == "cpu" and opts.unified and opts.link_bandwidth is None


def test_explicit_flags_win_over_the_profile():
    from promoe_cli.loading import load_options

    common = dict(quant="int4", context=None, device="cpu", dtype=None, policy="lru", slot_split="uniform",
                  prefetch="none", profile="rtx3060-laptop-6gb")  # fmt: skip
    opts = load_options(vram="4GB", link_bandwidth="1GB/s", link_latency=None, **common)
    assert (opts.vram, opts.reserved) == (4e9, 0)  # --vram is the whole budget
    assert opts.link_bandwidth == 1e9 and opts.link_latency == pytest.approx(
        10e-6
    )  # latency from the profile
    opts = load_options(vram=None, link_bandwidth=None, link_latency="1ms", **common)
    assert opts.vram == 6 * GIB and opts.reserved == 500_000_000 and opts.link_latency == pytest.approx(1e-3)


def test_toml_round_trip():
    p = load_profile("jetson-agx-orin-64gb")
    q = parse_profile(tomllib.loads(profile_to_toml(p)), name=p.name)
    for name, fig in p.figures.items():
        assert q.figures[name].source == fig.source
        assert q.figures[name].value == pytest.approx(fig.value, rel=1e-3)


def test_profile_device_writes_a_profile_that_plan_finds(tiny_model, home):
    r = invoke("profile-device", "--quick", "--write", "this-box")
    assert r.exit_code == 0, r.output
    assert "matmul" in r.stdout and "per-copy latency" in r.stdout and "dequantize int4" in r.stdout
    assert "not applicable" in r.stdout or "pinned" in r.stdout  # CPU: says what does not apply
    p = load_profile("this-box")
    assert p.path == home / "profiles" / "this-box.toml"
    assert all(f.kind == "measured" for f in p.figures.values()) and p.dequant
    r = invoke("plan", tiny_model("mixtral"), "--profile", "this-box", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["budget"] == p.device_memory


def test_probe_figures_follow_the_stated_conventions(monkeypatch):
    """With every timed call taking 0.5 s, each figure is its formula: bytes of the largest
    copy a second, read + write of a device copy, 2 n^3 flops of a matmul, weights dequantized."""
    from runtime import device_probe

    fns = []
    monkeypatch.setattr(device_probe, "median_seconds", lambda fn, *a: fns.append(fn) or 0.5)
    s = device_probe.QUICK
    r = device_probe.probe_device("cpu", s)
    assert fns and all(c.pinned is False and c.seconds == 0.5 for c in r.copies)
    assert [c.size for c in r.copies] == list(s.sizes) and r.latency == 0.5
    assert r.device_bandwidth == 2 * max(s.sizes) / 0.5
    assert r.matmul_flops == 2 * s.matmul_n**3 / 0.5 and r.matmul_dtype == "float32"
    n = s.dequant_shape[0] * s.dequant_shape[1]
    assert r.dequant and all(rate == n / 0.5 for rate in r.dequant.values())
    prof = r.to_profile("fake")
    assert prof.figures["link_bandwidth"].value == max(s.sizes) / 0.5
    assert prof.figures["reserved_memory"].value == r.device_memory - r.device_free
    assert prof.figures["compute"].value == r.matmul_flops and prof.dequant == r.dequant


def test_profile_device_json_and_bad_name():
    r = invoke("profile-device", "--quick", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    sizes = {c["bytes"] for c in data["copies"]}
    assert sizes == {1_000_000, 4_000_000, 16_000_000} and data["matmul_flops"] > 0
    one_line_error(invoke("profile-device", "--quick", "--write", "../evil"), 2, "not a usable profile name")


def test_profile_device_without_bitsandbytes_skips_nf4_and_says_so(monkeypatch):
    """A format whose library is missing is left out of the measurements and listed as not
    applicable; the other formats are still measured (the GPU machines have no bitsandbytes)."""
    from quant.nf4 import NF4

    def missing(self, w):
        raise ImportError("No module named 'bitsandbytes'", name="bitsandbytes")

    monkeypatch.setattr(NF4, "quantize", missing)
    r = invoke("profile-device", "--quick", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert "nf4" not in data["dequant_weights_per_s"] and "int4" in data["dequant_weights_per_s"]
    assert any("nf4" in line and "bitsandbytes" in line for line in data["not_applicable"])


def test_profile_device_goes_on_when_a_format_fails_on_the_device(monkeypatch):
    """bitsandbytes without a native library for this CUDA imports, then raises at its
    first call: that format is listed as failed, the rest of the profile is still measured."""
    from quant.nf4 import NF4

    def broken(self, parts, shape, dtype):
        raise RuntimeError("CUDA Setup failed despite GPU being available.\nmore lines")

    monkeypatch.setattr(NF4, "dequantize", broken)
    r = invoke("profile-device", "--quick", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert "nf4" not in data["dequant_weights_per_s"] and "int4" in data["dequant_weights_per_s"]
    note = "dequantize nf4: failed on this device (CUDA Setup failed despite GPU being available.)"
    assert note in data["not_applicable"]


def test_gpu_timings_come_from_events_around_several_calls(monkeypatch):
    """On CUDA the probe times with events on the stream, ``inner`` calls a sample, and
    reports one call's share (stand-in events: each elapsed_time is the next of a list)."""
    import torch

    from runtime import device_probe

    elapsed_ms = iter([8.0, 4.0, 6.0])
    log = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self, stream=None):
            log.append("record")

        def synchronize(self):
            log.append("sync")

        def elapsed_time(self, other):
            return next(elapsed_ms)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    calls = []
    t = device_probe.gpu_seconds(lambda: calls.append(1), warmup=2, repeats=3, inner=4)
    assert len(calls) == 2 + 3 * 4
    assert t == pytest.approx(6.0 / 1e3 / 4)  # the median sample, per call
    assert log == ["record", "record", "sync"] * 3


def test_profile_device_warns_when_other_processes_keep_the_cpu_busy(home, monkeypatch):
    """Measured next to a busy process, copies come out 100x slow: say so, also when saving."""
    import promoe_cli.profile_device as pd

    monkeypatch.setattr(pd, "_others_cpu_percent", lambda: 95.0)
    r = invoke("profile-device", "--quick", "--write", "busy-box")
    assert r.exit_code == 0, r.output
    assert "the machine looks busy: 95%" in r.stderr and "saved anyway" in r.stderr
    monkeypatch.setattr(pd, "_others_cpu_percent", lambda: 3.0)
    assert "busy" not in invoke("profile-device", "--quick").stderr
