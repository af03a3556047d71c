"""What promoe keeps under ``$PROMOE_HOME/stores``: list it, remove it, prune it.

Each converted checkpoint has a folder ``stores/<model>-<hash>`` (see
``store_paths.model_dir``) holding one expert store per quantization (``int4/``,
``int2/``...: a manifest naming the checkpoint it came from, and one file per layer) and
perhaps a learned predictor. A store is as large as the checkpoint's experts at that
width, 24 GB for Mixtral-8x7B in int4, and is converted again whenever it is needed; a
learned predictor is not (``promoe train-predictor`` makes it).

A model's checkpoint is *gone* when the folder that held it is still there but the
checkpoint is not (deleted, moved, an old Hugging Face snapshot pruned): nothing will
use its stores again, and ``prune`` removes them. When not even that folder exists (an
unmounted drive, say), or no manifest names the checkpoint, it is *unknown*: listed, and
removed only by name. Nothing is removed while a live process works in the folder.
Torch is never imported here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import UsageError
from runtime.store_paths import (
    MANIFEST,
    PREDICTOR_FILE,
    PREDICTOR_META,
    discard,
    model_dir,
    parse_temporary,
    remove_dead_temporaries,
    temporary_alive,
    tree_bytes,
)


@dataclass(frozen=True)
class StoredFormat:
    quant: str  # the quantization's name, e.g. "int4"
    nbytes: int
    complete: bool  # False: no readable manifest (a store that the next load rebuilds)


@dataclass(frozen=True)
class StoredModel:
    path: Path  # stores/<model>-<hash>
    source: Path | None  # the checkpoint its stores came from (None: nothing says)
    formats: tuple[StoredFormat, ...]
    predictor_bytes: int  # the learned predictor's files; 0 when there is none
    predictor_damage: str | None  # why the predictor would be refused (None: sound, or none)
    leftover_bytes: int  # temporaries whose process is gone
    busy: tuple[tuple[str, str, int], ...]  # (store name, "tmp" or "old", pid) of live temporaries

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.formats) + self.predictor_bytes + self.leftover_bytes

    @property
    def checkpoint(self) -> str:
        """ "present", "gone" (its folder's parent is there, the checkpoint is not) or "unknown"."""
        if self.source is None:
            return "unknown"
        if (self.source / "config.json").is_file():
            return "present"
        return "gone" if self.source.parent.is_dir() else "unknown"


@dataclass(frozen=True)
class Pruned:
    name: str
    nbytes: int
    reason: str


def _source(data: object, *keys: str) -> Path | None:
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return Path(data) if isinstance(data, str) and data else None


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def describe(path: Path) -> StoredModel:
    """What one ``stores/<model>-<hash>`` folder holds."""
    formats, sources, busy = [], [], []
    leftover = 0
    for entry in sorted(path.iterdir()):
        parsed = parse_temporary(entry)
        if parsed is not None:
            if temporary_alive(entry):
                busy.append(parsed)
            else:
                leftover += tree_bytes(entry)
        elif entry.is_dir() and not entry.name.startswith("."):
            manifest = _read_json(entry / MANIFEST)
            source = _source(manifest, "source", "path")
            if source is not None:
                sources.append(source)
            formats.append(StoredFormat(entry.name, tree_bytes(entry), isinstance(manifest, dict)))
    if not sources:  # a predictor alone also names its checkpoint
        source = _source(_read_json(path / PREDICTOR_META), "source", "model")
        sources += [source] if source is not None else []
    predictor = sum(tree_bytes(path / f) for f in (PREDICTOR_FILE, PREDICTOR_META) if (path / f).is_file())
    return StoredModel(
        path, sources[0] if sources else None, tuple(formats), predictor, predictor_damage(path), leftover,
        tuple(busy),
    )  # fmt: skip


def predictor_damage(path: Path) -> str | None:
    """What the loader would refuse in the learned predictor beside ``path``'s stores: one
    of its two files missing, settings that are not JSON, weights whose checksum does not
    match (a file cut short). None when it is sound or there is none. Shapes and values are
    only checked by loading it (``runtime.predictor.load_learned_predictor``)."""
    weights, settings = path / PREDICTOR_FILE, path / PREDICTOR_META
    if not weights.is_file() and not settings.is_file():
        return None
    if not weights.is_file() or not settings.is_file():
        return f"{PREDICTOR_META if weights.is_file() else PREDICTOR_FILE} is missing"
    meta = _read_json(settings)
    if not isinstance(meta, dict):
        return f"{PREDICTOR_META} is unreadable"
    if "xxh3_128" in meta:
        import xxhash

        try:
            if xxhash.xxh3_128_hexdigest(weights.read_bytes()) != meta["xxh3_128"]:
                return "its checksum does not match"
        except OSError:
            return f"{PREDICTOR_FILE} is unreadable"
    return None


def list_stores(home: Path) -> list[StoredModel]:
    """Every model folder under ``home/stores``, largest first."""
    root = home / "stores"
    if not root.is_dir():
        return []
    found = [describe(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(found, key=lambda m: (-m.nbytes, m.name))


def root_leftovers(home: Path) -> int:
    """Bytes of whole model folders whose removal was cut short (they are only pruned)."""
    root = home / "stores"
    if not root.is_dir():
        return 0
    return sum(tree_bytes(p) for p in root.iterdir() if parse_temporary(p) and not temporary_alive(p))


def find(home: Path, target: str) -> StoredModel | None:
    """The stores of ``target``: a folder name from the listing (``tiny-code-moe-8366a8204067``)
    or the path of a checkpoint. None when there are none."""
    root = home / "stores"
    for candidate in (root / target, model_dir(home, Path(target).expanduser())):
        if candidate.parent == root and candidate.is_dir() and not candidate.name.startswith("."):
            return describe(candidate)
    return None


def remove(model: StoredModel, quant: str | None = None, *, dry_run: bool = False) -> int:
    """Delete the model's stores and predictor (or only its ``quant`` store); returns the
    bytes freed (with ``dry_run``, that would be freed, and nothing is deleted).

    Raises UsageError while a live process converts (or removes) what would be removed,
    when the model has no ``quant`` store, or when the folder is a symbolic link (promoe
    deletes only what it made, not what a link points at)."""
    busy = [b for b in model.busy if quant is None or b[0] == quant]
    if busy:
        what, kind, pid = busy[0]
        doing = "a conversion into" if kind == "tmp" else "a removal of"
        raise UsageError(f"{doing} {model.name}/{what} is running (process {pid})",
                         hint="let it finish or stop it, then run this again")  # fmt: skip
    if quant is None:
        target, freed = model.path, model.nbytes
    else:
        fmt = next((f for f in model.formats if f.quant == quant), None)
        if fmt is None:
            names = [f.quant for f in model.formats]
            variant = next((n for n in names if n.startswith(f"{quant}-")), None)
            if variant is not None:  # int4 experts the CPU computes are stored as int4-cpu
                hint = f"its {quant} experts are stored as {variant}: use -q {variant}"
            elif names:
                hint = f"-q takes a store's name as listed: {', '.join(names)}"
            else:
                hint = "'promoe stores' lists every store"
            raise UsageError(
                f"{model.name} has no {quant} store (it has: {', '.join(names) or 'none'})", hint=hint
            )
        target, freed = model.path / quant, fmt.nbytes
    if target.is_symlink():
        raise UsageError(f"{target} is a link to {target.resolve()}: promoe removes only what it made",
                         hint=f"delete {target.resolve()} yourself if it holds the store, then the link")  # fmt: skip
    if dry_run:
        return freed
    discard(target)
    if quant is not None and not any(model.path.iterdir()):  # its last store
        model.path.rmdir()
    return freed


def prune(home: Path, *, dry_run: bool = False) -> list[Pruned]:
    """Remove the model folders whose checkpoint is gone, and the leftovers of interrupted
    conversions and removals; returns what went (with ``dry_run``, would go)."""
    done = []
    for model in list_stores(home):
        if model.checkpoint == "gone" and not model.busy and not model.path.is_symlink():
            done.append(
                Pruned(model.name, remove(model, dry_run=dry_run), f"its checkpoint {model.source} is gone")
            )
        elif model.leftover_bytes:
            freed = model.leftover_bytes if dry_run else remove_dead_temporaries(model.path)
            done.append(Pruned(model.name, freed, "leftovers of an interrupted conversion or removal"))
    stray = root_leftovers(home)
    if stray:
        freed = stray if dry_run else remove_dead_temporaries(home / "stores")
        done.append(Pruned("(stores)", freed, "model folders whose removal was cut short"))
    return done
