"""Choosing an ART backend: the checks that run before anything is written name what to set."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from codreamer.backends.factory import EMBEDDED_BASE_MODEL, BackendUnavailable, check_backend_available
from codreamer.cli import learn_loop_main
from codreamer.config import Settings


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith(("CODREAMER_", "WANDB_"))]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _gpu_with_unsloth(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "unsloth" else real(name, *a))


def test_an_art_backend_with_the_embedded_model_names_the_flag_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _gpu_with_unsloth(monkeypatch)
    assert learn_loop_main(["--runs-dir", str(tmp_path / "runs"), "--backend", "local"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and "--base-model" in line and "Qwen/Qwen2.5-0.5B-Instruct" in line
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert learn_loop_main(["--runs-dir", str(tmp_path / "runs"), "--backend", "serverless"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and "--base-model" in line and "OpenPipe/Qwen3-14B-Instruct" in line
    assert not (tmp_path / "runs").exists()


def test_a_hugging_face_model_passes_the_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpu_with_unsloth(monkeypatch)
    check_backend_available(Settings(backend="local", base_model="Qwen/Qwen2.5-0.5B-Instruct"))
    check_backend_available(
        Settings(backend="serverless", base_model="OpenPipe/Qwen3-14B-Instruct", wandb_api_key="k" * 40)
    )
    check_backend_available(Settings())  # the embedded default needs nothing
    with pytest.raises(BackendUnavailable, match=EMBEDDED_BASE_MODEL):
        check_backend_available(Settings(backend="serverless", wandb_api_key="k" * 40))
