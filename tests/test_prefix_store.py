"""Conversations' keys/values kept between turns (`PrefixStore`) and the sampler that uses them."""

from __future__ import annotations

import pytest
import torch

from codreamer.backends.embedded.policy import Policy, TrainSequence
from codreamer.backends.embedded.prefix_store import PrefixStore

try:  # tests/ is a rootdir (no __init__.py): pytest puts it on sys.path
    from test_grpo import IM_END, randomize_lora_b, reference_logprobs, tiny_policy
except ModuleNotFoundError:  # pragma: no cover
    from tests.test_grpo import IM_END, randomize_lora_b, reference_logprobs, tiny_policy

pytestmark = pytest.mark.timeout(60)

SYSTEM = list(range(10, 40))  # 30 tokens every conversation starts with
FIRST_TURNS = [SYSTEM + [41, 42, 43], SYSTEM + [44, 45], SYSTEM + [46, 47, 48, 49]]
TOOL_RESULT = [50, 51, 52, 53, 54]


def kv(tokens: int, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (2, 1, tokens, 4)  # layers, heads, tokens, dim: 32 bytes per token and layer pair
    return torch.full(shape, fill), torch.full(shape, fill)


# --- the store ------------------------------------------------------------------------------


def test_match_finds_the_longest_stored_prefix_within_the_limit() -> None:
    store = PrefixStore(max_bytes=10_000)
    store.add([1, 2, 3, 4], *kv(4, 1.0))
    store.add([1, 2, 9], *kv(3, 2.0))
    length, entry = store.match([1, 2, 3, 4, 5, 6], limit=5)
    assert length == 4 and entry is not None and float(entry.keys[0, 0, 0, 0]) == 1.0
    assert store.match([1, 2, 3, 4, 5, 6], limit=3)[0] == 3  # one token is always left to compute
    assert store.match([7, 8], limit=1) == (0, None)


def test_an_entry_that_a_newer_one_extends_is_dropped() -> None:
    store = PrefixStore(max_bytes=10_000)
    store.add([1, 2, 3], *kv(3))
    store.add([1, 2, 3, 4, 5], *kv(5))
    assert len(store) == 1 and store.nbytes == 2 * 2 * 5 * 4 * 4


def test_least_recently_used_entries_go_first_past_the_budget() -> None:
    per_token = 2 * 2 * 4 * 4  # keys + values, 2 layers, 4 floats
    store = PrefixStore(max_bytes=10 * per_token)
    store.add([1, 1, 1, 1], *kv(4))
    store.add([2, 2, 2, 2], *kv(4))
    store.match([1, 1, 1, 1, 1], limit=4)  # [1...] is now the most recently used
    store.add([3, 3, 3, 3], *kv(4))
    assert store.nbytes <= store.max_bytes
    assert store.match([2, 2, 2, 2, 2], limit=4) == (0, None)
    assert store.match([1, 1, 1, 1, 1], limit=4)[0] == 4
    store.add(list(range(11)), *kv(11))  # bigger than the whole budget: not kept
    assert store.match(list(range(12)), limit=11)[0] == 0


def test_a_store_of_zero_bytes_keeps_nothing() -> None:
    store = PrefixStore(max_bytes=0)
    store.add([1, 2, 3], *kv(3))
    assert len(store) == 0


# --- the sampler ----------------------------------------------------------------------------


def second_turns(policy: Policy, temperature: float = 0.0, seed: int | None = None) -> list[list[int]]:
    """Sample every first turn, then build the next prompts as a rollout does."""
    first = policy.sample(FIRST_TURNS, max_new_tokens=6, temperature=temperature, seed=seed)
    return [
        prompt + sample.token_ids + [IM_END] + TOOL_RESULT for prompt, sample in zip(FIRST_TURNS, first, strict=True)
    ]


def cold_policy() -> Policy:
    policy = tiny_policy()
    policy.prefix_store.max_bytes = 0
    randomize_lora_b(policy)
    return policy


def warm_policy() -> Policy:
    policy = tiny_policy()
    randomize_lora_b(policy)
    return policy


def test_a_second_turn_starts_from_the_first_turns_keys_and_values() -> None:
    warm, cold = warm_policy(), cold_policy()
    prompts = second_turns(warm)
    assert prompts == second_turns(cold)  # same weights: the same first turns
    before = warm.prefilled_positions
    got = warm.sample(prompts, max_new_tokens=8, temperature=0.0)
    computed = warm.prefilled_positions - before
    want = cold.sample(prompts, max_new_tokens=8, temperature=0.0)
    assert [s.token_ids for s in got] == [s.token_ids for s in want]
    for g, w in zip(got, want, strict=True):
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
    assert computed <= len(prompts) * (len(TOOL_RESULT) + 2)  # only the new tokens were computed


def test_sampled_logprobs_from_stored_prefixes_equal_the_training_logprobs() -> None:
    policy = warm_policy()
    prompts = second_turns(policy, temperature=1.0, seed=3)
    samples = policy.sample(prompts, max_new_tokens=8, temperature=1.0, seed=5)
    with torch.no_grad():
        for prompt, sample in zip(prompts, samples, strict=True):
            assert sample.token_ids
            want = reference_logprobs(policy, TrainSequence(prompt, sample.token_ids, 1.0))
            assert sample.logprobs == pytest.approx(want.tolist(), abs=1e-4)


def test_rows_with_and_without_a_stored_prefix_share_a_batch() -> None:
    warm, cold = warm_policy(), cold_policy()
    stored = second_turns(warm)[0]
    second_turns(cold)
    fresh = [5, 6, 7] + list(range(20, 60))  # shares nothing with the stored conversations
    prompts = [stored, fresh]
    got = warm.sample(prompts, max_new_tokens=6, temperature=0.0)
    for prompt, sample in zip(prompts, got, strict=True):
        [alone] = cold.sample([prompt], max_new_tokens=6, temperature=0.0)
        assert sample.token_ids == alone.token_ids
        assert sample.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_training_forgets_the_stored_conversations() -> None:
    warm, cold = warm_policy(), cold_policy()
    step = [TrainSequence(FIRST_TURNS[0], [5, 6, 7], 1.0)]
    for policy in (warm, cold):
        second_turns(policy)
        policy.train_step(step, learning_rate=1e-2)
    assert len(warm.prefix_store) == 0
    prompts = second_turns(warm)  # new weights: the first turns are sampled (and stored) again
    assert prompts == second_turns(cold)
    got = warm.sample(prompts, max_new_tokens=6, temperature=0.0)
    want = cold.sample(prompts, max_new_tokens=6, temperature=0.0)
    assert [s.token_ids for s in got] == [s.token_ids for s in want]
    for g, w in zip(got, want, strict=True):
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
