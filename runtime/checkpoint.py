"""Read a Hugging Face safetensors checkpoint tensor by tensor, never all at once.

:class:`Checkpoint` knows which shard holds each key (from the index, or by reading the
shard headers), opens shards lazily with ``safe_open`` (memory-mapped), and reads either
a whole tensor or one expert's slice of a fused ``[E, ...]`` tensor.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from runtime.errors import CheckpointError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


class Checkpoint:
    """A checkpoint directory: ``config.json`` plus one or more ``*.safetensors`` shards."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(
                f"{self.path} has no config.json", hint="point promoe at a Hugging Face model folder"
            )
        self.config_bytes = config_path.read_bytes()
        try:
            self.config: dict[str, Any] = json.loads(self.config_bytes)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path} is not valid JSON ({exc.msg}, line {exc.lineno})",
                                  hint="re-download or repair config.json") from None  # fmt: skip
        except UnicodeDecodeError:
            raise CheckpointError(f"{config_path} is not valid JSON (not UTF-8 text)",
                                  hint="re-download or repair config.json") from None  # fmt: skip
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{config_path} is not a JSON object (it holds a {type(self.config).__name__})",
                                  hint="re-download or repair config.json")  # fmt: skip
        self._handles: dict[str, Any] = {}

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file (read on first use, so config errors come first)."""
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                wm = json.loads(index.read_bytes())["weight_map"]
                if not isinstance(wm, dict) or not all(isinstance(f, str) for f in wm.values()):
                    raise TypeError
            except (ValueError, KeyError, TypeError):  # not JSON, not UTF-8, no weight_map of names
                raise CheckpointError(
                    f"{index} is not a safetensors index (JSON with a weight_map of tensor names to shard files)",
                    hint="finish the download (hf download REPO) or copy model.safetensors.index.json again",
                ) from None
            missing = sorted({f for f in wm.values() if not (self.path / f).is_file()})
            if missing:
                raise CheckpointError(
                    f"{self.path} is incomplete: {len(missing)} shard(s) missing, e.g. {missing[0]}",
                    hint="finish the download (hf download REPO) or copy the missing files",
                )
            return dict(wm)
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            has_bin = any(self.path.glob("*.bin")) or any(self.path.glob("*.pt"))
            raise CheckpointError(
                f"{self.path} has no .safetensors weights"
                + (" (only PyTorch .bin files)" if has_bin else ""),
                hint="promoe reads safetensors checkpoints; re-save with model.save_pretrained(..., safe_serialization=True)",
            )
        wm: dict[str, str] = {}
        for shard in shards:
            with _open_shard(shard) as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    wm[key] = shard.name
        return wm

    # -- identity -------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What a converted store must match to be reused: config hash, shard names, sizes, mtimes."""
        files = []
        for name in sorted(set(self.weight_map.values())):
            st = (self.path / name).stat()
            files.append({"name": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        return {
            "path": str(self.path.resolve()),
            "config_sha256": hashlib.sha256(self.config_bytes).hexdigest(),
            "files": files,
        }

    # -- reading --------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def _handle(self, key: str):
        try:
            shard = self.weight_map[key]
        except KeyError:
            raise CheckpointError(
                f"tensor '{key}' is not in the checkpoint at {self.path}",
                hint="the checkpoint and its config.json do not match, or the download is incomplete; re-download it",
            ) from None
        h = self._handles.get(shard)
        if h is None:
            h = self._handles[shard] = _open_shard(self.path / shard)
        return h

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self._handle(key).get_slice(key).get_dtype()]

    def nbytes(self, key: str) -> int:
        n = 1
        for d in self.shape(key):
            n *= d
        return n * self.dtype(key).itemsize

    def get(self, key: str) -> torch.Tensor:
        return self._handle(key).get_tensor(key)

    def get_row(self, key: str, index: int) -> torch.Tensor:
        """``tensor[index]`` of a stacked ``[E, ...]`` tensor, reading only that row."""
        return self._handle(key).get_slice(key)[index]

    def close(self) -> None:
        self._handles.clear()


def _open_shard(path: Path):
    """``safe_open`` whose failures (a truncated download, a missing shard) are CheckpointErrors."""
    try:
        return safe_open(path, framework="pt")
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:120]})",
            hint="the download may be incomplete: fetch the model again",
        ) from exc
