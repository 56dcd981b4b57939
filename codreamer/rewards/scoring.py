"""Scoring one trajectory: the reward it is trained on, and every part of it, on the trajectory.

Today the reward is the offline rubric's total. Each rubric part is stored in
`trajectory.metrics` under `rubric/<part>` so it is logged separately, and the reward that
GRPO trains on is the same number that is logged as `reward`.
"""

from __future__ import annotations

import art

from codreamer.domain import Product, Prospect
from codreamer.rewards.rubric import score_email
from codreamer.training.rollout import email_from_trajectory


def score_trajectory(trajectory: art.Trajectory, prospect: Prospect, product: Product) -> float:
    rubric = score_email(email_from_trajectory(trajectory), prospect, product)
    trajectory.metrics.update(rubric.as_metrics())
    trajectory.reward = rubric.total
    return trajectory.reward
