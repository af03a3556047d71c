"""promoe bench: every configuration measured on the same prompts; trace replay through the cache."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from promoe_cli.main import app
from runtime.bench_report import METRICS, BenchReport, ConfigResult
from tests.conftest import SHARED

runner = CliRunner()


@pytest.fixture(scope="module")
def bench_json(tiny_model, tmp_path_factory):
    """One run of every configuration on the CPU (its emulated link and budget), as JSON."""
    path = tiny_model("mixtral")
    trace = tmp_path_factory.mktemp("bench") / "trace.jsonl"
    with pytest.MonkeyPatch.context() as mp:  # a home of its own: no predictor another test trained
        mp.setenv("PROMOE_HOME", str(tmp_path_factory.mktemp("bench-home")))
        r = runner.invoke(app, ["bench", str(path), "--prompt-len", "24", "--gen-len", "6", "--repeats", "2",
                                "--quant", "int8", "--device", "cpu", "--json", "--trace-out", str(trace)])  # fmt: skip
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout), trace, r.stderr


def test_every_configuration_reports_every_field(bench_json):
    data, *_ = bench_json
    by_name = {c["name"]: c for c in data["configs"]}
    assert list(by_name) == ["resident", "on-demand", "lru", "lfu", "arc", "cross-layer", "learned", "low-bit",
                             "host-misses", "transformers", "accelerate"]  # fmt: skip
    for name in ("resident", "on-demand", "lru", "lfu", "arc", "cross-layer", "low-bit", "host-misses"):
        c = by_name[name]
        assert c["status"] == "ok", c
        for m in ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s", "hit_rate", "decode_hit_rate",
                  "bytes_per_token", "stall_ms_per_token", "peak_device_bytes", "host_rss_bytes"):  # fmt: skip
            assert c[m] is not None and c[m]["min"] <= c[m]["median"] <= c[m]["max"], (name, m)
        assert c["speedup_decode_vs_on_demand"] > 0
    assert by_name["cross-layer"]["prediction_precision"]["median"] > 0
    assert by_name["on-demand"]["speedup_decode_vs_on_demand"] == 1.0
    base = by_name["on-demand"]["decode_tokens_per_s"]["median"]
    for name in ("resident", "lru", "cross-layer", "transformers"):  # each against on-demand's decode
        want = by_name[name]["decode_tokens_per_s"]["median"] / base
        assert by_name[name]["speedup_decode_vs_on_demand"] == pytest.approx(want, rel=1e-6), name
    assert by_name["learned"]["status"] == "skipped" and "train-predictor" in by_name["learned"]["note"]
    assert "--prefetch" not in by_name["learned"]["note"]  # bench has no such option
    assert by_name["accelerate"]["status"] == "skipped" and "CUDA" in by_name["accelerate"]["note"]
    assert by_name["transformers"]["status"] == "ok"
    assert "of uses from low-bit copies" in by_name["low-bit"]["note"]
    assert set(METRICS) <= set(by_name["resident"])


def test_resident_hits_everything_and_on_demand_keeps_nothing(bench_json, tiny_model):
    from runtime.bench import budget_for_fraction
    from runtime.loader import LoadOptions

    data, *_ = bench_json
    by_name = {c["name"]: c for c in data["configs"]}
    res, od = by_name["resident"], by_name["on-demand"]
    assert res["hit_rate"]["min"] == 1.0 and res["bytes_per_token"]["max"] == 0
    assert res["note"] == "upper bound: the emulated budget is lifted"  # on the CPU, said in its row
    assert od["hit_rate"]["max"] == 0.0 and od["bytes_per_token"]["min"] > 0  # no cross-token hits
    assert data["cache_experts"] == "16 of 32"  # --cache-fraction 0.5 by default
    # the budget emulated on the CPU, though resident (loaded first) lifts it for itself
    assert data["budget"] == budget_for_fraction(
        str(tiny_model("mixtral")), LoadOptions(quant="int8", device="cpu"), 0.5
    )
    assert data["link"].startswith("emulated")


def test_the_tracer_records_each_tokens_own_experts():
    from runtime.offload import RoutingTracer

    tracer = RoutingTracer()
    tracer.record(0, torch.tensor([[1, 2], [3, 4]]), torch.tensor([[0.6, 0.4], [0.7, 0.3]]))
    tracer.record(1, torch.tensor([[5, 6], [7, 0]]), torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    records = tracer.flush(10)
    assert [(r.token, r.layer, r.experts) for r in records] == [
        (10, 0, (1, 2)), (10, 1, (5, 6)), (11, 0, (3, 4)), (11, 1, (7, 0))
    ]  # fmt: skip
    assert records[2].weights == pytest.approx((0.7, 0.3))


def test_trace_out_records_the_run(bench_json):
    from runtime.trace import read_trace

    _, trace, _ = bench_json
    recs = read_trace(trace)
    assert {r.layer for r in recs} == {0, 1, 2, 3} and len({r.token for r in recs}) == 24 + 6 - 1


@pytest.mark.skipif(not (SHARED / "traces").is_dir(), reason="no shared traces")
def test_trace_replay_json():
    r = runner.invoke(app, ["bench", "--trace", str(SHARED / "traces" / "mixtral-8x7b-humaneval.jsonl"),
                            "--policy", "lfu", "--slots-per-layer", "4", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["hit_rate"] == pytest.approx(
        {"lfu": 0.6122, "lru": 0.5946, "arc": 0.5935, "belady": 0.7261}, abs=5e-5
    )
    r = runner.invoke(app, ["bench", "--trace", str(SHARED / "traces" / "mixtral-8x7b-humaneval.jsonl"),
                            "--policy", "lfu", "--slots-per-layer", "4"])  # fmt: skip
    assert r.exit_code == 0 and "offline optimum" in r.stdout


def test_bench_errors_are_one_line(tmp_path):
    r = runner.invoke(app, ["bench", "--trace", str(tmp_path / "none.jsonl")])
    assert r.exit_code == 2 and r.stderr.startswith("error: trace file") and "Traceback" not in r.output
    r = runner.invoke(app, ["bench", "--configs", "fastest", "--gen-len", "2"])
    assert r.exit_code != 0 and "fastest" in r.stderr


def test_quality_reports_every_format(tiny_model):
    r = runner.invoke(
        app, ["bench", str(tiny_model("mixtral")), "--quality", "--quality-tokens", "48", "--json"]
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["tokens"] == 48  # --quality-tokens of text scored
    rows = {row["name"]: row for row in data["rows"]}
    assert list(rows)[:6] == ["none", "int8", "int4", "nf4", "int3", "int2"]
    assert rows["none"]["agreement"] == 1.0 and rows["int8"]["agreement"] >= 0.9
    bits = [rows[n]["bits_per_weight"] for n in ("none", "int8", "int4", "int2")]
    assert bits == sorted(bits, reverse=True)
    mixed = next(row for name, row in rows.items() if "misses" in name)
    assert 0 < mixed["low_bit_share"] < 1 and mixed["perplexity"] > 0


def test_prompt_length_fits_the_model():
    from runtime.bench import fit_prompt_len
    from runtime.errors import PromoeError

    assert fit_prompt_len(512, None, 128) == 384  # the default shrinks to fit a short model
    assert fit_prompt_len(32768, None, 128) == 512 and fit_prompt_len(None, None, 128) == 512
    assert fit_prompt_len(512, 300, 128) == 300
    with pytest.raises(PromoeError, match="context of 512 tokens"):
        fit_prompt_len(512, 500, 128)


def test_prompt_too_long_for_the_model_is_one_line(tiny_model):
    r = runner.invoke(app, ["bench", str(tiny_model("mixtral")), "--prompt-len", "250", "--gen-len", "10"])
    assert r.exit_code == 2 and "context of 256 tokens" in r.stderr and "Traceback" not in r.output
    assert "emulated link" not in r.stderr  # refused before the link was measured
    r = runner.invoke(app, ["bench", str(tiny_model("mixtral")), "--gen-len", "300"])
    assert r.exit_code == 2 and "hint: use --gen-len 255 or less" in r.stderr, r.output
    r = runner.invoke(app, ["bench", str(tiny_model("mixtral")), "--quality", "--quality-tokens", "300"])
    assert r.exit_code == 2 and "256 positions" in r.stderr and "Traceback" not in r.output
    r = runner.invoke(app, ["bench", str(tiny_model("mixtral")), "--quality", "--configs", "lru"])
    assert r.exit_code == 2 and "--configs does not apply" in r.stderr and "Traceback" not in r.output


def test_configs_are_checked_before_anything_runs(tiny_model, home):  # home: no predictor trained there
    from runtime.bench_configs import ALL_CONFIGS

    r = runner.invoke(app, ["bench", "--help"], env={"COLUMNS": "400"})
    assert all(name in r.stdout for name in ALL_CONFIGS)  # the help lists what bench can run
    for bad, needle in (("warp", "unknown bench configuration 'warp'"), (",", "--configs is empty")):
        r = runner.invoke(app, ["bench", str(tiny_model("mixtral")), "--configs", bad])
        assert r.exit_code == 2 and r.stderr.startswith("error: " + needle), r.output
        assert "emulated link" not in r.stderr  # refused before the link was calibrated
    r = runner.invoke(app, ["bench", str(tiny_model("mixtral")), "--configs", "learned", "--gen-len", "4"])
    assert r.exit_code == 2 and "no configuration could run here (learned:" in r.stderr, r.output


def test_link_calibration_warns_on_a_busy_machine(tiny_model, monkeypatch):
    import itertools
    import time

    import runtime.offload
    from runtime.bench import BusyMachineWarning, calibrate_link
    from runtime.loader import LoadOptions

    real = runtime.offload.expert_mlp
    slow = itertools.cycle([False, True, True])  # two thirds of the runs are held up by "another process"

    def contended(*args, **kw):
        if next(slow):
            time.sleep(0.01)
        return real(*args, **kw)

    monkeypatch.setattr(runtime.offload, "expert_mlp", contended)
    with pytest.warns(BusyMachineWarning, match="the machine looks busy"):
        bandwidth, compute = calibrate_link(
            str(tiny_model("mixtral")), LoadOptions(quant="int8", device="cpu")
        )
    assert compute >= 0.01 and bandwidth > 0


def test_link_calibration_warns_when_other_processes_load_the_cpus(tiny_model, monkeypatch):
    """A load that never lets up slows every run alike: the spread cannot show it, the CPU time
    other processes used can."""
    import runtime.bench as bench
    from runtime.loader import LoadOptions

    seen = []

    def share(before, after):
        seen.append(after.wall - before.wall)
        return 0.6

    monkeypatch.setattr(bench, "others_cpu_share", share)
    with pytest.warns(bench.BusyMachineWarning, match="other processes used 60% of its CPU time"):
        bench.calibrate_link(str(tiny_model("mixtral")), LoadOptions(quant="int8", device="cpu"))
    assert seen and seen[0] >= 0.5  # long enough for CPU times counted in ticks


def test_other_processes_cpu_share():
    import subprocess
    import sys
    import time

    from runtime.device_probe import CpuSample, others_cpu_share

    a = CpuSample(wall=10.0, machine_busy=100.0, own=5.0, cores=2)
    b = CpuSample(wall=12.0, machine_busy=103.0, own=6.0, cores=2)  # 3 s busy in 4 core-seconds, 1 ours
    assert others_cpu_share(a, b) == pytest.approx(0.5)
    assert others_cpu_share(a, CpuSample(12.0, 101.0, 6.0, 2)) == 0.0  # only ours
    assert others_cpu_share(a, a) == 0.0

    spin = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"]
    )
    try:
        time.sleep(0.3)  # past its start-up
        before = CpuSample.now()
        time.sleep(1.0)
        after = CpuSample.now()
    finally:
        spin.kill()
        spin.wait()
    assert others_cpu_share(before, after) >= 0.7 / after.cores  # one core kept busy by another process


def test_cache_fraction_budget_never_exceeds_the_device(tiny_model, monkeypatch):
    import runtime.memory_plan as mp
    from runtime.bench import budget_for_fraction
    from runtime.loader import LoadOptions

    path, opts = str(tiny_model("mixtral")), LoadOptions(quant="int8", device="cpu")
    half = budget_for_fraction(path, opts, 0.5)  # the CPU sets no limit
    assert budget_for_fraction(path, opts, 1.0) > half
    monkeypatch.setattr(
        mp, "device_budget", lambda device, vram: half if vram is None else vram
    )  # a small GPU
    assert budget_for_fraction(path, opts, 1.0) == half


def _write_trace(path, *experts):
    """A trace of one layer, one record per token, with these expert lists."""
    path.write_text("".join(json.dumps({"token": t, "layer": 0, "experts": list(e)}) + "\n"
                            for t, e in enumerate(experts)))  # fmt: skip
    return path


def test_trace_replay_with_fewer_slots_than_top_k_is_a_usage_error(tmp_path):
    trace = _write_trace(tmp_path / "t.jsonl", (0, 1), (0, 1))  # 1 stays resident, 0 then needs its slot
    r = runner.invoke(app, ["bench", "--trace", str(trace), "--slots-per-layer", "1"])
    assert r.exit_code == 2, r.output
    assert r.stderr.splitlines() == [
        "error: --slots-per-layer 1 is too few: the trace routes each token to top-k = 2 experts per layer, "
        "so at least 2 slots per layer are needed",
        "hint: use --slots-per-layer 2 or more",
    ]
    r = runner.invoke(app, ["bench", "--trace", str(trace), "--slots-per-layer", "2", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["hit_rate"]["lru"] == 0.5


@pytest.mark.parametrize(
    ("experts", "needle"),
    [([99, -1], "expert id -1 is not a non-negative integer"), ([1, 1], "expert 1 is listed twice"),
     ([1, True], "expert id true is not"), ([1.5, 2], "expert id 1.5 is not"), ([], "no experts listed")],
)  # fmt: skip
def test_trace_replay_refuses_bad_expert_ids_naming_the_line(tmp_path, experts, needle):
    trace = _write_trace(tmp_path / "bad.jsonl", (0, 1), experts)
    r = runner.invoke(app, ["bench", "--trace", str(trace)])
    assert r.exit_code == 2, r.output
    lines = r.stderr.splitlines()
    assert (
        len(lines) == 2
        and lines[0].startswith(f"error: {trace}:2: {needle}")
        and lines[1].startswith("hint:")
    )


def test_trace_replay_of_a_folder_says_it_is_a_folder(tmp_path):
    r = runner.invoke(app, ["bench", "--trace", str(tmp_path)])
    assert r.exit_code == 2 and r.stderr.startswith(f"error: {tmp_path} is a folder, not a trace file"), (
        r.output
    )
    assert len(r.stderr.splitlines()) == 2


@pytest.mark.parametrize("extra", [["--configs", "lru"], ["--quality"], ["--plot", "x.png"],
                                   ["--trace-out", "t.jsonl"], ["mixtral"]])  # fmt: skip
def test_trace_replay_refuses_options_it_would_ignore(tmp_path, extra):
    trace = _write_trace(tmp_path / "t.jsonl", (0, 1), (0, 2))
    r = runner.invoke(app, ["bench", "--trace", str(trace), *extra])
    assert r.exit_code == 2, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and "cannot go with it" in lines[0] and lines[1].startswith("hint: drop ")
    assert r.stdout == ""


def test_a_budget_no_configuration_fits_is_the_budget_error(tiny_model):
    r = runner.invoke(app, ["bench", str(tiny_model("mixtral")), "--configs", "lru,on-demand", "--vram", "1KB",
                            "--repeats", "1", "--gen-len", "4", "--link-bandwidth", "off"])  # fmt: skip
    assert r.exit_code == 4, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: 1.0 KB is not enough: this model needs at least ")
    assert "MB" in lines[0] and "--configs" not in r.stderr and lines[1].startswith("hint: ")


def test_when_nothing_ran_the_hint_never_names_a_configuration_tried():
    from runtime.bench import nothing_ran_error
    from runtime.bench_report import ConfigResult
    from runtime.errors import InsufficientMemoryError, UsageError

    def failed(name, exc):
        return ConfigResult(name, status="skipped", note=str(exc), error=exc)

    def short(needed):
        return InsufficientMemoryError(
            f"needs {needed}", needed=needed, available=1, hint=f"give it {needed}"
        )

    assert nothing_ran_error([ConfigResult("lru"), failed("lfu", short(5))]) is None
    assert str(nothing_ran_error([failed("lru", short(9)), failed("on-demand", short(7)),
                                  ConfigResult("transformers", "skipped", "runs after a promoe configuration")])) \
        == "needs 7"  # fmt: skip
    e = nothing_ran_error([failed("lru", UsageError("no")), failed("learned", UsageError("untrained"))])
    assert isinstance(e, UsageError) and e.hint == "add one that can, e.g. --configs on-demand"
    assert "lru: no; learned: untrained" in str(e)
    e = nothing_ran_error([failed("lru", short(9)), failed("learned", UsageError("untrained"))])
    assert isinstance(e, UsageError) and e.hint == "give it 9"  # another configuration would not fit either
    from runtime.bench_configs import ALL_CONFIGS

    e = nothing_ran_error([failed(n, UsageError("no")) for n in ALL_CONFIGS])
    assert not any(f"--configs {n}" in e.hint for n in ALL_CONFIGS)
    e = nothing_ran_error([ConfigResult("transformers", "skipped", "runs after a promoe configuration")])
    assert e.hint == "add one that can, e.g. --configs lru"
    from runtime.errors import StoreError

    damaged = StoreError("the learned predictor in X is damaged", hint="train it again")
    assert (
        nothing_ran_error([failed("learned", damaged), failed("lru", UsageError("no"))]) is damaged
    )  # exit 5


def test_plot_without_matplotlib_is_refused_before_any_work(tiny_model, tmp_path, monkeypatch):
    import sys

    import runtime.bench

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError

    def no_work(*args, **kw):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(runtime.bench, "run_bench", no_work)
    monkeypatch.setattr(runtime.bench, "calibrate_link", no_work)
    png = tmp_path / "b.png"
    r = runner.invoke(app, ["bench", str(tiny_model("mixtral")), "--configs", "lru", "--plot", str(png)])
    assert r.exit_code == 2, r.output
    assert r.stderr.splitlines() == ["error: --plot needs matplotlib, which is not installed",
                                     "hint: pip install 'promoe[plot]'"]  # fmt: skip
    assert not png.exists()


@pytest.mark.parametrize("flag", ["--trace-out", "--plot"])
def test_output_paths_are_checked_before_any_work(tiny_model, tmp_path, monkeypatch, flag):
    """A folder, or a file in a folder that does not exist, is refused before the benchmark
    runs (--trace-out was written, and refused, only after it)."""
    import types

    import runtime.bench

    monkeypatch.setitem(sys.modules, "matplotlib", types.ModuleType("matplotlib"))  # installed or not

    def no_work(*args, **kw):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(runtime.bench, "run_bench", no_work)
    monkeypatch.setattr(runtime.bench, "calibrate_link", no_work)
    for path, needle in ((tmp_path, "is a folder"), (tmp_path / "no" / "x.out", "does not exist")):
        r = runner.invoke(app, ["bench", str(tiny_model("mixtral")), "--configs", "lru", flag, str(path)])
        assert r.exit_code == 2, r.output
        assert r.stderr.startswith(f"error: {flag} {path}") and needle in r.stderr, r.stderr


def test_a_skipped_configuration_keeps_its_error_without_its_frames(tiny_model):
    """The error is kept for the report, not the frames of the failed load, which can hold
    what it had allocated (page-locked layers) until the whole benchmark ends."""
    from runtime.bench import run_bench
    from runtime.errors import InsufficientMemoryError
    from runtime.loader import LoadOptions

    report = run_bench(str(tiny_model("mixtral")), LoadOptions(vram=1000, device="cpu"), ["lru"], gen_len=2,
                       repeats=1)  # fmt: skip
    (res,) = report.results
    assert res.status == "skipped" and isinstance(res.error, InsufficientMemoryError)
    assert res.error.__traceback__ is None and res.error.__context__ is None


def test_each_configuration_is_announced_as_it_finishes(bench_json):
    """A run stopped early still leaves what it measured: one stderr line per configuration,
    in the order they ran, with the decode figures the report holds."""
    data, _, stderr = bench_json
    ran = [c["name"] for c in data["configs"] if c["status"] == "ok"]
    lines = [
        line for line in stderr.splitlines() if line.split(":")[0] in {c["name"] for c in data["configs"]}
    ]
    assert [line.split(":")[0] for line in lines] == ran and "lfu" in ran
    lfu = next(c for c in data["configs"] if c["name"] == "lfu")
    assert f"lfu: decode {lfu['decode_tokens_per_s']['median']:.1f} tok/s" in stderr


def test_cache_fraction_budget_on_cuda_holds_that_fraction(monkeypatch):
    """On CUDA a plan of the free memory keeps a headroom back (5% of it), but a load with
    --vram does not: the --cache-fraction budget must not hand that headroom to the cache."""
    import dataclasses

    from runtime import memory_plan
    from runtime.bench import budget_for_fraction
    from runtime.loader import LoadOptions
    from runtime.memory_plan import plan_load

    free = 139 << 30  # an H200

    def cuda_like(device, opts):  # runtime.memory_plan.budget_inputs on a CUDA device
        if opts.vram is not None:
            return opts.vram, opts.reserved, False
        return free, max(memory_plan.CUDA_HEADROOM_MIN, int(free * memory_plan.CUDA_HEADROOM_FRACTION)), False

    monkeypatch.setattr(memory_plan, "budget_inputs", cuda_like)
    base = LoadOptions(device="cpu")
    vram = budget_for_fraction(None, base, 0.5)
    plan = plan_load(None, dataclasses.replace(base, vram=vram)).plan
    assert plan.slots == round(0.5 * plan.total_experts), f"{plan.slots} of {plan.total_experts} slots"


def test_bench_prompts_are_each_exactly_prompt_len():
    """A text shorter than every prompt together is repeated until the last prompt is whole."""
    from runtime.bench import bench_prompts

    def tok(text):
        return {"input_ids": list(range(100))}

    prompts = bench_prompts(tok, 64, 3)  # 4 prompts of 64 from 100 tokens
    assert [len(p) for p in prompts] == [64] * 4
    assert prompts[1] == list(range(64, 100)) + list(range(28))


def test_prompt_and_answer_may_fill_the_context_exactly():
    from runtime.bench import fit_prompt_len
    from runtime.errors import PromoeError

    assert fit_prompt_len(512, 384, 128) == 384
    with pytest.raises(PromoeError, match="context of 512 tokens"):
        fit_prompt_len(512, 385, 128)
    assert fit_prompt_len(512, None, 511) == 1
    with pytest.raises(PromoeError, match="leaves no room for a prompt"):
        fit_prompt_len(512, None, 512)


def _stats(**kw):
    from types import SimpleNamespace

    base = dict(prefill_tokens_per_s=100.0, decode_tokens_per_s=10.0, ttft_s=0.1, hit_rate=0.5,
                prediction_precision=None, prediction_recall=None, low_bit_loads=0, host_computed=0)  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def test_decode_figures_exclude_the_prefill(monkeypatch):
    """Hit rate, bytes and stall per token count from after the first token (the prefill's one
    invocation per layer touches nearly every expert), per decode step (tokens - 1)."""
    from types import SimpleNamespace

    import runtime.generate
    from runtime.bench import _run_promoe
    from runtime.generate import DoneEvent, TokenEvent

    first = _stats(generated_tokens=1, uses=100, hits=10, bytes_moved=1000, stall_s=0.5)
    last = _stats(generated_tokens=5, uses=140, hits=40, bytes_moved=1400, stall_s=0.9)
    reason = "length"

    def fake_stream(lm, prompt, cfg):
        assert cfg.max_new_tokens == 5 and cfg.temperature == 0 and cfg.ignore_eos
        yield TokenEvent(text="a", token_id=1, stats=first)
        yield TokenEvent(text="b", token_id=2, stats=last)
        yield DoneEvent("ab", [1, 2], reason, last)

    monkeypatch.setattr(runtime.generate, "stream_generate", fake_stream)
    lm = SimpleNamespace(device=torch.device("cpu"), plan=SimpleNamespace(device_total=123))
    run = _run_promoe(lm, [1, 2, 3], 5)
    assert run["decode_hit_rate"] == pytest.approx(30 / 40)
    assert run["bytes_per_token"] == pytest.approx(400 / 4)
    assert run["stall_ms_per_token"] == pytest.approx(1e3 * 0.4 / 4)
    assert (run["hit_rate"], run["uses"], run["hits"], run["peak_device_bytes"]) == (0.5, 140.0, 40.0, 123.0)
    reason = "interrupted"  # Ctrl-C inside the run: the benchmark stops, it does not time a cut-off run
    with pytest.raises(KeyboardInterrupt):
        _run_promoe(lm, [1, 2, 3], 5)


def test_each_configuration_loads_with_its_own_options():
    """The module's table of configurations, as load options."""
    from runtime.bench import _promoe_options
    from runtime.loader import LoadOptions

    base = LoadOptions(quant="int8", policy="lru", predictor="learned")

    def opts(name):
        return _promoe_options(name, base, "arc", 32, 4, low_bit="int3", low_bit_threshold=0.2)

    r = opts("resident")
    assert (r.predictor, r.max_slots, r.retain) == ("none", 32, True)  # a slot for every expert
    od = opts("on-demand")
    assert (od.predictor, od.retain, od.max_slots, od.policy) == ("none", False, 4, "lru")
    for name in ("lru", "lfu", "arc"):
        o = opts(name)
        assert (o.predictor, o.policy, o.low_bit, o.host_misses) == ("none", name, None, False)
    lb = opts("low-bit")
    assert (lb.predictor, lb.policy, lb.low_bit, lb.low_bit_threshold, lb.host_misses) == (
        "cross-layer", "arc", "int3", 0.2, False)  # fmt: skip
    hm = opts("host-misses")
    assert (hm.predictor, hm.policy, hm.low_bit, hm.host_misses) == ("cross-layer", "arc", None, True)
    for name in ("cross-layer", "learned"):
        o = opts(name)
        assert (o.predictor, o.policy, o.low_bit, o.host_misses) == (name, "arc", None, False)
    assert opts("lru").quant == "int8" and base.predictor == "learned"  # the base is copied, not changed


def test_cache_fraction_budget_gives_that_share_of_slots(tiny_model):
    """The budget holds round(fraction * experts) slots beside a profile's reserved memory, and
    never fewer than one slot per MoE layer."""
    import dataclasses

    from runtime.bench import budget_for_fraction
    from runtime.loader import LoadOptions
    from runtime.memory_plan import plan_load

    path = str(tiny_model("mixtral"))
    for reserved in (0, 3 << 20):
        base = LoadOptions(quant="int8", device="cpu", reserved=reserved)
        for fraction, want in ((0.25, 8), (0.0, 4)):  # 32 experts in 4 MoE layers
            vram = budget_for_fraction(path, base, fraction)
            plan = plan_load(path, dataclasses.replace(base, vram=vram)).plan
            assert (plan.total_experts, plan.slots) == (32, want), (reserved, fraction)


def test_link_calibration_sets_a_copy_to_ratio_times_the_median_compute(tiny_model, monkeypatch):
    """On a fake clock: ten slow warm-up runs are left out, a third of the rest take 1 ms and
    the others 3 ms. The median is 3 ms, three times the fastest: a spread over 2x is warned of;
    one expert's copy is set to take ``ratio`` times the median."""
    import itertools
    from types import SimpleNamespace

    import runtime.bench as bench
    import runtime.offload
    from quant import get_format
    from runtime.expert_layout import ExpertLayout
    from runtime.loader import LoadOptions
    from runtime.memory_plan import plan_load

    clock = SimpleNamespace(now=1e9)  # far past the real clock: the half-second minimum is met at once
    calls = itertools.count()

    def timed(*args, **kw):
        n = next(calls)
        clock.now += 0.1 if n < 10 else (1e-3 if n % 3 == 0 else 3e-3)

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr(runtime.offload, "expert_mlp", timed)
    monkeypatch.setattr(bench, "others_cpu_share", lambda before, after: 0.0)
    path, opts = str(tiny_model("mixtral")), LoadOptions(quant="int8", device="cpu")
    with pytest.warns(bench.BusyMachineWarning, match=r"took 1\.00 to 3\.00 ms \(median 3\.00\)"):
        bandwidth, compute = bench.calibrate_link(path, opts, ratio=5.0)
    assert compute == pytest.approx(3e-3, rel=1e-4)  # the fake clock counts from 1e9 s
    nbytes = ExpertLayout(plan_load(path, opts).spec.expert_shape, get_format("int8")).nbytes
    assert bandwidth == pytest.approx(nbytes / (5.0 * 3e-3), rel=1e-4)
    assert next(calls) == 60  # 60 runs: the clock says the half second has passed


def test_prefetching_configurations_use_the_best_reactive_policy(bench_json):
    """cross-layer, low-bit and host-misses evict with the reactive policy of the best decode
    hit rate in the same run (the first on a tie), and say which."""
    data, *_ = bench_json
    by_name = {c["name"]: c for c in data["configs"]}
    rates = {n: by_name[n]["decode_hit_rate"]["median"] for n in ("lru", "lfu", "arc")}
    best = max(rates, key=rates.get)
    for name in ("cross-layer", "low-bit", "host-misses"):
        assert by_name[name]["note"].startswith(f"policy {best}"), (rates, by_name[name]["note"])
    assert "computed on the host" in by_name["host-misses"]["note"]


def test_route_note_gives_each_routes_share_of_uses():
    from runtime.bench import _route_note

    runs = [
        {"uses": 10, "low_bit_loads": 2, "host_computed": 5},
        {"uses": 30, "low_bit_loads": 6, "host_computed": 3},
    ]
    assert _route_note(runs) == "20.0% of uses from low-bit copies, 20.0% computed on the host"
    runs[1]["host_computed"] = 15
    assert _route_note(runs) == "20.0% of uses from low-bit copies, 50.0% computed on the host"
    assert _route_note([{"uses": 0, "low_bit_loads": 0, "host_computed": 0}]) == ""


def test_resident_is_skipped_when_a_real_budget_cannot_hold_every_expert(tiny_model, monkeypatch):
    """On a real device (not an emulated budget) resident keeps the budget: with room for a
    quarter of the experts it is skipped, saying so, and its model is closed."""
    import runtime.bench as bench
    from runtime.loader import LoadedModel, LoadOptions

    closed = []
    real_close = LoadedModel.close
    monkeypatch.setattr(LoadedModel, "close", lambda self: (closed.append(self.name), real_close(self)))
    monkeypatch.setattr(bench, "emulated_budget", lambda opts: False)
    path = str(tiny_model("mixtral"))
    base = LoadOptions(quant="int8", device="cpu")
    base.vram = bench.budget_for_fraction(path, base, 0.25)
    report = bench.run_bench(path, base, ["resident", "lru"], prompt_len=8, gen_len=2, repeats=1)
    res, lru = report.results
    assert res.status == "skipped" and res.note == "every expert does not fit the budget (8 of 32 slots)"
    assert lru.status == "ok" and report.budget == base.vram
    assert len(closed) == 2  # each configuration's model closed: the skipped one and the one that ran


def test_transformers_baseline_times_prefill_then_cached_greedy_decode(tiny_model, monkeypatch):
    """One forward of the prompt, then gen_len - 1 of one token each on the KV cache, feeding
    transformers' own greedy tokens; on a clock that ticks once per reading, prefill is the
    prompt's tokens in one tick and decode gen_len - 1 tokens in the next."""
    from types import SimpleNamespace

    import runtime.baselines as baselines
    from tests.helpers import greedy_ids, reference_model

    model = reference_model(tiny_model("mixtral"))
    prompt = [5, 17, 42, 99, 7, 128, 64, 3]
    want = greedy_ids(model, prompt, 6)  # before the hook: transformers' own generate
    fed = []
    model.register_forward_pre_hook(
        lambda m, args, kw: fed.append(kw["input_ids"][0].tolist()), with_kwargs=True
    )
    ticks = iter(range(1, 100))
    monkeypatch.setattr(baselines, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    run = baselines._run_hf(model, prompt, 6, torch.device("cpu"))
    assert fed == [prompt] + [[t] for t in want[:5]]
    assert run["prefill_tokens_per_s"] == len(prompt) and run["ttft_s"] == 1.0
    assert run["decode_tokens_per_s"] == 5.0


def test_transformers_baseline_needs_the_prompts_and_a_budget_for_the_whole_model(tiny_model, monkeypatch):
    """Alone it has no prompts (it runs after a promoe configuration); under a real budget
    (not the CPU's emulated one) it runs only if every weight fits; it times ``repeats`` runs."""
    import runtime.baselines as baselines
    import runtime.bench as bench
    from runtime.loader import LoadOptions

    path = str(tiny_model("mixtral"))
    base = LoadOptions(quant="int8", device="cpu")
    (alone,) = bench.run_bench(path, base, ["transformers"], prompt_len=8, gen_len=2, repeats=1).results
    assert alone.status == "skipped" and "runs after a promoe configuration" in alone.note
    for module in (bench, baselines):
        monkeypatch.setattr(module, "emulated_budget", lambda opts: False)
    base.vram = bench.budget_for_fraction(path, base, 0.25)
    _, hf = bench.run_bench(path, base, ["lru", "transformers"], prompt_len=8, gen_len=2, repeats=2).results
    assert hf.status == "skipped" and hf.note == "the whole model does not fit the budget"
    base.vram = 1 << 30
    _, hf = bench.run_bench(path, base, ["lru", "transformers"], prompt_len=8, gen_len=2, repeats=2).results
    assert hf.status == "ok" and len(hf.runs) == 2


def _run(decode: float, **extra) -> dict:
    return {"prefill_tokens_per_s": 56.2, "decode_tokens_per_s": decode, "ttft_s": 0.5741, "decode_hit_rate": 0.786,
            "bytes_per_token": 1.77e6, "stall_ms_per_token": 33.1, "peak_device_bytes": 35_700_000, **extra}  # fmt: skip


def _report() -> BenchReport:
    on_demand = ConfigResult("on-demand", runs=[_run(14.0), _run(14.4)], speedup_decode=1.0)
    cross = ConfigResult("cross-layer+low-bit", note="policy lru", speedup_decode=1.43,
                         runs=[_run(20.2, prediction_precision=0.854, prediction_recall=0.6)])  # fmt: skip
    skipped = ConfigResult("resident", status="skipped", note="the budget cannot hold every expert")
    return BenchReport("tiny-code-moe", "cpu", "int4", 37_500_000, "32 of 64", "64.3 MB/s", 32, 8, 2,
                       [on_demand, cross, skipped])  # fmt: skip


@pytest.mark.parametrize("width", [160, 80])
def test_the_bench_table_keeps_every_cell_whole_at_any_width(width, monkeypatch):
    """On a wide terminal one table; on a narrow one, where its columns would be cut to a few
    letters, two: speed, then the cache's figures, each with the configurations' whole names."""
    from promoe_cli import bench_render

    console = Console(width=width, record=True, highlight=False)
    monkeypatch.setattr(bench_render, "out", console)
    bench_render.render_report(_report())
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines[1:]) <= width
    tables = sum(line.startswith("┏") for line in lines)
    assert tables == (1 if width == 160 else 2)
    headers, block = [], []  # each table's headers, their wrapped lines joined
    for line in [*lines, ""]:
        if line.startswith("┃"):
            block.append([c.strip() for c in line.strip("┃").split("┃")])
        elif block:
            headers += [" ".join(part for part in parts if part) for parts in zip(*block, strict=True)]
            block = []
    for col in ("config", "prefill tok/s", "decode tok/s", "speedup", "TTFT s", "hit rate", "pred P/R", "MB/tok",
                "stall ms/tok", "device mem"):  # fmt: skip
        assert col in headers, (col, headers)
    rows = [[c.strip() for c in line.strip("│").split("│")] for line in lines if line.startswith("│")]
    by_name: dict[str, list[str]] = {}
    for row in rows:
        by_name.setdefault(row[0], []).extend(row[1:])
    assert set(by_name) == {"on-demand", "cross-layer+low-bit"}  # the skipped one is said below
    assert by_name["on-demand"] == ["56", "14.2 (14.0–14.4)", "1.00x", "0.574", "0.786", "-", "1.77", "33.10",
                                    "35.7 MB"]  # fmt: skip
    assert by_name["cross-layer+low-bit"][5] == "0.85/0.60"
    said = " ".join(text.split())
    assert "cross-layer+low-bit: policy lru" in said
    assert "resident skipped: the budget cannot hold every expert" in said
    assert "resident: the budget" not in said  # said once, as why it was skipped
    assert "32-token prompts, 8 generated tokens; median (min–max) of 2 runs" in said
    assert said.startswith(
        "tiny-code-moe on cpu · int4 experts · budget 37.5 MB (cache 32 of 64 experts) · link 64.3"
    )
    one = _report()
    one.repeats = 1
    bench_render.render_report(one)
    assert "median (min–max) of 1 run;" in " ".join(console.export_text().split())


def _small_bench(path, *extra):
    return runner.invoke(app, ["bench", str(path), "--configs", "lru", "--prompt-len", "8", "--gen-len", "2",
                               "--repeats", "1", "--quant", "int8", "--device", "cpu", *extra])  # fmt: skip


def test_a_promoe_home_that_is_a_file_is_refused_before_any_work(tiny_model, tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("PROMOE_HOME", str(afile))
    r = _small_bench(tiny_model("mixtral"))
    assert r.exit_code == 2 and r.stderr.startswith(f"error: PROMOE_HOME={afile} is a file"), r.output
    assert "emulated link" not in r.stderr and r.stdout == ""  # the link was not measured first


def test_the_auto_link_keeps_a_given_latency_and_a_profiles_link_is_not_measured(
    tiny_model, home, monkeypatch
):
    """--link-latency goes with the measured bandwidth; a profile that emulates a link is that
    link, measured by nobody here; a busy machine during the measurement is said."""
    import runtime.bench as bench
    from runtime.bench import BusyMachineWarning
    from tests.test_memory_plan import _small_profile

    def calibrate(ref, base, ratio=4.0):
        import warnings

        warnings.warn(BusyMachineWarning("the machine looks busy: a test says so"), stacklevel=1)
        return 5e8, 1e-3

    monkeypatch.setattr(bench, "calibrate_link", calibrate)
    path = tiny_model("mixtral")
    r = _small_bench(path, "--link-latency", "50us", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["link"] == "emulated 500.0 MB/s, 50 us per copy"
    assert "the machine looks busy: a test says so" in r.stderr
    assert "one expert's decode compute takes 1.00 ms" in r.stderr
    assert re.search(r"^lru: decode [0-9.]+ tok/s, hit rate [0-9.]+$", r.stderr, re.M)  # as it finished
    _small_profile(home, "small-gpu", "1GB")
    r = _small_bench(path, "--profile", "small-gpu", "--json")
    assert r.exit_code == 0, r.output
    assert (
        json.loads(r.stdout)["link"].startswith("emulated 2.0 GB/s")
        and "decode compute takes" not in r.stderr
    )


def test_trace_replay_counts_tokens_and_layers_and_compares_with_belady(tmp_path):
    records = [(t, layer, e) for t, e in enumerate([(0, 1), (0, 2), (1, 0)]) for layer in (0, 1)]
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"token": t, "layer": la, "experts": list(e)}) + "\n"
                             for t, la, e in records))  # fmt: skip
    r = runner.invoke(
        app, ["bench", "--trace", str(trace), "--policy", "lfu", "--slots-per-layer", "2", "--json"]
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert (data["tokens"], data["layers"], data["slots_per_layer"], data["policy"]) == (3, 2, 2, "lfu")
    assert list(data["hit_rate"]) == ["lfu", "lru", "arc", "belady"]  # the one asked for first
    rates = data["hit_rate"]
    r = runner.invoke(app, ["bench", "--trace", str(trace), "--policy", "lfu", "--slots-per-layer", "2"])
    said = " ".join(r.stdout.replace("│", " ").split())
    assert "t.jsonl: 3 tokens x 2 layers, 2 slots per layer" in said
    assert f"lfu {rates['lfu']:.4f} {rates['lfu'] / rates['belady']:.0%}" in said
    assert f"belady (offline optimum) {rates['belady']:.4f} 100%" in said
    r = runner.invoke(app, ["bench", "--trace", str(tmp_path / "none.jsonl"), "--policy", "fifo"])
    assert r.exit_code == 2 and r.stderr.startswith("error: unknown cache policy 'fifo'")  # before reading
