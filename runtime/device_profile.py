"""Device profiles: facts about a device as TOML data, validated on load, applied to LoadOptions.

A profile is one TOML file (``profiles/README.md`` documents every field). Every figure
is a table ``{value, source}``: ``value`` is a string with a unit (``"6GiB"``,
``"12GB/s"``, ``"10us"``, ``"22TFLOPS"``) or a bare number in the base unit, and
``source`` starts with ``datasheet:``, ``estimate:`` or ``measured:`` and says where the
number comes from. Anything wrong (a missing or unknown field, a value that does not
parse, a reserve larger than the memory) raises :class:`ProfileError` naming the field.

Lookup by name (:func:`load_profile`): ``$PROMOE_HOME/profiles/NAME.toml`` (written by
``promoe profile-device --write NAME``) first, then the shipped ``profiles/NAME.toml``;
a path ending in ``.toml`` is read as is. An unknown name lists the available ones.

How a profile drives loading (:func:`apply_profile`):

* the budget is the profile's device memory, of which its reserved memory (OS, driver,
  CUDA context) is kept back; a unified-memory profile (Jetson, CPU) also counts the host
  expert store against that one pool;
* a GPU profile on a machine where the device resolves to the CPU means "emulate that
  device": its memory sizes the budget and its host-to-device bandwidth and per-copy
  latency become the emulated link, so transfer costs are visible;
* on a CUDA machine the profile only sizes the budget: the real link is used;
* a CPU profile makes ``--device auto`` the CPU; the real memory copy is its link.

Explicit command-line values win over the profile (``promoe_cli.loading.load_options``
applies the profile first, then the flags); an explicit ``--vram`` is the whole budget,
so the profile's reserve is not subtracted from it.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import InvalidSizeError, ProfileError
from runtime.sizes import format_bytes, parse_bandwidth, parse_duration, parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SOURCE_KINDS = ("datasheet", "estimate", "measured")
DEVICE_TYPES = ("cuda", "cpu")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

#: figure -> (unit kind, required)
FIGURES: dict[str, tuple[str, bool]] = {
    "device_memory": ("size", True),
    "reserved_memory": ("size", True),
    "host_memory": ("size", True),
    "link_bandwidth": ("bandwidth", True),
    "link_latency": ("duration", True),
    "device_bandwidth": ("bandwidth", True),
    "compute": ("flops", True),
    "link_bandwidth_pageable": ("bandwidth", False),
}
SCALARS = ("description", "device_type", "unified")
README_HINT = "the fields are described in profiles/README.md"

_FLOPS = {"flops": 1.0, "kflops": 1e3, "mflops": 1e6, "gflops": 1e9, "tflops": 1e12, "pflops": 1e15}


def parse_flops(text: str) -> float:
    """``"22TFLOPS"`` -> 2.2e13 floating-point operations per second."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]+)\s*(?:/\s*s)?\s*", str(text).lower())
    if m is None or m.group(2) not in _FLOPS:
        raise InvalidSizeError(f"'{text}' is not a compute rate", hint="write e.g. 22TFLOPS or 500GFLOPS")
    return float(m.group(1)) * _FLOPS[m.group(2)]


_PARSERS = {
    "size": parse_size,
    "bandwidth": parse_bandwidth,
    "duration": parse_duration,
    "flops": parse_flops,
}
_EXAMPLES = {"size": "6GiB", "bandwidth": "12GB/s", "duration": "10us", "flops": "22TFLOPS"}


@dataclass(frozen=True)
class Figure:
    value: float  # base units: bytes, bytes/s, seconds, FLOP/s
    source: str  # "datasheet: ...", "estimate: ..." or "measured: ..."

    @property
    def kind(self) -> str:
        return self.source.split(":", 1)[0].strip()


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    device_type: str  # "cuda" or "cpu"
    unified: bool  # host and device share one memory pool
    figures: dict[str, Figure]
    dequant: dict[str, float] = field(default_factory=dict)  # quant format -> weights/s (measured)
    dequant_source: str = ""
    path: Path | None = None

    def value(self, name: str) -> float | None:
        fig = self.figures.get(name)
        return fig.value if fig is not None else None

    @property
    def device_memory(self) -> int:
        return int(self.figures["device_memory"].value)

    @property
    def reserved_memory(self) -> int:
        return int(self.figures["reserved_memory"].value)

    @property
    def host_memory(self) -> int:
        return int(self.figures["host_memory"].value)

    @property
    def link_bandwidth(self) -> float:
        return self.figures["link_bandwidth"].value

    @property
    def link_latency(self) -> float:
        return self.figures["link_latency"].value


# -- locating -------------------------------------------------------------------------
def shipped_dir() -> Path:
    """``profiles/`` beside ``runtime/`` (the source tree, or site-packages for an install)."""
    return Path(__file__).resolve().parents[1] / "profiles"


def user_dir() -> Path:
    from runtime.resolve import promoe_home

    return promoe_home() / "profiles"


def available_profiles() -> dict[str, Path]:
    """Name -> file, user profiles shadowing shipped ones of the same name."""
    found: dict[str, Path] = {}
    for folder in (shipped_dir(), user_dir()):
        if folder.is_dir():
            found.update({p.stem: p for p in sorted(folder.glob("*.toml"))})
    return dict(sorted(found.items()))


def find_profile(name: str) -> Path:
    if name.endswith(".toml") or os.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ProfileError(
                f"no device profile file {path}", hint="pass a profile name or an existing .toml file"
            )
        return path
    for folder in (user_dir(), shipped_dir()):
        path = folder / f"{name}.toml"
        if path.is_file():
            return path
    names = ", ".join(available_profiles()) or "none"
    raise ProfileError(
        f"unknown device profile '{name}'",
        hint=f"available: {names}; measure this machine with: promoe profile-device --write NAME",
    )


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ProfileError(f"'{name}' is not a usable profile name",
                           hint="use lowercase letters, digits, '.', '_' and '-', e.g. my-laptop")  # fmt: skip
    return name


# -- loading and validating -----------------------------------------------------------
def load_profile(name_or_path: str) -> DeviceProfile:
    """Find, read and validate a profile (see module doc for the lookup order)."""
    path = find_profile(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"device profile {path} is not valid TOML ({exc})",
                           hint=f"fix the file; {README_HINT}") from None  # fmt: skip
    return parse_profile(data, name=path.stem, path=path)


def parse_profile(data: dict[str, Any], *, name: str, path: Path | None = None) -> DeviceProfile:
    """Validate a profile's parsed TOML; every error names the field at fault."""
    where = f"device profile '{name}'" + (f" ({path})" if path else "")

    def bad(fld: str, problem: str, hint: str = README_HINT) -> ProfileError:
        return ProfileError(f"{where}: field '{fld}' {problem}", hint=hint)

    unknown = sorted(set(data) - set(SCALARS) - set(FIGURES) - {"dequant"})
    if unknown:
        raise bad(
            unknown[0],
            "is not a profile field",
            f"known fields: {', '.join([*SCALARS, *FIGURES, 'dequant'])}",
        )
    description = data.get("description", "")
    if not isinstance(description, str):
        raise bad("description", "must be a string")
    device_type = data.get("device_type")
    if device_type is None:
        raise bad("device_type", "is missing", f'add device_type = "cuda" or "cpu"; {README_HINT}')
    if device_type not in DEVICE_TYPES:
        raise bad("device_type", f"must be one of {', '.join(DEVICE_TYPES)} (got {device_type!r})")
    unified = data.get("unified")
    if unified is None:
        raise bad(
            "unified", "is missing", f"add unified = true (Jetson: one memory pool) or false; {README_HINT}"
        )
    if not isinstance(unified, bool):
        raise bad("unified", f"must be true or false (got {unified!r})")
    figures = {}
    for fname, (kind, required) in FIGURES.items():
        if fname not in data:
            if required:
                raise bad(fname, "is missing", f"add [{fname}] with value and source; {README_HINT}")
            continue
        figures[fname] = _figure(data[fname], fname, kind, bad)
    reserved, total = figures["reserved_memory"].value, figures["device_memory"].value
    if reserved >= total:
        raise bad("reserved_memory", f"({format_bytes(reserved)}) must be smaller than device_memory "
                                     f"({format_bytes(total)})", "a bare number is bytes: write e.g. \"6GiB\"")  # fmt: skip
    dequant, dequant_source = _dequant(data.get("dequant", {}), bad)
    return DeviceProfile(name, description, device_type, unified, figures, dequant, dequant_source, path)


def _figure(raw: Any, fname: str, kind: str, bad) -> Figure:
    if not isinstance(raw, dict):
        raise bad(fname, f"must be a table with value and source, e.g. {fname} = {{ value = \"{_EXAMPLES[kind]}\", "
                         "source = \"datasheet: ...\" }")  # fmt: skip
    extra = sorted(set(raw) - {"value", "source"})
    if extra:
        raise bad(f"{fname}.{extra[0]}", "is not a field of a figure (only value and source)")
    value = raw.get("value")
    if isinstance(value, bool) or value is None:
        raise bad(
            f"{fname}.value", "is missing" if value is None else "must be a number or a string with a unit"
        )
    try:
        number = float(value) if isinstance(value, (int, float)) else _PARSERS[kind](value)
    except InvalidSizeError:
        raise bad(f"{fname}.value", f"is not a {kind} ({value!r})", f"write e.g. {_EXAMPLES[kind]}") from None
    if not number > 0 and not (fname == "reserved_memory" and number == 0):
        raise bad(f"{fname}.value", f"must be positive (got {value!r})")
    if not math.isfinite(number):
        raise bad(f"{fname}.value", f"must be finite (got {value!r})", f"write e.g. {_EXAMPLES[kind]}")
    if kind == "size" and number != int(number):
        raise bad(f"{fname}.value", f"is a fraction of a byte (got {value!r})",
                  "a bare number is bytes: write e.g. \"6GiB\"")  # fmt: skip
    source = raw.get("source")
    if (
        not isinstance(source, str)
        or source.split(":", 1)[0].strip() not in SOURCE_KINDS
        or ":" not in source
    ):
        raise bad(f"{fname}.source", "must say where the figure comes from, starting with "
                                     "'datasheet:', 'estimate:' or 'measured:'")  # fmt: skip
    return Figure(number, source)


def _dequant(raw: Any, bad) -> tuple[dict[str, float], str]:
    if not isinstance(raw, dict):
        raise bad("dequant", "must be a table of quant format = weights per second")
    rates = {}
    for key, value in raw.items():
        if key == "source":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise bad(
                f"dequant.{key}", f"must be a finite positive number of weights per second (got {value!r})"
            )
        rates[key] = float(value)
    source = raw.get("source", "")
    if rates and (
        not isinstance(source, str)
        or source.split(":", 1)[0].strip() not in SOURCE_KINDS
        or ":" not in source
    ):
        raise bad("dequant.source", "must start with 'measured:', 'estimate:' or 'datasheet:'")
    return rates, source if isinstance(source, str) else ""


# -- writing --------------------------------------------------------------------------
def _fmt_value(kind: str, v: float) -> str:
    if kind == "size":
        return f"{v / 1e9:.3f}GB"
    if kind == "bandwidth":
        return f"{v / 1e9:.3f}GB/s"
    if kind == "duration":
        return f"{v * 1e6:.2f}us"
    return f"{v / 1e12:.4f}TFLOPS"


def profile_to_toml(profile: DeviceProfile) -> str:
    import tomli_w

    data: dict[str, Any] = {
        "description": profile.description,
        "device_type": profile.device_type,
        "unified": profile.unified,
    }
    for fname, fig in profile.figures.items():
        data[fname] = {"value": _fmt_value(FIGURES[fname][0], fig.value), "source": fig.source}
    if profile.dequant:
        data["dequant"] = {
            "source": profile.dequant_source,
            **{k: float(f"{v:.4g}") for k, v in profile.dequant.items()},
        }
    header = f"# Device profile '{profile.name}'; fields: profiles/README.md in the promoe source.\n"
    return header + tomli_w.dumps(data)


def write_profile(profile: DeviceProfile, name: str) -> Path:
    """Save under $PROMOE_HOME/profiles/NAME.toml (atomically); ``--profile NAME`` then finds it."""
    check_name(name)
    folder = user_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    text = profile_to_toml(profile)
    parse_profile(tomllib.loads(text), name=name, path=path)  # never write what would not load
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


# -- applying -------------------------------------------------------------------------
def emulates_link(profile: DeviceProfile, device: str, cuda_available: bool) -> bool:
    """True when a GPU profile is used on a device that resolves to the CPU."""
    if profile.device_type == "cpu":
        return False
    resolved = ("cuda" if cuda_available else "cpu") if device == "auto" else device
    return resolved.split(":")[0] == "cpu"


def apply_profile(opts, profile: str | DeviceProfile, *, cuda_available: bool | None = None) -> DeviceProfile:
    """Fill ``opts`` (a :class:`runtime.loader.LoadOptions`) from a profile; see the module doc.

    Sets the budget (``vram``, ``reserved``, ``unified``), the device for a CPU profile
    under ``--device auto``, and the emulated link for a GPU profile on the CPU.
    Callers apply explicit command-line values afterwards, so those win.
    """
    prof = profile if isinstance(profile, DeviceProfile) else load_profile(profile)
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if prof.device_type == "cpu" and opts.device == "auto":
        opts.device = "cpu"
    opts.vram = prof.device_memory
    opts.reserved = prof.reserved_memory
    opts.unified = prof.unified
    opts.host_memory = prof.host_memory
    if emulates_link(prof, opts.device, cuda_available):
        opts.link_bandwidth = prof.link_bandwidth
        opts.link_latency = prof.link_latency
    return prof
