"""Find a model on this machine, offline: a directory, a cached Hugging Face repo, or an alias.

Nothing is ever downloaded. In order:

1. no reference: the bundled default model (``models/tiny-code-moe`` in the source
   tree, or ``$PROMOE_DEFAULT_MODEL``); if that is missing, a small random MoE that
   promoe builds offline from a fixed seed under ``$PROMOE_HOME/models`` on first use;
2. an existing directory with a ``config.json``;
3. a short alias (``mixtral``, ``qwen3-moe``, ...), tried against the local Hugging Face
   cache in its listed order (instruct releases first);
4. a repo id (``org/name``) in the local Hugging Face cache.

``promoe plan`` may go one step further (:func:`known_config`): for an alias or repo id
that is not on this machine, promoe ships the model's ``config.json`` (nothing else), so
a user can see what fits before downloading tens of gigabytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ModelNotFoundError, UsageError

#: alias -> (what it is, candidate repo ids in preference order)
ALIASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mixtral": ("Mixtral-8x7B-Instruct-v0.1", ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mistralai/Mixtral-8x7B-v0.1")),
    "qwen1.5-moe": ("Qwen1.5-MoE-A2.7B", ("Qwen/Qwen1.5-MoE-A2.7B-Chat", "Qwen/Qwen1.5-MoE-A2.7B")),
    "qwen3-moe": ("Qwen3-30B-A3B", ("Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B-Instruct-2507")),
    "olmoe": ("OLMoE-1B-7B", ("allenai/OLMoE-1B-7B-0924-Instruct", "allenai/OLMoE-1B-7B-0125-Instruct",
                              "allenai/OLMoE-1B-7B-0924")),
    "deepseek-v2-lite": ("DeepSeek-V2-Lite", ("deepseek-ai/DeepSeek-V2-Lite-Chat", "deepseek-ai/DeepSeek-V2-Lite")),
    "phi-moe": ("Phi-3.5-MoE", ("microsoft/Phi-3.5-MoE-instruct",)),
    "gpt-oss": ("gpt-oss-20b (bf16)", ("unsloth/gpt-oss-20b-BF16", "openai/gpt-oss-20b")),
}  # fmt: skip
ALIASES["gpt-oss-20b"] = ALIASES["gpt-oss"]
ALIASES["qwen3-30b-a3b"] = ALIASES["qwen3-moe"]
ALIASES["phi-3.5-moe"] = ALIASES["phi-moe"]

SOURCE_ROOT = Path(__file__).resolve().parents[1]
#: ``<org>--<name>/config.json`` of each alias's first repo (package data)
KNOWN_CONFIGS = Path(__file__).resolve().parent / "known_configs"
BUNDLED_MODEL = SOURCE_ROOT / "models" / "tiny-code-moe"
FALLBACK_NAME = "tiny-random-moe"


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    source: str  # "bundled", "random", "directory", "hf-cache", "config" (shipped config.json only)
    label: str  # what to call it on screen


def promoe_home() -> Path:
    """``$PROMOE_HOME`` (default ``~/.cache/promoe``): refused if it exists and is not a folder."""
    home = Path(os.environ.get("PROMOE_HOME") or Path.home() / ".cache" / "promoe").expanduser()
    if home.exists() and not home.is_dir():
        raise UsageError(
            f"PROMOE_HOME={home} is a file, not a folder",
            hint="point PROMOE_HOME at a folder (it is made if missing), or unset it for ~/.cache/promoe",
        )
    return home


def _hf_cached(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None
    return path if (path / "config.json").is_file() else None


def _is_repo_id(ref: str) -> bool:
    """``org/name`` as the Hub spells repo ids (a path with a space, say, is not one)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return True


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def default_model() -> ResolvedModel:
    env = os.environ.get("PROMOE_DEFAULT_MODEL")
    if env:
        try:
            return resolve_model(env)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(
                f"PROMOE_DEFAULT_MODEL={env}: {exc}", hint=f"{exc.hint}; or unset PROMOE_DEFAULT_MODEL"
            ) from None
    if (BUNDLED_MODEL / "config.json").is_file():
        return ResolvedModel(BUNDLED_MODEL, "bundled", "tiny-code-moe (bundled)")
    path = promoe_home() / "models" / FALLBACK_NAME
    if not (path / "config.json").is_file():
        from runtime.tiny import build_tiny_model

        build_tiny_model("mixtral", path, seed=0)
    return ResolvedModel(path, "random", f"{FALLBACK_NAME} (random weights, seed 0)")


def resolve_model(ref: str | None) -> ResolvedModel:
    """Turn what the user typed into a local checkpoint directory, or explain where we looked."""
    if ref is None or ref == "":
        return default_model()
    p = Path(ref).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(
                f"{p} is a directory but has no config.json", hint="point at a Hugging Face model folder"
            )
        return ResolvedModel(p.resolve(), "directory", p.name)
    key = ref.lower()
    if key in ALIASES:
        what, repos = ALIASES[key]
        for repo in repos:
            path = _hf_cached(repo)
            if path is not None:
                return ResolvedModel(path, "hf-cache", repo)
        raise ModelNotFoundError(
            f"'{ref}' ({what}) is not on this machine: none of {', '.join(repos)} is in the Hugging Face "
            f"cache ({_hf_cache_dir()})",
            hint=f"download it once with: hf download {repos[0]}  (promoe never downloads by itself)"
            + _plan_first(ref),
        )
    if "/" in ref and _is_repo_id(ref):  # org/name: not a path (./x, ~/x, /x, a/b/c) nor "my models/x"
        path = _hf_cached(ref)
        if path is not None:
            return ResolvedModel(path, "hf-cache", ref)
        raise ModelNotFoundError(
            f"model '{ref}' not found: no directory {ref}, and not in the Hugging Face cache ({_hf_cache_dir()})",
            hint=f"download it once with: hf download {ref}, or pass a local directory" + _plan_first(ref),
        )
    if Path(ref).expanduser().exists():
        raise ModelNotFoundError(
            f"model '{ref}' is a file, not a model folder",
            hint="pass the folder that holds config.json and the safetensors weights",
        )
    raise ModelNotFoundError(
        f"model '{ref}' not found: no such directory, and it is not a known alias",
        hint=f"pass a model folder, a Hugging Face repo id in your cache, or one of: {', '.join(sorted(ALIASES))}",
    )


def _plan_first(ref: str) -> str:
    if not known_config(ref):
        return ""
    import torch

    gpu = "" if torch.cuda.is_available() else " --dtype bfloat16"  # as a GPU computes, not this CPU
    return f"; to see first what fits: promoe plan {ref} --vram 6GB{gpu}"


def known_config(ref: str | None) -> ResolvedModel | None:
    """The shipped ``config.json`` of an alias or repo id (see module doc), or None.

    Only for planning: a folder with a config and no weights cannot be loaded."""
    if not ref:
        return None
    key = ref.lower()
    repos = ALIASES[key][1] if key in ALIASES else (ref,)
    for repo in repos:
        path = KNOWN_CONFIGS / repo.replace("/", "--")
        if (path / "config.json").is_file():
            return ResolvedModel(
                path, "config", f"{repo} (not on this machine: planned from its config.json)"
            )
    return None
