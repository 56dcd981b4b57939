"""Keys and values of recent conversations, so a rollout's next turn prefills only what is new.

Every turn of a rollout sends the whole conversation again (system prompt and tools, the
prospect, the turns so far), and on a CPU the prefill of ~800 tokens/s is a quarter of the
sampler's time. The embedded sampler keeps the keys and values of each completed row
(prompt + the tokens it fed back) and starts a later request from the longest stored prefix
of its prompt. A token's keys and values depend only on the tokens before it, so any prefix
of a stored sequence serves a prompt that starts with it.

Entries are valid only for the weights that computed them: the policy clears the store
whenever its weights change. The store is bounded in bytes (least recently used goes
first) and drops an entry as soon as a newer one extends it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import count

import torch

from codreamer.backends.embedded.kv_cache import common_prefix_length

__all__ = ["PrefixStore", "StoredPrefix"]


@dataclass(frozen=True)
class StoredPrefix:
    """The tokens of one sequence and their keys/values, `[layers, kv_heads, tokens, head_dim]`."""

    tokens: tuple[int, ...]
    keys: torch.Tensor
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class PrefixStore:
    """Stored prefixes by recency, at most `max_bytes` of keys and values (0 turns it off)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, StoredPrefix] = OrderedDict()
        self._ids = count()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget everything (the weights changed)."""
        self._entries.clear()
        self.nbytes = 0

    def match(self, prompt: Sequence[int], limit: int) -> tuple[int, StoredPrefix | None]:
        """The longest stored prefix of `prompt`, at most `limit` tokens: (length, entry)."""
        best_length, best_key = 0, None
        prompt = tuple(prompt)
        for key, entry in self._entries.items():
            length = min(common_prefix_length([prompt, entry.tokens]), limit)
            if length > best_length:
                best_length, best_key = length, key
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        return best_length, self._entries[best_key]

    def add(self, tokens: Sequence[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep `tokens` with their keys/values; entries that `tokens` extends are dropped."""
        entry = StoredPrefix(tuple(tokens), keys, values)
        if not entry.tokens or entry.nbytes > self.max_bytes:
            return
        for key, old in list(self._entries.items()):
            if len(old.tokens) <= len(entry.tokens) and entry.tokens[: len(old.tokens)] == old.tokens:
                self._remove(key)
        self._entries[next(self._ids)] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            self._remove(next(iter(self._entries)))

    def _remove(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes
