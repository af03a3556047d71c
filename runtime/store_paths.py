"""Where expert stores live under ``$PROMOE_HOME/stores``, and the hidden temporaries
around them. No torch here: ``promoe stores`` lists and removes without loading it.

``stores/<model>-<hash>/`` holds a checkpoint's stores (``int4/``, ...) and its learned
predictor. A conversion writes into ``.<quant>.tmp-<pid>-<hex>`` beside its store and
renames it into place when complete; a store on its way out (replaced, or removed by
``promoe stores``) is first renamed to ``.<name>.old-<pid>-<hex>``, so a removal cut
short never leaves a store that gets used. A temporary whose process is gone is a
leftover, removed by the next conversion of that store or by ``promoe stores prune``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

MANIFEST = "manifest.json"
PREDICTOR_FILE = "predictor.safetensors"
PREDICTOR_META = "predictor.json"

_TEMPORARY = re.compile(r"\.(.+)\.(tmp|old)-(\d+)-[0-9a-f]+")


def model_dir(home: Path, checkpoint: Path) -> Path:
    """``stores/<model>-<hash>``: every store (one per quantization) and the learned
    predictor of the checkpoint at this path; the hash is of the resolved path."""
    src = str(Path(checkpoint).resolve())
    m = re.search(r"models--([^/]+)", src)
    slug = m.group(1) if m else Path(src).name
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", slug)[:60]
    return home / "stores" / f"{slug}-{hashlib.sha256(src.encode()).hexdigest()[:12]}"


def temporary_name(final: Path, kind: str) -> Path:
    """A fresh temporary beside ``final``: ``kind`` "tmp" (being written) or "old" (on its way out)."""
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def parse_temporary(path: Path) -> tuple[str, str, int] | None:
    """``(name of what it is for, "tmp" or "old", process id)`` for a temporary's name, else None."""
    m = _TEMPORARY.fullmatch(path.name)
    return (m.group(1), m.group(2), int(m.group(3))) if m else None


def temporary_alive(path: Path) -> bool:
    """Whether the process named in a temporary's name still works on it.

    A process id is reused after the owner dies (a reboot after a power cut), so a live
    process counts only if it started before the temporary last changed."""
    parsed = parse_temporary(path)
    if parsed is None:
        return False
    pid = parsed[2]
    if pid == os.getpid():
        return True
    import psutil

    try:
        started = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # not ours to inspect: assume it is at work
        return True
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    return started <= max(st.st_mtime, st.st_ctime) + 1.0


def discard(path: Path) -> None:
    """Remove a store folder: renamed to a temporary first, then deleted (a deletion cut
    short leaves a leftover, never a store)."""
    doomed = temporary_name(path, "old")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def remove_dead_temporaries(folder: Path, name: str | None = None) -> int:
    """Delete the temporaries in ``folder`` (those for ``name`` only, if given) whose process
    is gone; returns how many bytes that freed."""
    if not folder.is_dir():
        return 0
    freed = 0
    for p in folder.iterdir():
        parsed = parse_temporary(p)
        if parsed is not None and (name is None or parsed[0] == name) and not temporary_alive(p):
            freed += tree_bytes(p)
            shutil.rmtree(p, ignore_errors=True)
    return freed


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (``path`` itself if a file); links are not followed."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):  # removed while we looked
                total += os.lstat(os.path.join(root, f)).st_size
    return total
