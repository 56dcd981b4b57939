"""A KV cache for sampling that appends in place, and the shared-prefix helpers.

transformers' `DynamicCache` grows by `torch.cat`, which copies the whole cache of every
layer at every decoding step. On a CPU whose memory bandwidth is the bottleneck that copy
costs as much as the attention itself, so the sampler uses layers that reserve room for
the whole completion up front and write each new token's keys and values in place.

This cache is for inference only (in-place writes would break autograd); training keeps
the plain `DynamicCache`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in a buffer of `capacity` positions, filled in place."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._keys = torch.empty(0)
        self._values = torch.empty(0)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, _ = key_states.shape
        self._keys = key_states.new_empty((batch, heads, self.capacity, key_states.shape[-1]))
        self._values = value_states.new_empty((batch, heads, self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            self._grow(end)
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self._publish()
        return self.keys, self.values

    def _grow(self, needed: int) -> None:
        """Past the reserved capacity (only if a caller under-estimated it): double the buffer."""
        self.capacity = max(needed, 2 * self.capacity)
        keys, values = self._keys, self._values
        self.lazy_initialization(keys, values)
        self._keys[:, :, : self.length] = keys[:, :, : self.length]
        self._values[:, :, : self.length] = values[:, :, : self.length]

    def _publish(self) -> None:
        """`keys`/`values` are views of the filled part, as `DynamicLayer` callers expect."""
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._publish()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys = self._keys[indices]
            self._values = self._values[indices]
            self._publish()


def preallocated_cache(num_layers: int, capacity: int) -> Cache:
    """A cache of `num_layers` in-place layers, each with room for `capacity` positions."""
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix shared by every row (0 for no rows).

    The common prefix of a set of sequences is the common prefix of its lexicographic
    minimum and maximum, so two comparisons of at most one row's length suffice.
    """
    if not rows:
        return 0
    low, high = min(rows), max(rows)
    for index, token in enumerate(low):
        if high[index] != token:
            return index
    return len(low)
