"""ART's training options, from the settings to `backend.train`.

`RecordingBackend` is a TEST DOUBLE: a backend whose `train` records the keywords it gets.
The options are checked against the real signatures of ART's `LocalBackend.train` and
`ServerlessBackend.train` (imported, never run: no GPU, no network).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import typing
from collections.abc import Iterator
from typing import Any

import art
import pytest
from loguru import logger

from codreamer.backends import factory
from codreamer.cli import _parse_settings
from codreamer.config import Settings
from codreamer.errors import UsageError
from codreamer.pipeline.stages import grpo_update


class RecordingBackend:
    """TEST DOUBLE of a backend: `train` records its keywords and returns step 1."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.calls: list[dict[str, Any]] = []

    async def train(self, model: Any, groups: Any, **kwargs: Any) -> art.TrainResult:
        self.calls.append(kwargs)
        return art.TrainResult(step=1, metrics={})


@pytest.fixture(autouse=True)
def no_env_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    for name in [n for n in os.environ if n.startswith(("CODREAMER_", "WANDB_"))]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env of the repository


@pytest.fixture
def warnings_seen() -> Iterator[list[str]]:
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
    yield seen
    logger.remove(sink)


def _embedded_double(monkeypatch: pytest.MonkeyPatch) -> None:
    import codreamer.backends.embedded.backend as embedded

    monkeypatch.setattr(embedded, "EmbeddedBackend", RecordingBackend)


def _train_once(backend: Any, **kwargs: Any) -> dict[str, Any]:
    asyncio.run(grpo_update(backend, None, [], learning_rate=3e-5, **kwargs))  # type: ignore[arg-type]
    return backend.calls[-1]


def test_the_default_settings_pass_only_the_learning_rate(
    monkeypatch: pytest.MonkeyPatch, warnings_seen: list[str]
) -> None:
    _embedded_double(monkeypatch)
    backend = factory.create_backend(Settings())
    assert factory.train_options(Settings()) == {} and factory.train_options_of(backend) == {}
    assert _train_once(backend) == {"learning_rate": 3e-5}  # exactly what the embedded backend got before
    assert not any("ignores" in w for w in warnings_seen)


def test_options_the_user_set_reach_backend_train_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    import art.serverless.backend as serverless

    monkeypatch.setattr(serverless, "ServerlessBackend", RecordingBackend)
    settings = Settings(
        backend="serverless",
        base_model="OpenPipe/Qwen3-14B-Instruct",
        wandb_api_key="k" * 40,
        loss_fn="ppo",
        kl_penalty_coef=0.05,
        epsilon=0.1,
        normalize_advantages=False,
        importance_sampling_level="sequence",
    )
    backend = factory.create_backend(settings)
    assert isinstance(backend, RecordingBackend)
    assert _train_once(backend) == {
        "learning_rate": 3e-5,
        "loss_fn": "ppo",
        "kl_penalty_coef": 0.05,
        "epsilon": 0.1,
        "normalize_advantages": False,  # a False that was set is passed, not dropped as "unset"
        "importance_sampling_level": "sequence",
    }
    # an explicit `options=` wins over what the factory attached (and {} passes none)
    assert _train_once(backend, options={}) == {"learning_rate": 3e-5}
    assert _train_once(backend, options={"kl_penalty_coef": 0.2}) == {"learning_rate": 3e-5, "kl_penalty_coef": 0.2}


def test_every_option_is_set_from_a_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODREAMER_EPSILON", "0.15")
    monkeypatch.setenv("CODREAMER_IMPORTANCE_SAMPLING_LEVEL", "average")
    settings = _parse_settings(
        "learn-loop",
        "",
        ["--loss-fn", "ppo", "--kl-penalty-coef", "0.05", "--normalize-advantages", "false", "--epsilon-high", "0.3",
         "--mask-prob-ratio", "true", "--packed-sequence-length", "4096", "--kl-penalty-source", "sample",
         "--advantage-balance", "-0.5", "--truncated-importance-sampling", "2",
         "--max-negative-advantage-importance-sampling-weight", "5", "--kl-penalty-reference-step", "3"],
    )  # fmt: skip
    assert factory.train_options(settings) == {
        "loss_fn": "ppo",
        "kl_penalty_coef": 0.05,
        "kl_penalty_reference_step": 3,
        "kl_penalty_source": "sample",
        "epsilon": 0.15,
        "epsilon_high": 0.3,
        "normalize_advantages": False,
        "advantage_balance": -0.5,
        "importance_sampling_level": "average",
        "max_negative_advantage_importance_sampling_weight": 5.0,
        "truncated_importance_sampling": 2.0,
        "mask_prob_ratio": True,
        "packed_sequence_length": 4096,
    }
    assert set(factory.train_options(settings)) == set(factory.ART_TRAIN_OPTIONS)  # the test covers every option


@pytest.mark.parametrize(
    ("args", "setting"),
    [
        (["--loss-fn", "dro"], "loss_fn"),  # Tinker-native only; LocalBackend/ServerlessBackend refuse it
        (["--advantage-balance", "2"], "advantage_balance"),
        (["--kl-penalty-coef", "-1"], "kl_penalty_coef"),
        (["--epsilon", "0"], "epsilon"),
        (["--importance-sampling-level", "tokens"], "importance_sampling_level"),
    ],
)
def test_a_bad_option_is_refused_before_anything_runs(args: list[str], setting: str) -> None:
    with pytest.raises(UsageError, match=setting.replace("_", ".")) as caught:
        _parse_settings("learn-loop", "", args)
    assert caught.value.exit_code == 2


def test_the_embedded_backend_gets_them_and_honours_them(
    monkeypatch: pytest.MonkeyPatch, warnings_seen: list[str]
) -> None:
    _embedded_double(monkeypatch)
    backend = factory.create_backend(Settings(loss_fn="ppo", kl_penalty_coef=0.1))
    assert not any("ignores" in w for w in warnings_seen)
    assert _train_once(backend) == {"learning_rate": 3e-5, "loss_fn": "ppo", "kl_penalty_coef": 0.1}
    # ...and the real embedded backend checks them by name (train_options.parse_train_options)
    from codreamer.backends.embedded.train_options import parse_train_options

    assert parse_train_options({"loss_fn": "ppo", "kl_penalty_coef": 0.1}).loss().loss_fn == "ppo"


def _literal_values(annotation: Any) -> set[Any]:
    if typing.get_origin(annotation) is typing.Literal:
        return set(typing.get_args(annotation))
    return set().union(*(_literal_values(a) for a in typing.get_args(annotation)))


@pytest.mark.parametrize(
    ("where", "name"), [("art.local.backend", "LocalBackend"), ("art.serverless.backend", "ServerlessBackend")]
)
def test_every_option_is_a_keyword_of_arts_train_with_the_same_choices(where: str, name: str) -> None:
    __import__(where)
    module = sys.modules[where]
    parameters = inspect.signature(getattr(module, name).train).parameters
    for option in factory.ART_TRAIN_OPTIONS:
        assert option in parameters and parameters[option].kind is inspect.Parameter.KEYWORD_ONLY, (name, option)
        ours = _literal_values(Settings.model_fields[option].annotation)
        if ours:  # a choice: ours must be among ART's
            theirs = parameters[option].annotation
            if isinstance(theirs, str):  # a module with `from __future__ import annotations`
                theirs = eval(theirs, {**vars(module), "Literal": typing.Literal})
            assert ours <= _literal_values(theirs), (name, option)
