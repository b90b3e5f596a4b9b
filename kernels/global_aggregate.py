"""Transient-global aggregation for LongT5: the block sums that become global tokens.

Block-id rules (those of the reference LongT5 implementation):
- token i of a row belongs to block `i // block_size`; padding belongs to none (-1);
- a block counts as full when its last position holds a real token; tokens after
  the last full block (a trailing partial block, or one whose last position is
  padding) join the last full block; with no full block at all, no token has a block;
- there are `L // block_size` global tokens; global g exists for a row when
  g <= the largest block id of that row. Aggregates of blocks that hold only
  padding are zero.
"""

from __future__ import annotations

import torch

from ._backend import use_triton

HAS_TRITON_KERNEL = False


def global_block_ids(key_padding_mask: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block id of every token and which global tokens exist.

    key_padding_mask `(B, L)`, nonzero = real token. Returns block_ids `(B, L)` int64
    (-1 for tokens in no block) and global_valid `(B, L // block_size)` bool.
    """
    if block_size < 1:
        raise ValueError(f"global_block_size must be >= 1; got {block_size}")
    B, L = key_padding_mask.shape
    valid = key_padding_mask != 0
    pos = torch.arange(L, device=key_padding_mask.device)
    block_ids = torch.where(valid, pos // block_size, -1)  # (B, L)
    block_ends = valid & (pos % block_size == block_size - 1)  # (B, L)
    last_full = block_ends.sum(-1, keepdim=True) - 1  # (B, 1)
    block_ids = torch.minimum(block_ids, last_full)
    num_globals = L // block_size
    largest = block_ids.max(-1, keepdim=True).values if L > 0 else block_ids.new_full((B, 1), -1)
    global_valid = torch.arange(num_globals, device=key_padding_mask.device)[None, :] <= largest  # (B, G)
    return block_ids, global_valid


def global_aggregate_reference(
    hidden: torch.Tensor, key_padding_mask: torch.Tensor | None, block_size: int = 16
) -> torch.Tensor:
    """Block sums in fp32. hidden `(B, L, d_model)` -> `(B, L // block_size, d_model)` in hidden's dtype."""
    B, L, d = hidden.shape
    if key_padding_mask is None:
        key_padding_mask = torch.ones(B, L, dtype=torch.bool, device=hidden.device)
    block_ids, _ = global_block_ids(key_padding_mask, block_size)
    num_globals = L // block_size
    # Tokens in no block go to an extra slot that is dropped.
    slot = torch.where(block_ids < 0, num_globals, block_ids)  # (B, L)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    sums = hidden.new_zeros(B, num_globals + 1, d, dtype=acc)
    sums = sums.scatter_add(1, slot[:, :, None].expand(B, L, d), hidden.to(acc))
    return sums[:, :num_globals].to(hidden.dtype)


def global_aggregate(hidden: torch.Tensor, key_padding_mask: torch.Tensor | None, block_size: int = 16) -> torch.Tensor:
    """LongT5 global tokens before their RMSNorm. hidden `(B, L, d_model)`, key_padding_mask `(B, L)`
    or None -> `(B, L // block_size, d_model)`."""
    if hidden.dim() != 3:
        raise ValueError(f"global_aggregate expects hidden of shape (B, L, d_model); got {tuple(hidden.shape)}")
    if key_padding_mask is not None and key_padding_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"global_aggregate: key_padding_mask must be {tuple(hidden.shape[:2])}; got {tuple(key_padding_mask.shape)}"
        )
    use_triton("global_aggregate", HAS_TRITON_KERNEL, hidden)
    return global_aggregate_reference(hidden, key_padding_mask, block_size)
