"""Taking a trained model out of CoDreamer: a step's adapter, or a merged Hugging Face model.

Every step folder of the embedded backend is a PEFT adapter (`adapter_config.json` +
`adapter_model.safetensors`) over the embedded base model (SmolLM2-135M-Instruct, de-quantised
to fp32). `export_checkpoint` writes either

- an adapter folder (`merged=False`): the adapter files plus the tokenizer; load it with
  `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<base>), folder)`, or give it
  to vLLM as a LoRA module over the same base (`adapter_config.json` names the base folder); or
- a merged model folder (`merged=True`): the LoRA deltas folded into the base weights, saved as
  a plain transformers model (`config.json`, `model.safetensors`, tokenizer with its chat
  template); `AutoModelForCausalLM.from_pretrained(folder)` (or vLLM) loads it with no peft.

Steps written before adapter configs were saved (only `adapter_model.safetensors`) get one
built from the weights' shapes; their LoRA alpha is not recorded, so it must be given.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from codreamer.backends.embedded.checkpoints import steps_in
from codreamer.backends.embedded.policy import ADAPTER_FILE, LORA_TARGETS
from codreamer.backends.embedded.weights import EMBEDDED_MODEL_NAME, load_embedded_model

__all__ = ["ExportError", "ExportResult", "export_checkpoint"]

CONFIG_FILE = "adapter_config.json"


class ExportError(ValueError):
    """The run or step cannot be exported; the message says why."""


@dataclass(frozen=True)
class ExportResult:
    step: int
    output: Path
    merged: bool


def latest_step(run_directory: Path) -> int:
    """The newest step with a checkpoint folder in the run (ExportError when there is none)."""
    return _step_folder(run_directory, None)[0]


def _step_folder(run_directory: Path, step: int | None) -> tuple[int, Path]:
    root = run_directory / "checkpoints"
    steps = steps_in(root)
    if not steps:
        raise ExportError(f"{run_directory} has no checkpoints to export (expected {root}/<step>/)")
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        raise ExportError(f"step {chosen} is not on disk in {root}; steps there: {', '.join(map(str, steps))}")
    return chosen, root / f"{chosen:04d}"


def _legacy_config(folder: Path, lora_alpha: int | None, base: Path) -> dict[str, object]:
    """An adapter config for a step saved without one: the rank from the weights' shapes."""
    from safetensors import safe_open

    if lora_alpha is None:
        raise ExportError(
            f"{folder} predates saved adapter configs: give lora_alpha (CoDreamer's default is 2 x lora_rank)"
        )
    with safe_open(str(folder / ADAPTER_FILE), "pt") as tensors:
        rank = next(tensors.get_slice(k).get_shape()[0] for k in tensors.keys() if "lora_A" in k)  # noqa: SIM118
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(rank),
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": LORA_TARGETS,
        "base_model_name_or_path": str(base),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def _write_adapter(source: Path, staging: Path, base: Path, lora_alpha: int | None) -> None:
    shutil.copy2(source / ADAPTER_FILE, staging / ADAPTER_FILE)
    config = json.loads((source / CONFIG_FILE).read_text()) if (source / CONFIG_FILE).is_file() else None
    config = config or _legacy_config(source, lora_alpha, base)
    config["base_model_name_or_path"] = str(base)
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def _write_merged(adapter: Path, staging: Path, cache_dir: Path) -> None:
    from peft import PeftModel

    base, _ = load_embedded_model(cache_dir)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(staging), safe_serialization=True)


def export_checkpoint(
    run_directory: Path,
    output: Path,
    *,
    step: int | None = None,
    merged: bool = False,
    cache_dir: Path,
    lora_alpha: int | None = None,
) -> ExportResult:
    """Export step `step` (default: the latest) of the run in `run_directory` (ART's model folder,
    holding `checkpoints/`) to `output`, which must not exist yet; written atomically."""
    if output.exists():
        raise ExportError(f"{output} already exists; choose another output folder")
    chosen, folder = _step_folder(run_directory, step)
    _, tokenizer = load_embedded_model(cache_dir)
    base = Path(tokenizer.name_or_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        with tempfile.TemporaryDirectory() as scratch:
            adapter = staging if not merged else Path(scratch)
            _write_adapter(folder, adapter, base, lora_alpha)
            if merged:
                _write_merged(adapter, staging, cache_dir)
        tokenizer.save_pretrained(str(staging))
        (staging / "codreamer_export.json").write_text(
            json.dumps(
                {"run": str(run_directory), "step": chosen, "merged": merged, "base_model": EMBEDDED_MODEL_NAME},
                indent=2,
            )
        )
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(chosen, output, merged)
