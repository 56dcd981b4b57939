"""GRPO advantages and batches (`codreamer.backends.embedded.grpo`) and the embedded `Policy` on a tiny model.

The policy tests never load SmolLM2: they wrap a randomly initialised 2-layer Llama with a
64-token vocabulary, so every forward pass takes milliseconds. The loss, the micro-batched
gradient and the sampler are checked against straightforward reference computations.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import art
import pytest
import torch
from openai.types.chat.chat_completion import Choice
from transformers import LlamaConfig, LlamaForCausalLM

from codreamer.backends.embedded.grpo import (
    MissingTokenIds,
    build_grpo_batch,
    group_advantages,
    trajectory_sequences,
)
from codreamer.backends.embedded.kv_cache import PreallocatedLayer, common_prefix_length
from codreamer.backends.embedded.policy import (
    MIN_SHARED_PREFIX,
    GRPOConfig,
    Policy,
    TrainSequence,
    batch_cost,
    inverse_cdf_sample,
    trainable_shared_prefix,
)

pytestmark = pytest.mark.timeout(60)

VOCAB = 64
PAD, EOS, IM_END, UNK = 0, 1, 2, 3


class FakeTokenizer:
    """Test double: the only tokenizer attributes `Policy.__init__` reads."""

    eos_token_id = EOS
    pad_token_id = PAD

    def convert_tokens_to_ids(self, token: str) -> int:
        return IM_END if token == "<|im_end|>" else UNK


def tiny_policy(**config: object) -> Policy:
    """A LoRA policy around a random 2-layer Llama; same weights for the same arguments."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    )
    settings: dict[str, object] = {"lora_rank": 4, "lora_alpha": 8, "seed": 0}
    settings.update(config)
    return Policy(base, FakeTokenizer(), GRPOConfig(**settings))


def randomize_lora_b(policy: Policy, seed: int = 1) -> None:
    """LoRA B starts at zero (the adapter is a no-op); make it matter so LoRA A gets gradients too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def lora_state(policy: Policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_" in n}


def lora_grads(policy: Policy) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}


def reference_logprobs(policy: Policy, seq: TrainSequence) -> torch.Tensor:
    """Full model on prompt+completion alone (no padding); log-probs of the completion tokens."""
    ids = torch.tensor([seq.prompt_ids + seq.completion_ids])
    logits = policy.model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    start = len(seq.prompt_ids) - 1  # position t predicts token t + 1
    positions = torch.arange(start, start + len(seq.completion_ids))
    return logp[positions, torch.tensor(seq.completion_ids)]


def reference_loss(policy: Policy, sequences: list[TrainSequence]) -> torch.Tensor:
    total = sum(len(s.completion_ids) for s in sequences)
    return -sum(s.advantage * reference_logprobs(policy, s).sum() for s in sequences) / total


def random_sequences(spec: list[tuple[int, int, float]], seed: int = 0) -> list[TrainSequence]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for prompt_len, completion_len, advantage in spec:
        ids = torch.randint(4, VOCAB, (prompt_len + completion_len,), generator=generator).tolist()
        out.append(TrainSequence(ids[:prompt_len], ids[prompt_len:], advantage))
    return out


def _ids(seq: TrainSequence) -> list[int]:
    return seq.prompt_ids + seq.completion_ids


def shared_prompt_group(prompt_len: int, completion_lens: list[int], seed: int = 11) -> list[TrainSequence]:
    """A GRPO group: one prompt, several completions, advantages of both signs."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(4, VOCAB, (prompt_len,), generator=generator).tolist()
    return [
        TrainSequence(prompt, torch.randint(4, VOCAB, (n,), generator=generator).tolist(), (-1) ** i * (0.3 + 0.1 * i))
        for i, n in enumerate(completion_lens)
    ]


def reference_trained_logprobs(policy: Policy, seq: TrainSequence) -> torch.Tensor:
    """Like `reference_logprobs`, for every trained token: the completion and the prompt spans."""
    ids = _ids(seq)
    logp = torch.log_softmax(policy.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    trained = [t for start, end in seq.prompt_spans for t in range(start, end)] + list(
        range(len(seq.prompt_ids), len(ids))
    )
    return logp[torch.tensor(trained) - 1, torch.tensor([ids[t] for t in trained])]


MIXED = [(5, 3, 1.3), (17, 9, -0.7), (2, 14, 0.4), (11, 1, -1.1), (8, 6, 0.0)]


# ------------------------------------------------------------------------- advantages
def test_group_advantages_have_zero_mean_and_unit_std() -> None:
    rewards = [0.2, 0.5, 0.9, 0.4, 0.4]
    adv = group_advantages(rewards)
    assert statistics.fmean(adv) == pytest.approx(0.0, abs=1e-9)
    assert statistics.pstdev(adv) == pytest.approx(1.0, rel=1e-5)
    # Order is preserved: the best reward gets the largest advantage.
    assert max(range(5), key=adv.__getitem__) == 2 and min(range(5), key=adv.__getitem__) == 0
    assert group_advantages([1.0, 0.0]) == pytest.approx([1.0, -1.0], rel=1e-5)


def test_group_advantages_without_spread_are_zero() -> None:
    assert group_advantages([0.7, 0.7, 0.7]) == [0.0, 0.0, 0.0]
    assert group_advantages([0.3]) == [0.0]
    assert group_advantages([]) == []


# ---------------------------------------------------------------------- GRPO batches
def _logprobs(token_ids: list[int] | None) -> dict[str, object]:
    """The server's logprobs for these tokens: -0.1 * (position + 1), so each is recognisable."""
    return {
        "content": [
            {"token": f"token_id:{t}", "logprob": -0.1 * (i + 1), "bytes": [], "top_logprobs": []}
            for i, t in enumerate(token_ids or [])
        ]
    }


def _choice(prompt_ids: list[int] | None, token_ids: list[int] | None) -> Choice:
    raw: dict[str, object] = {
        "index": 0,
        "finish_reason": "stop",
        "message": {"role": "assistant", "content": "x"},
        "logprobs": _logprobs(token_ids),
    }
    if prompt_ids is not None:
        raw["prompt_token_ids"] = prompt_ids
    if token_ids is not None:
        raw["token_ids"] = token_ids
    return Choice.model_validate(raw)


def _plain(seqs: list[TrainSequence]) -> list[TrainSequence]:
    """The sequences without their sampled log-probs, to compare token layouts."""
    return [TrainSequence(s.prompt_ids, s.completion_ids, s.advantage, s.prompt_spans) for s in seqs]


def _trajectory(reward: float, turns: list[tuple[list[int], list[int]]]) -> art.Trajectory:
    items: list[object] = [{"role": "user", "content": "write"}]
    for prompt_ids, token_ids in turns:
        items.append(_choice(prompt_ids, token_ids))
        items.append({"role": "tool", "tool_call_id": "c", "content": "{}"})
    return art.Trajectory(messages_and_choices=items, reward=reward)


def test_trajectory_sequences_take_the_token_ids_of_every_choice() -> None:
    traj = _trajectory(1.0, [([10, 11], [12, 13, 14]), ([10, 11, 12, 15, 20], [21]), ([5], [])])
    seqs = trajectory_sequences(traj, advantage=0.5)
    assert seqs[0].sampled_logprobs == pytest.approx((-0.1, -0.2, -0.3))
    assert _plain(seqs) == [
        TrainSequence([10, 11], [12, 13, 14], 0.5),
        TrainSequence([10, 11, 12, 15, 20], [21], 0.5),
    ]  # the second prompt does not hold the first turn: no fold; the empty completion is dropped


def test_a_turn_held_by_the_next_prompt_is_folded_into_it() -> None:
    traj = _trajectory(1.0, [([10, 11], [12, 13, 14]), ([10, 11, 12, 13, 14, 20], [21]), ([5], [])])
    seqs = trajectory_sequences(traj, advantage=0.5)
    assert _plain(seqs) == [TrainSequence([10, 11, 12, 13, 14, 20], [21], 0.5, ((2, 5),))]
    assert seqs[0].sampled_logprobs == pytest.approx((-0.1, -0.2, -0.3, -0.1))  # spans first, in position order
    assert seqs[0].trained_tokens == 4


def test_folded_sequences_have_the_same_loss_and_gradient_as_separate_turns() -> None:
    policy = tiny_policy()
    randomize_lora_b(policy)
    first = TrainSequence([1, 2, 3], [4, 5, 6], -0.7)
    second = TrainSequence([1, 2, 3, 4, 5, 6, 7, 8], [9, 10], -0.7)
    folded = TrainSequence(second.prompt_ids, second.completion_ids, -0.7, ((3, 6),))
    separate_loss, separate_sum = policy.policy_loss([first, second], normalizer=5)
    folded_loss, folded_sum = policy.policy_loss([folded], normalizer=5)
    assert float(folded_loss) == pytest.approx(float(separate_loss), abs=1e-5)
    assert folded_sum == pytest.approx(separate_sum, abs=1e-4)


def test_trajectory_sequences_accept_choices_in_dict_form() -> None:
    choice = {
        "index": 0,
        "finish_reason": "length",
        "message": {"role": "assistant", "content": "x"},
        "prompt_token_ids": [1, 2],
        "token_ids": [3],
        "logprobs": _logprobs([3]),
    }
    traj = art.Trajectory(messages_and_choices=[{"role": "user", "content": "u"}], reward=0.0)
    traj.messages_and_choices.append(choice)
    assert _plain(trajectory_sequences(traj, 2.0)) == [TrainSequence([1, 2], [3], 2.0)]


@pytest.mark.parametrize(("prompt_ids", "token_ids"), [(None, None), ([1, 2], None), (None, [3])])
def test_choices_without_token_ids_are_refused(prompt_ids: list[int] | None, token_ids: list[int] | None) -> None:
    traj = art.Trajectory(
        messages_and_choices=[{"role": "user", "content": "u"}, _choice(prompt_ids, token_ids)], reward=1.0
    )
    with pytest.raises(MissingTokenIds, match="prompt_token_ids"):
        trajectory_sequences(traj, 1.0)


def test_build_grpo_batch_skips_and_counts_groups_without_spread() -> None:
    spread = art.TrajectoryGroup(
        [
            _trajectory(1.0, [([1], [2, 3]), ([1, 2, 3, 4], [5])]),
            _trajectory(0.0, [([1], [6])]),
        ]
    )
    flat = art.TrajectoryGroup([_trajectory(0.5, [([7], [8])]), _trajectory(0.5, [([7], [9])])])
    single = art.TrajectoryGroup([_trajectory(1.0, [([7], [10])])])
    batch = build_grpo_batch([flat, spread, single])
    assert (batch.groups_used, batch.groups_skipped) == (1, 2)
    assert [(s.prompt_ids, s.completion_ids, s.prompt_spans) for s in batch.sequences] == [
        ([1, 2, 3, 4], [5], ((1, 3),)),
        ([1], [6], ()),
    ]
    assert (batch.groups_no_reward_spread, batch.groups_no_trainable_tokens) == (2, 0)
    assert [s.advantage for s in batch.sequences] == pytest.approx([1.0, -1.0], rel=1e-5)


def test_build_grpo_batch_of_only_flat_groups_is_empty() -> None:
    flat = art.TrajectoryGroup([_trajectory(0.0, [([1], [2])]), _trajectory(0.0, [([1], [3])])])
    batch = build_grpo_batch([flat])
    assert batch.sequences == [] and (batch.groups_used, batch.groups_skipped) == (0, 1)


def test_a_group_with_spread_but_nothing_trainable_is_told_apart_from_one_without_spread() -> None:
    """Choices without log-probs are not trained (ART's rule); the group is counted as such, not as flat."""
    bare = [_trajectory(r, [([1], [2])]) for r in (0.0, 1.0)]
    for trajectory in bare:
        trajectory.messages_and_choices[1].logprobs = None
    batch = build_grpo_batch([art.TrajectoryGroup(bare)])
    assert (batch.groups_used, batch.groups_no_reward_spread, batch.groups_no_trainable_tokens) == (0, 0, 1)


def test_additional_histories_are_trained_too() -> None:
    def with_extra(reward: float) -> art.Trajectory:
        trajectory = _trajectory(reward, [([1, 2], [3, 4])])
        extra = art.trajectories.LegacyHistory(
            messages_and_choices=[{"role": "user", "content": "u"}, _choice([9, 8], [7])]
        )
        trajectory.additional_histories = [extra]
        return trajectory

    batch = build_grpo_batch([art.TrajectoryGroup([with_extra(1.0), with_extra(0.0)])])
    assert len(batch.sequences) == 4  # two histories per trajectory
    assert sorted(s.completion_ids for s in batch.sequences) == [[3, 4], [3, 4], [7], [7]]


def test_normalize_advantages_false_only_centres_rewards() -> None:
    group = art.TrajectoryGroup([_trajectory(r, [([1], [2])]) for r in (0.0, 4.0)])
    scaled = build_grpo_batch([group]).sequences
    centred = build_grpo_batch([group], normalize_advantages=False).sequences
    assert sorted(s.advantage for s in scaled) == pytest.approx([-1.0, 1.0], rel=1e-5)
    assert sorted(s.advantage for s in centred) == pytest.approx([-2.0, 2.0])


# ------------------------------------------------------------------------ policy loss
def test_policy_loss_matches_a_per_sequence_reference() -> None:
    policy = tiny_policy()
    randomize_lora_b(policy)
    sequences = random_sequences(MIXED)
    total = sum(len(s.completion_ids) for s in sequences)
    with torch.no_grad():
        loss, logprob_sum = policy.policy_loss(sequences, normalizer=total)
        expected = reference_loss(policy, sequences)
        expected_sum = float(sum(reference_logprobs(policy, s).sum() for s in sequences))
    assert abs(float(loss) - float(expected)) < 1e-4, (float(loss), float(expected))
    assert logprob_sum == pytest.approx(expected_sum, abs=1e-3)
    assert expected_sum < 0


def test_policy_loss_is_independent_of_batch_composition() -> None:
    """Padding must not leak: a sequence's loss is the same alone or next to longer ones."""
    policy = tiny_policy()
    randomize_lora_b(policy)
    sequences = random_sequences(MIXED)
    with torch.no_grad():
        together, _ = policy.policy_loss(sequences, normalizer=1)
        alone = sum(float(policy.policy_loss([s], normalizer=1)[0]) for s in sequences)
    assert float(together) == pytest.approx(alone, abs=1e-4)


def test_train_step_gradient_equals_the_reference_loss_gradient() -> None:
    sequences = random_sequences(MIXED)  # includes a zero-advantage sequence: it counts in the normaliser
    trained = tiny_policy(max_grad_norm=1e9, micro_batch_tokens=64)
    randomize_lora_b(trained)
    trained.train_step(sequences, learning_rate=1e-3)
    got = lora_grads(trained)

    reference = tiny_policy()
    randomize_lora_b(reference)
    reference.model.train()
    reference_loss(reference, sequences).backward()
    want = lora_grads(reference)
    assert got.keys() == want.keys() and len(got) > 0
    assert any(float(g.abs().max()) > 1e-4 for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_micro_batched_gradient_equals_one_big_batch() -> None:
    sequences = random_sequences(MIXED + [(20, 12, 0.9), (3, 4, -0.2), (30, 10, 0.5)], seed=3)
    small = tiny_policy(max_grad_norm=1e9, micro_batch_tokens=64)
    large = tiny_policy(max_grad_norm=1e9, micro_batch_tokens=100_000)
    for policy in (small, large):
        randomize_lora_b(policy)
    active = [s for s in sequences if s.advantage != 0]
    assert len(small.micro_batches(active)) >= 3
    assert len(large.micro_batches(active)) == 1

    small_metrics = small.train_step(sequences, learning_rate=1e-3)
    large_metrics = large.train_step(sequences, learning_rate=1e-3)
    small_grads, large_grads = lora_grads(small), lora_grads(large)
    for name in large_grads:
        torch.testing.assert_close(small_grads[name], large_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert small_metrics["loss"] == pytest.approx(large_metrics["loss"], abs=1e-5)
    assert small_metrics["grad_norm"] == pytest.approx(large_metrics["grad_norm"], rel=1e-4)
    assert small_metrics["mean_logprob"] == pytest.approx(large_metrics["mean_logprob"], abs=1e-5)
    assert small_metrics["num_tokens"] == sum(len(s.completion_ids) for s in sequences)
    assert small_metrics["num_sequences"] == len(sequences)


def test_micro_batches_keep_every_sequence_within_the_token_budget() -> None:
    policy = tiny_policy(micro_batch_tokens=64)
    sequences = random_sequences([(30, 10, 1.0), (3, 2, 1.0), (10, 5, 1.0), (50, 30, 1.0), (6, 6, 1.0), (8, 8, 1.0)])
    batches = policy.micro_batches(sequences)
    assert sorted(map(id, (s for b in batches for s in b))) == sorted(map(id, sequences))
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for b in batches for s in b]
    assert lengths == sorted(lengths)  # no shared prefixes here: sorted by length, to pad little
    for batch in batches:
        width = max(len(s.prompt_ids) + len(s.completion_ids) for s in batch)
        assert len(batch) == 1 or width * len(batch) <= 64


def test_micro_batches_count_a_shared_prefix_once() -> None:
    """Eight completions of one 40-token prompt: 39 + 8 x 7 = 95 computed tokens, not 8 x 46 = 368
    (position 39 predicts the first completion token, so it is computed per row)."""
    group = shared_prompt_group(prompt_len=40, completion_lens=[6, 3, 6, 5, 1, 6, 4, 2])
    stranger = random_sequences([(12, 3, 1.0)], seed=8)[0]
    assert batch_cost(group) == 39 + 8 * 7
    assert batch_cost([*group, stranger]) == 9 * 46  # sharing nothing: every row in full
    batches = tiny_policy(micro_batch_tokens=100).micro_batches([*group, stranger])
    assert batches == [sorted(group, key=_ids), [stranger]]
    small = tiny_policy(micro_batch_tokens=64).micro_batches(group)
    assert len(small) >= 2 and all(batch_cost(b) <= 64 for b in small)


def test_train_step_moves_log_probs_in_the_direction_of_the_advantage() -> None:
    policy = tiny_policy(learning_rate=1e-2)
    randomize_lora_b(policy)
    good, bad = random_sequences([(6, 5, 1.0), (7, 4, -1.0)], seed=5)
    with torch.no_grad():
        good_before = float(reference_logprobs(policy, good).sum())
        bad_before = float(reference_logprobs(policy, bad).sum())
    metrics = policy.train_step([good, bad], learning_rate=1e-2)
    with torch.no_grad():
        good_after = float(reference_logprobs(policy, good).sum())
        bad_after = float(reference_logprobs(policy, bad).sum())
    assert good_after > good_before + 1e-3
    assert bad_after < bad_before - 1e-3
    # mean_logprob is measured under the weights before the update.
    assert metrics["mean_logprob"] == pytest.approx((good_before + bad_before) / 9, abs=1e-4)
    assert metrics["learning_rate"] == 1e-2 and metrics["num_tokens"] == 9.0
    assert not policy.model.training  # back in eval mode for sampling


def test_train_step_with_only_zero_advantages_changes_nothing() -> None:
    policy = tiny_policy()
    randomize_lora_b(policy)
    before = lora_state(policy)
    metrics = policy.train_step(random_sequences([(4, 4, 0.0), (5, 3, 0.0)]), learning_rate=1e-2)
    after = lora_state(policy)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert metrics["loss"] == 0.0 and metrics["num_tokens"] == 7.0
    assert metrics["mean_logprob"] != metrics["mean_logprob"]  # NaN: no active tokens


def test_save_and_load_round_trip_lora_weights_and_optimizer(tmp_path: Path) -> None:
    sequences = random_sequences(MIXED)
    trained = tiny_policy()
    randomize_lora_b(trained)
    trained.train_step(sequences, learning_rate=1e-2)
    trained.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").is_file()

    fresh = tiny_policy()
    saved, before = lora_state(trained), lora_state(fresh)
    assert not all(torch.equal(saved[n], before[n]) for n in saved)
    fresh.load(tmp_path / "ckpt")
    loaded = lora_state(fresh)
    assert loaded.keys() == saved.keys()
    for name in saved:
        torch.testing.assert_close(loaded[name], saved[name], atol=0, rtol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(reference_logprobs(fresh, sequences[1]), reference_logprobs(trained, sequences[1]))

    # The optimizer state came back too: the next step is identical on both.
    trained.train_step(sequences, learning_rate=1e-2)
    fresh.train_step(sequences, learning_rate=1e-2)
    after_trained, after_fresh = lora_state(trained), lora_state(fresh)
    for name in after_trained:
        torch.testing.assert_close(after_fresh[name], after_trained[name], atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------- sampling
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


def test_sample_returns_one_sample_per_prompt_with_matching_logprobs() -> None:
    policy = tiny_policy()
    samples = policy.sample(PROMPTS, max_new_tokens=6, temperature=1.0, seed=0)
    assert len(samples) == len(PROMPTS)
    for sample in samples:
        assert len(sample.logprobs) == len(sample.token_ids) <= 6
        assert all(lp <= 0.0 for lp in sample.logprobs)
        assert all(0 <= t < VOCAB and t not in (EOS, IM_END) for t in sample.token_ids[:-1])
        stopped = sample.token_ids[-1] in (EOS, IM_END)
        assert sample.finish_reason == ("stop" if stopped else "length")
        assert stopped or len(sample.token_ids) == 6


def test_greedy_sampling_is_deterministic() -> None:
    policy = tiny_policy()
    randomize_lora_b(policy)
    first = policy.sample(PROMPTS, max_new_tokens=8, temperature=0.0)
    second = policy.sample(PROMPTS, max_new_tokens=8, temperature=0.0)
    assert first == second
    assert all(len(s.token_ids) > 0 for s in first)


def test_seeded_sampling_is_reproducible() -> None:
    policy = tiny_policy()
    a = policy.sample(PROMPTS, max_new_tokens=8, temperature=1.0, seed=123)
    b = policy.sample(PROMPTS, max_new_tokens=8, temperature=1.0, seed=123)
    c = policy.sample(PROMPTS, max_new_tokens=8, temperature=1.0, seed=124)
    assert a == b
    assert [s.token_ids for s in a] != [s.token_ids for s in c]


def test_left_padding_gives_the_same_greedy_result_as_each_prompt_alone() -> None:
    policy = tiny_policy()
    randomize_lora_b(policy)
    batched = policy.sample(PROMPTS, max_new_tokens=8, temperature=0.0)
    for prompt, sample in zip(PROMPTS, batched, strict=True):
        [alone] = policy.sample([prompt], max_new_tokens=8, temperature=0.0)
        assert sample.token_ids == alone.token_ids
        assert sample.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_sampled_logprobs_equal_the_training_logprobs() -> None:
    """At temperature 1 the sampler's logprobs (KV cache, left padding) are the ones training recomputes."""
    policy = tiny_policy()
    randomize_lora_b(policy)
    samples = policy.sample(PROMPTS, max_new_tokens=8, temperature=1.0, seed=7)
    with torch.no_grad():
        for prompt, sample in zip(PROMPTS, samples, strict=True):
            assert sample.token_ids
            want = reference_logprobs(policy, TrainSequence(prompt, sample.token_ids, 1.0))
            assert sample.logprobs == pytest.approx(want.tolist(), abs=1e-4)


def test_a_row_that_stops_early_does_not_disturb_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = tiny_policy()
    randomize_lora_b(policy)
    expected = [policy.sample([p], max_new_tokens=6, temperature=0.0)[0] for p in PROMPTS]

    real_choose = Policy._choose
    calls = {"n": 0}

    def choose_end_of_turn_for_row_0_at_step_2(logits, temperature, generator):  # type: ignore[no-untyped-def]
        chosen, logprobs = real_choose(logits, temperature, generator)
        if calls["n"] == 2:
            chosen = chosen.clone()
            chosen[0] = IM_END
        calls["n"] += 1
        return chosen, logprobs

    monkeypatch.setattr(policy, "_choose", choose_end_of_turn_for_row_0_at_step_2)
    first, *others = policy.sample(PROMPTS, max_new_tokens=6, temperature=0.0)
    # the end-of-turn token is part of the completion (as vLLM returns it) and has its log-prob
    assert first.token_ids == [*expected[0].token_ids[:2], IM_END] and first.finish_reason == "stop"
    assert len(first.logprobs) == 3
    for got, want in zip(others, expected[1:], strict=True):
        assert got.token_ids == want.token_ids and got.finish_reason == "length"


# ------------------------------------------------------------------ shared prefixes
def test_common_prefix_length() -> None:
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2, 3, 9]]) == 2
    assert common_prefix_length([[1, 2], [1, 2, 3]]) == 2
    assert common_prefix_length([[5, 6]]) == 2
    assert common_prefix_length([[1], [2]]) == 0
    assert common_prefix_length([]) == 0


def test_the_shared_prefix_stops_before_the_first_trained_token() -> None:
    group = shared_prompt_group(prompt_len=30, completion_lens=[4, 5, 6])
    assert trainable_shared_prefix(group) == 29  # position 29 predicts the first completion token
    folded = TrainSequence(group[0].prompt_ids, [7, 8], 0.5, ((20, 24),))  # a span inside the common prompt
    assert trainable_shared_prefix([*group, folded]) == 19
    short = shared_prompt_group(prompt_len=MIN_SHARED_PREFIX, completion_lens=[2, 3])
    assert trainable_shared_prefix(short) == 0  # too short to be worth its own pass
    assert trainable_shared_prefix(group[:1]) == 0


def _prefix_batch() -> list[TrainSequence]:
    """A group sharing a 30-token prompt, a folded multi-turn sequence sharing 24 of it, and a stranger."""
    group = shared_prompt_group(prompt_len=30, completion_lens=[6, 2, 9, 4])
    prompt = group[0].prompt_ids
    folded = TrainSequence(prompt[:24] + [9, 8, 7, 6, 5, 4, 11], [12, 13, 14], 0.8, ((25, 28),))
    return [*group, folded, *random_sequences([(7, 5, -0.9)], seed=4)]


def test_policy_loss_with_a_shared_prefix_matches_the_reference() -> None:
    policy = tiny_policy()
    randomize_lora_b(policy)
    sequences = _prefix_batch()
    together = sequences[:5]
    assert trainable_shared_prefix(together) == 24
    total = sum(s.trained_tokens for s in together)
    with torch.no_grad():
        loss, logprob_sum = policy.policy_loss(together, normalizer=total)
        wanted = [reference_trained_logprobs(policy, s) for s in together]
    expected = -sum(s.advantage * w.sum() for s, w in zip(together, wanted, strict=True)) / total
    assert abs(float(loss) - float(expected)) < 1e-4, (float(loss), float(expected))
    assert logprob_sum == pytest.approx(float(sum(w.sum() for w in wanted)), abs=1e-3)


def test_train_step_gradient_with_shared_prefixes_equals_the_reference_gradient() -> None:
    sequences = _prefix_batch()
    trained = tiny_policy(max_grad_norm=1e9, micro_batch_tokens=100_000)
    randomize_lora_b(trained)
    assert any(trainable_shared_prefix(b) for b in trained.micro_batches(sequences))
    trained.train_step(sequences, learning_rate=1e-3)
    got = lora_grads(trained)

    reference = tiny_policy()
    randomize_lora_b(reference)
    reference.model.train()
    total = sum(s.trained_tokens for s in sequences)
    (-sum(s.advantage * reference_trained_logprobs(reference, s).sum() for s in sequences) / total).backward()
    want = lora_grads(reference)
    assert got.keys() == want.keys() and any(float(g.abs().max()) > 1e-4 for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


SHARED = list(range(20, 40))  # a 20-token prefix (>= MIN_SHARED_PREFIX) common to all prompts below
PREFIXED_PROMPTS = [SHARED + [5, 6], SHARED + [7], SHARED + [8, 9, 10], SHARED]


def test_sampling_with_a_shared_prefix_matches_each_prompt_alone() -> None:
    policy = tiny_policy()
    randomize_lora_b(policy)
    batched = policy.sample(PREFIXED_PROMPTS, max_new_tokens=8, temperature=0.0)
    for prompt, sample in zip(PREFIXED_PROMPTS, batched, strict=True):
        [alone] = policy.sample([prompt], max_new_tokens=8, temperature=0.0)
        assert sample.token_ids == alone.token_ids and sample.token_ids
        assert sample.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_shared_prefix_sampled_logprobs_equal_the_training_logprobs() -> None:
    policy = tiny_policy()
    randomize_lora_b(policy)
    samples = policy.sample(PREFIXED_PROMPTS, max_new_tokens=8, temperature=1.0, seed=3)
    assert sum(len(s.token_ids) for s in samples) >= 8
    with torch.no_grad():
        for prompt, sample in zip(PREFIXED_PROMPTS, samples, strict=True):
            if not sample.token_ids:
                continue  # stopped at once: nothing to compare
            want = reference_logprobs(policy, TrainSequence(prompt, sample.token_ids, 1.0))
            assert sample.logprobs == pytest.approx(want.tolist(), abs=1e-4)


def _base_weights(policy: Policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_" not in n}


def test_sampling_after_a_training_step_uses_the_updated_adapter() -> None:
    """Sampling merges LoRA into the base weights and training unmerges it: the sampler must
    see each update, and the base weights must come back (up to rounding)."""
    policy = tiny_policy(learning_rate=1e-2)
    randomize_lora_b(policy)
    base_before = _base_weights(policy)
    for round_ in range(3):
        samples = policy.sample(PROMPTS, max_new_tokens=6, temperature=1.0, seed=round_)
        with torch.no_grad():
            for prompt, sample in zip(PROMPTS, samples, strict=True):
                if sample.token_ids:
                    want = reference_logprobs(policy, TrainSequence(prompt, sample.token_ids, 1.0))
                    assert sample.logprobs == pytest.approx(want.tolist(), abs=1e-4)
        assert any(s.token_ids for s in samples)
        sequences = [
            TrainSequence(p, s.token_ids, a) for p, s, a in zip(PROMPTS, samples, [1.0, -1.0, 0.5], strict=True)
        ]
        policy.train_step([s for s in sequences if s.completion_ids], learning_rate=1e-2)
    for name, before in base_before.items():
        torch.testing.assert_close(_base_weights(policy)[name], before, atol=1e-6, rtol=0, msg=name)


def test_loading_a_checkpoint_after_sampling_serves_the_loaded_adapter(tmp_path: Path) -> None:
    saved = tiny_policy()
    randomize_lora_b(saved, seed=2)
    saved.save(tmp_path / "ckpt")
    policy = tiny_policy()
    randomize_lora_b(policy, seed=9)
    policy.sample(PROMPTS, max_new_tokens=4, temperature=0.0)  # merges the seed-9 adapter
    policy.load(tmp_path / "ckpt")
    got = policy.sample(PROMPTS, max_new_tokens=6, temperature=0.0)
    want = saved.sample(PROMPTS, max_new_tokens=6, temperature=0.0)
    assert [s.token_ids for s in got] == [s.token_ids for s in want]
    for got_sample, want_sample in zip(got, want, strict=True):
        assert got_sample.logprobs == pytest.approx(want_sample.logprobs, abs=1e-5)


def test_the_sampling_cache_grows_past_its_reserved_capacity() -> None:
    layer = PreallocatedLayer(capacity=2)
    chunks = [torch.randn(2, 3, n, 4) for n in (3, 1, 2)]
    for chunk in chunks:
        keys, values = layer.update(chunk, chunk * 2)
    torch.testing.assert_close(keys, torch.cat(chunks, dim=2))
    torch.testing.assert_close(values, torch.cat(chunks, dim=2) * 2)
    assert layer.get_seq_length() == 6
    layer.batch_select_indices(torch.tensor([1]))
    torch.testing.assert_close(layer.keys, torch.cat(chunks, dim=2)[1:])


def test_inverse_cdf_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2], [1.0, 0.0, 0.0, 0.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([inverse_cdf_sample(probs, [generator, None]) for _ in range(4000)])
    assert draws[:, 1].eq(0).all()  # a one-hot row always gives its token
    counts = torch.bincount(draws[:, 0], minlength=5).double() / len(draws)
    assert counts[0] == 0 and counts[2] == 0  # zero-probability tokens are never drawn
    torch.testing.assert_close(counts, probs[0].double(), atol=0.03, rtol=0)
    again = torch.Generator().manual_seed(0)
    assert torch.equal(inverse_cdf_sample(probs[:1], [again]), draws[0, :1])  # seeded: reproducible
