"""`promoe stores`: the listing of converted stores, removing them, pruning orphans."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from promoe_cli.main import app
from quant import get_format
from runtime.checkpoint import Checkpoint
from runtime.expert_store import MANIFEST, model_dir, open_store
from runtime.model_spec import describe_model

runner = CliRunner()


def _convert(path, home, quant: str) -> None:
    ckpt = Checkpoint(path)
    store, _ = open_store(ckpt, describe_model(ckpt), get_format(quant), home=home)
    del store


def _disk_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _listing(home) -> dict:
    r = runner.invoke(app, ["stores", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["stores"] == str(home / "stores")
    return {m["name"]: m for m in data["models"]}


@pytest.fixture
def checkpoint(tiny_model, tmp_path):
    """A checkpoint of our own, so a test can move or delete it."""
    dst = tmp_path / "ckpt" / "my-moe"
    shutil.copytree(tiny_model("mixtral"), dst)
    return dst


def test_the_listing_names_each_store_its_checkpoint_and_its_size(checkpoint, home):
    _convert(checkpoint, home, "int8")
    _convert(checkpoint, home, "int4")
    folder = model_dir(home, checkpoint)
    models = _listing(home)
    assert list(models) == [folder.name]
    m = models[folder.name]
    assert m["checkpoint"] == str(checkpoint.resolve()) and not m["orphaned"]
    assert set(m["formats"]) == {"int8", "int4"}
    for quant, info in m["formats"].items():
        assert info["complete"] and info["bytes"] == _disk_bytes(folder / quant)
    assert m["formats"]["int8"]["bytes"] > m["formats"]["int4"]["bytes"]
    assert m["bytes"] == _disk_bytes(folder)

    r = runner.invoke(app, ["stores"], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and folder.name in r.stdout and "int8" in r.stdout and "int4" in r.stdout


def test_an_empty_home_says_so(home):
    r = runner.invoke(app, ["stores"])
    assert r.exit_code == 0 and "no stores yet" in r.stderr
    assert _listing(home) == {}


def test_rm_one_format_keeps_the_others_and_the_next_load_converts_it_again(checkpoint, home):
    _convert(checkpoint, home, "int8")
    _convert(checkpoint, home, "int4")
    folder = model_dir(home, checkpoint)
    size = _disk_bytes(folder / "int8")

    r = runner.invoke(app, ["stores", "rm", str(checkpoint), "--quant", "int8", "--dry-run"])
    assert r.exit_code == 0 and "would remove" in r.stdout and (folder / "int8").is_dir()

    r = runner.invoke(app, ["stores", "rm", str(checkpoint), "--quant", "int8"])
    assert r.exit_code == 0, r.output
    assert "removed" in r.stdout and f"{folder.name}/int8" in r.stdout
    assert not (folder / "int8").exists() and (folder / "int4" / MANIFEST).is_file()
    assert list(folder.iterdir()) == [folder / "int4"]  # no hidden leftover either
    assert set(_listing(home)[folder.name]["formats"]) == {"int4"}
    assert size > 0

    ckpt = Checkpoint(checkpoint)
    _, report = open_store(ckpt, describe_model(ckpt), get_format("int8"), home=home)
    assert report.action == "converted"


def test_rm_by_listed_name_removes_the_whole_folder(checkpoint, home):
    _convert(checkpoint, home, "int4")
    folder = model_dir(home, checkpoint)
    r = runner.invoke(app, ["stores", "rm", folder.name])
    assert r.exit_code == 0, r.output
    assert not folder.exists() and list((home / "stores").iterdir()) == []


def test_rm_errors_are_one_line(checkpoint, home):
    _convert(checkpoint, home, "int4")
    r = runner.invoke(app, ["stores", "rm", "no-such-model"])
    assert r.exit_code == 2 and r.stderr.startswith("error: no stores of 'no-such-model'")
    assert "promoe stores" in r.stderr.splitlines()[1]
    r = runner.invoke(app, ["stores", "rm", str(checkpoint), "--quant", "int2"])
    assert r.exit_code == 2 and "has no int2 store (it has: int4)" in r.stderr
    assert (model_dir(home, checkpoint) / "int4").is_dir()


def test_a_running_conversion_is_not_removed(checkpoint, home):
    _convert(checkpoint, home, "int4")
    folder = model_dir(home, checkpoint)
    live = folder / f".int8.tmp-{os.getpid()}-0123abcd"  # this process is alive
    live.mkdir()
    r = runner.invoke(app, ["stores", "rm", folder.name])
    assert r.exit_code == 2 and f"process {os.getpid()}" in r.stderr
    assert (folder / "int4").is_dir() and live.is_dir()


def test_prune_removes_orphans_and_dead_leftovers_only(checkpoint, tiny_model, home):
    _convert(checkpoint, home, "int4")
    kept = tiny_model("olmoe")
    _convert(kept, home, "int4")
    orphan, keep = model_dir(home, checkpoint), model_dir(home, kept)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    leftover = keep / f".int8.tmp-{dead}-deadbeef"
    leftover.mkdir()
    (leftover / "layer-000.safetensors").write_bytes(b"x" * 1000)
    shutil.rmtree(checkpoint.parent)  # the checkpoint is gone: its store is an orphan

    models = _listing(home)
    assert models[orphan.name]["orphaned"] and not models[keep.name]["orphaned"]
    assert models[keep.name]["leftover_bytes"] == 1000

    r = runner.invoke(app, ["stores", "prune", "--dry-run"])
    assert r.exit_code == 0 and orphan.is_dir() and leftover.is_dir()
    assert f"would remove {orphan.name}" in r.stdout and "is gone" in r.stdout

    r = runner.invoke(app, ["stores", "prune"])
    assert r.exit_code == 0, r.output
    assert not orphan.exists() and not leftover.exists()
    assert (keep / "int4" / MANIFEST).is_file()
    assert list(_listing(home)) == [keep.name]

    r = runner.invoke(app, ["stores", "prune"])
    assert r.exit_code == 0 and "removed nothing" in r.stdout
