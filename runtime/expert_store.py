"""The host expert store: every expert quantized, one byte row each, persisted on disk.

Conversion streams the checkpoint one expert at a time (read, quantize, pack into its
row), so peak host memory stays near the store's own size. The result is saved under
``$PROMOE_HOME/stores/<model>/<quant>/`` as one safetensors file per MoE layer (a
``uint8 [E, row_bytes]`` tensor) plus ``manifest.json``, which records the source
checkpoint's identity (config hash, shard names, sizes, mtimes), the quantization, the
row layout, and an xxh3-128 checksum of every file.

Crash safety: a conversion writes into a temporary sibling directory and renames it into
place only after every file and the manifest are written and synced, so an interrupted
conversion (Ctrl-C, power loss) never leaves a store that gets used. Leftover temporary
directories of dead processes are removed on the next start.

On the next start the store is memory-mapped instead of converted again, after its
manifest and checksums are verified; a stale store (the checkpoint or the settings
changed) or a corrupt one (a checksum or size mismatch) is rebuilt.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file

from quant import QuantFormat
from runtime.checkpoint import Checkpoint
from runtime.errors import CheckpointError, InsufficientMemoryError, StoreError
from runtime.expert_layout import ExpertLayout, ExpertWeights
from runtime.model_spec import ModelSpec
from runtime.sizes import format_bytes
from runtime.store_paths import MANIFEST, discard, model_dir, remove_dead_temporaries, temporary_name

STORE_FORMAT = "promoe-expert-store"
STORE_VERSION = 1

#: progress(description, completed, total)
ProgressFn = Callable[[str, int, int], None]


@dataclass
class StoreReport:
    action: str  # "reused", "converted" or "rebuilt"
    reason: str  # why it was rebuilt ("" otherwise)
    seconds: float  # time spent converting or mapping + verifying
    path: Path
    nbytes: int
    source: str = ""  # what a conversion read: "the checkpoint", or "the int4 store" it repacked


class ExpertStore:
    """Quantized experts in host memory (pinned when copies go to a CUDA device).

    ``rows(layer)`` is a ``uint8 [E, row_bytes]`` tensor; ``row(layer, e)`` one expert,
    the unit every copy to the device moves.
    """

    def __init__(
        self, layout: ExpertLayout, layers: dict[int, torch.Tensor], path: Path, manifest: dict
    ) -> None:
        self.layout = layout
        self._rows = layers
        self.path = path
        self.manifest = manifest

    def rows(self, layer: int) -> torch.Tensor:
        return self._rows[layer]

    def row(self, layer: int, expert: int) -> torch.Tensor:
        return self._rows[layer][expert]

    def weights(self, layer: int, expert: int) -> ExpertWeights:
        """Typed host-side views of one expert (for computing a miss on the CPU)."""
        return self.layout.views(self._rows[layer][expert])

    @property
    def layers(self) -> list[int]:
        return list(self._rows)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self._rows.values())

    @property
    def pinned(self) -> bool:
        return all(t.is_pinned() for t in self._rows.values())

    @property
    def unpinned_layers(self) -> int:
        return sum(not t.is_pinned() for t in self._rows.values())


# -- reading experts from a checkpoint --------------------------------------------------


def read_expert(ckpt: Checkpoint, spec: ModelSpec, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """One expert in canonical form: ``gate_up [2I, H]``, ``down [H, I]`` (+ biases).

    Handles per-expert keys (``experts.{e}.w1/w3/w2`` or ``gate/up/down_proj``) and fused
    ``experts.gate_up_proj [E, ...]`` tensors, reading only this expert's bytes.
    """
    arch = spec.arch
    for prefix in dict.fromkeys((arch.disk_experts_prefix(layer), f"model.layers.{layer}.mlp.experts")):
        fused = f"{prefix}.gate_up_proj"
        if fused in ckpt:
            gate_up = ckpt.get_row(fused, expert)
            down = ckpt.get_row(f"{prefix}.down_proj", expert)
            if spec.transposed:  # stored [in, out]: F.linear wants [out, in]
                gate_up, down = gate_up.T, down.T
            out = {"gate_up": gate_up, "down": down}
            if spec.expert_shape.has_bias:
                out["gate_up_bias"] = ckpt.get_row(f"{fused}_bias", expert)
                out["down_bias"] = ckpt.get_row(f"{prefix}.down_proj_bias", expert)
            return out
        g, u, d = arch.expert_names
        first = f"{prefix}.{expert}.{g}.weight"
        if first in ckpt:
            gate_up = torch.cat([ckpt.get(first), ckpt.get(f"{prefix}.{expert}.{u}.weight")], dim=0)
            return {"gate_up": gate_up, "down": ckpt.get(f"{prefix}.{expert}.{d}.weight")}
    raise CheckpointError(
        f"expert {expert} of layer {layer} is not in the checkpoint",
        hint=f"looked for {arch.disk_experts_prefix(layer)}.{expert}.{arch.expert_names[0]}.weight "
        "and a fused experts.gate_up_proj",
    )


def _check_shapes(tensors: dict[str, torch.Tensor], layout: ExpertLayout, layer: int, expert: int) -> None:
    """The expert read from the checkpoint has the shapes its config.json implies."""
    want = {**layout.shape.matrices(), **layout.shape.biases()}
    for name, shape in want.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise CheckpointError(
                f"expert {expert} of layer {layer}: {name} is {list(got)} in the checkpoint, but its "
                f"config.json implies {list(shape)}",
                hint="the config.json does not match the weights; use the one that came with the checkpoint",
            )


# -- locating, validating, converting ---------------------------------------------------


def store_dir(home: Path, ckpt: Checkpoint, fmt: QuantFormat) -> Path:
    return model_dir(home, ckpt.path) / fmt.store_name


def _expected(ckpt: Checkpoint, spec: ModelSpec, fmt: QuantFormat, layout: ExpertLayout) -> dict[str, Any]:
    return {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "source": ckpt.identity(),
        "quant": {"name": fmt.name, "params": fmt.params()},
        "layout": layout.to_json(),
        "layers": spec.moe_layers,
        "num_experts": spec.num_experts,
    }


def _layer_file(layer: int) -> str:
    return f"layer-{layer:03d}.safetensors"


def _checksum(t: torch.Tensor) -> str:
    return xxhash.xxh3_128_hexdigest(t.contiguous().numpy())


def _stale_reason(manifest: dict, expected: dict) -> str | None:
    names = {
        "format": "not a promoe store",
        "version": "written by another promoe store version",
        "source": "the checkpoint changed since conversion",
        "quant": "the quantization settings changed",
        "layout": "the expert layout changed",
        "layers": "the MoE layers changed",
        "num_experts": "the number of experts changed",
    }
    for key, why in names.items():
        if manifest.get(key) != expected[key]:
            return why
    return None


def _load_verified(path: Path, manifest: dict, spec: ModelSpec, layout: ExpertLayout, pin: bool,
                   progress: ProgressFn | None, verify: bool = True) -> dict[int, torch.Tensor]:  # fmt: skip
    """Map every layer file, checking size, shape and (if ``verify``) checksum. Raises StoreError.

    With ``pin``, page-lock each layer while the host can spare it (HOST_MARGIN kept back);
    the layers after that stay memory-mapped: copies from them are synchronous and slower,
    and read from disk what the page cache does not hold, but the model runs."""
    rows: dict[int, torch.Tensor] = {}
    files = manifest.get("files", {})
    room = _available_host() - HOST_MARGIN if pin else 0
    for i, layer in enumerate(spec.moe_layers):
        name = _layer_file(layer)
        entry = files.get(name)
        fpath = path / name
        if entry is None or not fpath.is_file():
            raise StoreError(f"{name} is missing")
        if fpath.stat().st_size != entry["bytes"]:
            raise StoreError(f"{name} has the wrong size")
        try:
            with safe_open(fpath, framework="pt") as f:
                t = f.get_tensor("experts")  # memory-mapped, not read yet
        except Exception as exc:  # safetensors raises several types for a damaged header
            raise StoreError(f"{name} is unreadable ({exc})") from None
        if tuple(t.shape) != (spec.num_experts, layout.nbytes) or t.dtype != torch.uint8:
            raise StoreError(f"{name} has the wrong shape")
        if verify and _checksum(t) != entry["xxh3_128"]:
            raise StoreError(f"checksum mismatch in {name}")
        if pin and t.numel() <= room:
            try:
                t = _page_locked(t)
                room -= t.numel()
            except InsufficientMemoryError:  # the driver's limit: this layer and the rest stay mapped
                room = 0
        rows[layer] = t
        if progress:
            progress("Loading expert store", i + 1, len(spec.moe_layers))
    return rows


def _page_locked(t: torch.Tensor) -> torch.Tensor:
    """A page-locked copy of ``t``, its size rounded up to whole pages, so copies from it to
    the GPU run asynchronously on the copy streams.

    Not ``torch.empty(..., pin_memory=True)``: PyTorch's caching host allocator rounds every
    block up to a power of two, so a Mixtral-8x7B int4 layer (0.74 GiB) would lock 1 GiB and
    the store 32 GiB instead of 23.6. An anonymous mapping registered with the driver locks
    only its own pages, and is unregistered when it is freed. Raises
    :class:`InsufficientMemoryError` when the host cannot spare the memory.
    """
    import mmap
    import weakref

    nbytes = t.numel() * t.element_size()
    # Whole pages of its own (an anonymous mapping): the driver locks every page a range
    # touches and refuses a range touching a page already locked (712,
    # cudaErrorHostMemoryAlreadyRegistered), so two heap neighbours sharing a page (small
    # layers, once a freed buffer has raised malloc's mmap threshold) would leave every
    # layer after the first unlocked.
    locked = -(-max(nbytes, 1) // mmap.PAGESIZE) * mmap.PAGESIZE
    mem = mmap.mmap(-1, locked, flags=mmap.MAP_PRIVATE)  # anonymous, as malloc's
    buf = torch.frombuffer(mem, dtype=t.dtype, count=t.numel()).view(t.shape)
    buf.copy_(t)
    cudart = torch.cuda.cudart()
    ptr = buf.data_ptr()
    err = int(cudart.cudaHostRegister(ptr, locked, 0))
    if err != 0:
        _clear_cuda_error()
        raise InsufficientMemoryError(
            f"the driver could not page-lock {format_bytes(nbytes)} of host memory for the expert "
            f"store (CUDA error {err})", needed=nbytes, available=_available_host(), hint=_PIN_HINT,
        )  # fmt: skip
    # the mapping outlives every tensor on it (their storage holds it): unregistered only
    # once the last view of it, a copy's source included, is gone
    weakref.finalize(mem, cudart.cudaHostUnregister, ptr)
    return buf


def _clear_cuda_error() -> bool:
    """Reset CUDA's last error after a failed call whose code was already handled here;
    True if the cudart torch uses was found to do it.

    The runtime keeps it per thread until cudaGetLastError reads it, and torch checks that
    after every kernel launch, so a refused cudaHostRegister would otherwise surface as an
    unrelated error in the next kernel (say, of the bench configuration that runs next).
    torch's own bindings do not offer the call; the cudart that torch already loaded does
    (RTLD_NOLOAD: never load another copy).
    """
    import ctypes

    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"):
        try:
            ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL).cudaGetLastError()
            return True
        except (OSError, AttributeError):
            continue
    return False


#: host memory left free when page-locking the store (the OS, the page cache, promoe itself)
HOST_MARGIN = 1 << 30
_PIN_HINT = "close other programs, or use smaller experts (e.g. --quant int3 or int2)"


def _available_host() -> int:
    import psutil

    return psutil.virtual_memory().available


@dataclass
class _Source:
    """A valid store of ``layout.fmt`` (a format the one converted repacks), read, not converted."""

    name: str
    layout: ExpertLayout
    rows: dict[int, torch.Tensor]

    def repack(self, layer: int, expert: int, layout: ExpertLayout, out: torch.Tensor) -> None:
        """Expert ``expert`` of ``layer`` into ``out``, a row of ``layout``: its parts repacked."""
        src, dst = self.layout.views(self.rows[layer][expert]), layout.views(out)
        for mat, shape in layout.shape.matrices().items():
            for name, t in layout.fmt.repack(getattr(src, mat), shape).items():
                getattr(dst, mat)[name].copy_(t)
        for name in layout.shape.biases():
            getattr(dst, name).copy_(getattr(src, name))


def _repack_source(
    ckpt: Checkpoint, spec: ModelSpec, fmt: QuantFormat, home: Path, progress: ProgressFn | None
) -> _Source | None:
    """The store ``fmt`` can be repacked from (int4 for int4-cpu), if one is there, up to date
    with the checkpoint and intact (checksums verified: a damaged one is never repacked)."""
    src_fmt = fmt.repack_source()
    if src_fmt is None:
        return None
    layout = ExpertLayout(spec.expert_shape, src_fmt)
    path = store_dir(home, ckpt, src_fmt)
    if not (path / MANIFEST).is_file():
        return None
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if _stale_reason(manifest, _expected(ckpt, spec, src_fmt, layout)) is not None:
            return None
        check = _renamed(progress, f"Checking the {src_fmt.store_name} store to repack")
        return _Source(src_fmt.store_name, layout, _load_verified(path, manifest, spec, layout, False, check))
    except Exception:  # noqa: BLE001 - any damage at all: a shortcut not taken, the checkpoint is read
        return None


def _renamed(progress: ProgressFn | None, title: str) -> ProgressFn | None:
    """``progress`` reporting under ``title``."""
    return None if progress is None else (lambda _desc, done, total: progress(title, done, total))


def _convert(ckpt: Checkpoint, spec: ModelSpec, layout: ExpertLayout, expected: dict, tmp: Path,
             quantize_device: torch.device | None, progress: ProgressFn | None, title: str,
             source: _Source | None = None) -> dict:  # fmt: skip
    """Write every layer file and then the manifest into ``tmp``: each expert quantized from
    the checkpoint, or repacked from ``source``. Returns the manifest."""
    t0 = time.perf_counter()
    files: dict[str, dict] = {}
    total = spec.total_experts
    done = 0
    for layer in spec.moe_layers:
        buf = torch.empty((spec.num_experts, layout.nbytes), dtype=torch.uint8)  # one layer of rows
        for e in range(spec.num_experts):
            if source is not None:
                source.repack(layer, e, layout, buf[e])
            else:
                tensors = read_expert(ckpt, spec, layer, e)
                ckpt.close()  # unmap what was read: resident memory stays one expert, not a shard
                _check_shapes(tensors, layout, layer, e)
                if quantize_device is not None:
                    tensors = {k: v.to(quantize_device) for k, v in tensors.items()}
                layout.pack(tensors, out=buf[e])
            done += 1
            if progress:
                progress(title, done, total)
        name = _layer_file(layer)
        save_file({"experts": buf}, tmp / name)
        files[name] = {"bytes": (tmp / name).stat().st_size, "xxh3_128": _checksum(buf)}
        del buf
    manifest = {**expected, "files": files, "conversion_seconds": round(time.perf_counter() - t0, 3),
                "created_unix": int(time.time()),
                "converted_from": f"the {source.name} store" if source else "the checkpoint"}  # fmt: skip
    for name in files:
        _fsync(tmp / name)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync(tmp / MANIFEST)
    return manifest


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_store(
    ckpt: Checkpoint,
    spec: ModelSpec,
    fmt: QuantFormat,
    *,
    home: Path,
    pin: bool = False,
    quantize_device: torch.device | None = None,
    progress: ProgressFn | None = None,
) -> tuple[ExpertStore, StoreReport]:
    """Reuse the store for (checkpoint, quantization) if valid, else convert it. See module doc."""
    layout = ExpertLayout(spec.expert_shape, fmt)
    final = store_dir(home, ckpt, fmt)
    expected = _expected(ckpt, spec, fmt, layout)
    remove_dead_temporaries(final.parent, final.name)
    reason = "no store yet"
    t0 = time.perf_counter()
    if (final / MANIFEST).is_file():
        try:
            manifest = json.loads((final / MANIFEST).read_text())
            stale = _stale_reason(manifest, expected)
            if stale is None:
                rows = _load_verified(final, manifest, spec, layout, pin, progress)
                report = StoreReport(
                    "reused", "", time.perf_counter() - t0, final, sum(t.numel() for t in rows.values())
                )
                return ExpertStore(layout, rows, final, manifest), report
            reason = f"stale: {stale}"
        # ValueError: bad JSON or UTF-8; AttributeError, TypeError, KeyError: JSON of another shape
        except (StoreError, ValueError, KeyError, TypeError, AttributeError) as exc:
            reason = f"corrupt: {exc}" if isinstance(exc, StoreError) and str(exc) else "corrupt manifest"
    elif final.exists():
        reason = "corrupt: manifest missing"

    action = "converted" if reason == "no store yet" else "rebuilt"
    title = (
        f"Converting experts to {fmt.name}"
        if action == "converted"
        else f"Rebuilding the {fmt.name} expert store ({reason})"
    )
    t0 = time.perf_counter()
    source = _repack_source(ckpt, spec, fmt, home, progress)
    if source is not None:
        title += f" (repacking the {source.name} store)"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(final, "tmp")
    tmp.mkdir()
    try:
        manifest = _convert(ckpt, spec, layout, expected, tmp, quantize_device, progress, title, source)
        del source  # unmap the int4 store read from: the new store is loaded (and pinned) next
        if final.exists():
            with contextlib.suppress(OSError):  # a leftover at worst, cleared next time
                discard(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written survives, Ctrl-C included
        with contextlib.suppress(OSError):  # nor the model's folder, if nothing else is in it
            final.parent.rmdir()
        raise
    convert_s = time.perf_counter() - t0
    rows = _load_verified(final, manifest, spec, layout, pin, None, verify=False)  # checksummed as written
    report = StoreReport(action, "" if action == "converted" else reason, convert_s, final,
                         sum(t.numel() for t in rows.values()), manifest["converted_from"])  # fmt: skip
    return ExpertStore(layout, rows, final, manifest), report
