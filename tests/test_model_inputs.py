"""What promoe is pointed at: which model a reference finds (folder, alias, Hugging Face
cache, default), and every way a checkpoint, its config.json, its tokenizer or a
--device can be unusable, each a one-line error with a hint and its exit code.
(Found unchecked by a mutation audit of resolve, checkpoint, model_spec, arch and loader.)"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.checkpoint import Checkpoint
from runtime.errors import CheckpointError, UsageError
from runtime.model_spec import describe_model
from runtime.resolve import BUNDLED_MODEL, known_config, promoe_home, resolve_model
from tests.test_cli import invoke, one_line_error

INSTRUCT, BASE = "mistralai/Mixtral-8x7B-Instruct-v0.1", "mistralai/Mixtral-8x7B-v0.1"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """``add(repo, src=None, config=True)``: a snapshot of ``repo`` in an empty Hugging Face
    cache (laid out as huggingface_hub writes it), holding ``src``'s files or a bare config."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def add(repo: str, src: Path | None = None, config: bool = True) -> Path:
        storage = cache / f"models--{repo.replace('/', '--')}"
        snap = storage / "snapshots" / ("0" * 40)
        if src is not None:
            shutil.copytree(src, snap)
        else:
            snap.mkdir(parents=True)
            if config:
                (snap / "config.json").write_text("{}")
            (snap / "README.md").write_text("a partial download")
        (storage / "refs").mkdir()
        (storage / "refs" / "main").write_text("0" * 40)
        return snap

    return add


def _copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    if config_changes:
        cfg = json.loads((dst / "config.json").read_text())
        for k, v in config_changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _drop_tensors(folder: Path, *keys: str) -> None:
    shard = folder / "model.safetensors"
    tensors = load_file(shard)
    for k in keys:
        del tensors[k]
    save_file(tensors, shard, metadata={"format": "pt"})


# -- which model a reference finds ----------------------------------------------------------


def test_an_alias_finds_its_first_cached_release_in_any_case(hf_cache):
    """Instruct before base; a snapshot without config.json (a partial download) is skipped."""
    base = hf_cache(BASE)
    instruct = hf_cache(INSTRUCT)
    got = resolve_model("Mixtral")
    assert (got.path, got.source, got.label) == (instruct, "hf-cache", INSTRUCT)
    (instruct / "config.json").unlink()
    got = resolve_model("mixtral")
    assert (got.path, got.label) == (base, BASE)


def test_a_cached_repo_id_is_found_and_planned(hf_cache, tiny_model):
    snap = hf_cache("someone/tiny-moe", tiny_model("mixtral"))
    got = resolve_model("someone/tiny-moe")
    assert (got.path, got.source, got.label) == (snap, "hf-cache", "someone/tiny-moe")
    r = invoke("plan", "someone/tiny-moe", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"] == "someone/tiny-moe"


def test_a_local_folder_is_found_before_an_alias_of_its_name(tiny_model, tmp_path, monkeypatch, hf_cache):
    _copy(tiny_model("mixtral"), tmp_path / "mixtral")
    monkeypatch.chdir(tmp_path)
    got = resolve_model("mixtral")
    assert got.source == "directory" and got.path == (tmp_path / "mixtral").resolve()


def test_an_empty_reference_is_the_default_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the folder it is run from
    got = resolve_model("")
    assert (got.source, got.path) == ("bundled", BUNDLED_MODEL)


def test_a_folder_without_config_json_is_a_missing_model(tmp_path):
    (tmp_path / "weights").mkdir()
    one_line_error(invoke("plan", tmp_path / "weights"), 2, "is a directory but has no config.json")
    with pytest.raises(CheckpointError, match="has no config.json"):  # the reader checks it too
        Checkpoint(tmp_path / "weights")


@pytest.mark.parametrize("ref", ["./nope", "~/nope", "a/b/c", "my models/mixtral", "x/..", "nope-model"])
def test_a_path_that_is_not_there_is_not_taken_for_a_repo_id(ref, tmp_path, monkeypatch, hf_cache):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    r = invoke("plan", ref)
    one_line_error(r, 2, f"model '{ref}' not found: no such directory", "pass a model folder")
    assert "hf download" not in r.stderr


def test_an_alias_not_cached_names_its_first_release_and_the_plan(hf_cache):
    r = invoke("chat", "mixtral", "--prompt", "x")
    one_line_error(r, 2, f"none of {INSTRUCT}, {BASE} is in the Hugging Face cache")
    gpu = "" if torch.cuda.is_available() else " --dtype bfloat16"  # the plan as a GPU computes
    hint = " ".join(r.stderr.strip().splitlines()[1].split())
    assert hint == f"hint: download it once with: hf download {INSTRUCT} (promoe never downloads by itself); " \
        f"to see first what fits: promoe plan mixtral --vram 6GB{gpu}"  # fmt: skip


def test_a_repo_id_not_cached_is_planned_from_its_shipped_config(hf_cache):
    r = invoke("chat", INSTRUCT, "--prompt", "x")
    one_line_error(
        r, 2, f"hf download {INSTRUCT}, or pass a local directory", f"promoe plan {INSTRUCT} --vram 6GB"
    )
    r = invoke("plan", INSTRUCT, "--vram", "6GB", "--dtype", "bfloat16", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"].startswith(f"{INSTRUCT} (not on this machine")
    assert known_config("MIXTRAL").path == known_config(INSTRUCT).path  # an alias in any case


def test_a_repo_id_promoe_has_no_config_for_is_not_offered_a_plan(hf_cache):
    r = invoke("chat", "someone/unknown-moe", "--prompt", "x")
    one_line_error(r, 2, "hf download someone/unknown-moe, or pass a local directory")
    assert "promoe plan" not in r.stderr
    assert (
        known_config(None) is None
        and known_config("") is None
        and known_config("someone/unknown-moe") is None
    )


def test_every_alias_in_the_readme_is_one_and_finds_its_first_model():
    """The README's alias table and ALIASES say the same: each name on a row is an alias
    whose first repo is the row's first model, and no alias is missing from the table."""
    from runtime.resolve import ALIASES, SOURCE_ROOT

    rows = re.findall(r"^\| (`[^|]+`) \| ([\w.-]+/[\w.-]+)", (SOURCE_ROOT / "README.md").read_text(), re.M)
    listed = {name: repo for names, repo in rows for name in re.findall(r"`([^`]+)`", names)}
    assert listed and set(listed) == set(ALIASES)
    for name, repo in listed.items():
        assert ALIASES[name][1][0] == repo, name
        assert known_config(name) is not None, name  # and promoe plans it before a download


def test_a_default_model_that_is_not_there_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMOE_DEFAULT_MODEL", str(tmp_path / "gone"))
    r = invoke("chat", "--prompt", "x")
    one_line_error(r, 2, f"PROMOE_DEFAULT_MODEL={tmp_path / 'gone'}: model", "or unset PROMOE_DEFAULT_MODEL")


def test_promoe_home_expands_a_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PROMOE_HOME", "~/promoe-home")
    assert promoe_home() == tmp_path / "promoe-home"


@pytest.mark.parametrize("bundled", ["missing", "without config.json"])
def test_the_random_fallback_model_is_built_once(tmp_path, monkeypatch, bundled):
    """Without the bundled model (or with its folder but not its files, as a partial
    checkout leaves it) promoe builds a random one, once."""
    import runtime.resolve
    import runtime.tiny

    built = []
    real = runtime.tiny.build_tiny_model
    monkeypatch.setattr(runtime.tiny, "build_tiny_model", lambda *a, **kw: built.append(a) or real(*a, **kw))
    if bundled != "missing":
        (tmp_path / "not-here").mkdir()
    monkeypatch.setattr(runtime.resolve, "BUNDLED_MODEL", tmp_path / "not-here")
    monkeypatch.setenv("PROMOE_HOME", str(tmp_path / "home"))
    first, second = resolve_model(None), resolve_model(None)
    assert (
        first == second
        and first.source == "random"
        and first.path == tmp_path / "home/models/tiny-random-moe"
    )
    assert len(built) == 1  # the second run reuses it (and so its expert store)


# -- an unusable checkpoint ----------------------------------------------------------------


@pytest.mark.parametrize(
    "content,needle",
    [(b"{not json", "is not valid JSON (Expecting property name"), (b"\xff\xfe\x00junk", "is not valid JSON"),
     (b"[]", "is not a JSON object (it holds a list)")],
)  # fmt: skip
def test_a_config_json_that_is_not_an_object_is_refused(tiny_model, tmp_path, content, needle):
    bad = _copy(tiny_model("mixtral"), tmp_path / "bad")
    (bad / "config.json").write_bytes(content)
    one_line_error(invoke("plan", bad), 3, f"{bad / 'config.json'} {needle}", "repair config.json")


def test_a_sharded_checkpoint_with_a_missing_or_broken_index_is_refused(tiny_model, tmp_path):
    src = tiny_model("mixtral", max_shard_size="300KB")
    assert invoke("plan", src).exit_code == 0
    shards = sorted(src.glob("*.safetensors"))
    assert len(shards) > 3
    gone = _copy(src, tmp_path / "gone")
    (gone / shards[2].name).unlink()
    one_line_error(invoke("plan", gone), 3, f"{gone} is incomplete: 1 shard(s) missing, e.g. {shards[2].name}",
                   "finish the download")  # fmt: skip
    for name, text in [
        ("badjson", "{not json"),
        ("nomap", '{"metadata": {}}'),
        ("listmap", '{"weight_map": []}'),
    ]:
        bad = _copy(src, tmp_path / name)
        (bad / "model.safetensors.index.json").write_text(text)
        one_line_error(invoke("plan", bad), 3, f"{bad / 'model.safetensors.index.json'} is not a safetensors index",
                       "finish the download")  # fmt: skip


def test_a_folder_without_safetensors_weights_is_refused(tiny_model, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_model("mixtral") / "config.json", bare)
    r = invoke("plan", bare)
    one_line_error(r, 3, f"{bare} has no .safetensors weights", "safe_serialization=True")
    assert "only PyTorch" not in r.stderr
    (bare / "pytorch_model.bin").write_bytes(b"\0")
    one_line_error(invoke("plan", bare), 3, "has no .safetensors weights (only PyTorch .bin files)")


def test_missing_expert_tensors_are_named(tiny_model, tmp_path, home):
    one = _copy(tiny_model("mixtral"), tmp_path / "one")
    _drop_tensors(one, "model.layers.0.block_sparse_moe.experts.3.w3.weight")  # w1 there, w3 not
    one_line_error(invoke("chat", one, "--prompt", "x", "-n", 1), 3,
                   "tensor 'model.layers.0.block_sparse_moe.experts.3.w3.weight' is not in the checkpoint",
                   "do not match")  # fmt: skip
    layer = _copy(tiny_model("mixtral"), tmp_path / "layer")
    _drop_tensors(layer, *(f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"
                           for e in range(8) for w in ("w1", "w2", "w3")))  # fmt: skip
    one_line_error(invoke("plan", layer), 3, "no expert weights for layer 0",
                   "expected model.layers.0.block_sparse_moe.experts.0.w1.weight")  # fmt: skip


def test_a_missing_non_expert_weight_is_named(tiny_model, tmp_path, home):
    bad = _copy(tiny_model("mixtral"), tmp_path / "nonorm")
    _drop_tensors(bad, "model.norm.weight")
    one_line_error(invoke("chat", bad, "--prompt", "x", "-n", 1), 3,
                   "the checkpoint lacks 1 weight(s) the model needs, e.g. model.norm.weight", "re-export")  # fmt: skip


@pytest.mark.parametrize("qc,method", [({"quant_method": "mxfp4"}, "mxfp4"), ("fp8", "a quantized format")])
def test_a_quantized_checkpoint_is_refused(tiny_model, tmp_path, qc, method):
    bad = _copy(tiny_model("mixtral"), tmp_path / "quantized", quantization_config=qc)
    one_line_error(
        invoke("plan", bad), 3, f"this checkpoint is stored in {method}", "unsloth/gpt-oss-20b-BF16"
    )


def test_a_model_without_moe_layers_is_refused(tiny_model, tmp_path):
    dense = _copy(tiny_model("qwen3_moe"), tmp_path / "dense", mlp_only_layers=[0, 1, 2, 3])
    one_line_error(invoke("plan", dense), 3, f"{dense} has no MoE layers", "Mixture-of-Experts")


def test_a_config_without_model_type_says_so(tiny_model, tmp_path):
    bad = _copy(tiny_model("mixtral"), tmp_path / "untyped", model_type=None)
    one_line_error(invoke("plan", bad), 3, "config.json has no model_type", "mixtral")


def test_top_k_may_be_every_expert_but_not_none(tiny_model, tmp_path):
    every = _copy(tiny_model("mixtral"), tmp_path / "every", num_experts_per_tok=8)
    r = invoke("plan", every, "--json")
    assert r.exit_code == 0, r.output
    none = _copy(tiny_model("mixtral"), tmp_path / "none", num_experts_per_tok=0)
    one_line_error(invoke("plan", none), 3, "routes each token to 0 experts, but the model has 8")


def test_the_expert_dtype_is_the_shards_or_else_the_configs(tiny_model, tmp_path):
    """With weights, what the shards store (here fp32, whatever config.json says); from a
    shipped config.json alone, its dtype or torch_dtype; an unknown name is refused."""
    shards = _copy(tiny_model("mixtral"), tmp_path / "fp32", dtype="bfloat16", torch_dtype="bfloat16")
    assert describe_model(Checkpoint(shards)).expert_shape.dtype == torch.float32
    legacy = _copy(tiny_model("mixtral"), tmp_path / "legacy", dtype=None, torch_dtype="float16")
    assert describe_model(Checkpoint(legacy), weights=False).expert_shape.dtype == torch.float16
    odd = _copy(tiny_model("mixtral"), tmp_path / "odd", dtype="e")  # torch.e (2.718...), not a dtype
    with pytest.raises(CheckpointError, match="config.json names an unknown dtype 'e'"):
        describe_model(Checkpoint(odd), weights=False)
    one_line_error(invoke("plan", odd), 3, "config.json names an unknown dtype 'e'", "bfloat16")


def test_a_config_field_transformers_cannot_take_is_refused(tiny_model, tmp_path):
    bad = _copy(tiny_model("mixtral"), tmp_path / "float7", dtype="float7")
    one_line_error(
        invoke("plan", bad), 3, f"transformers cannot read {bad / 'config.json'}", "repair config.json"
    )


def test_modules_kept_in_fp32_follow_transformers(tiny_model):
    """DeepSeek-V3's routers stay fp32 in any half dtype (strict); GPT-OSS's norms only under fp16."""
    ds = describe_model(Checkpoint(tiny_model("deepseek_v3")))
    assert ds.load_dtype("model.layers.1.mlp.gate.weight", torch.bfloat16) == torch.float32
    assert ds.load_dtype("model.layers.1.self_attn.o_proj.weight", torch.bfloat16) == torch.bfloat16
    oss = describe_model(Checkpoint(tiny_model("gpt_oss")))
    assert oss.load_dtype("model.norm.weight", torch.bfloat16) == torch.bfloat16
    assert oss.load_dtype("model.norm.weight", torch.float16) == torch.float32
    assert oss.load_dtype("model.layers.0.self_attn.q_proj.weight", torch.float16) == torch.float16


# -- the tokenizer and the device ----------------------------------------------------------


def test_a_tokenizer_of_a_handful_of_tokens_is_refused(tiny_model, tmp_path, home):
    from tokenizers import Tokenizer, models

    bad = _copy(tiny_model("mixtral"), tmp_path / "fewtok")
    Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>")).save(
        str(bad / "tokenizer.json")
    )
    one_line_error(invoke("chat", bad, "--prompt", "x", "-n", 1), 3, f"the tokenizer in {bad} has only",
                   "tokenizer.json")  # fmt: skip


@pytest.mark.parametrize("name", ["cpu:1", "cuda:x"])
def test_a_device_that_is_not_one_is_unknown(tiny_model, name):
    one_line_error(invoke("chat", tiny_model("mixtral"), "--device", name, "--prompt", "x"), 2,
                   f"unknown device '{name}'", "use auto, cpu, cuda or cuda:N")  # fmt: skip


def test_a_cuda_index_past_several_devices_names_the_range(monkeypatch):
    from runtime.loader import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: None)
    with pytest.raises(UsageError, match=r"--device cuda:2: this machine has 2 CUDA devices$") as err:
        pick_device("cuda:2")
    assert err.value.hint == "use cuda:0 to cuda:1"
