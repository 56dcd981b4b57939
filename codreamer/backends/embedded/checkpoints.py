"""Step folders on disk: listing, atomic writing, and a small cache of older adapters.

A step folder holds the adapter in PEFT's format (`adapter_config.json` +
`adapter_model.safetensors`, loadable with `PeftModel.from_pretrained`) and, when saved, the
optimizer state (`optimizer.pt`). It is written into a hidden temporary folder and renamed,
so a crash never leaves half a step that a restart would resume from.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from art.utils.output_dirs import get_model_dir

if TYPE_CHECKING:
    import art

    from codreamer.backends.embedded.policy import Policy

CHECKPOINT_DIR_RE = re.compile(r"^\d{4,}$")
#: Older adapters kept in memory for `name@step` requests (each ~20 MB at rank 16).
CACHED_ADAPTERS = 2


def checkpoints_dir(model: art.Model) -> Path:
    return Path(get_model_dir(model, art_path=model.base_path)) / "checkpoints"


def steps_in(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and CHECKPOINT_DIR_RE.match(p.name))


def checkpoint_steps(model: art.Model) -> list[int]:
    return steps_in(checkpoints_dir(model))


def save_step(policy: Policy, root: Path, step: int, with_optimizer: bool) -> Path:
    """Write step `step`'s folder atomically (temporary folder, then rename)."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{step:04d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{step:04d}-", dir=root))
    try:
        policy.save(staging, optimizer=with_optimizer)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


class AdapterCache:
    """The last few older adapters read from disk, by step (thread-safe: the sampler thread reads it)."""

    def __init__(self, size: int = CACHED_ADAPTERS) -> None:
        self.size = size
        self._entries: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, step: int, folder: Path) -> dict[str, torch.Tensor]:
        from codreamer.backends.embedded.policy import load_adapter

        with self._lock:
            if step in self._entries:
                self._entries.move_to_end(step)
                return self._entries[step]
        state = load_adapter(folder)
        with self._lock:
            self._entries[step] = state
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return state

    def forget(self, step: int) -> None:
        with self._lock:
            self._entries.pop(step, None)
