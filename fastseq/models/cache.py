"""The decoder's key/value cache for incremental generation.

Each decoder layer keeps its self-attention keys and values in preallocated `(B, capacity, H, D)`
buffers that fill one step at a time (no copy of the past per step), and the cross-attention keys
and values of the encoder states, computed at the first step and reused after. Attention reads
the buffers through `(B, H, T, D)` views.
"""

from __future__ import annotations

import torch


class LayerCache:
    def __init__(self, owner: KVCache):
        self.owner = owner
        self.self_k: torch.Tensor | None = None  # (B, capacity, H, D)
        self.self_v: torch.Tensor | None = None
        self.cross_k: torch.Tensor | None = None  # (B, H, Le, D)
        self.cross_v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new steps' keys and values `(B, H, n, D)`; return every step's so far."""
        B, H, n, D = k.shape
        start = self.owner.length
        if self.self_k is None:
            self.self_k = k.new_empty(B, self.owner.capacity, H, D)
            self.self_v = v.new_empty(B, self.owner.capacity, H, D)
        if start + n > self.self_k.shape[1]:
            raise ValueError(
                f"the cache holds {self.self_k.shape[1]} decoder steps; step {start + n} does not fit "
                "(raise max_new_tokens when building it)"
            )
        self.self_k[:, start : start + n] = k.transpose(1, 2)
        self.self_v[:, start : start + n] = v.transpose(1, 2)
        end = start + n
        return self.self_k[:, :end].transpose(1, 2), self.self_v[:, :end].transpose(1, 2)  # (B, H, T, D)

    def cross(self, compute) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention keys and values: `compute()` once, then the stored ones."""
        if self.cross_k is None:
            self.cross_k, self.cross_v = compute()
        return self.cross_k, self.cross_v

    def reorder(self, index: torch.Tensor) -> None:
        for name in ("self_k", "self_v", "cross_k", "cross_v"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index))


class KVCache:
    """Keys and values of every decoder layer. `length` counts the decoder steps already stored;
    the model's decode advances it after each call."""

    def __init__(self, num_layers: int, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.layers = [LayerCache(self) for _ in range(num_layers)]

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search moves rows between beams)."""
        for layer in self.layers:
            layer.reorder(index)
