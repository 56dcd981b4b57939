"""Load and validate the task data: prospects, the product, and the train/held-out split.

Everything is checked when a run starts, so a typo in a data file stops the run at once with
`file:line: field path: problem` instead of failing deep inside a rollout an hour later.
Files: `prospects.jsonl` (one `Prospect` per line), `product.json` (one `Product`) and
`splits.json` (`{"train": [ids], "heldout": [ids]}`), as written by `scripts/make_prospects.py`.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

from codreamer.domain import Product, Prospect, Scenario, Split
from codreamer.errors import UserError
from codreamer.storage import JsonlLineError, iter_jsonl

PROSPECTS_FILE = "prospects.jsonl"
SPLITS_FILE = "splits.json"
PRODUCT_FILE = "product.json"
SPLITS: tuple[Split, ...] = get_args(Split)


class DataError(UserError, ValueError):
    """A data file is missing or malformed; the message says which file, line and field."""


@dataclass(frozen=True)
class TaskData:
    """Everything a run needs to know about the task, validated and cross-checked."""

    prospects: dict[str, Prospect]
    product: Product
    train: list[Scenario]
    heldout: list[Scenario]


class _SplitFile(BaseModel):
    """The shape of splits.json; extra keys are refused so a misspelt split is not ignored."""

    model_config = ConfigDict(extra="forbid")

    train: list[str]
    heldout: list[str]


def _where(path: Path, line: int | None = None) -> str:
    """`file` or `file:line`, relative to the working directory when inside it, for short messages."""
    try:
        shown = str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        shown = str(path)
    return shown if line is None else f"{shown}:{line}"


def _describe(exc: ValidationError) -> str:
    """Pydantic's errors as `field a.b: message`, joined, so the message names the field path."""
    parts = []
    for error in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in error["loc"])
        parts.append(f"field {loc}: {error['msg']}" if loc else error["msg"])
    return "; ".join(parts)


def _read_text(path: Path) -> str:
    """The file's text, or a DataError naming the file (missing, a folder, not UTF-8)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{_where(path)}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{_where(path)}: is a folder, not a file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{_where(path)}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _parse_json(text: str, path: Path, first_line: int = 1) -> Any:
    """Parse JSON; on failure name the line (`first_line` is the text's line in the file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        line = first_line + exc.lineno - 1
        raise DataError(f"{_where(path, line)}: invalid JSON: {exc.msg} (column {exc.colno})") from None


def _read_json(path: Path) -> Any:
    """Read a whole-file JSON document."""
    return _parse_json(_read_text(path), path)


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) per non-blank line, lazily so the first bad line is reported
    (`codreamer.storage.iter_jsonl`, strict: a data file with a bad line is a mistake to fix)."""
    try:
        yield from iter_jsonl(_read_text(path), path, strict=True)
    except JsonlLineError as exc:
        where = "" if exc.column is None else f" (column {exc.column})"
        raise DataError(f"{_where(path, exc.line)}: invalid JSON: {exc.reason}{where}") from None


def load_prospects(path: Path) -> dict[str, Prospect]:
    """Prospects by id, in file order; each line is validated and ids must be unique."""
    prospects: dict[str, Prospect] = {}
    first_seen: dict[str, int] = {}
    for number, record in _jsonl_records(path):
        try:
            prospect = Prospect.model_validate(record)
        except ValidationError as exc:
            raise DataError(f"{_where(path, number)}: {_describe(exc)}") from None
        pid = prospect.prospect_id
        if pid in prospects:
            raise DataError(f"{_where(path, number)}: duplicate prospect_id {pid!r} (first on line {first_seen[pid]})")
        prospects[pid], first_seen[pid] = prospect, number
    return prospects


def load_product(path: Path) -> Product:
    """The product the agent sells."""
    try:
        return Product.model_validate(_read_json(path))
    except ValidationError as exc:
        raise DataError(f"{_where(path)}: {_describe(exc)}") from None


def load_split(path: Path, prospects: Collection[str]) -> dict[Split, list[str]]:
    """Prospect ids per split, in file order; every id must be known and in one split only.

    `prospects` is anything that holds the known ids, such as `load_prospects`'s dict.
    """
    try:
        parsed = _SplitFile.model_validate(_read_json(path))
    except ValidationError as exc:
        raise DataError(f"{_where(path)}: {_describe(exc)}") from None
    splits: dict[Split, list[str]] = {split: getattr(parsed, split) for split in SPLITS}
    seen: dict[str, Split] = {}
    for split, ids in splits.items():
        for pid in ids:
            if pid not in prospects:
                raise DataError(f"{_where(path)}: field {split}: unknown prospect_id {pid!r}")
            if pid in seen:
                where = f"listed twice in {split}" if seen[pid] == split else f"in both {seen[pid]} and {split}"
                raise DataError(f"{_where(path)}: prospect_id {pid!r} is {where}")
            seen[pid] = split
    return splits


def _scenarios(split: Split, ids: list[str], prospects: dict[str, Prospect]) -> list[Scenario]:
    """One outreach scenario per prospect id; the id is stable so results can be matched across runs."""
    return [Scenario(scenario_id=f"outreach-{pid}", split=split, prospect=prospects[pid]) for pid in ids]


def load_task_data(data_dir: Path) -> TaskData:
    """Load and cross-check prospects.jsonl, splits.json and product.json from `data_dir`."""
    prospects = load_prospects(data_dir / PROSPECTS_FILE)
    product = load_product(data_dir / PRODUCT_FILE)
    splits = load_split(data_dir / SPLITS_FILE, prospects)
    return TaskData(
        prospects=prospects,
        product=product,
        train=_scenarios("train", splits["train"], prospects),
        heldout=_scenarios("heldout", splits["heldout"], prospects),
    )
