"""Task data: the shipped files load, bad files are reported by file, line and field."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import get_args

import pytest

from codreamer.data import (
    DataError,
    TaskData,
    load_product,
    load_prospects,
    load_split,
    load_task_data,
)
from codreamer.domain import Persona

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "data"
GENERATOR = REPO / "scripts" / "make_prospects.py"


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_prospects", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    return _load_generator()


@pytest.fixture(scope="module")
def task() -> TaskData:
    return load_task_data(DATA_DIR)


@pytest.fixture
def data_copy(tmp_path: Path) -> Path:
    """A writable copy of the shipped data, for tests that break one file."""
    for name in ("prospects.jsonl", "splits.json", "product.json"):
        shutil.copy(DATA_DIR / name, tmp_path / name)
    return tmp_path


def _records() -> list[dict]:
    return [json.loads(line) for line in (DATA_DIR / "prospects.jsonl").read_text().splitlines() if line]


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- the shipped data -------------------------------------------------------------------


def test_shipped_data_loads(task: TaskData) -> None:
    prospects = task.prospects
    assert len(prospects) >= 40
    assert len({p.company.industry for p in prospects.values()}) >= 8
    assert {p.persona for p in prospects.values()} == set(get_args(Persona))
    assert len({p.company.name for p in prospects.values()}) == len(prospects)
    assert all(2 <= len(p.pain_points) <= 3 for p in prospects.values())
    assert task.product.name and task.product.value_props


def test_shipped_splits_are_disjoint_and_stratified(task: TaskData) -> None:
    train = {s.prospect.prospect_id for s in task.train}
    heldout = {s.prospect.prospect_id for s in task.heldout}
    assert train and heldout
    assert not train & heldout
    assert (len(train), len(heldout)) == (36, 12)
    for scenarios in (task.train, task.heldout):
        assert {s.prospect.persona for s in scenarios} == set(get_args(Persona))
        assert len({s.prospect.company.industry for s in scenarios}) >= 8


def test_scenarios_carry_split_and_stable_id(task: TaskData) -> None:
    assert all(s.split == "train" for s in task.train)
    assert all(s.split == "heldout" for s in task.heldout)
    first = task.train[0]
    assert first.scenario_id == f"outreach-{first.prospect.prospect_id}"
    assert first.prospect is task.prospects[first.prospect.prospect_id]


# --- bad files ----------------------------------------------------------------------------


def test_bad_field_names_file_line_and_field(tmp_path: Path) -> None:
    records = _records()[:3]
    records[1]["company"]["employees"] = 0
    path = _write_jsonl(tmp_path / "prospects.jsonl", [json.dumps(r) for r in records])
    with pytest.raises(DataError) as info:
        load_prospects(path)
    message = str(info.value)
    assert "prospects.jsonl:2:" in message
    assert "field company.employees:" in message
    assert "greater than 0" in message


def test_missing_field_and_blank_lines(tmp_path: Path) -> None:
    records = _records()[:2]
    del records[1]["persona"]
    path = _write_jsonl(tmp_path / "prospects.jsonl", [json.dumps(records[0]), "", "  ", json.dumps(records[1])])
    with pytest.raises(DataError, match=r"prospects\.jsonl:4: field persona: Field required"):
        load_prospects(path)


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    records = _records()[:2]
    path = _write_jsonl(tmp_path / "prospects.jsonl", ["", json.dumps(records[0]), "", json.dumps(records[1]), ""])
    assert list(load_prospects(path)) == [records[0]["prospect_id"], records[1]["prospect_id"]]


def test_invalid_json_line(tmp_path: Path) -> None:
    records = _records()[:2]
    path = _write_jsonl(tmp_path / "prospects.jsonl", [json.dumps(records[0]), '{"prospect_id": "p002",'])
    with pytest.raises(DataError, match=r"prospects\.jsonl:2: invalid JSON: "):
        load_prospects(path)


def test_duplicate_prospect_id_names_both_lines(tmp_path: Path) -> None:
    records = _records()[:3]
    records[2]["prospect_id"] = records[0]["prospect_id"]
    path = _write_jsonl(tmp_path / "prospects.jsonl", [json.dumps(r) for r in records])
    with pytest.raises(DataError, match=r"prospects\.jsonl:3: duplicate prospect_id 'p001' \(first on line 1\)"):
        load_prospects(path)


def test_bad_product_names_field(tmp_path: Path) -> None:
    product = json.loads((DATA_DIR / "product.json").read_text())
    product["value_props"] = []
    (tmp_path / "product.json").write_text(json.dumps(product))
    with pytest.raises(DataError, match=r"product\.json: field value_props: "):
        load_product(tmp_path / "product.json")


def test_invalid_json_file_names_line(tmp_path: Path) -> None:
    (tmp_path / "product.json").write_text('{\n  "name": "Pipewise",\n  oops\n}\n')
    with pytest.raises(DataError, match=r"product\.json:3: invalid JSON: "):
        load_product(tmp_path / "product.json")


@pytest.mark.parametrize(
    ("splits", "expected"),
    [
        ({"train": ["p001", "p999"], "heldout": ["p002"]}, r"splits\.json: field train: unknown prospect_id 'p999'"),
        (
            {"train": ["p001", "p002"], "heldout": ["p002"]},
            r"splits\.json: prospect_id 'p002' is in both train and heldout",
        ),
        ({"train": ["p001", "p001"], "heldout": []}, r"splits\.json: prospect_id 'p001' is listed twice in train"),
        ({"train": ["p001"]}, r"splits\.json: field heldout: Field required"),
        ({"train": [], "heldout": [], "test": []}, r"splits\.json: field test: Extra inputs"),
        ({"train": "p001", "heldout": []}, r"splits\.json: field train: Input should be a valid list"),
    ],
)
def test_bad_split(tmp_path: Path, splits: dict, expected: str) -> None:
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(DataError, match=expected):
        load_split(tmp_path / "splits.json", {"p001", "p002", "p003"})


def test_split_keeps_file_order(tmp_path: Path) -> None:
    (tmp_path / "splits.json").write_text(json.dumps({"heldout": ["p003"], "train": ["p002", "p001"]}))
    assert load_split(tmp_path / "splits.json", {"p001", "p002", "p003"}) == {
        "train": ["p002", "p001"],
        "heldout": ["p003"],
    }


@pytest.mark.parametrize("name", ["prospects.jsonl", "splits.json", "product.json"])
def test_missing_file_is_named(data_copy: Path, name: str) -> None:
    (data_copy / name).unlink()
    with pytest.raises(DataError, match=rf"{name}: file not found"):
        load_task_data(data_copy)


def test_task_data_checks_split_against_prospects(data_copy: Path) -> None:
    lines = (data_copy / "prospects.jsonl").read_text().splitlines()
    (data_copy / "prospects.jsonl").write_text("\n".join(lines[1:]) + "\n")  # drop p001
    with pytest.raises(DataError, match=r"splits\.json: field \w+: unknown prospect_id 'p001'"):
        load_task_data(data_copy)


# --- the generator ------------------------------------------------------------------------


def test_generator_is_deterministic(generator: ModuleType, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    generator.main(first, seed=7)
    generator.main(second, seed=7)
    for name in ("prospects.jsonl", "splits.json", "product.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    load_task_data(first)


def test_generator_seed_changes_prospects(generator: ModuleType, tmp_path: Path) -> None:
    generator.main(tmp_path / "a", seed=7)
    generator.main(tmp_path / "b", seed=8)
    assert (tmp_path / "a" / "prospects.jsonl").read_bytes() != (tmp_path / "b" / "prospects.jsonl").read_bytes()
    load_task_data(tmp_path / "b")


def test_shipped_data_matches_generator(generator: ModuleType, tmp_path: Path) -> None:
    """The checked-in files are exactly what `scripts/make_prospects.py` writes by default."""
    generator.main(tmp_path)
    for name in ("prospects.jsonl", "splits.json", "product.json"):
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), f"regenerate data/{name}"
