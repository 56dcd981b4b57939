"""The real learning loop on the real SmolLM2-135M model, kept short (few tokens, small groups).

These are the slowest tests (tens of seconds on 2 CPU cores): they load the embedded model,
serve it on loopback, run rollouts, score them, take a real GRPO step, checkpoint, evaluate.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from codreamer.cli import codreamer_main, learn_loop_main, train_main
from codreamer.config import Settings, command_fields
from codreamer.pipeline.history import read_history

pytestmark = pytest.mark.slow

FAST_FLAGS = [
    "--group-size",
    "3",
    "--scenarios-per-step",
    "1",
    "--max-turns",
    "1",
    "--max-tokens",
    "12",
    "--eval-scenarios",
    "1",
    "--eval-samples",
    "1",
    "--warm-start",
    "off",
    "--no-eval-before-train",
    "--no-wandb",
]


def _run_dir(runs: Path, run_id: str) -> Path:
    return runs / "codreamer" / "models" / run_id


def test_learn_loop_runs_an_iteration_then_resumes_by_run_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = [*FAST_FLAGS, "--runs-dir", str(tmp_path), "--run-id", "it-test"]
    assert learn_loop_main([*flags, "--iterations", "1"]) == 0

    directory = _run_dir(tmp_path, "it-test")
    records, skipped = read_history(directory / "iterations.jsonl")
    assert skipped == 0 and len(records) == 1
    first = records[0]
    assert first["step"] == 1 and first["iteration"] == 1
    assert first["train/reward_count"] == 3
    assert 0.0 <= first["train/reward_min"] <= first["train/reward_max"] <= 1.0
    assert {"train/rubric/personalization", "train/rubric/no_hallucination", "eval/reward_mean"} <= first.keys()
    assert first["train_metrics/groups_used"] + first["train_metrics/groups_skipped"] == 1
    assert all(first[f"time/{stage}_s"] >= 0 for stage in ("generate", "score", "train", "evaluate", "log"))
    adapter = directory / "checkpoints" / "0001" / "adapter_model.safetensors"
    assert adapter.is_file() and load_file(str(adapter))
    run = json.loads((directory / "run.json").read_text())
    assert run["status"] == "finished" and "wandb_api_key" not in run["settings"]

    # Same run id, two iterations in total: only the second one runs.
    assert learn_loop_main([*flags, "--iterations", "2"]) == 0
    records, _ = read_history(directory / "iterations.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert (directory / "checkpoints" / "0002").is_dir()
    assert codreamer_main(["--runs-dir", str(tmp_path), "show", "it-test"]) == 0

    # The trace counts iterations as the history does: `--iteration N` is the record with "iteration": N.
    for number in (1, 2):
        capsys.readouterr()
        assert codreamer_main(["--runs-dir", str(tmp_path), "trace", "it-test", "--iteration", str(number)]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first.startswith("run_iteration") and first.endswith(f"iteration {number}"), first


def test_train_runs_max_steps(tmp_path: Path) -> None:
    flags = [*FAST_FLAGS, "--runs-dir", str(tmp_path), "--run-id", "train-test", "--max-steps", "1"]
    assert train_main(flags) == 0
    records, _ = read_history(_run_dir(tmp_path, "train-test") / "iterations.jsonl")
    assert [r["step"] for r in records] == [1]
    assert "eval/reward_mean" in records[0]  # the last step is evaluated


@pytest.mark.parametrize(("entry", "command"), [(learn_loop_main, "learn-loop"), (train_main, "train")])
def test_help_documents_every_flag(entry, command, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        entry(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    own = command_fields(command)
    for name, field in Settings.model_fields.items():
        if "SecretStr" in str(field.annotation):
            assert f"--{name.replace('_', '-')}" not in text  # secrets never on the command line
            continue
        if name not in own:
            assert not re.search(rf"--{name.replace('_', '-')}\b(?!-)", text), name  # the other command's flag
            continue
        assert f"--{name.replace('_', '-')}" in text, name
        assert field.description and field.description.split()[0] in text


def test_warm_start_then_rl_with_base_and_warm_start_evaluations(tmp_path: Path) -> None:
    """The default shape in miniature: base model evaluated, SFT warm start (its own step, its own
    evaluation), then RL; a second call resumes without training the warm start again."""
    flags = [
        *(f for f in FAST_FLAGS if f not in ("off", "--warm-start", "--no-eval-before-train")),
        "--warm-start-demos", "2", "--warm-start-batch-size", "2",
        "--runs-dir", str(tmp_path), "--run-id", "warm",
    ]  # fmt: skip
    assert learn_loop_main([*flags, "--iterations", "1"]) == 0
    directory = _run_dir(tmp_path, "warm")
    warm = json.loads((directory / "warm_start.json").read_text())
    assert warm["step"] == 1 and warm["demos"] == 2 and len(warm["losses"]) == 1
    assert sorted(p.name for p in (directory / "evals").iterdir()) == [
        "step_0000.json",
        "step_0001.json",
        "step_0002.json",
    ]
    records, _ = read_history(directory / "iterations.jsonl")
    assert [r["step"] for r in records] == [2]
    assert "eval/behaviour/self_finalized" in records[0] and "train/behaviour/looked_up" in records[0]
    assert records[0]["eval/delta_base_paired_n"] == 1
    report = (directory / "report.md").read_text()
    assert "warm start (SFT)" in report and "Before and after" in report

    assert learn_loop_main([*flags, "--iterations", "2"]) == 0
    assert json.loads((directory / "warm_start.json").read_text()) == warm  # not trained again
    records, _ = read_history(directory / "iterations.jsonl")
    assert [r["step"] for r in records] == [2, 3]
