"""Which scenarios each iteration trains on: a deterministic function of (seed, iteration).

The order of the training scenarios is reshuffled each epoch with `Random(seed + epoch)`
and each iteration takes the next `per_step` of them. Because it depends on nothing else,
a resumed run picks exactly the scenarios the uninterrupted run would have picked.
"""

from __future__ import annotations

import random

from codreamer.domain import Scenario


def scenarios_for_iteration(train: list[Scenario], before: int, per_step: int, seed: int) -> list[Scenario]:
    """The scenarios of the iteration after `before` others (iteration number N: `before` = N - 1).

    A position in the scenario stream, not an iteration number: the stream starts at 0.
    """
    if not train:
        raise ValueError("no training scenarios")
    picked: list[Scenario] = []
    start = before * per_step
    for position in range(start, start + per_step):
        epoch, index = divmod(position, len(train))
        order = list(train)
        random.Random(seed + epoch).shuffle(order)
        picked.append(order[index])
    return picked


def iterations_per_epoch(num_train: int, per_step: int) -> int:
    return max(1, -(-num_train // per_step))
