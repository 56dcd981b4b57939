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
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

#: One row's stored keys, values (`[layers, heads, tokens, dim]`, or None) and how many positions to use.
CachedRow = tuple[torch.Tensor | None, torch.Tensor | None, int]


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
        return self._keys[:, :, : self.length], self._values[:, :, : self.length]

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

    def gather_columns(self, index: torch.Tensor, capacity: int) -> None:
        """Keep, per row, the positions `index[row]` (`[batch, width]`), in a new buffer of `capacity`."""
        if self.is_initialized:
            batch, heads, _, dim = self._keys.shape
            expanded = index[:, None, :, None].expand(batch, heads, index.shape[1], dim)
            keys = self._keys[:, :, : self.length].gather(2, expanded)
            values = self._values[:, :, : self.length].gather(2, expanded)
            self.capacity = capacity
            self.lazy_initialization(keys, values)
            self._keys[:, :, : index.shape[1]] = keys
            self._values[:, :, : index.shape[1]] = values
            self.length = index.shape[1]
            self._publish()

    def start_right_aligned(self, rows: Sequence[CachedRow], layer: int, width: int) -> None:
        """Row i starts with the first `length_i` stored positions of this layer (`layer` of its
        `[layers, heads, tokens, dim]` keys/values), ending at `width`; zeros in the gap before."""
        template = next(keys for keys, _, length in rows if keys is not None and length)
        _, heads, _, dim = template.shape
        self.dtype, self.device = template.dtype, template.device
        self._keys = template.new_zeros((len(rows), heads, self.capacity, dim))  # gaps are masked, but finite
        self._values = template.new_zeros((len(rows), heads, self.capacity, dim))
        self.is_initialized = True
        for row, (keys, values, length) in enumerate(rows):
            if keys is not None and values is not None and length:
                self._keys[row, :, width - length : width] = keys[layer, :, :length]
                self._values[row, :, width - length : width] = values[layer, :, :length]
        self.length = width
        self._publish()


def preallocated_cache(num_layers: int, capacity: int) -> Cache:
    """A cache of `num_layers` in-place layers, each with room for `capacity` positions."""
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])


def right_aligned_cache(rows: Sequence[CachedRow], capacity: int) -> tuple[Cache, torch.Tensor]:
    """A batch cache whose row i holds the first `length_i` positions of its `[layers, heads,
    tokens, dim]` keys/values (None, 0: nothing), right-aligned at the width of the longest;
    with its attention mask (1 where a row has a cached position, 0 for the gap before it)."""
    width = max(length for _, _, length in rows)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (_, _, length) in enumerate(rows):
        mask[row, width - length :] = 1
    layers = next(keys for keys, _, length in rows if keys is not None and length).shape[0]
    cache = preallocated_cache(layers, capacity)
    for index, layer in enumerate(cache.layers):
        assert isinstance(layer, PreallocatedLayer)
        layer.start_right_aligned(rows, index, width)
    return cache, mask


def close_gaps(cache: Cache, attention: torch.Tensor, room: int) -> torch.Tensor:
    """Move each row's attended positions to the right end of the cache, in order, and return
    the new attention mask; `room` positions are kept free for decoding.

    Rows that start from stored prefixes of different lengths leave a masked gap between a
    row's stored part and its new tokens; every decoding step would read those columns.
    Position ids travel with the rows, so nothing else changes.
    """
    lengths = attention.sum(-1)
    width = int(lengths.max())
    index = torch.zeros((attention.shape[0], width), dtype=torch.long)
    mask = torch.zeros((attention.shape[0], width), dtype=attention.dtype)
    for row in range(attention.shape[0]):
        columns = attention[row].nonzero().squeeze(-1)
        index[row, width - len(columns) :] = columns
        mask[row, width - len(columns) :] = 1
    for layer in cache.layers:
        assert isinstance(layer, PreallocatedLayer)
        layer.gather_columns(index, width + room)
    return mask


def row_keys_values(cache: Cache, row: int, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of one batch row's keys/values at `columns`, `[layers, heads, len(columns), dim]`."""
    layers: list[Any] = list(cache.layers)  # DynamicLayer-like: `keys`/`values` are [batch, heads, tokens, dim]
    keys = torch.stack([layer.keys[row][:, columns] for layer in layers])
    values = torch.stack([layer.values[row][:, columns] for layer in layers])
    return keys, values


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix shared by every row (0 for no rows).

    The common prefix of a set of sequences is the common prefix of its lexicographic
    minimum and maximum, so two comparisons of at most one row's length suffice.
    """
    if not rows:
        return 0
    ordered: list[Any] = list(rows)  # lists (or tuples), compared lexicographically
    low, high = min(ordered), max(ordered)
    for index, token in enumerate(low):
        if high[index] != token:
            return index
    return len(low)
