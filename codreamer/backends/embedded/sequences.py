"""Training sequences of the embedded backend and how they are grouped into micro-batches.

A `TrainSequence` is one forward pass: prompt tokens, a completion, and the earlier sampled
spans inside the prompt (`prompt_spans`, earlier turns of the same episode), all trained with
one advantage. `sampled_logprobs` are the log-probabilities the sampler reported for the trained
tokens (in position order); the loss divides by them for its importance ratio, so a stale
(off-policy) sequence is corrected instead of being treated as if the current weights sampled it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from codreamer.backends.embedded.kv_cache import common_prefix_length

#: A common prefix shorter than this is not worth a forward pass of its own.
MIN_SHARED_PREFIX = 16


@dataclass(frozen=True)
class TrainSequence:
    """Tokens to reinforce with one advantage: the completion, plus `prompt_spans`.

    `prompt_spans` are [start, end) ranges of `prompt_ids` that were sampled too: earlier
    turns of the same episode, which a multi-turn trajectory carries in its last prompt.
    Training them inside the last turn's sequence costs one forward pass instead of one per
    turn, with the same loss. `sampled_logprobs` (None: unknown, treated as on-policy) holds
    one value per trained token, spans first, then the completion (NaN: unknown token).
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    prompt_spans: tuple[tuple[int, int], ...] = ()
    sampled_logprobs: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.sampled_logprobs is not None and len(self.sampled_logprobs) != self.trained_tokens:
            raise ValueError(f"{len(self.sampled_logprobs)} sampled log-probs for {self.trained_tokens} trained tokens")

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def trained_tokens(self) -> int:
        return len(self.completion_ids) + sum(end - start for start, end in self.prompt_spans)

    def trained_positions(self) -> list[int]:
        """Indices (in prompt + completion) of the trained tokens, in order."""
        spans = [t for start, end in self.prompt_spans for t in range(start, end)]
        return spans + list(range(len(self.prompt_ids), self.length))

    def old_logprobs(self) -> list[float]:
        """The sampler's log-prob per trained token; NaN where unknown."""
        if self.sampled_logprobs is None:
            return [math.nan] * self.trained_tokens
        return list(self.sampled_logprobs)


def tokens_of(seq: TrainSequence) -> list[int]:
    return seq.prompt_ids + seq.completion_ids


def _first_trained(seq: TrainSequence) -> int:
    return min([len(seq.prompt_ids), *(start for start, _ in seq.prompt_spans)])


def _shared_limit(seq: TrainSequence) -> int:
    """How much of `seq` a shared prefix may cover: up to the position that predicts its first trained token."""
    return _first_trained(seq) - 1


def trainable_shared_prefix(sequences: Sequence[TrainSequence]) -> int:
    """Length of the prefix all `sequences` share and none trains on (0 when not worth sharing)."""
    if len(sequences) < 2:
        return 0
    shared = min(common_prefix_length([tokens_of(s) for s in sequences]), *(_shared_limit(s) for s in sequences))
    return shared if shared >= MIN_SHARED_PREFIX else 0


def batch_cost(sequences: Sequence[TrainSequence]) -> int:
    """Tokens a micro-batch computes: its shared prefix once, plus each row's padded rest."""
    shared = trainable_shared_prefix(sequences)
    return shared + len(sequences) * (max(s.length for s in sequences) - shared)


def _prefix_runs(ordered: Sequence[TrainSequence]) -> Iterator[list[TrainSequence]]:
    """Consecutive runs of token-sorted sequences, extended while sharing saves computed tokens."""
    run: list[TrainSequence] = []
    for seq in ordered:
        if run and batch_cost([*run, seq]) >= batch_cost(run) + seq.length:
            yield run
            run = []
        run.append(seq)
    if run:
        yield run


def _chunks(sequences: Sequence[TrainSequence], budget: int) -> list[list[TrainSequence]]:
    """Consecutive chunks whose `batch_cost` fits `budget` (a longer sequence goes alone)."""
    chunks: list[list[TrainSequence]] = []
    current: list[TrainSequence] = []
    for seq in sequences:
        if current and batch_cost([*current, seq]) > budget:
            chunks.append(current)
            current = []
        current.append(seq)
    if current:
        chunks.append(current)
    return chunks


def micro_batches(sequences: list[TrainSequence], budget: int) -> list[list[TrainSequence]]:
    """Split by a computed-token budget so activation memory stays bounded on any batch size.

    Sequences that share a prompt prefix (a GRPO group; rollouts share the system
    prompt) are kept together, so each micro-batch computes that prefix once
    (`batch_cost`). The rest are sorted by length, so each micro-batch pads little.
    """
    runs = list(_prefix_runs(sorted(sequences, key=tokens_of)))
    loners = sorted((run[0] for run in runs if len(run) == 1), key=lambda s: s.length)
    shared = [chunk for run in runs if len(run) > 1 for chunk in _chunks(run, budget)]
    return shared + _chunks(loners, budget)
