"""Exported checkpoints load outside CoDreamer (`export.py`) and answer as the policy did.

A policy on the real SmolLM2 with a non-trivial LoRA adapter is saved as a step folder; the
export is loaded with plain transformers (merged) and with peft (adapter), and their greedy
answer is the policy's own greedy sample.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from codreamer.backends.embedded.checkpoints import save_step
from codreamer.backends.embedded.export import ExportError, export_checkpoint
from codreamer.backends.embedded.policy import GRPOConfig, Policy
from codreamer.backends.embedded.weights import load_embedded_model
from codreamer.config import Settings

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_torch_thread")]

CACHE = Settings().model_cache_dir
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int], list[int]]:
    """A run folder whose step 3 is a policy with a random (non-zero) adapter; its prompt and greedy answer."""
    base, tokenizer = load_embedded_model(CACHE)
    policy = Policy(base, tokenizer, GRPOConfig(lora_rank=4, lora_alpha=8))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    messages = [{"role": "user", "content": "Name a colour."}]
    prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    [answer] = policy.sample([prompt], NEW_TOKENS, 0.0)
    run = tmp_path_factory.mktemp("run")
    save_step(policy, run / "checkpoints", 3, with_optimizer=True)
    return run, prompt, answer.token_ids


def _greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)  # type: ignore[operator]
    return out[0, len(prompt) :].tolist()


def test_a_merged_export_loads_with_plain_transformers_and_answers_as_the_policy(
    trained_run: tuple[Path, list[int], list[int]], tmp_path: Path
) -> None:
    run, prompt, answer = trained_run
    result = export_checkpoint(run, tmp_path / "merged", merged=True, cache_dir=CACHE)
    assert result.step == 3 and (tmp_path / "merged" / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.chat_template  # a served export renders prompts as the policy did
    assert not any("lora" in name for name, _ in model.named_parameters())
    generated = _greedy(model, prompt)
    assert generated[: len(answer)] == answer[: len(generated)]


def test_an_adapter_export_loads_with_peft_and_answers_as_the_policy(
    trained_run: tuple[Path, list[int], list[int]], tmp_path: Path
) -> None:
    run, prompt, answer = trained_run
    export_checkpoint(run, tmp_path / "adapter", step=3, cache_dir=CACHE)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    base = AutoModelForCausalLM.from_pretrained(load_embedded_model(CACHE)[1].name_or_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    generated = _greedy(model, prompt)
    assert generated[: len(answer)] == answer[: len(generated)]


def test_a_missing_step_or_an_existing_output_is_refused(
    trained_run: tuple[Path, list[int], list[int]], tmp_path: Path
) -> None:
    run, _, _ = trained_run
    with pytest.raises(ExportError, match=r"step 7 is not on disk.*steps there: 3"):
        export_checkpoint(run, tmp_path / "x", step=7, cache_dir=CACHE)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_checkpoint(run, tmp_path / "taken", cache_dir=CACHE)
    with pytest.raises(ExportError, match="no checkpoints"):
        export_checkpoint(tmp_path, tmp_path / "y", cache_dir=CACHE)


def test_codreamer_export_writes_the_latest_step_and_refuses_to_overwrite(
    trained_run: tuple[Path, list[int], list[int]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from codreamer.cli import codreamer_main

    run, _, _ = trained_run
    runs_dir = tmp_path / "runs"
    shutil.copytree(run, runs_dir / "codreamer" / "models" / "r1")
    (runs_dir / "codreamer" / "models" / "r1" / "run.json").write_text('{"run_id": "r1", "status": "finished"}')
    assert codreamer_main(["--runs-dir", str(runs_dir), "export", "r1"]) == 0
    written = runs_dir / "codreamer" / "models" / "r1" / "exports" / "step-0003"
    assert (written / "adapter_config.json").is_file()
    assert f"exported step 3 of r1 as a PEFT adapter: {written}" in capsys.readouterr().out
    assert codreamer_main(["--runs-dir", str(runs_dir), "export", "r1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert codreamer_main(["--runs-dir", str(runs_dir), "export", "r1", "--step", "9"]) == 2
    assert "step 9 is not on disk" in capsys.readouterr().err
    assert codreamer_main(["--runs-dir", str(runs_dir), "export", "nope"]) == 2
    assert codreamer_main(["--runs-dir", str(runs_dir), "export", "../r1"]) == 2
