"""The command line: one-shot output, stats JSON, and one-line errors with hints (no tracebacks)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from promoe_cli.main import app
from runtime.generate import SamplingConfig, encode_prompt, generate
from tests.helpers import budget_for_slots, load_small

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_one_shot_prints_only_the_completion(tiny_model, tmp_path):
    path = tiny_model("mixtral")
    stats = tmp_path / "stats.json"
    vram = budget_for_slots(path, "int8", 2)
    r = invoke("chat", path, "--prompt", "def fibonacci(n):", "-n", 12, "-t", 0, "--no-chat-template",
               "--quant", "int8", "--vram", vram, "--stats-json", stats, "--prefetch", "none")  # fmt: skip
    assert r.exit_code == 0, r.output
    lm = load_small(path, quant="int8", slots_per_layer=2, predictor="none")
    want = generate(lm, encode_prompt(lm.tokenizer, "def fibonacci(n):", chat_template=False),
                    SamplingConfig(max_new_tokens=12, temperature=0))  # fmt: skip
    lm.close()
    assert r.stdout == want.text + "\n"
    data = json.loads(stats.read_text())
    for key in ("prompt_tokens", "generated_tokens", "prefill_tokens_per_s", "decode_tokens_per_s", "hit_rate",
                "hits", "misses", "bytes_moved", "cache_slots", "cache_bytes"):  # fmt: skip
        assert key in data, key
    assert data["generated_tokens"] == len(want.token_ids)
    assert data["cache_slots"] == 2 * 4
    assert data["hits"] + data["misses"] + data["late"] == data["uses"] > 0


def test_trace_out_records_routing(tiny_model, tmp_path):
    from runtime.trace import read_trace

    path = tiny_model("qwen3_moe")  # layer 1 is dense: not in the trace
    trace = tmp_path / "trace.jsonl"
    r = invoke("chat", path, "--prompt", "hello", "-n", 5, "-t", 0, "--quant", "none", "--trace-out", trace,
               "--no-chat-template")  # fmt: skip
    assert r.exit_code == 0, r.output
    recs = read_trace(trace)
    assert {x.layer for x in recs} == {0, 2, 3}
    tokens = sorted({x.token for x in recs})
    assert tokens == list(range(len(tokens))) and len(tokens) >= 5
    assert all(len(x.experts) == 2 and abs(sum(x.weights) - 1) < 1e-3 for x in recs)


def one_line_error(r, code: int, *needles: str) -> None:
    assert r.exit_code == code, (r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: ") and len(lines) == 2, r.stderr
    assert "Traceback" not in r.output
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_without_a_terminal_a_conversion_and_a_random_default_model_are_said(tmp_path, monkeypatch):
    """One-shot runs print no progress bars (stderr is not a terminal here): a conversion,
    which can take minutes, says how far it got once it runs long (here: at once); the
    random fallback for a missing bundled model says, every time, that it writes nonsense."""
    import promoe_cli.loading
    import runtime.resolve

    monkeypatch.setattr(promoe_cli.loading, "NOTE_AFTER_S", 0.0)  # a tiny conversion is quick
    monkeypatch.setenv("PROMOE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(runtime.resolve, "BUNDLED_MODEL", tmp_path / "not-here")
    runs = [invoke("chat", "--prompt", "x", "-n", 2, "-q", "int8") for _ in range(2)]
    for r in runs:
        assert r.exit_code == 0, r.output
        assert "writes nonsense" in r.stderr and "Traceback" not in r.output
    assert "Converting experts to int8: 1/" in runs[0].stderr  # the first run converts ...
    assert "Converting experts to int8: done" in runs[0].stderr  # ... and says when it finished ...
    assert "Converting" not in runs[1].stderr  # ... the second reuses the store
    monkeypatch.setattr(promoe_cli.loading, "NOTE_AFTER_S", 1e9)  # a quick rebuild is said all the same
    manifest = next((tmp_path / "home" / "stores").glob("*/int8/manifest.json"))
    manifest.write_text("{not json")
    r = invoke("chat", "--prompt", "x", "-n", 2, "-q", "int8")
    assert r.exit_code == 0 and "Rebuilding" in r.stderr and "done" in r.stderr, r.stderr


def test_missing_model(tmp_path):
    one_line_error(invoke("chat", tmp_path / "nope", "--prompt", "x"), 2, "not found")


def test_alias_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    one_line_error(invoke("chat", "mixtral", "--prompt", "x"), 2, "Mixtral-8x7B-Instruct-v0.1", "hf download")


def test_unsupported_architecture(tmp_path):
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    one_line_error(invoke("chat", d, "--prompt", "x"), 3, "llama", "mixtral", "gpt_oss")


@pytest.mark.parametrize("size", ["6XB", "lots"])
def test_malformed_size(tiny_model, size):
    one_line_error(invoke("chat", tiny_model("mixtral"), "--vram", size, "--prompt", "x"), 2, size, "6GB")


def test_budget_smaller_than_non_expert_weights(tiny_model):
    r = invoke("chat", tiny_model("mixtral"), "--vram", "100KB", "--prompt", "x")
    one_line_error(r, 4, "needs at least", "non-expert weights")


def test_unknown_quant_and_policy(tiny_model):
    one_line_error(invoke("chat", tiny_model("mixtral"), "--quant", "int5", "--prompt", "x"), 2, "int4")
    one_line_error(invoke("chat", tiny_model("mixtral"), "--policy", "mru", "--prompt", "x"), 2, "lfu")


def test_help_lists_commands_and_examples():
    r = invoke("--help")
    assert r.exit_code == 0 and "chat" in r.stdout
    r = invoke("chat", "--help")
    assert r.exit_code == 0 and "Examples" in r.stdout and "--vram" in r.stdout


@pytest.mark.parametrize(
    "command",
    ["", "chat", "plan", "bench", "train-predictor", "profile-device", "stores", "stores rm", "stores prune"],
)
def test_help_labels_values_not_flags(command):
    """Each option that takes a value shows what it takes (``-n N``, ``--vram SIZE``); a flag
    shows nothing there (Typer's own label, ``<bool>``, reads as a value to pass)."""
    import re

    r = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "<bool>" not in r.stdout
    rows = {m.group(1): m.group(2) for m in re.finditer(r"│ (--[a-z-]+)\s+(?:-\w\s+)?(\S+)", r.stdout)}
    assert rows["--help"] != "<bool>" and not rows["--help"].startswith("<")
    valued = [v for k, v in rows.items() if v.startswith("<")]
    assert valued == [], valued  # every valued option has its own placeholder
    if command == "chat":
        assert rows["--max-new-tokens"] == "N" and rows["--vram"] == "SIZE" and rows["--seed"] == "S"
        assert "9223372036854775807" not in r.stdout


def test_unknown_slot_split(tiny_model):
    one_line_error(
        invoke("chat", tiny_model("mixtral"), "--slot-split", "deep", "--prompt", "x"), 2, "shallow"
    )


def test_context_longer_than_the_model(tiny_model):
    one_line_error(
        invoke("chat", tiny_model("mixtral"), "--context", "100000", "--prompt", "x"), 2, "256 positions"
    )


def test_one_shot_prompt_longer_than_the_context(tiny_model):
    long = "x " * 400  # more tokens than the tiny model's 256 positions
    one_line_error(
        invoke("chat", tiny_model("mixtral"), "--prompt", long, "-n", 4), 2, "the context holds 256"
    )


def test_one_shot_completion_cut_by_the_context_says_so(tiny_model):
    r = invoke(
        "chat", tiny_model("mixtral"), "--prompt", "x " * 100, "-n", 100, "-t", 0, "--no-chat-template"
    )
    assert r.exit_code == 0, r.output
    assert "the context is full at 256 tokens" in r.stderr and "the model attends to no more" in r.stderr
    assert "--context" not in r.stderr  # 256 is the model's own: a longer one cannot be given
    r = invoke("chat", tiny_model("mixtral"), "--prompt", "x " * 60, "-n", 100, "-t", 0, "--no-chat-template",
               "--context", 128)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "the context is full at 128 tokens" in r.stderr
    assert "a longer --context lets it go on, up to the model's 256 positions" in r.stderr
    r = invoke("chat", tiny_model("mixtral"), "--prompt", "x", "-n", 4, "-t", 0, "--no-chat-template")
    assert r.exit_code == 0 and "context is full" not in r.stderr


@pytest.mark.parametrize(
    "args,needle",
    [(("--device", "tpu"), "unknown device"), (("--device", "meta"), "unknown device"),
     (("--dtype", "float64"), "unknown dtype"), (("--top-p", "0"), "--top-p 0 is outside (0, 1]"), (("--top-p", "1.5"), "--top-p 1.5 is outside"),
     (("--link-bandwidth", "0GB/s"), "not a bandwidth"), (("--vram", ""), "is not a size"),
     (("--prefetch", "magic"), "unknown predictor"), (("--vram", "6"), "--vram 6 has no unit"),  # also with no budget, where none is built
     (("-q", "int2", "--low-bit", "int2"), "no format has fewer bits than int2"),
     (("-q", "int4", "--low-bit", "int8"), "e.g. --low-bit int2")],
)  # fmt: skip
def test_bad_option_values_are_one_line(tiny_model, args, needle):
    one_line_error(invoke("chat", tiny_model("mixtral"), *args, "--prompt", "x"), 2, needle)


@pytest.mark.parametrize("prompt", ["", "  ", "\n\t"])
def test_an_empty_prompt_is_refused_before_loading(tiny_model, prompt, monkeypatch):
    import promoe_cli.loading

    monkeypatch.setattr(promoe_cli.loading, "load", lambda *a, **k: pytest.fail("loaded the model"))
    r = invoke("chat", tiny_model("mixtral"), "--prompt", prompt, "--no-chat-template")
    one_line_error(r, 2, "--prompt is empty")
    assert "leave --prompt out to chat" in r.stderr and r.stdout == ""


def test_unwritable_output_paths_are_one_line(tiny_model, tmp_path, monkeypatch):
    from promoe_cli.loading import check_output_file

    for flag in ("--trace-out", "--stats-json"):
        r = invoke("chat", tiny_model("mixtral"), "--prompt", "x", "-n", 2, flag, tmp_path)
        one_line_error(r, 2, f"{flag} {tmp_path} is a folder")
        assert r.stdout == ""  # refused before generating, not after
        missing = tmp_path / "no" / "such" / "out.json"
        one_line_error(
            invoke("chat", tiny_model("mixtral"), "--prompt", "x", flag, missing), 2, "does not exist"
        )
        assert not missing.parent.exists()  # no folder is made behind the user's back
        if Path("/proc/self").is_dir():  # a folder that exists where no file can be made, even by root
            r = invoke("chat", tiny_model("mixtral"), "--prompt", "x", "-n", 2, flag, "/proc/promoe-out.json")
            one_line_error(r, 2, "cannot write there")
            assert r.stdout == ""
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        check_output_file(fifo, flag)  # not opened (that would block, or end its reader's input)
        link = tmp_path / "dangling"
        link.symlink_to(tmp_path / "nowhere.json")
        check_output_file(link, flag)  # left alone: neither its target made nor the link removed
        assert link.is_symlink() and not (tmp_path / "nowhere.json").exists()
        fifo.unlink()
        link.unlink()
        kept = tmp_path / "kept.json"
        kept.write_text("old")
        check_output_file(kept, flag)  # the check leaves a file that was there as it was ...
        assert kept.read_text() == "old"
        check_output_file(tmp_path / "new.json", flag)  # ... and makes none
        assert not (tmp_path / "new.json").exists()
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("PROMOE_HOME", str(afile))
    one_line_error(
        invoke("chat", tiny_model("mixtral"), "--prompt", "x", "-n", 2), 2, f"PROMOE_HOME={afile} is a file"
    )
    one_line_error(invoke("stores"), 2, f"PROMOE_HOME={afile} is a file")  # not "no stores yet"


def test_truncated_checkpoint_and_impossible_top_k(tiny_model, tmp_path):
    import shutil

    src = tiny_model("mixtral")
    bad = tmp_path / "truncated"
    shutil.copytree(src, bad)
    shard = next(bad.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    one_line_error(invoke("plan", bad), 3, "not a readable safetensors file")
    topk = tmp_path / "topk"
    shutil.copytree(src, topk)
    cfg = json.loads((topk / "config.json").read_text())
    cfg["num_experts_per_tok"] = cfg["num_local_experts"] + 1
    (topk / "config.json").write_text(json.dumps(cfg))
    one_line_error(invoke("plan", topk), 3, "routes each token to")


def test_a_cuda_device_index_is_checked_and_made_current(monkeypatch):
    """With stand-ins for a one-GPU machine: cuda:1 is a one-line error; cuda:0 becomes the
    current device, where Triton launches its kernels."""
    import torch

    from runtime.errors import UsageError
    from runtime.loader import pick_device

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    with pytest.raises(UsageError, match="has 1 CUDA device") as err:
        pick_device("cuda:1")
    assert err.value.hint == "use cuda:0"
    assert pick_device("cuda:0") == torch.device("cuda:0") and current == [torch.device("cuda:0")]


def test_ctrl_c_in_a_one_shot_prompt_exits_130(tiny_model, tmp_path, monkeypatch):
    """A script must tell a cut-off completion from a whole one: what was written stays on
    stdout, the figures are still written, and the exit code is 130."""
    import transformers.models.mixtral.modeling_mixtral as mm

    forward, calls = mm.MixtralForCausalLM.forward, {"n": 0}

    @functools.wraps(forward)  # the same signature: the KV cache is passed under the name it declares
    def interrupted_forward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # prefill and two decode steps, then Ctrl-C
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(mm.MixtralForCausalLM, "forward", interrupted_forward)
    stats = tmp_path / "stats.json"
    r = invoke("chat", tiny_model("mixtral"), "--prompt", "hello", "-n", 20, "-t", 0, "--stats-json", stats)
    assert r.exit_code == 130, r.output
    assert "interrupted" in r.stderr and r.stdout.strip()
    assert json.loads(stats.read_text())["finish_reason"] == "interrupted"


@pytest.mark.parametrize(
    "change,needle",
    [({"intermediate_size": 192}, "expert 0 of layer 0: gate_up is [192, 64] in the checkpoint"),
     ({"num_key_value_heads": 1}, "k_proj.weight has shape")],
)  # fmt: skip
def test_a_config_that_does_not_match_the_weights_is_a_checkpoint_error(
    tiny_model, tmp_path, home, change, needle
):
    """Exit 3 and a hint, before anything is converted; no empty store folder stays behind."""
    import shutil

    bad = tmp_path / "mismatch"
    shutil.copytree(tiny_model("mixtral"), bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, **change}))
    one_line_error(invoke("chat", bad, "--prompt", "x", "-n", 2), 3, needle, "does not match the weights")
    assert not any((home / "stores").glob("mismatch-*"))


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "qwen2_moe"])
def test_a_missing_tokenizer_is_reported_before_the_experts_are_converted(arch, tiny_model, tmp_path, home):
    """Without its files transformers builds olmoe and qwen2-moe an empty tokenizer (a
    vocabulary of one or two tokens), which encoded every prompt to nothing."""
    import shutil

    bad = tmp_path / "notok"
    shutil.copytree(tiny_model(arch), bad)
    for f in bad.glob("tokenizer*"):
        f.unlink()
    one_line_error(
        invoke("chat", bad, "--prompt", "x", "-n", 2), 3, f"{bad} has no tokenizer", "tokenizer.json"
    )
    assert not any((home / "stores").glob("notok-*"))
    (bad / "tokenizer.json").write_text("{not json")
    one_line_error(invoke("chat", bad, "--prompt", "x", "-n", 2), 3, "could not load the tokenizer")


def test_a_tokenizer_of_vocab_json_and_merges_txt_is_found(tiny_model, tmp_path):
    """A Qwen-style folder whose BPE is vocab.json and merges.txt (no tokenizer.json) has
    a tokenizer: it loads with the whole vocabulary, round-trips text, and chats."""
    import shutil

    from tokenizers import Tokenizer

    from runtime.loader import load_tokenizer

    src, bpe = tiny_model("qwen2_moe"), tmp_path / "bpe"
    shutil.copytree(src, bpe)
    for f in bpe.glob("tokenizer*"):
        f.unlink()
    whole = Tokenizer.from_file(str(src / "tokenizer.json"))
    whole.model.save(str(bpe))  # vocab.json, merges.txt
    assert not any(bpe.glob("tokenizer*")) and (bpe / "merges.txt").is_file()
    tok, text = load_tokenizer(bpe), "def fibonacci(n):\n    return n"
    assert len(tok) == whole.get_vocab_size() and tok.decode(tok(text)["input_ids"]) == text
    r = invoke("chat", bpe, "--prompt", "def", "-n", 2, "-t", 0, "--no-chat-template")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    "argv,needle",
    [(["chat", "--context", "-1"], "Invalid value for '--context': it must be 16 or more"),
     (["chat", "-n", "0"], "'--max-new-tokens' / '-n': it must be 1 or more"),
     (["chat", "-t", "101"], "'--temperature' / '-t': it must be 100 or less"),
     (["chat", "--nope"], "No such option: --nope"), (["plan", "--top-p", "2"], "No such option"),
     (["chat", "--seed", str(2**63)], "from 0 to 2^63-1"), (["chat", "--seed", "-1"], "'--seed'"),
     (["frobnicate"], "No such command")],
)  # fmt: skip
def test_command_line_usage_errors_are_one_line_too(monkeypatch, capsys, argv, needle):
    """The `promoe` entry point reports Typer's own usage errors (out of range, unknown
    option) as one line and a hint, like every other error, not as a boxed panel."""
    from promoe_cli.main import run

    monkeypatch.setattr(sys, "argv", ["promoe", *argv])
    with pytest.raises(SystemExit) as exc:
        run()
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert lines[1].startswith("hint: promoe ") and "--help" in lines[1]
    assert ("lists the commands" in lines[1]) == (needle == "No such command")


def test_bitsandbytes_hub_kernel_warning_does_not_leak(tmp_path):
    """bitsandbytes' CPU backend warns at import (on CPUs with AVX-512 bf16) that it could not
    fetch a kernel from the hub; promoe fetches nothing, and its stderr stays clean of it.
    In a fresh process: bitsandbytes warns once per process."""
    import importlib.util
    import os
    import subprocess

    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16() or importlib.util.find_spec("kernels") is not None:
        pytest.skip("bitsandbytes does not warn here (no AVX-512 bf16, or `kernels` is installed)")
    env = {**os.environ, "PROMOE_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "promoe_cli.main", "profile-device", "--quick", "--json"],
                       capture_output=True, text=True, env=env, timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "nf4" in json.loads(r.stdout)["dequant_weights_per_s"]  # bitsandbytes was imported
    assert "kernels-community" not in r.stderr


def test_a_file_given_as_the_model_is_called_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    one_line_error(invoke("plan", f), 2, "is a file, not a model folder")


def test_bare_promoe_prints_the_help_and_nothing_on_stderr(monkeypatch, capsys):
    from promoe_cli.main import run

    monkeypatch.setattr(sys, "argv", ["promoe"])
    with pytest.raises(SystemExit):
        run()
    captured = capsys.readouterr()
    assert "Usage: promoe" in captured.out and captured.err == ""


def test_the_banner_says_explicit_options_for_misses_go_unused(tiny_model):
    """In place on the CPU nothing misses: the options for misses the user typed are said to
    go unused, in the banner and, for a one-shot completion, in a note; defaults, which nobody
    asked for, are not mentioned."""
    typed = ["--prefetch", "cross-layer", "--policy", "arc", "--low-bit", "int2", "--host-misses"]
    note = "--prefetch cross-layer, --policy arc, --low-bit int2, --host-misses unused"
    path = str(tiny_model("mixtral"))
    asked = runner.invoke(app, ["chat", path, *typed], input="/quit\n")
    default = runner.invoke(app, ["chat", path], input="/quit\n")
    assert asked.exit_code == 0 and default.exit_code == 0, asked.output + default.output
    assert f"nothing can miss ({note})" in " ".join(asked.stderr.split())  # as wrapped to the width
    assert "nothing can miss" not in default.stderr
    one_shot = runner.invoke(app, ["chat", path, *typed, "--prompt", "x", "-n", 1])
    assert one_shot.exit_code == 0 and f"nothing can miss: {note}" in " ".join(one_shot.stderr.split())
    quiet = runner.invoke(app, ["chat", path, "--prompt", "x", "-n", 1])
    assert quiet.exit_code == 0 and "nothing can miss" not in quiet.stderr


def test_a_ctrl_c_typer_turns_into_exit_130_still_says_interrupted(monkeypatch, capsys):
    """typer 0.2x returns 130 for a KeyboardInterrupt outside a command's own handling (one
    pressed while promoe starts): the user still sees why it stopped."""
    import promoe_cli.main as main

    monkeypatch.setattr(main, "app", lambda **kw: 130)
    with pytest.raises(SystemExit) as exc:
        main.run()
    assert exc.value.code == 130 and "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("one_shot", [True, False])
def test_a_reader_that_stops_reading_ends_promoe_quietly(one_shot, tiny_model, home):
    """`promoe chat ... | head -1`: the pipe breaks under a long answer; promoe stops at once,
    with no error on stderr (it said 'error: Broken pipe' and blamed the paths)."""
    import subprocess

    args = ["--prompt", "def f(x):"] if one_shot else []
    p = subprocess.Popen([sys.executable, "-m", "promoe_cli.main", "chat", str(tiny_model("mixtral")), "-n", "400",
                          "-t", "1", "--seed", "0", *args],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    if not one_shot:
        p.stdin.write(b"def f(x):\nclass A:\nimport os\n")
    p.stdin.close()
    p.stdout.read(1)
    p.stdout.close()  # the reader goes away
    stderr = p.stderr.read().decode()
    assert p.wait(timeout=120) == 1
    assert "error" not in stderr and "Traceback" not in stderr, stderr


def test_the_banner_says_how_misses_are_served_and_what_the_low_bit_store_did(
    tiny_model, tmp_path, monkeypatch
):
    """With --low-bit and --host-misses the banner says both routes, and whether the low-bit
    copies' store was converted or reused (it said 'expert store reused' right after
    converting the int2 copies, which the progress note called just 'Converting experts')."""
    import promoe_cli.loading

    monkeypatch.setattr(promoe_cli.loading, "NOTE_AFTER_S", 0.0)  # a tiny conversion is quick
    monkeypatch.setenv("PROMOE_HOME", str(tmp_path / "home"))
    path = tiny_model("mixtral")
    vram = budget_for_slots(path, "int4", 2)
    args = ["chat", path, "--vram", vram, "--low-bit", "int2", "--host-misses", "--link-bandwidth", "1GB/s"]
    runs = []
    for _ in range(2):
        r = runner.invoke(app, [str(a) for a in args], input="/quit\n")
        assert r.exit_code == 0, r.output
        runs.append(" ".join(r.stderr.split()))
    assert "Converting experts to int4: done" in runs[0] and "Converting experts to int2: done" in runs[0]
    assert "expert store converted from the checkpoint" in runs[0]
    assert "int2 copies' store converted from the checkpoint" in runs[0]
    assert "expert store reused · int2 copies' store reused" in runs[1] and "Converting" not in runs[1]
    for said in runs:
        assert "misses: from int2 copies when their gate weight is below 0.3 · computed on the host" in said


def test_the_readme_names_every_command_and_option():
    """README.md documents every command and flag: one added without a word there fails here."""
    import re

    import typer

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing, checked = [], []

    def walk(command, path):  # typer's own click: its Group and Option are not click's
        for name, sub in getattr(command, "commands", {}).items():
            if not sub.hidden:
                walk(sub, [*path, name])
        if path and f"promoe {' '.join(path)}" not in readme:
            missing.append(" ".join(path))
        for param in command.params:
            if param.param_type_name != "option":
                continue
            for flag in param.opts + param.secondary_opts:
                if flag.startswith("--") and flag != "--help":
                    checked.append(flag)
                    if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", readme):
                        missing.append(f"{' '.join(path)} {flag}")

    walk(typer.main.get_command(app), [])
    assert "--jsonl" in checked and len(checked) > 50  # it saw the commands' options
    assert not missing, f"not in README.md: {missing}"


def test_a_conversion_note_says_done_not_how_far_once_it_is_done(monkeypatch, capsys):
    """Without a terminal: how far a conversion got, then every NOTE_EVERY_S seconds; at its
    end one line that it is done (never "N/N experts so far"), and nothing for other phases."""
    import promoe_cli.loading as loading

    clock = {"now": 100.0}
    monkeypatch.setattr("time.monotonic", lambda: clock["now"])
    note = loading._conversion_notes()

    def at(t: float, done: int, desc: str = "Converting experts to int4") -> str:
        clock["now"] = 100.0 + t
        note(desc, done, 8)
        return capsys.readouterr().err

    assert at(0, 0) == ""  # a quick one stays quiet
    assert (
        at(loading.NOTE_AFTER_S, 2)
        == f"Converting experts to int4: 2/8 experts, {loading.NOTE_AFTER_S:.0f}s so far\n"
    )
    assert at(loading.NOTE_AFTER_S + 1, 3) == ""  # not again until NOTE_EVERY_S later
    later = loading.NOTE_AFTER_S + loading.NOTE_EVERY_S
    assert at(later, 5) == f"Converting experts to int4: 5/8 experts, {later:.0f}s so far\n"
    assert (
        at(later + loading.NOTE_EVERY_S, 8)
        == f"Converting experts to int4: done, 8 experts in {later + 30:.0f}s\n"
    )
    assert at(later + 100, 8, "Loading non-expert weights") == ""
    quick = loading._conversion_notes()
    clock["now"] = 0.0
    quick("Converting experts to int8", 0, 4)
    clock["now"] = 1.0
    quick("Converting experts to int8", 4, 4)  # done before it was said to run: nothing to say
    assert capsys.readouterr().err == ""


def test_the_banner_says_the_budget_the_link_and_where_the_store_was_converted(tiny_model, home, capsys):
    from promoe_cli.loading import banner
    from runtime.loader import LoadOptions, load_model
    from runtime.sizes import format_bytes

    path = tiny_model("mixtral")
    vram = budget_for_slots(path, "int8", 2)
    for action in ("converted", "reused"):
        lm = load_model(str(path), LoadOptions(quant="int8", device="cpu", vram=vram, link_bandwidth=1e9))
        try:
            banner(lm, profile="small-gpu")
        finally:
            lm.close()
        said = " ".join(capsys.readouterr().err.split())
        assert f"cpu as profile small-gpu, budget {format_bytes(vram)} · emulated link 1.0 GB/s ·" in said
        if action == "converted":
            folder = next((home / "stores").glob("*/int8"))
            assert "expert store converted from the checkpoint in " in said and said.endswith(
                f"s, in {folder}"
            )
        else:
            assert said.endswith("· expert store reused")


@pytest.mark.slow
def test_the_commands_run_offline_and_print_no_library_chatter(tmp_path):
    """Run as a user would, with no offline variable set: the Hugging Face libraries are made
    offline before they are imported, and what transformers would log (a tokenizer's length
    warning on bench's long prompt text) stays out of promoe's output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env["PROMOE_HOME"] = str(tmp_path / "home")
    code = (
        "import sys\nfrom promoe_cli.main import run\n"
        "sys.argv = ['promoe', 'bench', '--configs', 'lru', '--prompt-len', '8', '--gen-len', '2', '--repeats', '1',"
        " '--link-bandwidth', 'off']\n"
        "try:\n    run()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "import huggingface_hub.constants\nprint('offline', huggingface_hub.constants.HF_HUB_OFFLINE)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "offline True"
    assert "[transformers]" not in r.stderr and "Warning" not in r.stderr, r.stderr
