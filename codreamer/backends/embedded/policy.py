"""The trainable policy of the embedded backend: a LoRA-wrapped causal LM on CPU.

One object owns the weights, so sampling and GRPO updates never race: both take the same
lock. Sampling returns the chosen tokens' log-probabilities (what the OpenAI API calls
`logprobs`), and training recomputes them under the current weights for the loss, as an
on-policy GRPO step with one update per batch of groups.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from codreamer.config import GRPOConfig

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_FILE = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


@dataclass(frozen=True)
class Sample:
    """One sampled completion: token ids, their log-probabilities, why it stopped."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (end-of-turn token) or "length"


@dataclass(frozen=True)
class TrainSequence:
    """Tokens to reinforce with one advantage: the completion, plus `prompt_spans`.

    `prompt_spans` are [start, end) ranges of `prompt_ids` that were sampled too: earlier
    turns of the same episode, which a multi-turn trajectory carries in its last prompt.
    Training them inside the last turn's sequence costs one forward pass instead of one per
    turn, with the same loss.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    prompt_spans: tuple[tuple[int, int], ...] = ()

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def trained_tokens(self) -> int:
        return len(self.completion_ids) + sum(end - start for start, end in self.prompt_spans)


def _row_generators(seed: int | Sequence[int | None] | None, rows: int) -> list[torch.Generator | None]:
    if seed is None:
        return [None] * rows
    seeds = [seed + row for row in range(rows)] if isinstance(seed, int) else list(seed)
    if len(seeds) != rows:
        raise ValueError(f"{len(seeds)} seeds for {rows} prompts")
    return [torch.Generator().manual_seed(s) if s is not None else None for s in seeds]


class Policy:
    """LoRA policy with sampling and a GRPO step; every public method is thread-safe."""

    def __init__(self, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: GRPOConfig) -> None:
        torch.manual_seed(config.seed)
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        )
        self.model: PeftModel = get_peft_model(base, lora)
        self.tokenizer = tokenizer
        self.config = config
        self.stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self._trainable, lr=config.learning_rate, weight_decay=0.0)
        self._lock = threading.Lock()
        self.model.eval()

    # ----------------------------------------------------------------------------- sampling
    @torch.inference_mode()
    def sample(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        seed: int | Sequence[int | None] | None = None,
    ) -> list[Sample]:
        """Sample one completion per prompt, batched with left padding and a KV cache.

        `seed` is one seed per row (or an int: row i gets seed + i). Each row draws from its
        own generator, so a request's tokens do not depend on which other requests happened
        to share its batch.
        """
        with self._lock:
            return self._sample_locked(prompts, max_new_tokens, temperature, _row_generators(seed, len(prompts)))

    def _sample_locked(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        generators: list[torch.Generator | None],
    ) -> list[Sample]:
        input_ids, attention = self._left_pad(prompts)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        batch = len(prompts)
        tokens: list[list[int]] = [[] for _ in range(batch)]
        logprobs: list[list[float]] = [[] for _ in range(batch)]
        finished = [False] * batch
        cache = None
        step_ids, step_pos = input_ids, positions
        for _ in range(max_new_tokens):
            out = self.model(
                input_ids=step_ids,
                attention_mask=attention,
                position_ids=step_pos,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,  # the prefill needs the last position's logits only
            )
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float()
            chosen, chosen_logprobs = self._choose(logits, temperature, generators)
            for row in range(batch):
                if finished[row]:
                    continue
                token = int(chosen[row])
                if token in self.stop_ids:
                    finished[row] = True
                    continue
                tokens[row].append(token)
                logprobs[row].append(float(chosen_logprobs[row]))
            if all(finished):
                break
            chosen = torch.where(torch.tensor(finished), torch.full_like(chosen, self.pad_id), chosen)
            step_ids = chosen.unsqueeze(-1)
            step_pos = step_pos[:, -1:] + 1
            attention = torch.cat([attention, torch.ones(batch, 1, dtype=attention.dtype)], dim=-1)
        return [
            Sample(tokens[row], logprobs[row], "stop" if finished[row] else "length") for row in range(batch)
        ]

    @staticmethod
    def _choose(
        logits: torch.Tensor, temperature: float, generators: list[torch.Generator | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick the next token per row; return it and its log-probability under the sampling distribution."""
        if temperature <= 0:
            log_probs = torch.log_softmax(logits, dim=-1)
            chosen = log_probs.argmax(dim=-1)
        else:
            log_probs = torch.log_softmax(logits / temperature, dim=-1)
            probs = log_probs.exp()
            chosen = torch.cat(
                [torch.multinomial(probs[row], 1, generator=gen) for row, gen in enumerate(generators)]
            )
        return chosen, log_probs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        return ids, mask

    # ----------------------------------------------------------------------------- training
    def train_step(self, sequences: list[TrainSequence], learning_rate: float) -> dict[str, float]:
        """One GRPO update: maximise advantage-weighted log-likelihood of the sampled tokens.

        The step is on-policy (the samples come from the current weights and we update
        once), so the PPO ratio is 1 and the clipped objective reduces to this gradient.
        The loss is averaged over all completion tokens of the batch (token-level, as in
        DAPO), so long and short answers weigh by their length.
        """
        with self._lock:
            return self._train_locked(sequences, learning_rate)

    def _train_locked(self, sequences: list[TrainSequence], learning_rate: float) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        total_tokens = sum(s.trained_tokens for s in sequences)
        active = [s for s in sequences if s.advantage != 0.0]  # zero advantage: zero gradient
        self.model.train()
        loss_sum, logprob_sum = 0.0, 0.0
        try:
            self.optimizer.zero_grad(set_to_none=True)
            for micro in self.micro_batches(active):
                loss, logprob_total = self.policy_loss(micro, normalizer=total_tokens)
                loss.backward()
                loss_sum += float(loss.detach())
                logprob_sum += logprob_total
            grad_norm = torch.nn.utils.clip_grad_norm_(self._trainable, self.config.max_grad_norm)
            self.optimizer.step()
        finally:
            self.model.eval()
        active_tokens = sum(s.trained_tokens for s in active)
        return {
            "loss": loss_sum,
            "grad_norm": float(grad_norm),
            "num_sequences": float(len(sequences)),
            "num_tokens": float(total_tokens),
            "mean_logprob": logprob_sum / active_tokens if active_tokens else math.nan,
            "learning_rate": learning_rate,
        }

    def micro_batches(self, sequences: list[TrainSequence]) -> list[list[TrainSequence]]:
        """Split by a padded-token budget so activation memory stays bounded on any batch size.

        Sequences are sorted by length first, so each micro-batch pads little.
        """
        batches: list[list[TrainSequence]] = []
        current: list[TrainSequence] = []
        for seq in sorted(sequences, key=lambda s: s.length):
            length = seq.length
            if current and length * (len(current) + 1) > self.config.micro_batch_tokens:
                batches.append(current)
                current = []
            current.append(seq)
        if current:
            batches.append(current)
        return batches

    def policy_loss(self, sequences: list[TrainSequence], normalizer: int) -> tuple[torch.Tensor, float]:
        """Sum of -advantage * log p(token) over completion tokens, divided by `normalizer`.

        Log-probs are computed only at positions that predict completion tokens, so the
        full-vocabulary logits exist for those rows and never for the prompt. Returns the
        loss and the (detached) sum of the token log-probs.
        """
        ids, mask, targets, advantages = self._right_pad(sequences)
        hidden = self.model.base_model.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        rows, cols = torch.nonzero(targets[:, 1:] >= 0, as_tuple=True)
        logits = self.model.base_model.model.lm_head(hidden[rows, cols]).float()
        token_ids = targets[rows, cols + 1]
        token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
        loss = -(advantages[rows] * token_logprobs).sum() / max(normalizer, 1)
        return loss, float(token_logprobs.detach().sum())

    def _right_pad(self, sequences: list[TrainSequence]) -> tuple[torch.Tensor, ...]:
        width = max(s.length for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        targets = torch.full((len(sequences), width), -1, dtype=torch.long)
        for row, seq in enumerate(sequences):
            full = seq.prompt_ids + seq.completion_ids
            ids[row, : len(full)] = torch.tensor(full, dtype=torch.long)
            mask[row, : len(full)] = 1
            targets[row, len(seq.prompt_ids) : len(full)] = torch.tensor(seq.completion_ids, dtype=torch.long)
            for start, end in seq.prompt_spans:
                targets[row, start:end] = ids[row, start:end]
        advantages = torch.tensor([s.advantage for s in sequences], dtype=torch.float32)
        return ids, mask, targets, advantages

    # -------------------------------------------------------------------------- checkpoints
    def save(self, directory: Path) -> None:
        """Write the LoRA weights and optimizer state (the caller makes it atomic)."""
        with self._lock:
            directory.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(self.model).items()}
            save_file(state, str(directory / ADAPTER_FILE))
            torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)

    def load(self, directory: Path) -> None:
        """Restore LoRA weights and optimizer state saved by `save`."""
        with self._lock:
            set_peft_model_state_dict(self.model, load_file(str(directory / ADAPTER_FILE)))
            optimizer_path = directory / OPTIMIZER_FILE
            if optimizer_path.is_file():
                self.optimizer.load_state_dict(torch.load(optimizer_path, weights_only=True))
