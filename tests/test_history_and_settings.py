"""Run history (`pipeline/history.py`), scenario order (`pipeline/scenarios.py`), settings and `.env.example`."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import ValidationError

from codreamer.agent.rollout import RolloutConfig
from codreamer.backends.embedded.policy import GRPOConfig
from codreamer.config import Settings
from codreamer.domain import Company, Prospect, Scenario
from codreamer.pipeline.history import append_record, read_history
from codreamer.pipeline.scenarios import iterations_per_epoch, scenarios_for_iteration

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- history
def test_append_and_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "iterations.jsonl"  # parents are created
    records = [{"iteration": 1, "reward": 0.25, "tags": ["a", "b"]}, {"iteration": 2, "nested": {"x": [1, 2]}}]
    for record in records:
        append_record(path, record)
    assert read_history(path) == (records, 0)
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 3  # one whole line per record


def test_missing_history_is_empty(tmp_path: Path) -> None:
    assert read_history(tmp_path / "nope.jsonl") == ([], 0)


def test_torn_last_line_is_skipped_and_counted_and_blank_lines_ignored(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    append_record(path, {"iteration": 1})
    with path.open("a", encoding="utf-8") as handle:
        handle.write("\n   \n")  # blank lines: not records, not errors
    append_record(path, {"iteration": 2})
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"iteration": 3, "rew')  # a crash mid-write
    records, skipped = read_history(path)
    assert records == [{"iteration": 1}, {"iteration": 2}]
    assert skipped == 1


def test_a_record_appended_after_a_torn_line_survives(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    append_record(path, {"iteration": 1})
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"iteration": 2, "rew')  # crash
    append_record(path, {"iteration": 2, "resumed": True})  # the resumed run appends
    records, skipped = read_history(path)
    assert records == [{"iteration": 1}, {"iteration": 2, "resumed": True}]
    assert skipped == 1


def test_non_finite_floats_become_null(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    append_record(
        path,
        {
            "loss": math.nan,
            "m": {"up": math.inf, "ok": 1.5},
            "xs": [1.0, -math.inf],
            "t": (math.nan, 2),
            "p": Path("a/b"),
        },
    )
    raw = path.read_text(encoding="utf-8")
    assert "NaN" not in raw and "Infinity" not in raw
    json.loads(raw)  # strict JSON
    [record], skipped = read_history(path)
    assert skipped == 0
    assert record == {"loss": None, "m": {"up": None, "ok": 1.5}, "xs": [1.0, None], "t": [None, 2], "p": "a/b"}


APPENDER = """
import sys, time
from pathlib import Path
from codreamer.pipeline.history import append_record

path, worker, count, go = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
deadline = time.monotonic() + 30
while not go.exists() and time.monotonic() < deadline:  # start together with the others
    time.sleep(0.001)
for i in range(count):
    append_record(path, {"worker": worker, "i": i, "pad": "x" * (2000 + 37 * worker)})
"""


def test_concurrent_writer_processes_never_interleave(tmp_path: Path) -> None:
    path, go = tmp_path / "h.jsonl", tmp_path / "go"
    workers = [
        subprocess.Popen([sys.executable, "-c", APPENDER, str(path), str(w), "50", str(go)], cwd=REPO) for w in range(4)
    ]
    time.sleep(0.2)  # let the interpreters start and import
    go.touch()
    assert [p.wait(timeout=45) for p in workers] == [0, 0, 0, 0]
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 201
    records, skipped = read_history(path)
    assert skipped == 0 and len(records) == 200
    assert all(r["pad"] == "x" * (2000 + 37 * r["worker"]) for r in records)
    for worker in range(4):
        assert [r["i"] for r in records if r["worker"] == worker] == list(range(50))


# -------------------------------------------------------------------------- scenarios
def _scenario(index: int) -> Scenario:
    company = Company(
        name=f"Co {index}", industry="logistics", employees=10, headquarters="Hamburg", recent_news="news"
    )
    prospect = Prospect(
        prospect_id=f"p{index:03d}",
        first_name="Ada",
        last_name=f"L{index}",
        email=f"ada{index}@example.com",
        title="CTO",
        seniority="c_level",
        persona="technical",
        pain_points=["latency"],
        company=company,
    )
    return Scenario(scenario_id=f"s{index:03d}", split="train", prospect=prospect)


TRAIN = [_scenario(i) for i in range(7)]


def _ids(scenarios: list[Scenario]) -> list[str]:
    return [s.scenario_id for s in scenarios]


def test_scenarios_for_iteration_is_deterministic() -> None:
    for iteration in range(6):
        first = scenarios_for_iteration(TRAIN, iteration, per_step=3, seed=5)
        assert len(first) == 3
        assert first == scenarios_for_iteration(list(TRAIN), iteration, per_step=3, seed=5)


def test_every_scenario_once_per_epoch_and_a_new_order_each_epoch() -> None:
    per_step, epochs = 3, 4
    picked: list[str] = []
    # 7 scenarios, 3 per step: steps straddle epoch boundaries, coverage must still be exact.
    for iteration in range(len(TRAIN) * epochs // per_step + 1):
        picked += _ids(scenarios_for_iteration(TRAIN, iteration, per_step, seed=5))
    orders = [picked[e * len(TRAIN) : (e + 1) * len(TRAIN)] for e in range(epochs)]
    for order in orders:
        assert sorted(order) == _ids(TRAIN)
    assert len({tuple(o) for o in orders}) > 1
    assert orders[0] != orders[1]


def test_scenario_order_depends_on_the_seed() -> None:
    a = [_ids(scenarios_for_iteration(TRAIN, i, 7, seed=1)) for i in range(3)]
    b = [_ids(scenarios_for_iteration(TRAIN, i, 7, seed=2)) for i in range(3)]
    assert a != b


def test_scenarios_need_training_data_and_epochs_round_up() -> None:
    with pytest.raises(ValueError, match="no training scenarios"):
        scenarios_for_iteration([], 0, 2, seed=0)
    assert iterations_per_epoch(7, 3) == 3
    assert iterations_per_epoch(6, 3) == 2
    assert iterations_per_epoch(0, 3) == 1


# --------------------------------------------------------------------------- settings
@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No stray `.env` or CODREAMER_* variables from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("CODREAMER_") or name in {"WEAVE_PROJECT", "WANDB_API_KEY"}:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_settings_read_the_environment(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().group_size == 4
    monkeypatch.setenv("CODREAMER_GROUP_SIZE", "6")
    monkeypatch.setenv("CODREAMER_WANDB", "false")
    monkeypatch.setenv("WEAVE_PROJECT", "my-weave")
    monkeypatch.setenv("WANDB_API_KEY", "secret-key")
    settings = Settings()
    assert settings.group_size == 6
    assert settings.wandb is False
    assert settings.weave_project == "my-weave"
    assert settings.wandb_api_key is not None and settings.wandb_api_key.get_secret_value() == "secret-key"
    assert "secret-key" not in repr(settings)
    assert "wandb_api_key" not in settings.model_dump()


def test_settings_read_a_dotenv_file_below_the_environment(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / ".env").write_text("CODREAMER_SEED=9\nCODREAMER_GROUP_SIZE=3\n", encoding="utf-8")
    monkeypatch.setenv("CODREAMER_GROUP_SIZE", "5")
    settings = Settings()
    assert (settings.seed, settings.group_size) == (9, 5)


def test_group_size_of_one_is_refused(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(group_size=1)
    [error] = caught.value.errors()
    assert error["loc"] == ("group_size",) and error["type"] == "greater_than_equal"
    assert "group_size" in str(caught.value) and "greater than or equal to 2" in str(caught.value)

    monkeypatch.setenv("CODREAMER_GROUP_SIZE", "1")
    with pytest.raises(ValidationError, match="group_size"):
        Settings()


def test_settings_views_carry_the_values(clean_env: Path) -> None:
    settings = Settings(max_turns=2, max_tokens=17, temperature=0.5, lora_rank=8, learning_rate=1e-4, seed=3)
    rollout = RolloutConfig.from_settings(settings)
    assert (rollout.max_turns, rollout.max_tokens, rollout.temperature) == (2, 17, 0.5)
    grpo = GRPOConfig.from_settings(settings)
    assert (grpo.lora_rank, grpo.lora_alpha, grpo.learning_rate, grpo.seed) == (8, 16, 1e-4, 3)


# ------------------------------------------------------------------------ .env.example
def _make_env_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_env_example", REPO / "scripts" / "make_env_example.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_env_names_follow_the_prefix_or_the_alias() -> None:
    module = _make_env_example()
    assert module.env_name("group_size") == "CODREAMER_GROUP_SIZE"
    assert module.env_name("weave_project") == "WEAVE_PROJECT"
    assert module.env_name("wandb_api_key") == "WANDB_API_KEY"


def test_env_example_mentions_every_setting() -> None:
    module = _make_env_example()
    text = (REPO / ".env.example").read_text(encoding="utf-8")
    missing = [name for name in Settings.model_fields if f"# {module.env_name(name)}=" not in text]
    assert not missing, f".env.example lacks {missing}; run `uv run python scripts/make_env_example.py`"
    assert text == module.render(), (
        ".env.example drifted from Settings; run `uv run python scripts/make_env_example.py`"
    )
    assert all(line.startswith("#") for line in text.splitlines() if line.strip())
