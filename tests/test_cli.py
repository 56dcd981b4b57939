"""The command line (`codreamer.cli`): one `codreamer` command whose subcommands are pydantic
models, `learn-loop` / `train` as the same commands, `--config FILE`, flag spellings, the
precedence of flags, environment, config file and `.env`, and resume-safety marked on the
settings. Nothing here loads the model: the loop itself is replaced by a recorder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import codreamer.cli.entry as entry
from codreamer.cli import codreamer_main, learn_loop_main, train_main
from codreamer.config import ResumeFree, Settings, resume_free_fields
from codreamer.pipeline.history import append_record
from codreamer.pipeline.state import RESUME_FREE_SETTINGS, config_fingerprint

pytestmark = pytest.mark.timeout(120)

#: The hand-kept list `pipeline/state.py` had before the fields were marked; the markers must give it back.
OLD_RESUME_FREE = frozenset(
    {
        "run_id", "runs_dir", "iterations", "epochs", "max_steps", "force_resume", "rollout_concurrency",
        "request_timeout_s", "inference_client", "train_retries", "model_cache_dir", "prefix_store_mb",
        "events_secret", "judge_api_key",
        "judge_timeout_s", "judge_attempts", "wandb", "weave_project", "wandb_api_key", "wandb_project",
        "wandb_entity", "wandb_mode", "tracking_timeout_s", "inference_attempts", "retry_initial_s", "retry_max_s",
        "rollout_timeout_s", "generate_timeout_s", "score_timeout_s", "train_timeout_s", "evaluate_timeout_s",
        "torch_threads", "events_tolerance_s",
        "keep_last", "keep_best", "eval_every", "policy_price_usd_per_mtok_in", "policy_price_usd_per_mtok_out",
        "judge_price_usd_per_mtok_in", "judge_price_usd_per_mtok_out", "low_reward_threshold",
    }
)  # fmt: skip

LEARN_LOOP_ONLY = ["--iterations", "--eval-every"]
TRAIN_ONLY = ["--epochs", "--max-steps"]
SECRET_FLAGS = ["--wandb-api-key", "--judge-api-key", "--events-secret"]


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No .env or CODREAMER_* / W&B variables of the machine; the working directory is tmp_path."""
    for name in list(os.environ):
        if name.startswith(("CODREAMER_", "WANDB_", "WEAVE_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Settings]]:
    """Stands in for the loop: records (prog, settings) of every run an entry point starts."""
    runs: list[tuple[str, Settings]] = []

    def record(prog: str, main: Callable[[], Any], settings: Settings) -> int:
        runs.append((prog, settings))
        return 0

    monkeypatch.setattr(entry, "_run", record)
    return runs


def _help(entry_point: Callable[[list[str]], int], args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        entry_point(args)
    assert exited.value.code == 0
    return capsys.readouterr().out


def _one_error_line(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: error: ")
    return lines[0]


# --------------------------------------------------------------------------- --help


@pytest.mark.parametrize(
    ("entry_point", "args", "own", "foreign"),
    [
        (learn_loop_main, ["--help"], LEARN_LOOP_ONLY, TRAIN_ONLY),
        (codreamer_main, ["learn-loop", "--help"], LEARN_LOOP_ONLY, TRAIN_ONLY),
        (train_main, ["--help"], TRAIN_ONLY, LEARN_LOOP_ONLY),
        (codreamer_main, ["train", "--help"], TRAIN_ONLY, LEARN_LOOP_ONLY),
    ],
)
def test_each_training_command_lists_only_its_own_flags(
    entry_point: Callable[[list[str]], int],
    args: list[str],
    own: list[str],
    foreign: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = _help(entry_point, args, capsys)
    for flag in [*own, "--config", "--group-size", "--learning-rate", "--no-eval-before-train", "--runs-dir"]:
        assert f"{flag} " in text or f"{flag}," in text, flag
    for flag in [*foreign, *SECRET_FLAGS]:
        assert flag not in text, flag
    assert "--learning-rate float" in text and "--learning_rate float" not in text  # flags shown kebab-case
    assert "highest first: these flags, environment variables" in " ".join(text.split())


@pytest.mark.parametrize("verb", ["runs", "show", "report", "trace", "ingest", "serve-events", "analyze"])
def test_the_other_verbs_list_no_training_settings(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(codreamer_main, [verb, "--help"], capsys)
    assert text.startswith(f"usage: codreamer {verb} ")
    for flag in ["--group-size", "--learning-rate", "--iterations", "--epochs", "--config", *SECRET_FLAGS]:
        assert flag not in text, flag


def test_codreamer_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(codreamer_main, ["--help"], capsys)
    for command in ["learn-loop", "train", "runs", "show", "report", "trace", "ingest", "serve-events", "analyze"]:
        assert f"\n    {command} " in text, command
    assert "--group-size" not in text


# --------------------------------------------------------------------------- the same commands


def test_learn_loop_and_train_are_the_same_commands_under_codreamer(
    tmp_path: Path, ran: list[tuple[str, Settings]]
) -> None:
    flags = ["--runs-dir", str(tmp_path / "runs"), "--group-size", "6", "--run-id", "r1"]
    assert learn_loop_main([*flags, "--iterations", "2"]) == 0
    assert codreamer_main(["learn-loop", *flags, "--iterations", "2"]) == 0
    assert train_main([*flags, "--epochs", "2"]) == 0
    assert codreamer_main(["train", *flags, "--epochs", "2"]) == 0
    (p1, a), (p2, b), (p3, c), (p4, d) = ran
    assert (p1, p2, p3, p4) == ("learn-loop", "codreamer", "train", "codreamer")
    assert a == b and c == d and a.iterations == 2 and c.epochs == 2 and a.group_size == c.group_size == 6
    # --runs-dir before the command applies to it; its own flag wins
    assert codreamer_main(["--runs-dir", "elsewhere", "learn-loop"]) == 0
    assert codreamer_main(["--runs-dir", "elsewhere", "train", "--runs-dir", "mine"]) == 0
    assert (ran[-2][1].runs_dir, ran[-1][1].runs_dir) == (Path("elsewhere"), Path("mine"))


@pytest.mark.parametrize(
    ("entry_point", "args", "flag", "owner"),
    [(learn_loop_main, ["--epochs", "2"], "--epochs", "train"), (train_main, ["--iterations=2"], "--iterations", "learn-loop"),
     (codreamer_main, ["learn-loop", "--max_steps", "3"], "--max-steps", "train")],
)  # fmt: skip
def test_a_flag_of_the_other_command_is_refused_and_says_whose_it_is(
    entry_point: Callable[[list[str]], int], args: list[str], flag: str, owner: str, tmp_path: Path,
    ran: list[tuple[str, Settings]], capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    assert entry_point(args) == 2
    prog = "codreamer" if entry_point is codreamer_main else "train" if entry_point is train_main else "learn-loop"
    line = _one_error_line(capsys.readouterr().err, prog)
    assert "unrecognized arguments" in line and f"{flag} is a flag of `{owner}` only" in line and "--help" in line
    assert ran == [] and not (tmp_path / "runs").exists()


def test_a_command_is_required_and_an_unknown_one_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert codreamer_main([]) == 2
    line = _one_error_line(capsys.readouterr().err, "codreamer")
    assert "a command is required: learn-loop, train, runs" in line
    assert codreamer_main(["bogus"]) == 2
    assert "invalid choice: 'bogus'" in _one_error_line(capsys.readouterr().err, "codreamer")


# --------------------------------------------------------------------------- spellings


@pytest.mark.parametrize(
    "args",
    [
        ["--learning_rate", "1e-4", "--no_eval_before_train", "--group_size=6", "--keep_last", "all"],
        ["--learning-rate", "1e-4", "--no-eval-before-train", "--group-size=6", "--keep-last", "all"],
        ["--learning-rate=1e-4", "--no_eval-before_train", "--group_size", "6", "--keep-last=all"],
    ],
)
def test_snake_and_kebab_flags_are_the_same_flag(args: list[str], ran: list[tuple[str, Settings]]) -> None:
    assert learn_loop_main(args) == 0
    assert codreamer_main(["train", *args]) == 0
    for _prog, settings in ran:
        assert (settings.learning_rate, settings.eval_before_train, settings.group_size, settings.keep_last) == (
            1e-4,
            False,
            6,
            None,
        )


def test_only_flag_names_are_respelled(ran: list[tuple[str, Settings]], capsys: pytest.CaptureFixture[str]) -> None:
    assert learn_loop_main(["--judge-model", "openai/a_b", "--kl-penalty-source", "current_learner", "--", "x_y"]) == 2
    assert "unrecognized arguments: -- x_y" in _one_error_line(
        capsys.readouterr().err, "learn-loop"
    )  # after --: left alone
    assert learn_loop_main(["--judge-model", "openai/a_b", "--kl-penalty-source", "current_learner"]) == 0
    assert (ran[-1][1].judge_model, ran[-1][1].kl_penalty_source) == ("openai/a_b", "current_learner")
    assert learn_loop_main(["--no_such_flag", "1"]) == 2
    assert "unrecognized arguments: --no_such_flag 1" in _one_error_line(capsys.readouterr().err, "learn-loop")


def test_codreamer_takes_snake_case_flags_before_and_after_the_verb(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _make_run(tmp_path / "runs", "r1")
    assert codreamer_main(["--runs_dir", str(tmp_path / "runs"), "trace", "r1", "--iteration", "1"]) == 0
    assert "no trace recorded" in capsys.readouterr().out


# --------------------------------------------------------------------------- --config and precedence

CONFIGS = {
    "toml": 'group_size = 6\nseed = 7\nmax-turns = 3\nwarm_start = "off"\nkeep-last = "all"\n',
    "yaml": "group_size: 6\nseed: 7\nmax-turns: 3\nwarm_start: 'off'\nkeep-last: all\n",
    "yml": "# a comment\ngroup-size: 6\nseed: 7\nmax_turns: 3\nwarm-start: 'off'\nkeep_last: all\n",
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("command", ["learn-loop", "train"])
def test_flags_beat_the_environment_which_beats_the_config_file_which_beats_dotenv(
    kind: str, command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ran: list[tuple[str, Settings]]
) -> None:
    config = tmp_path / f"run.{kind}"
    config.write_text(CONFIGS[kind])
    (tmp_path / ".env").write_text("CODREAMER_GROUP_SIZE=5\nCODREAMER_SEED=1\nCODREAMER_TEMPERATURE=0.1\n")
    monkeypatch.setenv("CODREAMER_SEED", "8")
    main = learn_loop_main if command == "learn-loop" else train_main
    assert main(["--config", str(config), "--max-turns", "4"]) == 0
    assert codreamer_main([command, "--max_turns", "4", "--config", str(config)]) == 0
    for _prog, settings in ran:
        assert settings.max_turns == 4  # flag > file
        assert settings.seed == 8  # environment > file
        assert settings.group_size == 6 and settings.warm_start == "off" and settings.keep_last is None  # file > .env
        assert settings.temperature == 0.1  # .env > default
        assert settings.lora_rank == Settings.model_fields["lora_rank"].default
    assert ran[0][1].model_copy(update={"run_id": None}) == ran[1][1].model_copy(update={"run_id": None})


def test_an_empty_yaml_file_is_no_settings(tmp_path: Path, ran: list[tuple[str, Settings]]) -> None:
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert learn_loop_main(["--config", "empty.yaml"]) == 0
    assert ran[0][1] == Settings(run_id=ran[0][1].run_id)


HOSTILE_CONFIGS: list[tuple[str, str | bytes | None, list[str]]] = [
    ("missing.toml", None, ["does not exist"]),
    ("a-directory.toml", "DIR", ["is a directory"]),
    ("broken.toml", "group_size = 6\nseed = = 7\n", ["not valid TOML", "line 2"]),
    ("broken.yaml", "group_size: 6\nseed: [7\n", ["not valid YAML", "line 3"]),
    ("typo.toml", "grup_size = 6\n", ["unknown setting 'grup_size'", "did you mean 'group_size'?"]),
    ("typo.yaml", "learning-rat: 1e-4\n", ["unknown setting 'learning-rat'", "did you mean 'learning-rate'?"]),
    ("nested.toml", "[learn-loop]\ngroup_size = 6\n", ["unknown setting 'learn-loop'"]),
    ("other.toml", "epochs = 2\n", ["'epochs' is a setting of `train` only, not of `learn-loop`"]),
    ("twice.yaml", "group_size: 6\ngroup-size: 7\n", ["'group_size' and 'group-size' are the same setting"]),
    ("list.toml", "group_size = [6, 7]\n", ["'group_size' must be a single value, not a list"]),
    ("list.yaml", "- group_size\n", ["must map setting names to values, found a list"]),
    ("settings.json", "{}", ["unknown format '.json'", ".toml, .yaml or .yml"]),
    ("latin1.toml", b'project = "caf\xe9"\n', ["not UTF-8 text"]),
    (
        "bad-value.toml",
        'group_size = "abc"\n',
        ["group_size (CODREAMER_GROUP_SIZE / --group-size)", "'abc'", "the key in"],
    ),
    ("escape.toml", 'run_id = "../../x"\n', ["'../../x' is not allowed"]),
]


@pytest.mark.parametrize(("name", "content", "expected"), HOSTILE_CONFIGS, ids=[case[0] for case in HOSTILE_CONFIGS])
def test_a_bad_config_file_is_one_line_naming_it_and_nothing_runs(
    name: str, content: str | bytes | None, expected: list[str], tmp_path: Path,
    ran: list[tuple[str, Settings]], capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    path = tmp_path / name
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert learn_loop_main(["--runs-dir", str(tmp_path / "runs"), "--config", str(path)]) == 2
    line = _one_error_line(capsys.readouterr().err, "learn-loop")
    assert str(path) in line
    for part in expected:
        assert part in line, part
    assert ran == [] and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("key", "env"),
    [
        ("wandb_api_key", "WANDB_API_KEY"),
        ("judge-api-key", "CODREAMER_JUDGE_API_KEY"),
        ("events_secret", "CODREAMER_EVENTS_SECRET"),
    ],
)
@pytest.mark.parametrize("kind", ["toml", "yaml"])
def test_secrets_are_refused_in_a_config_file(
    key: str, env: str, kind: str, tmp_path: Path, ran: list[tuple[str, Settings]], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"run.{kind}"
    path.write_text(f'{key} = "sekrit-value-1"\n' if kind == "toml" else f"{key}: sekrit-value-1\n")
    assert train_main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    line = _one_error_line(err, "train")
    assert f"{path}: '{key}' is a secret" in line and f"set {env} in the environment" in line and ".env" in line
    assert "sekrit-value-1" not in err and ran == []


def test_a_secret_after_the_verb_is_refused_before_parsing(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["learn-loop", "--judge_api_key", "sekrit-value-1"], ["runs", "--wandb-api-key=sekrit-value-1"]):
        assert codreamer_main(args) == 2
        err = capsys.readouterr().err
        assert "not accepted on the command line" in _one_error_line(err, "codreamer") and "sekrit-value-1" not in err


# --------------------------------------------------------------------------- the verbs on a tiny run


def _make_run(runs: Path, run_id: str) -> Path:
    directory = runs / "codreamer" / "models" / run_id
    directory.mkdir(parents=True)
    meta = {"run_id": run_id, "kind": "learn-loop", "status": "finished", "created_at": "2026-01-01T00:00:00+00:00"}
    (directory / "run.json").write_text(json.dumps(meta))
    for step, reward in ((1, 0.3), (2, 0.4)):
        record = {
            "run_id": run_id,
            "iteration": step,
            "step": step,
            "train/reward_mean": reward,
            "train/reward_std": 0.1,
        }
        append_record(directory / "iterations.jsonl", record | ({"eval/reward_mean": 0.5} if step == 2 else {}))
    return directory


def test_every_verb_runs_on_a_tiny_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    directory = _make_run(runs, "r1")
    base = ["--runs-dir", str(runs)]
    assert codreamer_main([*base, "runs"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("run id") and "r1" in out and "finished" in out
    assert codreamer_main([*base, "show", "r1"]) == 0
    out = capsys.readouterr().out
    assert "run r1 (learn-loop, finished)" in out and "iter   2 step   2 reward 0.400 ±0.100 eval 0.500" in out
    assert codreamer_main([*base, "report", "r1"]) == 0
    assert (
        f"report: {directory / 'report.md'}" in capsys.readouterr().out and (directory / "reward_curve.png").is_file()
    )
    assert codreamer_main([*base, "trace", "r1"]) == 0
    assert "no trace recorded" in capsys.readouterr().out
    assert codreamer_main([*base, "analyze", "r1"]) == 0
    assert "failure analysis of run r1" in capsys.readouterr().out and (directory / "failure_report.md").is_file()
    assert codreamer_main([*base, "analyze", "--last", "1"]) == 0
    assert "failure analysis of last 1 run(s)" in capsys.readouterr().out
    assert codreamer_main([*base, "show", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert codreamer_main([*base, "serve-events", "--port", "0"]) == 2  # no secret in the environment: refused
    assert "serve-events:" in capsys.readouterr().err


def test_ingest_and_the_runs_dir_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "events.jsonl"
    event = {"event_id": "e1", "trajectory_id": "t", "prospect_id": "p", "step": 0, "timestamp": "2025-01-01T00:00:00Z"}
    source.write_text(json.dumps(event) + "\n")
    monkeypatch.setenv("CODREAMER_RUNS_DIR", str(tmp_path / "env-runs"))
    assert codreamer_main(["ingest", str(source)]) == 0
    assert (
        "1 valid (1 new" in capsys.readouterr().out and (tmp_path / "env-runs" / "codreamer" / "events.jsonl").is_file()
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [(["trace", "r1", "--iteration", "abc"], "trace --iteration: Input should be a valid integer"),
     (["serve-events", "--port", "http"], "serve-events --port: Input should be a valid integer"),
     (["report"], "the following arguments are required: RUN-ID"),
     (["runs", "extra"], "unrecognized arguments: extra")],
)  # fmt: skip
def test_a_bad_verb_argument_is_one_line(args: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert codreamer_main(args) == 2
    assert expected in _one_error_line(capsys.readouterr().err, "codreamer")


@pytest.mark.parametrize("verb", ["show", "report", "trace", "analyze"])
def test_a_path_traversal_run_id_is_refused_by_every_verb(
    verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _make_run(tmp_path / "runs", "r1")
    (tmp_path / "victim").mkdir()
    assert codreamer_main(["--runs-dir", str(tmp_path / "runs"), verb, "../../../victim"]) == 2
    assert "not allowed" in capsys.readouterr().err
    assert list((tmp_path / "victim").iterdir()) == []


def test_a_path_traversal_run_id_never_starts_a_run(
    tmp_path: Path, ran: list[tuple[str, Settings]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert codreamer_main(["learn-loop", "--runs-dir", str(tmp_path / "runs"), "--run_id", "../x"]) == 2
    assert "'../x' is not allowed" in _one_error_line(capsys.readouterr().err, "codreamer")
    assert ran == [] and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- resume-safety on the fields


def test_the_resume_free_markers_give_the_old_list() -> None:
    assert resume_free_fields() == OLD_RESUME_FREE == RESUME_FREE_SETTINGS
    assert set(config_fingerprint(Settings())) == set(Settings.model_fields) - OLD_RESUME_FREE


def test_a_new_setting_shapes_training_unless_marked() -> None:
    class Extended(Settings):
        new_knob: int = 1
        new_timeout_s: ResumeFree[float] = 2.0

    assert resume_free_fields(Extended) == OLD_RESUME_FREE | {"new_timeout_s"}
