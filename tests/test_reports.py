"""Run reports (`codreamer.reports`): report.md content, the reward-curve PNG, run summaries."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from codreamer.pipeline.evaluation import EvalSummary, PartStats, ProspectResult, store_evaluation
from codreamer.pipeline.history import append_record
from codreamer.reports import load_run, plot_reward_curve, run_summary, write_run_report

pytestmark = pytest.mark.timeout(60)

SECRET = "sk-test-do-not-print"


def write_run_json(directory: Path, status: str = "finished") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    settings = {
        "group_size": 4,
        "learning_rate": 5e-5,
        "max_tokens": 48,
        "judge_api_key": SECRET,
        "events_secret": SECRET,
    }
    meta = {
        "run_id": directory.name,
        "kind": "learn-loop",
        "status": status,
        "created_at": "2026-01-01T00:00:00+00:00",
        "updated_at": "2026-01-01T01:00:00+00:00",
        "settings": settings,
    }
    (directory / "run.json").write_text(json.dumps(meta))


def record(step: int, train: float, evaluation: float | None = None, **extra: float) -> dict:
    data = {
        "run_id": "r",
        "iteration": step,
        "step": step,
        "train/reward_mean": train,
        "train/reward_std": 0.1,
        "train/rubric/length": train + 0.1,
        "train/reward/rubric": train,
        "train/exceptions": 0.0,
        "time/generate_s": 40.0 + step,
        "time/train_s": 6.0,
        "peak_rss_mb": 4000.0 + step,
        **extra,
    }
    if evaluation is not None:
        data |= {
            "eval/reward_mean": evaluation,
            "eval/reward_ci_low": evaluation - 0.05,
            "eval/reward_ci_high": evaluation + 0.05,
        }
    return data


def summary(step: int, mean: float, rewards: list[float]) -> EvalSummary:
    def stats(m: float) -> PartStats:
        return PartStats(n=len(rewards), mean=m, std=0.05, min=m - 0.1, max=m + 0.1, ci_low=m - 0.04, ci_high=m + 0.04)

    prospect = ProspectResult(
        prospect_id="p001",
        scenario_id="s1",
        n=len(rewards),
        mean_reward=mean,
        parts={"rubric/length": mean},
        rewards=rewards,
        seeds=list(range(len(rewards))),
    )
    return EvalSummary(
        step=step,
        n=len(rewards),
        parts={"reward": stats(mean), "rubric/length": stats(mean + 0.1)},
        prospects={"p001": prospect},
    )


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"


@pytest.fixture
def full_run(tmp_path: Path) -> Path:
    directory = tmp_path / "run-a"
    write_run_json(directory)
    history = directory / "iterations.jsonl"
    append_record(history, record(1, 0.30, 0.42, **{"llm/judge_calls": 2.0, "llm/judge_tokens": 1000.0}))
    append_record(history, record(2, 0.35, 0.55, **{"llm/judge_calls": 5.0, "llm/judge_tokens": 2500.0}))
    append_record(history, record(3, 0.40, 0.48))
    store_evaluation(directory, summary(0, 0.40, [0.3, 0.5]))
    store_evaluation(directory, summary(1, 0.42, [0.32, 0.52]))
    store_evaluation(directory, summary(2, 0.55, [0.45, 0.65]))
    store_evaluation(directory, summary(3, 0.48, [0.38, 0.58]))
    for step in (2, 3):
        (directory / "checkpoints" / f"{step:04d}").mkdir(parents=True)
    return directory


def test_full_report(full_run: Path) -> None:
    markdown, curve = write_run_report(full_run)
    assert (markdown, curve) == (full_run / "report.md", full_run / "reward_curve.png")
    text = markdown.read_text()
    assert "# Run run-a" in text and "| status | finished |" in text
    assert "| best held-out reward | step 2: 0.550 |" in text
    assert "| best checkpoint on disk | step 2 |" in text
    assert "| 2 | 2 | 0.350 ± 0.100 | 0.550 [0.500, 0.600] | +0.150 |" in text  # per-iteration row: CI, Δ base
    assert "| `rubric/length` | 0.580 [0.540, 0.620] | 0.500 | +0.080 |" in text  # latest vs base per part
    assert (
        "| 2 | RL | 0.550 [0.510, 0.590] | +0.130 | +0.150 | [+0.150, +0.150] | no | - | - | - |" in text
    )  # paired delta
    assert "| 1 | RL | 0.420 [0.380, 0.460] | +0.020 | +0.020 | [+0.020, +0.020] | yes |" in text
    assert "| p001 | 2 | 0 | 0.480 | +0.080 | 0.38, 0.58 |" in text
    assert "| generate | 42.0 | 126.0 |" in text and "Peak RSS: 4003 MB." in text
    assert "| `llm/judge_calls` | 5.0000 | 3.0000 |" in text  # cumulative: run total, latest share
    assert "| `llm/judge_tokens` | 2500.0000 | 1500.0000 |" in text
    assert "`group_size`" in text and "`max_tokens`" in text
    assert SECRET not in text and "judge_api_key" not in text
    assert "reward_curve.png" in text
    assert_png(curve)


def test_run_summary(full_run: Path) -> None:
    assert run_summary(full_run) == {
        "run_id": "run-a",
        "kind": "learn-loop",
        "status": "finished",
        "created_at": "2026-01-01T00:00:00+00:00",
        "updated_at": "2026-01-01T01:00:00+00:00",
        "iterations": 3,
        "step": 3,
        "best_step": 2,
        "best_score": 0.55,
        "best_checkpoint": 2,
        "last_train_reward": 0.40,
        "last_eval_reward": 0.48,
        "skipped_lines": 0,
    }


def test_run_with_one_iteration_and_no_evaluation(tmp_path: Path) -> None:
    directory = tmp_path / "run-b"
    write_run_json(directory, status="running")
    append_record(directory / "iterations.jsonl", record(1, 0.25))
    markdown, curve = write_run_report(directory)
    text = markdown.read_text()
    assert "No held-out evaluation was stored" in text
    assert "| 1 | 1 | 0.250 ± 0.100 | - | - |" in text
    assert "| best held-out reward | - |" in text
    assert "LLM usage" not in text
    assert_png(curve)
    info = run_summary(directory)
    assert info["status"] == "running" and info["best_step"] is None and info["iterations"] == 1


def test_history_only_evaluation_and_base_only(tmp_path: Path) -> None:
    # evaluations recorded only in the history (no evals/ folder), and a base-only eval folder
    directory = tmp_path / "run-c"
    write_run_json(directory)
    append_record(directory / "iterations.jsonl", record(1, 0.2, 0.3))
    assert run_summary(directory)["best_score"] == 0.3
    store_evaluation(directory, summary(0, 0.1, [0.1, 0.1]))
    text = write_run_report(directory)[0].read_text()
    assert "Latest: step 0" in text and "| `reward` | 0.100 [0.060, 0.140] |" in text
    assert "| 1 | 1 | 0.200 ± 0.100 | 0.300 [0.250, 0.350] |" in text


def test_empty_run_directory(tmp_path: Path) -> None:
    directory = tmp_path / "run-d"
    directory.mkdir()
    markdown, curve = write_run_report(directory)
    text = markdown.read_text()
    assert "# Run run-d" in text and "No iteration was recorded." in text and "| status | unknown |" in text
    assert_png(curve)


def test_curve_series_use_the_policy_step(full_run: Path) -> None:
    from codreamer.reports import _eval_series, _parts_to_plot, _train_series

    data = load_run(full_run)
    assert _parts_to_plot(data) == ["reward", "reward/rubric", "rubric/length"]
    xs, means, stds = _train_series(data, "reward")
    assert xs == [0.0, 1.0, 2.0] and means == [0.30, 0.35, 0.40] and stds == [0.1, 0.1, 0.1]
    points = _eval_series(data, "reward")
    assert [p[0] for p in points] == [0.0, 1.0, 2.0, 3.0]
    assert points[2] == pytest.approx((2.0, 0.55, 0.51, 0.59))  # the stored evaluation, not the history
    assert_png(plot_reward_curve(data, full_run / "other" / "curve.png"))


def test_report_labels_the_warm_start_shows_behaviour_and_emails_before_and_after(tmp_path: Path) -> None:
    directory = tmp_path / "run-w"
    write_run_json(directory)
    (directory / "warm_start.json").write_text(json.dumps({"step": 1, "demos": 4, "losses": [1.2, 0.4]}))
    append_record(directory / "iterations.jsonl", record(2, 0.6, 0.7, **{"train/behaviour/self_finalized": 0.75}))
    emails = {
        0: {
            "seed": 0,
            "subject": "You are | Maya",
            "body": "You are Maya.\nCall tools",
            "reward": 0.0,
            "auto_finalized": True,
        },
        2: {
            "seed": 0,
            "subject": "Idea for Acme",
            "body": "Hi Dana,\n\nA note.\n\nBest,\nMaya",
            "reward": 0.9,
            "auto_finalized": False,
        },
    }
    for step, mean in ((0, 0.0), (1, 0.5), (2, 0.7)):
        evaluation = summary(step, mean, [mean, mean])
        evaluation.behaviour = {"looked_up": step / 2, "self_finalized": step / 4, "auto_finalized": 1 - step / 4}
        if step in emails:
            evaluation.prospects["p001"].emails = [emails[step]]
        store_evaluation(directory, evaluation)
    write_run_report(directory)
    text = (directory / "report.md").read_text()
    assert "| 0 | base model | 0.000" in text and "| 1 | warm start (SFT) | 0.500" in text
    assert "| 2 | warm start + RL (1 steps) | 0.700" in text and "| 100% | 50% | 50% |" in text
    assert "| 2 | 2 | 0.600 ± 0.100 | 0.700 [0.650, 0.750] | +0.700 | 75% | - | 0 |" in text  # train self-finalised
    assert "### Before and after: base model (step 0) vs step 2" in text
    assert "| reward | 0.000 (auto-finalised) | 0.900 |" in text
    assert "| subject | You are \\| Maya | Idea for Acme |" in text  # a pipe cannot break the table
    assert "| body | You are Maya.<br>Call tools | Hi Dana,<br><br>A note.<br><br>Best,<br>Maya |" in text


def test_delayed_credit_section_shows_replay_per_iteration_only_when_outcomes_arrived(tmp_path: Path) -> None:
    quiet = tmp_path / "run-quiet"
    write_run_json(quiet)
    append_record(quiet / "iterations.jsonl", record(1, 0.3, **{"replay/outcomes_received": 0.0}))
    assert "## Delayed credit" not in write_run_report(quiet)[0].read_text()

    directory = tmp_path / "run-replay"
    write_run_json(directory)
    replay = {
        "replay/outcomes_received": 6.0,
        "replay/outcome_delay_iterations_mean": 1.0,
        "replay/groups": 2.0,
        "replay/trajectories": 8.0,
        "replay/reward_change_mean": -0.127,
        "replay/window_events": 3.0,
        "replay/outcomes_unknown": 1.0,
    }
    append_record(directory / "iterations.jsonl", record(1, 0.3))
    append_record(directory / "iterations.jsonl", record(2, 0.4, **replay))
    text = write_run_report(directory)[0].read_text()
    assert "## Delayed credit" in text
    assert "| 2 | 6 | 1.0 | 2 / 8 | -0.127 | 3 | 1 |" in text
    assert "| 1 | - | - | - / - | - | - | - |" in text
    assert "Outcomes from the event log" in text
