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
from runtime.sizes import format_bytes

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
    assert m["checkpoint"] == str(checkpoint.resolve()) and m["checkpoint_state"] == "present"
    assert set(m["formats"]) == {"int8", "int4"}
    for quant, info in m["formats"].items():
        assert info["complete"] and info["bytes"] == _disk_bytes(folder / quant)
    assert m["formats"]["int8"]["bytes"] > m["formats"]["int4"]["bytes"]
    assert m["bytes"] == _disk_bytes(folder)

    r = runner.invoke(app, ["stores"])
    assert r.exit_code == 0 and folder.name in r.stdout and "int8" in r.stdout and "int4" in r.stdout
    assert f"1 model, {format_bytes(m['bytes'])}" in r.stdout  # the total goes with the table


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


def test_rm_by_the_listed_name_without_its_hash(checkpoint, tmp_path, home):
    """`promoe stores rm my-moe`: the name the listing shows, less its hash, when it names one
    model (the bundled model has no alias to go by); two checkpoints of one name are refused."""
    other = tmp_path / "elsewhere" / "my-moe"
    shutil.copytree(checkpoint, other)
    _convert(checkpoint, home, "int4")
    _convert(other, home, "int4")
    r = runner.invoke(app, ["stores", "rm", "my-moe"])
    assert r.exit_code == 2 and "'my-moe' names 2 models' stores" in r.stderr
    assert model_dir(home, checkpoint).is_dir() and model_dir(home, other).is_dir()
    shutil.rmtree(model_dir(home, other))
    r = runner.invoke(app, ["stores", "rm", "my-moe"])
    assert r.exit_code == 0, r.output
    assert list((home / "stores").iterdir()) == []


def test_rm_errors_are_one_line(checkpoint, home):
    _convert(checkpoint, home, "int4")
    r = runner.invoke(app, ["stores", "rm", "no-such-model"])
    assert r.exit_code == 2 and r.stderr.startswith("error: no stores of 'no-such-model'")
    assert "promoe stores" in r.stderr.splitlines()[1]
    r = runner.invoke(app, ["stores", "rm", str(checkpoint), "--quant", "int2"])
    assert r.exit_code == 2 and "has no int2 store (it has: int4)" in r.stderr
    assert "-q takes a store's name as listed: int4" in r.stderr
    assert (model_dir(home, checkpoint) / "int4").is_dir()


def test_rm_of_int4_points_at_int4_cpu(tiny_model, home):
    """With the CPU as the device, int4 experts are stored as int4-cpu: -q int4 says so."""
    from quant.cpu_int4 import Int4CpuPacked, kernel_available

    if not kernel_available():
        pytest.skip("this torch has no CPU int4 kernel")
    checkpoint = tiny_model("mixtral", intermediate_size=128)  # int4-cpu needs multiples of 64
    ckpt = Checkpoint(checkpoint)
    open_store(ckpt, describe_model(ckpt), Int4CpuPacked(), home=home)
    r = runner.invoke(app, ["stores", "rm", str(checkpoint), "-q", "int4"])
    assert r.exit_code == 2 and "has no int4 store (it has: int4-cpu)" in r.stderr
    assert "use -q int4-cpu" in r.stderr


def test_a_running_conversion_is_not_removed(checkpoint, home):
    _convert(checkpoint, home, "int4")
    folder = model_dir(home, checkpoint)
    live = folder / f".int8.tmp-{os.getpid()}-0123abcd"  # this process is alive
    live.mkdir()
    r = runner.invoke(app, ["stores", "rm", folder.name])
    assert r.exit_code == 2 and f"process {os.getpid()}" in r.stderr
    assert (folder / "int4").is_dir() and live.is_dir()


def _dead_pid() -> str:
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip


def test_prune_removes_orphans_and_dead_leftovers_only(checkpoint, tiny_model, home):
    _convert(checkpoint, home, "int4")
    kept = tiny_model("olmoe")
    _convert(kept, home, "int4")
    orphan, keep = model_dir(home, checkpoint), model_dir(home, kept)
    leftover = keep / f".int8.tmp-{_dead_pid()}-deadbeef"
    leftover.mkdir()
    (leftover / "layer-000.safetensors").write_bytes(b"x" * 1000)
    shutil.rmtree(checkpoint)  # the checkpoint is gone (its folder's parent is still there)

    models = _listing(home)
    assert models[orphan.name]["checkpoint_state"] == "gone"
    assert models[keep.name]["checkpoint_state"] == "present"
    assert models[keep.name]["leftover_bytes"] == 1000

    r = runner.invoke(app, ["stores", "prune", "--dry-run"])
    assert r.exit_code == 0 and orphan.is_dir() and leftover.is_dir()
    assert f"would remove {orphan.name}" in r.stdout and "is gone" in r.stdout
    assert f"would remove {keep.name} (1.0 KB)" in r.stdout

    r = runner.invoke(app, ["stores", "prune"])
    assert r.exit_code == 0, r.output
    assert not orphan.exists() and not leftover.exists()
    assert (keep / "int4" / MANIFEST).is_file()
    assert list(_listing(home)) == [keep.name]

    r = runner.invoke(app, ["stores", "prune"])
    assert r.exit_code == 0 and "removed nothing" in r.stdout


def test_a_checkpoint_out_of_reach_is_unknown_and_never_pruned(checkpoint, home):
    """Not even the folder that held the checkpoint is there (an unmounted drive, say): its
    stores may be used again, so prune leaves them; rm by name still removes them."""
    _convert(checkpoint, home, "int4")
    folder = model_dir(home, checkpoint)
    shutil.rmtree(checkpoint.parent)
    assert _listing(home)[folder.name]["checkpoint_state"] == "unknown"
    r = runner.invoke(app, ["stores", "prune"])
    assert r.exit_code == 0 and "removed nothing" in r.stdout and folder.is_dir()
    assert runner.invoke(app, ["stores", "rm", folder.name]).exit_code == 0 and not folder.exists()


def test_a_manifest_that_names_no_checkpoint_is_listed_not_pruned(checkpoint, home):
    _convert(checkpoint, home, "int4")
    folder = model_dir(home, checkpoint)
    (folder / "int4" / MANIFEST).write_text(json.dumps({"source": "not a dict"}))
    m = _listing(home)[folder.name]
    assert m["checkpoint"] is None and m["checkpoint_state"] == "unknown"
    r = runner.invoke(app, ["stores"])
    assert r.exit_code == 0 and "unknown" in r.stdout
    r = runner.invoke(app, ["stores", "prune"])
    assert r.exit_code == 0 and folder.is_dir()


def test_a_removal_cut_short_is_listed_and_pruned(checkpoint, home):
    """A whole model's folder on its way out (renamed, not yet deleted, its process gone)
    is counted in the listing and removed by prune, which says so."""
    _convert(checkpoint, home, "int4")
    folder = model_dir(home, checkpoint)
    stray = folder.parent / f".{folder.name}.old-{_dead_pid()}-0badf00d"
    os.replace(folder, stray)
    size = _disk_bytes(stray)
    r = runner.invoke(app, ["stores"])
    assert r.exit_code == 0 and "left by a removal cut short" in r.stdout and "prune" in r.stdout
    assert json.loads(runner.invoke(app, ["stores", "--json"]).stdout)["leftover_bytes"] == size
    r = runner.invoke(app, ["stores", "prune", "--dry-run"])
    assert "would remove (stores)" in r.stdout and stray.is_dir()
    r = runner.invoke(app, ["stores", "prune"])
    assert r.exit_code == 0 and not stray.exists()
    from runtime.sizes import format_bytes

    assert "removed (stores)" in r.stdout and f"freed {format_bytes(size)}" in r.stdout


def test_a_linked_store_folder_is_not_followed(checkpoint, home, tmp_path):
    """promoe removes only what it made: a model folder that is a link (to a bigger disk)
    is refused, and what it points at stays."""
    _convert(checkpoint, home, "int4")
    folder = model_dir(home, checkpoint)
    elsewhere = tmp_path / "big-disk" / folder.name
    elsewhere.parent.mkdir()
    shutil.move(folder, elsewhere)
    folder.symlink_to(elsewhere, target_is_directory=True)
    assert folder.name in _listing(home)
    r = runner.invoke(app, ["stores", "rm", folder.name])
    assert r.exit_code == 2 and "is a link to" in r.stderr
    assert (elsewhere / "int4" / MANIFEST).is_file() and folder.is_symlink()


def test_only_what_a_live_process_works_on_is_refused(checkpoint, home):
    _convert(checkpoint, home, "int4")
    _convert(checkpoint, home, "int2")
    folder = model_dir(home, checkpoint)
    (folder / f".int8.tmp-{os.getpid()}-0123abcd").mkdir()  # this process is alive
    r = runner.invoke(app, ["stores", "rm", folder.name, "--quant", "int8"])
    assert r.exit_code == 2 and "has no int8 store" not in r.stderr and "conversion into" in r.stderr
    r = runner.invoke(app, ["stores", "rm", folder.name, "--quant", "int2"])
    assert r.exit_code == 0 and not (folder / "int2").exists()
    r = runner.invoke(app, ["stores", "rm", folder.name])
    assert r.exit_code == 2 and (folder / "int4").is_dir()


def test_a_reused_process_id_does_not_keep_a_leftover_alive(tmp_path, monkeypatch):
    """After a reboot the id in a dead conversion's name may belong to another process: a
    process that started after the temporary last changed is not its owner."""
    import time

    import psutil

    from runtime.store_paths import temporary_alive

    t = tmp_path / f".int4.tmp-{os.getppid()}-0123abcd"
    t.mkdir()
    assert temporary_alive(t)  # our parent started before it, and is alive

    class Later:
        def __init__(self, pid):
            pass

        def create_time(self):
            return time.time() + 60

    monkeypatch.setattr(psutil, "Process", Later)
    assert not temporary_alive(t)


def test_rm_needs_a_name_and_json_goes_with_the_listing(checkpoint, home):
    _convert(checkpoint, home, "int4")
    r = runner.invoke(app, ["stores", "rm", ""])
    assert r.exit_code == 2 and "name the model" in r.stderr
    assert (model_dir(home, checkpoint) / "int4").is_dir()
    r = runner.invoke(app, ["stores", "--json", "prune"])
    assert r.exit_code == 2 and "--json goes with the listing" in r.stderr


def test_rm_of_a_whole_model_says_its_predictor_went_too(checkpoint, home):
    from runtime.store_paths import PREDICTOR_FILE, PREDICTOR_META

    _convert(checkpoint, home, "int4")
    folder = model_dir(home, checkpoint)
    (folder / PREDICTOR_FILE).write_bytes(b"w" * 100)
    (folder / PREDICTOR_META).write_text(json.dumps({"source": {"model": str(checkpoint)}}))
    assert _listing(home)[folder.name]["predictor_bytes"] == _disk_bytes(folder) - _disk_bytes(
        folder / "int4"
    )
    r = runner.invoke(app, ["stores", "rm", str(checkpoint)])
    assert r.exit_code == 0 and "learned predictor" in r.stderr and "train-predictor" in r.stderr
    assert not folder.exists()


def test_the_listing_does_not_load_torch(home):
    r = subprocess.run([sys.executable, "-c", "import sys; from promoe_cli.main import run; sys.argv = "
                        "['promoe', 'stores']\ntry:\n    run()\nexcept SystemExit:\n    pass\n"
                        "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"


def test_a_long_checkpoint_path_keeps_its_state_and_its_end_in_the_table(
    tiny_model, home, tmp_path, monkeypatch
):
    """A Hugging Face cache path is longer than a terminal's column: the table wraps it rather
    than cutting it, and says "gone" first."""
    from promoe_cli.console import out

    monkeypatch.setattr(out, "width", 80)  # the console's width is fixed when it is made
    deep = tmp_path / "hub" / "models--someone--A-Rather-Long-Model-Name-v0.1" / "snapshots" / ("f" * 40)
    shutil.copytree(tiny_model("mixtral"), deep)
    _convert(deep, home, "int4")
    shutil.rmtree(deep)
    r = runner.invoke(app, ["stores"])
    assert r.exit_code == 0, r.output
    rows = "".join(line.strip(" │┃|") for line in r.stdout.splitlines())
    assert "gone:" in rows and "f" * 40 in rows.replace(" ", "").replace("│", "")
    name = model_dir(home, deep).name
    assert name in r.stdout  # whole: it is what `stores rm` takes


def test_the_listing_says_which_learned_predictor_the_loader_would_refuse(checkpoint, home):
    """A predictor cut short, or half of it gone, is listed as damaged, not as a sound one."""
    import xxhash

    from runtime.store_paths import PREDICTOR_FILE, PREDICTOR_META

    _convert(checkpoint, home, "int4")
    folder = model_dir(home, checkpoint)
    blob = b"weights" * 50
    (folder / PREDICTOR_FILE).write_bytes(blob)
    meta = {"source": {"model": str(checkpoint)}, "xxh3_128": xxhash.xxh3_128_hexdigest(blob)}
    (folder / PREDICTOR_META).write_text(json.dumps(meta))
    assert _listing(home)[folder.name]["predictor_damage"] is None

    (folder / PREDICTOR_FILE).write_bytes(blob[:-10])  # cut short
    assert _listing(home)[folder.name]["predictor_damage"] == "its checksum does not match"
    r = runner.invoke(app, ["stores"])
    assert r.exit_code == 0 and "damaged: its checksum does not match" in r.stdout
    assert "promoe train-predictor" in r.stderr

    (folder / PREDICTOR_META).write_text("{not json")
    assert _listing(home)[folder.name]["predictor_damage"] == f"{PREDICTOR_META} is unreadable"
    (folder / PREDICTOR_META).unlink()
    assert _listing(home)[folder.name]["predictor_damage"] == f"{PREDICTOR_META} is missing"
    (folder / PREDICTOR_FILE).unlink()
    assert _listing(home)[folder.name]["predictor_damage"] is None  # no predictor at all
    r = runner.invoke(app, ["stores"])
    assert "damaged" not in r.stdout and "train-predictor" not in r.stderr


def _cells(stdout: str, column: str) -> str:
    """One column of the table, its wrapped lines joined: what a reader takes in."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("┃"))
    names = [c.strip() for c in lines[head].strip("┃").split("┃")]
    at = names.index(column)
    rows = [line.strip("│").split("│") for line in lines[head + 1 :] if line.startswith("│")]
    return " ".join(" ".join(r[at].split()) for r in rows if r[at].strip())


def test_the_table_says_what_each_store_is_doing(checkpoint, tiny_model, home):
    """Each row: a store no manifest vouches for, one a live process converts or removes, what
    a dead one left; the line under the table totals it all and points at prune."""
    _convert(checkpoint, home, "int4")
    _convert(checkpoint, home, "int8")
    folder = model_dir(home, checkpoint)
    (folder / "int8" / MANIFEST).unlink()  # cut short: the next load rebuilds it
    (folder / f".int2.tmp-{os.getpid()}-0123abcd").mkdir()  # this process is alive
    (folder / f".int3.old-{os.getpid()}-0123abcd").mkdir()
    dead = folder / f".int5.tmp-{_dead_pid()}-deadbeef"
    dead.mkdir()
    (dead / "layer-000.safetensors").write_bytes(b"x" * 1000)
    m = _listing(home)[folder.name]
    assert m["formats"]["int8"]["complete"] is False and m["formats"]["int4"]["complete"] is True
    assert m["busy"] == [{"store": "int2", "kind": "converting", "pid": os.getpid()},
                         {"store": "int3", "kind": "removing", "pid": os.getpid()}]  # fmt: skip
    r = runner.invoke(app, ["stores"])
    assert r.exit_code == 0, r.output
    said, forms = " ".join(r.stdout.split()), _cells(r.stdout, "formats")
    assert "int8 " in forms and " (incomplete)" in forms and forms.count("(incomplete)") == 1
    assert f"(int2: converting, process {os.getpid()})" in forms
    assert f"(int3: being removed, process {os.getpid()})" in forms
    assert "(+1.0 KB left by an interrupted conversion or removal)" in forms
    assert f"1 model, {format_bytes(m['bytes'])}: promoe stores prune" in said

    # a second model whose checkpoint is gone, a third out of reach, and a removal cut short
    gone = tiny_model("olmoe")
    copy = checkpoint.parent.parent / "gone" / "olmoe"
    shutil.copytree(gone, copy)
    _convert(copy, home, "int4")
    shutil.rmtree(copy)
    far = checkpoint.parent.parent / "drive" / "far" / "qwen"
    shutil.copytree(tiny_model("qwen2_moe"), far)
    _convert(far, home, "int4")
    shutil.rmtree(far.parent)
    models = _listing(home)
    lost = models[model_dir(home, copy).name]
    r = runner.invoke(app, ["stores"])
    said = " ".join(r.stdout.split())
    assert f"notreachable:{far}" in _cells(r.stdout, "checkpoint").replace(" ", "")
    total = sum(x["bytes"] for x in models.values())
    assert (
        f"3 models, {format_bytes(total)}; 1 whose checkpoint is gone ({format_bytes(lost['bytes'])})" in said
    )

    root = home / "stores"
    stray = root / f".{folder.name}.old-{_dead_pid()}-0badf00d"
    os.replace(folder, stray)
    size = _disk_bytes(stray)
    r = runner.invoke(app, ["stores"])
    said = " ".join(r.stdout.split())
    assert f"2 models, {format_bytes(total - m['bytes'] + size)};" in said


def test_rm_of_one_format_keeps_the_predictor_and_says_nothing_of_it(checkpoint, home):
    from runtime.store_paths import PREDICTOR_FILE, PREDICTOR_META

    _convert(checkpoint, home, "int4")
    _convert(checkpoint, home, "int8")
    folder = model_dir(home, checkpoint)
    (folder / PREDICTOR_FILE).write_bytes(b"w" * 100)
    (folder / PREDICTOR_META).write_text(json.dumps({"source": {"model": str(checkpoint)}}))
    r = runner.invoke(app, ["stores", "rm", folder.name, "--quant", "int8"])
    assert r.exit_code == 0, r.output
    assert "predictor" not in r.output and (folder / PREDICTOR_FILE).is_file()


def test_rm_by_the_repo_id_chat_takes(checkpoint, home, tmp_path, monkeypatch):
    """`promoe stores rm someone/my-moe`: a model in the Hugging Face cache goes by its repo id."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    storage = cache / "models--someone--my-moe"
    snap = storage / "snapshots" / ("0" * 40)
    shutil.copytree(checkpoint, snap)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text("0" * 40)
    _convert(snap, home, "int4")
    folder = model_dir(home, snap)
    assert folder.is_dir()
    r = runner.invoke(app, ["stores", "rm", "someone/my-moe"])
    assert r.exit_code == 0, r.output
    assert f"removed {folder.name}" in r.stdout and not folder.exists()


def test_a_long_name_stays_whole_in_a_narrow_terminal(tiny_model, home, tmp_path, monkeypatch):
    """The name is what `stores rm` takes: whole, on one line. Where the table beside it would
    squeeze the other columns to slivers, each model is a block of lines instead."""
    from promoe_cli.console import out

    deep = tmp_path / "A-Rather-Long-Model-Name-For-A-Narrow-Terminal-v0.1"
    shutil.copytree(tiny_model("mixtral"), deep)
    _convert(deep, home, "int4")
    name = model_dir(home, deep).name
    for columns in (60, 80, len(name) + 63, len(name) + 64, 160):  # the table from name + 64 on
        monkeypatch.setattr(out, "width", columns)
        r = runner.invoke(app, ["stores"])
        assert r.exit_code == 0, r.output
        lines = r.stdout.splitlines()
        table = any(line.startswith("┏") for line in lines)
        assert table == (columns >= len(name) + 64), columns
        if table:  # every cell whole enough to read: none squeezed to a few letters
            assert "formats" in r.stdout and "int4 370" in r.stdout and name in r.stdout
        else:
            at = next(i for i, line in enumerate(lines) if line.startswith(name))
            checkpoint, formats, predictor = lines[at + 1 : at + 4]
            assert checkpoint == f"  checkpoint: {deep}" and predictor == "  predictor: -"
            assert formats.startswith("  formats: int4 ") and formats.endswith(" KB")
            assert lines[-1] == f"1 model, {format_bytes(_disk_bytes(model_dir(home, deep)))}"
