"""The host expert store is reused, verified, rebuilt when corrupt or stale, and never half-written."""

from __future__ import annotations

import json
import os

import pytest
import torch

from quant import get_format
from runtime.checkpoint import Checkpoint
from runtime.expert_store import MANIFEST, open_store, read_expert, store_dir
from runtime.model_spec import describe_model


def _open(path, home, quant="int8", progress=None):
    ckpt = Checkpoint(path)
    return open_store(ckpt, describe_model(ckpt), get_format(quant), home=home, progress=progress)


def test_reused_on_second_load(tiny_model, home):
    path = tiny_model("mixtral")
    store1, rep1 = _open(path, home)
    assert rep1.action == "converted"
    files = sorted(rep1.path.glob("*.safetensors"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    store2, rep2 = _open(path, home)
    assert rep2.action == "reused"
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # nothing was rewritten
    for layer in store1.layers:
        assert torch.equal(store1.rows(layer), store2.rows(layer))


def test_store_content_round_trips(tiny_model, home):
    """Exact format: every expert in the store dequantizes to the checkpoint's weights."""
    path = tiny_model("gpt_oss")  # fused, transposed, with biases
    ckpt = Checkpoint(path)
    spec = describe_model(ckpt)
    store, _ = open_store(ckpt, spec, get_format("none"), home=home)
    for layer in spec.moe_layers:
        for e in range(spec.num_experts):
            want = read_expert(ckpt, spec, layer, e)
            got = store.layout.dequantize(store.weights(layer, e), torch.float32)
            for k in want:
                torch.testing.assert_close(got[k], want[k].float(), rtol=0, atol=0)


def test_corrupt_store_is_detected_and_rebuilt(tiny_model, home):
    path = tiny_model("olmoe")
    _, rep = _open(path, home)
    victim = sorted(rep.path.glob("layer-*.safetensors"))[1]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF  # flip one byte of expert data
    victim.write_bytes(bytes(data))
    store, rep2 = _open(path, home)
    assert rep2.action == "rebuilt"
    assert "corrupt" in rep2.reason and "checksum" in rep2.reason
    _, rep3 = _open(path, home)
    assert rep3.action == "reused"


def test_truncated_or_missing_manifest_is_rebuilt(tiny_model, home):
    path = tiny_model("olmoe")
    _, rep = _open(path, home)
    for damage in (b"{not json", b"[]", b'{"files": []}', b"\xff\xfe not UTF-8", b"null"):
        (rep.path / MANIFEST).write_bytes(damage)  # unreadable, or JSON of another shape
        assert _open(path, home)[1].action == "rebuilt", damage
    f = sorted(rep.path.glob("layer-*.safetensors"))[0]
    f.write_bytes(f.read_bytes()[:50])
    _, rep2 = _open(path, home)
    assert rep2.action == "rebuilt" and "corrupt" in rep2.reason


def test_stale_store_is_rebuilt_when_checkpoint_changes(tiny_model, tmp_path, home):
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(tiny_model("mixtral"), path)
    _open(path, home)
    shard = path / "model.safetensors"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the checkpoint was replaced
    _, rep = _open(path, home)
    assert rep.action == "rebuilt" and "stale" in rep.reason
    _, rep_q = _open(path, home, quant="int4")  # another quantization is another store
    assert rep_q.action == "converted"


def test_a_store_quantized_another_way_is_rebuilt(tiny_model, home):
    """int3's clip search changes the stored values, not the layout: a store written without
    it (an older promoe) is stale for today's int3."""
    from quant.formats import GroupwiseInt

    path = tiny_model("mixtral")
    ckpt = Checkpoint(path)
    spec = describe_model(ckpt)
    open_store(ckpt, spec, GroupwiseInt(3, group_size=64), home=home)
    _, rep = _open(path, home, quant="int3")
    assert rep.action == "rebuilt" and "stale" in rep.reason


def test_interrupted_conversion_leaves_nothing_used(tiny_model, home):
    path = tiny_model("qwen2_moe")
    calls = {"n": 0}

    def interrupt(desc, done, total):
        calls["n"] += 1
        if done == total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _open(path, home, progress=interrupt)
    final = store_dir(home, Checkpoint(path), get_format("int8"))
    assert not final.exists()
    assert not list(final.parent.glob(".*tmp*"))  # the temporary directory was removed
    assert not final.parent.exists()  # nor a model folder left empty
    _, rep = _open(path, home)
    assert rep.action == "converted"
    manifest = json.loads((rep.path / MANIFEST).read_text())
    assert manifest["quant"]["name"] == "int8" and len(manifest["files"]) == 4


def test_leftover_temporaries_of_dead_processes_are_removed(tiny_model, home):
    path = tiny_model("mixtral")
    final = store_dir(home, Checkpoint(path), get_format("int8"))
    final.parent.mkdir(parents=True)
    stale = final.parent / f".{final.name}.tmp-999999-deadbeef"  # no such pid
    stale.mkdir()
    (stale / "layer-000.safetensors").write_bytes(b"half")
    _open(path, home)
    assert not stale.exists()


class FakeCudart:
    """Stands in for ``torch.cuda.cudart()``: records what is page-locked. Like the driver, it
    locks every page a range touches and refuses a range that touches a page already locked
    (712, cudaErrorHostMemoryAlreadyRegistered)."""

    PAGE = 4096

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.registered: dict[int, int] = {}

    def _pages(self, ptr: int, size: int) -> range:
        return range(ptr // self.PAGE, (ptr + size - 1) // self.PAGE + 1)

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802 - CUDA's name
        if self.fail:
            return 2  # cudaErrorMemoryAllocation
        new = set(self._pages(ptr, size))
        if any(new.intersection(self._pages(p, n)) for p, n in self.registered.items()):
            return 712  # cudaErrorHostMemoryAlreadyRegistered
        self.registered[ptr] = size
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        del self.registered[ptr]
        return 0


def test_the_pinned_store_locks_exactly_its_own_bytes(tiny_model, home, monkeypatch):
    """On CUDA the store is page-locked by registering a plain allocation of exactly its
    size (the caching host allocator would round each layer up to a power of two), and the
    registration ends with the memory. Layers the host cannot spare stay memory-mapped."""
    import gc

    from runtime import expert_store

    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    path = tiny_model("mixtral")
    ckpt = Checkpoint(path)
    spec = describe_model(ckpt)
    plain, _ = open_store(ckpt, spec, get_format("int4"), home=home)
    store, _ = open_store(ckpt, spec, get_format("int4"), home=home, pin=True)
    # each layer's own pages: its bytes rounded up to whole pages, shared with no other layer
    page = FakeCudart.PAGE
    sizes = {
        store.rows(layer).data_ptr(): -(-store.rows(layer).numel() // page) * page for layer in store.layers
    }
    assert cudart.registered == sizes
    for layer in store.layers:
        assert torch.equal(store.rows(layer), plain.rows(layer))
    del store
    gc.collect()
    assert cudart.registered == {}

    # room for two layers beside the margin: those are locked, the rest stay memory-mapped
    layer_bytes = plain.rows(plain.layers[0]).numel()
    monkeypatch.setattr(
        expert_store, "_available_host", lambda: expert_store.HOST_MARGIN + 2 * layer_bytes + 1
    )
    store, _ = open_store(ckpt, spec, get_format("int4"), home=home, pin=True)
    assert [
        layer for layer in store.layers if store.rows(layer).data_ptr() in cudart.registered
    ] == store.layers[:2]
    for layer in store.layers:
        assert torch.equal(store.rows(layer), plain.rows(layer))
    del store
    gc.collect()
    # the driver refuses: nothing more is locked, nothing fails, and its error is cleared
    monkeypatch.setattr(expert_store, "_available_host", lambda: 1 << 50)
    failing = FakeCudart(fail=True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: failing)
    cleared = []
    monkeypatch.setattr(expert_store, "_clear_cuda_error", lambda: cleared.append(True))
    store, _ = open_store(ckpt, spec, get_format("int4"), home=home, pin=True)
    assert failing.registered == {}
    assert all(torch.equal(store.rows(layer), plain.rows(layer)) for layer in store.layers)
    assert cleared == [True]  # tried once, the rest left mapped; no CUDA error is left for the next kernel


def test_every_layer_of_a_small_store_is_page_locked(tiny_model, home, monkeypatch):
    """Layers of a small store (under glibc's mmap threshold once a freed buffer of their size
    has raised it, as conversion does) come from the heap back to back, so a plain allocation
    shares its first and last pages with its neighbours; the driver refuses to lock a page
    twice, which would leave every layer after the first one pageable."""
    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    path = tiny_model("mixtral")
    ckpt = Checkpoint(path)
    spec = describe_model(ckpt)
    store, _ = open_store(ckpt, spec, get_format("int4"), home=home, pin=True)  # converted, then locked
    assert sorted(cudart.registered) == sorted(store.rows(layer).data_ptr() for layer in store.layers)
    store2, _ = open_store(ckpt, spec, get_format("int8"), home=home, pin=True)  # beside the first store
    assert len(cudart.registered) == len(store.layers) + len(store2.layers)


def test_a_copy_source_keeps_its_layer_page_locked(tiny_model, home, monkeypatch):
    """A ticket holds a row (a view of its layer) until its copy is done: the layer must stay
    registered while any view of it lives, even when the store itself is gone."""
    import gc

    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    ckpt = Checkpoint(tiny_model("mixtral"))
    store, _ = open_store(ckpt, describe_model(ckpt), get_format("int4"), home=home, pin=True)
    row = store.row(store.layers[0], 3)
    n = len(cudart.registered)
    del store
    gc.collect()
    assert len(cudart.registered) == 1 and n > 1  # the layer the row is on, only
    del row
    gc.collect()
    assert cudart.registered == {}


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("format", "not a promoe store"),
        ("version", "another promoe store version"),
        ("layout", "layout changed"),
        ("layers", "MoE layers changed"),
        ("num_experts", "number of experts changed"),
    ],
)
def test_a_manifest_field_that_no_longer_matches_makes_the_store_stale(tiny_model, home, key, why):
    """A store whose manifest records another format, store version, row layout, set of MoE
    layers or expert count (say, written by another promoe) is rebuilt, and the reason says
    which; its checksums still match, so only the field check can tell."""
    path = tiny_model("mixtral")
    _, rep = _open(path, home)
    manifest = json.loads((rep.path / MANIFEST).read_text())
    manifest[key] = {
        "format": "another-store",
        "version": manifest["version"] + 1,
        "layout": {**manifest["layout"], "nbytes": -1},
        "layers": [*manifest["layers"], 99],
        "num_experts": manifest["num_experts"] + 1,
    }[key]
    (rep.path / MANIFEST).write_text(json.dumps(manifest))
    _, rep2 = _open(path, home)
    assert rep2.action == "rebuilt" and rep2.reason.startswith("stale: ") and why in rep2.reason, rep2.reason
    assert _open(path, home)[1].action == "reused"


def test_a_missing_layer_file_or_entry_is_detected_and_rebuilt(tiny_model, home):
    path = tiny_model("olmoe")
    _, rep = _open(path, home)
    victim = sorted(rep.path.glob("layer-*.safetensors"))[1]
    victim.unlink()
    _, rep2 = _open(path, home)
    assert rep2.action == "rebuilt" and rep2.reason == f"corrupt: {victim.name} is missing"
    manifest = json.loads((rep.path / MANIFEST).read_text())
    del manifest["files"][victim.name]  # the file is there, the manifest does not vouch for it
    (rep.path / MANIFEST).write_text(json.dumps(manifest))
    _, rep3 = _open(path, home)
    assert rep3.action == "rebuilt" and rep3.reason == f"corrupt: {victim.name} is missing"
    (rep.path / MANIFEST).unlink()
    _, rep4 = _open(path, home)
    assert rep4.action == "rebuilt" and rep4.reason == "corrupt: manifest missing"
    assert _open(path, home)[1].action == "reused"


@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_a_layer_file_of_another_shape_or_type_is_rebuilt(tiny_model, home, change):
    """The same bytes (so the same checksum) as another shape or element type, the manifest's
    size updated to match: still not a layer of this store."""
    from safetensors.torch import save_file

    path = tiny_model("mixtral")
    store, rep = _open(path, home)
    name = sorted(rep.path.glob("layer-*.safetensors"))[0].name
    rows = store.rows(store.layers[0]).clone()
    save_file({"experts": rows.view(2, -1) if change == "shape" else rows.view(torch.int8)}, rep.path / name)
    manifest = json.loads((rep.path / MANIFEST).read_text())
    manifest["files"][name]["bytes"] = (rep.path / name).stat().st_size
    (rep.path / MANIFEST).write_text(json.dumps(manifest))
    del store
    _, rep2 = _open(path, home)
    assert rep2.action == "rebuilt" and rep2.reason == f"corrupt: {name} has the wrong shape"


def test_a_killed_conversion_leaves_no_store_and_the_next_start_converts(tiny_model, home):
    """A conversion cut off with no chance to clean up (killed, power lost) has written
    only into its temporary: no store folder exists, so none gets used, and the next start
    converts afresh (not "rebuilt" from a half-written folder) and clears the leftover."""
    import subprocess
    import sys

    from tests.conftest import REPO

    path = tiny_model("qwen2_moe")
    code = (
        "import os, sys\n"
        "from quant import get_format\n"
        "from runtime.checkpoint import Checkpoint\n"
        "from runtime.expert_store import open_store\n"
        "from runtime.model_spec import describe_model\n"
        "from pathlib import Path\n"
        "ckpt = Checkpoint(sys.argv[1])\n"
        "def die(desc, done, total):\n"
        "    if done == total // 2 + 1:\n"
        "        os._exit(9)\n"
        "open_store(ckpt, describe_model(ckpt), get_format('int8'), home=Path(sys.argv[2]), progress=die)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(path), str(home)], cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 9, r.stderr
    final = store_dir(home, Checkpoint(path), get_format("int8"))
    assert not final.exists()
    assert list(final.parent.glob(f".{final.name}.tmp-*"))  # what it wrote: a leftover temporary
    _, rep = _open(path, home)
    assert rep.action == "converted" and rep.reason == ""
    assert not list(final.parent.glob(f".{final.name}.tmp-*"))


def test_every_file_is_synced_before_the_store_is_renamed_into_place(tiny_model, home, monkeypatch):
    """Power lost right after the rename must not find files whose data never reached the
    disk: each layer file and the manifest is fsynced before the temporary becomes the store."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tiny_model("mixtral")
    _, rep = _open(path, home)
    renamed = events.index(("replace", str(rep.path)))
    synced = {ino for kind, ino in events[:renamed] if kind == "fsync"}
    files = [*rep.path.glob("layer-*.safetensors"), rep.path / MANIFEST]
    assert len(files) == 5 and all(f.stat().st_ino in synced for f in files), events


def test_a_layer_that_exactly_fits_the_room_left_is_page_locked(tiny_model, home, monkeypatch):
    """Room beside the margin for exactly two layers, to the byte: both are locked."""
    from runtime import expert_store

    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    ckpt = Checkpoint(tiny_model("mixtral"))
    spec = describe_model(ckpt)
    plain, _ = open_store(ckpt, spec, get_format("int4"), home=home)
    layer_bytes = plain.rows(plain.layers[0]).numel()
    monkeypatch.setattr(expert_store, "_available_host", lambda: expert_store.HOST_MARGIN + 2 * layer_bytes)
    store, _ = open_store(ckpt, spec, get_format("int4"), home=home, pin=True)
    locked = [layer for layer in store.layers if store.rows(layer).data_ptr() in cudart.registered]
    assert locked == store.layers[:2]
