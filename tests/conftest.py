"""Fixtures: tiny random checkpoints of every supported architecture, built offline once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from runtime.tiny import TINY_CONFIGS, build_tiny_model

ARCHS = list(TINY_CONFIGS)
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PROMOE_SHARED", REPO.parent / "shared"))

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="session", autouse=True)
def _isolated_session_home(tmp_path_factory):
    """PROMOE_HOME under the session's tmp dir from the first fixture on, module-scoped ones
    (which load models before any function-scoped fixture runs) included: never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROMOE_HOME", str(tmp_path_factory.getbasetemp() / "promoe-home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets PROMOE_HOME under its session tmp dir, never the user's (again, in
    case a test before it changed the environment)."""
    monkeypatch.setenv("PROMOE_HOME", str(tmp_path_factory.getbasetemp() / "promoe-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """``tiny_model(arch)`` -> path of a seeded random checkpoint (built on first use)."""

    def get(arch: str, **overrides) -> Path:
        name = arch + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
        path = tiny_dir / name
        if not (path / "config.json").is_file():
            build_tiny_model(arch, path, seed=0, **overrides)
        return path

    return get


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh PROMOE_HOME for tests that look at the expert store."""
    h = tmp_path / "home"
    monkeypatch.setenv("PROMOE_HOME", str(h))
    return h
