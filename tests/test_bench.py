"""promoe bench: every configuration measured on the same prompts; trace replay through the cache."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from promoe_cli.main import app
from runtime.bench_report import METRICS
from tests.conftest import SHARED

runner = CliRunner()


@pytest.fixture(scope="module")
def bench_json(tiny_model, tmp_path_factory):
    path = tiny_model("mixtral")
    trace = tmp_path_factory.mktemp("bench") / "trace.jsonl"
    r = runner.invoke(app, ["bench", str(path), "--prompt-len", "24", "--gen-len", "6", "--repeats", "2",
                            "--quant", "int8", "--json", "--trace-out", str(trace)])  # fmt: skip
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout), trace


def test_every_configuration_reports_every_field(bench_json):
    data, _ = bench_json
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
    assert by_name["learned"]["status"] == "skipped" and "train-predictor" in by_name["learned"]["note"]
    assert by_name["accelerate"]["status"] == "skipped" and "CUDA" in by_name["accelerate"]["note"]
    assert by_name["transformers"]["status"] == "ok"
    assert "of uses from low-bit copies" in by_name["low-bit"]["note"]
    assert set(METRICS) <= set(by_name["resident"])


def test_resident_hits_everything_and_on_demand_keeps_nothing(bench_json):
    data, _ = bench_json
    by_name = {c["name"]: c for c in data["configs"]}
    res, od = by_name["resident"], by_name["on-demand"]
    assert res["hit_rate"]["min"] == 1.0 and res["bytes_per_token"]["max"] == 0
    assert od["hit_rate"]["max"] == 0.0 and od["bytes_per_token"]["min"] > 0  # no cross-token hits
    assert data["cache_experts"] == "16 of 32"  # --cache-fraction 0.5 by default
    assert data["link"].startswith("emulated")


def test_trace_out_records_the_run(bench_json):
    from runtime.trace import read_trace

    _, trace = bench_json
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
    rows = {row["name"]: row for row in json.loads(r.stdout)["rows"]}
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
    r = runner.invoke(app, ["bench", str(tiny_model("mixtral")), "--quality", "--quality-tokens", "300"])
    assert r.exit_code == 2 and "256 positions" in r.stderr and "Traceback" not in r.output


def test_configs_are_checked_before_anything_runs(tiny_model):
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
