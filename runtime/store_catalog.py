"""What promoe keeps under ``$PROMOE_HOME/stores``: list it, remove it, prune it.

Each converted checkpoint has a folder ``stores/<model>-<hash>`` (see
``expert_store.model_dir``) holding one expert store per quantization (``int4/``,
``int2/``...: a manifest naming the checkpoint it came from, and one file per layer) and
perhaps a learned predictor. A store is as large as the checkpoint's experts at that
width, 24 GB for Mixtral-8x7B in int4, and is rebuilt whenever it is needed again, so
removing one loses only the time to convert it. A store is *orphaned* when the checkpoint
it came from is no longer at its path (moved, deleted, or an old snapshot in the
Hugging Face cache that was pruned): nothing will use it again.

Removal first renames the folder to a hidden temporary name that ``open_store`` treats as
a dead process's leftover, so a removal cut short never leaves a half-deleted store that
looks usable. A folder in which a conversion is still running is not removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import UsageError
from runtime.expert_store import MANIFEST, model_dir, pid_alive, temporary_owner
from runtime.predictor import PREDICTOR_FILE, PREDICTOR_META


@dataclass(frozen=True)
class StoredFormat:
    quant: str  # the quantization's name, e.g. "int4"
    nbytes: int
    complete: bool  # False: no readable manifest (a store that the next load rebuilds)


@dataclass(frozen=True)
class StoredModel:
    path: Path  # stores/<model>-<hash>
    source: Path | None  # the checkpoint its stores came from (None: no manifest says)
    formats: tuple[StoredFormat, ...]
    predictor_bytes: int  # the learned predictor's files; 0 when there is none
    leftover_bytes: int  # temporaries of conversions whose process is gone
    converting: tuple[int, ...]  # ids of live processes converting into this folder

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.formats) + self.predictor_bytes + self.leftover_bytes

    @property
    def orphaned(self) -> bool:
        """True when no checkpoint will use these stores again: its folder is gone."""
        return self.source is None or not (self.source / "config.json").is_file()


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):  # removed while we looked
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _manifest(store: Path) -> dict | None:
    try:
        data = json.loads((store / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe(path: Path) -> StoredModel:
    """What one ``stores/<model>-<hash>`` folder holds."""
    formats, sources, converting = [], [], []
    leftover = 0
    for entry in sorted(path.iterdir()):
        pid = temporary_owner(entry)
        if pid is not None:
            if pid_alive(pid):
                converting.append(pid)
            else:
                leftover += _tree_bytes(entry)
        elif entry.is_dir() and not entry.name.startswith("."):
            manifest = _manifest(entry)
            source = (manifest or {}).get("source", {}).get("path") if manifest else None
            if isinstance(source, str):
                sources.append(Path(source))
            formats.append(StoredFormat(entry.name, _tree_bytes(entry), manifest is not None))
    if not sources:  # a predictor alone also names its checkpoint
        try:
            model = json.loads((path / PREDICTOR_META).read_text()).get("source", {}).get("model")
        except (OSError, ValueError, AttributeError):
            model = None
        if isinstance(model, str):
            sources.append(Path(model))
    predictor = sum(_tree_bytes(path / f) for f in (PREDICTOR_FILE, PREDICTOR_META) if (path / f).is_file())
    return StoredModel(path, sources[0] if sources else None, tuple(formats), predictor, leftover,
                       tuple(converting))  # fmt: skip


def list_stores(home: Path) -> list[StoredModel]:
    """Every model folder under ``home/stores``, largest first."""
    root = home / "stores"
    if not root.is_dir():
        return []
    found = [describe(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(found, key=lambda m: (-m.nbytes, m.name))


def find(home: Path, target: str) -> StoredModel | None:
    """The stores of ``target``: a folder name from the listing (``tiny-code-moe-8366a8204067``)
    or the path of a checkpoint. None when there are none."""
    root = home / "stores"
    for candidate in (root / target, model_dir(home, Path(target).expanduser())):
        if candidate.parent == root and candidate.is_dir() and not candidate.name.startswith("."):
            return describe(candidate)
    return None


def remove(model: StoredModel, quant: str | None = None, *, dry_run: bool = False) -> int:
    """Delete the model's stores (or only its ``quant`` store); returns the bytes freed
    (with ``dry_run``, that would be freed, and nothing is deleted).

    Raises UsageError while a conversion runs into the folder, or when it has no ``quant``
    store."""
    if model.converting:
        raise UsageError(
            f"a conversion into {model.path} is running (process {model.converting[0]})",
            hint="wait for it to finish or stop it, then remove the store",
        )
    if quant is None:
        target, freed = model.path, model.nbytes
    else:
        fmt = next((f for f in model.formats if f.quant == quant), None)
        if fmt is None:
            have = ", ".join(f.quant for f in model.formats) or "none"
            raise UsageError(f"{model.name} has no {quant} store (it has: {have})",
                             hint="'promoe stores' lists every store")  # fmt: skip
        target, freed = model.path / quant, fmt.nbytes
    if dry_run:
        return freed
    # Renamed first, to a name open_store clears as a dead process's leftover (our pid is
    # gone once we exit), so a removal cut short is never mistaken for a store.
    doomed = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(target, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
    if quant is not None and not any(model.path.iterdir()):  # its last store
        model.path.rmdir()
    return freed


def _drop_dead_leftovers(path: Path) -> None:
    for entry in path.iterdir():
        pid = temporary_owner(entry)
        if pid is not None and not pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


def prune(home: Path, *, dry_run: bool = False) -> list[tuple[StoredModel, int]]:
    """Remove every orphaned model folder, and dead conversions' leftovers everywhere;
    returns what went (with ``dry_run``, would go) and how many bytes each freed."""
    done = []
    for model in list_stores(home):
        if model.orphaned and not model.converting:
            done.append((model, remove(model, dry_run=dry_run)))
        elif model.leftover_bytes:
            if not dry_run:
                _drop_dead_leftovers(model.path)
            done.append((model, model.leftover_bytes))
    if (home / "stores").is_dir() and not dry_run:  # a removal of a whole folder cut short
        _drop_dead_leftovers(home / "stores")
    return done
