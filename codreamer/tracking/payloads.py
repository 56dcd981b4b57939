"""What reaches W&B and Weave of a value: numeric metrics, and traces without payloads or secrets.

Every op's inputs and outputs go through `compact_inputs` / `compact_payload` (Weave's
client-level postprocessing, so the calls Weave patches in by itself are shaped too): token
ids, logprobs and long numeric lists never reach a trace, strings are capped, secrets masked.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, SecretStr

from codreamer.redaction import is_secret_name

TOP_LEVEL_METRICS = frozenset({"iteration", "peak_rss_mb"})
LARGE_KEYS = frozenset(
    {
        "logprobs",
        "top_logprobs",
        "token_logprobs",
        "token_ids",
        "prompt_token_ids",
        "completion_token_ids",
        "input_ids",
        "logits",
    }
)
MAX_TRACE_TEXT = 4000
MAX_TRACE_ITEMS = 50
MAX_NUMBERS = 32
MAX_DEPTH = 8


def metrics_for_wandb(record: Mapping[str, Any]) -> dict[str, int | float]:
    """The numeric metrics of a history record: namespaced keys (`train/...`, `eval/...`,
    `llm/...`, `time/...`, `score/...`, ...) and a few top-level numbers; NaN/inf are left out
    (a missing point, not a fake one), booleans count as 0/1, identifiers and `step` are not metrics."""
    out: dict[str, int | float] = {}
    for key, value in record.items():
        if "/" not in key and key not in TOP_LEVEL_METRICS:
            continue
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, int | float) and math.isfinite(value):
            out[key] = value
    return out


ART_STEP_METRIC = "training_step"
ART_STEP_AXIS_PREFIXES = ("train", "val")
_ART_ALIASES = {  # ART's name -> ours (ART's `model.log` names: `{split}/reward`, ...; `val` is held-out)
    "train/reward": "train/reward_mean",
    "train/reward_std_dev": "train/reward_std",
    "val/reward": "eval/reward_mean",
    "val/reward_std_dev": "eval/reward_std",
}


def _exception_rate(exceptions: Any, completed: Any) -> float | None:
    """Failed rollouts / all rollouts, or None without both counts (or without any rollout)."""
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (exceptions, completed)):
        return None
    total = float(exceptions) + float(completed)
    return float(exceptions) / total if total > 0 else None


def art_metrics(record: Mapping[str, Any], step: int) -> dict[str, int | float]:
    """ART's names for the same numbers, logged alongside ours so that ART's W&B views work.

    ART's `model.log` logs `train/reward`, `train/reward_std_dev`, `train/exception_rate` and
    `val/...` (the held-out split) with `training_step` as their x-axis (`define_metric`). Ours
    are copies under those names: `*/reward` is the mean blended reward trained on (train) or
    evaluated (val). `reward_std_dev` is the standard deviation over all rewards of the split
    (ART's is averaged over groups); `exception_rate` = failed rollouts / all rollouts.
    """
    out: dict[str, int | float] = {}
    for art_name, ours in _ART_ALIASES.items():
        value = record.get(ours)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[art_name] = value
    for split, completed in (("train", "train/trajectories"), ("val", "eval/reward_count")):
        prefix = "train" if split == "train" else "eval"
        rate = _exception_rate(record.get(f"{prefix}/exceptions"), record.get(completed))
        if rate is not None:
            out[f"{split}/exception_rate"] = rate
    if out:
        out[ART_STEP_METRIC] = int(step)
    return out


def _as_mapping(value: Any) -> Mapping[str, Any] | None:
    if isinstance(value, Mapping):
        return value
    if isinstance(value, BaseModel):
        try:
            return value.model_dump(mode="python", exclude_none=True)
        except Exception:  # noqa: BLE001 - an odd model is shown by its type name instead
            return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return None


def _compact_sequence(items: list[Any], depth: int) -> Any:
    if len(items) > MAX_NUMBERS and all(isinstance(i, int | float) for i in items):
        return f"<{len(items)} numbers omitted>"
    shown = [compact_payload(i, depth + 1) for i in items[:MAX_TRACE_ITEMS]]
    if len(items) > MAX_TRACE_ITEMS:
        shown.append(f"<{len(items) - MAX_TRACE_ITEMS} more items omitted>")
    return shown


def compact_payload(value: Any, depth: int = 0) -> Any:
    """What a trace keeps of a value: its readable parts, never token ids, logprobs or secrets.

    Used as Weave's client-level postprocessing, so it also shapes the calls Weave patches
    in by itself (OpenAI, litellm). It builds a new value and never mutates the original.
    """
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, SecretStr):
        return "***"
    if isinstance(value, str):
        return value if len(value) <= MAX_TRACE_TEXT else f"{value[:MAX_TRACE_TEXT]}... <{len(value)} chars>"
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if depth >= MAX_DEPTH:
        return f"<{type(value).__name__}>"
    mapping = _as_mapping(value)
    if mapping is not None:
        return {str(k): _compact_item(str(k), v, depth + 1) for k, v in mapping.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return _compact_sequence(list(value), depth)
    return f"<{type(value).__name__}>"  # clients, backends, tensors: named, never serialised


def _compact_item(name: str, value: Any, depth: int) -> Any:
    if name in LARGE_KEYS:
        return "<omitted>"
    return "***" if value and is_secret_name(name) else compact_payload(value, depth)


def compact_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """Weave's client-level input postprocessing: `compact_payload` of each argument."""
    return {str(k): _compact_item(str(k), v, 1) for k, v in inputs.items()}
