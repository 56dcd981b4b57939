"""The GPU environment (`scripts/gpu/`: the project + ART's LocalBackend) stays installable.

Checked here without a GPU: its lock is current with both pyprojects (`uv lock --check`, which
needs no network when the lock is current), it comes from PyPI alone, and it holds the versions
the overrides in `scripts/gpu/pyproject.toml` are there for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / "scripts" / "gpu"

pytestmark = pytest.mark.timeout(90)


def _lock() -> dict[str, dict[str, Any]]:
    packages = tomllib.loads((GPU / "uv.lock").read_text())["package"]
    return {p["name"]: p for p in packages}


def _uv() -> str | None:
    found = os.environ.get("UV") or shutil.which("uv")
    if found is None:  # `pip install uv` puts it beside the interpreter that runs uv
        candidate = Path(sys.executable).with_name("uv")
        found = str(candidate) if candidate.is_file() else None
    return found


def test_the_gpu_lock_is_current_with_both_pyprojects() -> None:
    uv = _uv()
    if uv is None:
        pytest.skip("uv is not on PATH")
    done = subprocess.run(
        [uv, "lock", "--check", "--project", str(GPU)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    if done.returncode != 0 and ("network" in done.stderr.lower() or "failed to fetch" in done.stderr.lower()):
        pytest.skip(f"PyPI unreachable: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, (
        "scripts/gpu/uv.lock is stale: run `uv lock --project scripts/gpu` after changing the project's "
        f"dependencies\n{done.stderr}"
    )


def test_the_gpu_set_comes_from_pypi_with_arts_gpu_stack() -> None:
    packages = _lock()
    sources = {name: p["source"] for name, p in packages.items()}
    assert sources["codreamer"] == {"editable": "../../"}
    assert sources["codreamer-gpu"] == {"virtual": "."}
    foreign = {
        n: s
        for n, s in sources.items()
        if n not in {"codreamer", "codreamer-gpu"} and s != {"registry": "https://pypi.org/simple"}
    }
    assert foreign == {}  # no PyTorch index, no git, no URL
    versions = {name: p["version"] for name, p in packages.items()}
    assert versions["openpipe-art"] == "0.5.23"
    assert versions["torch"] == "2.11.0"  # ART's pin (2.11.0+cu130) without the PyTorch index's local label
    assert versions["torchvision"] == "0.26.0"  # built for torch 2.11
    assert versions["transformers"] == "5.2.0" and versions["unsloth"] == "2026.3.3" and versions["trl"] == "0.20.0"
    assert {"unsloth-zoo", "bitsandbytes", "torchao", "nvidia-nccl-cu13"} <= set(versions)
    assert int(versions["wandb"].split(".")[1]) >= 31  # CoDreamer's floor, not ART's 0.28.0 pin
    assert {"llm", "llama-cpp-python"}.isdisjoint(versions)  # dropped, as in the CPU set
    # PyPI's torch 2.11.0 is the CUDA 13 build: the wheels ART's backend-cu130 extra expects
    torch_deps = {d["name"] for d in packages["torch"]["dependencies"]}
    assert {"nvidia-nccl-cu13", "cuda-toolkit"} <= torch_deps


def test_the_cpu_set_is_not_touched() -> None:
    """The README's two commands use the CPU lock: no GPU package may reach it."""
    cpu = {p["name"] for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}
    assert {"unsloth", "unsloth-zoo", "bitsandbytes", "codreamer-gpu"}.isdisjoint(cpu)
    assert "codreamer" in cpu
