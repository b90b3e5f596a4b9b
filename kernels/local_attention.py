"""LongT5 encoder attention: blocked local attention plus optional transient-global tokens.

Semantics (those of the reference LongT5 implementation):
- the sequence is cut into blocks of `radius + 1`; a query sees the keys of its
  own block and the two neighbouring blocks that lie within `radius` of it,
  with T5's bidirectional bucketed bias of `j - i` from `bias_table`;
- with `global_k`/`global_v` (transient-global), every query also sees every
  existing global token g with the bias `global_bias_table[bucket(g - block_id(i))]`;
  block ids and which globals exist follow `global_aggregate.global_block_ids`;
- padded keys are never attended. Outputs at padded query positions are
  unspecified (they never reach a real token); a query with nothing to attend
  returns zeros.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._backend import upcast, use_triton
from .bucketed_attention import (
    _unsupported,
    attention_with_lse,
    distance_table,
    relative_bias,
    relative_position_bucket,
)
from .global_aggregate import global_block_ids

HAS_TRITON_KERNEL = True


def _three_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, nb * block, ...) -> (B, H, nb, 3 * block, ...): previous, own and next block of each block."""
    padded = F.pad(x.movedim(2, -1), (block, block)).movedim(-1, 2)  # (B, H, (nb + 2) * block, ...)
    windows = padded.unfold(2, 3 * block, block)  # (B, H, nb, ..., 3 * block)
    return windows.movedim(-1, 3)  # (B, H, nb, 3 * block, ...)


def _side_bias(
    global_bias_table: torch.Tensor, block_ids: torch.Tensor, num_globals: int, max_distance: int
) -> torch.Tensor:
    """(B, H, L, G) bias of query i to global g: global_bias_table[bucket(g - block_id(i))]."""
    # block ids lie in [-1, G - 1], so g - block_id lies in [-(G - 1), G].
    distances = torch.arange(-(num_globals - 1), num_globals + 1, device=block_ids.device)  # (2G,)
    buckets = relative_position_bucket(
        distances, bidirectional=True, num_buckets=global_bias_table.shape[0], max_distance=max_distance
    )
    per_distance = upcast(global_bias_table)[buckets]  # (2G, H)
    g = torch.arange(num_globals, device=block_ids.device)
    index = g[None, None, :] - block_ids[:, :, None] + (num_globals - 1)  # (B, L, G)
    return per_distance[index].permute(0, 3, 1, 2)  # (B, H, L, G)


def _local_attention_triton(
    q,
    k,
    v,
    bias_table,
    *,
    radius,
    max_distance,
    key_padding_mask,
    global_k,
    global_v,
    global_bias_table,
    global_block_size,
    dropout_p,
) -> torch.Tensor:
    """The local part runs the attention kernel with a key window of `radius` (a query tile visits
    only the key tiles its window touches: O(L * radius)). The global part, when present, is
    `(B, H, L, G)` scores in PyTorch, merged with the local softmax through its log-sum-exp."""
    dist_table = None
    if bias_table is not None:
        dist_table = distance_table(bias_table, bidirectional=True, max_distance=max_distance)
    out, lse = attention_with_lse(
        q, k, v, dist_table, key_padding_mask=key_padding_mask, dropout_p=dropout_p, window=radius
    )  # (B, H, L, D), (B, H, L)
    if global_k is None:
        return out
    B, H, L, D = q.shape
    G = global_k.shape[2]
    key_valid = torch.ones(B, L, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        key_valid = key_padding_mask != 0
    block_ids, global_valid = global_block_ids(key_valid, global_block_size)
    side = torch.matmul(upcast(q), upcast(global_k).transpose(-1, -2))  # (B, H, L, G)
    if global_bias_table is not None:
        side = side + _side_bias(global_bias_table, block_ids, G, max_distance).to(side.dtype)
    side = side.masked_fill(~global_valid[:, None, None, :], float("-inf"))
    # One softmax over local and global keys, relative to a common per-row maximum; every term stays
    # finite (and so do the gradients) for rows with no local key, no global key, or neither.
    top = torch.maximum(lse, side.amax(-1)) if G else lse  # (B, H, L)
    top = torch.where(torch.isinf(top), 0.0, top)
    local_mass = torch.exp(lse - top)  # (B, H, L)
    global_mass = torch.exp(side - top[..., None])  # (B, H, L, G)
    total = local_mass + global_mass.sum(-1)
    total = torch.where(total > 0, total, 1.0)
    global_probs = global_mass / total[..., None]
    if dropout_p > 0.0:
        global_probs = F.dropout(global_probs, p=dropout_p, training=True)
    out = out.to(global_probs.dtype) * (local_mass / total)[..., None] + torch.matmul(global_probs, upcast(global_v))
    return out.to(q.dtype)


def local_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor | None,
    *,
    radius: int = 127,
    max_distance: int = 128,
    key_padding_mask: torch.Tensor | None = None,
    global_k: torch.Tensor | None = None,
    global_v: torch.Tensor | None = None,
    global_bias_table: torch.Tensor | None = None,
    global_block_size: int = 16,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """fp32 blocked attention. q/k/v `(B, H, L, D)`, global_k/global_v `(B, H, G, D)` -> `(B, H, L, D)`."""
    B, H, L, D = q.shape
    block = radius + 1
    num_blocks = -(-L // block)
    pad = num_blocks * block - L
    if key_padding_mask is None:
        key_valid = torch.ones(B, L, dtype=torch.bool, device=q.device)
    else:
        key_valid = key_padding_mask != 0
    qf = F.pad(upcast(q), (0, 0, 0, pad)).view(B, H, num_blocks, block, D)  # (B, H, nb, W, D)
    k3 = _three_blocks(F.pad(upcast(k), (0, 0, 0, pad)), block)  # (B, H, nb, 3W, D)
    v3 = _three_blocks(F.pad(upcast(v), (0, 0, 0, pad)), block)  # (B, H, nb, 3W, D)
    scores = torch.matmul(qf, k3.transpose(-1, -2))  # (B, H, nb, W, 3W)
    # Query i of a block sits at offset `block` of its three-block window.
    if bias_table is not None:
        bias = relative_bias(
            bias_table, block, 3 * block, bidirectional=True, max_distance=max_distance, q_offset=block
        )
        scores = scores + bias.to(scores.dtype)[None, :, None]  # (B, H, nb, W, 3W)
    rel = torch.arange(3 * block, device=q.device)[None, :] - block - torch.arange(block, device=q.device)[:, None]
    local_ok = rel.abs() <= radius  # (W, 3W)
    valid3 = _three_blocks(F.pad(key_valid, (0, pad))[:, None], block)[:, 0]  # (B, nb, 3W)
    allowed = local_ok[None, None, None] & valid3[:, None, :, None, :]  # (B, 1, nb, W, 3W)

    if global_k is not None:
        G = global_k.shape[2]
        block_ids, global_valid = global_block_ids(key_valid, global_block_size)
        side = torch.matmul(upcast(q), upcast(global_k).transpose(-1, -2))  # (B, H, L, G)
        if global_bias_table is not None:
            side = side + _side_bias(global_bias_table, block_ids, G, max_distance).to(side.dtype)
        side = F.pad(side, (0, 0, 0, pad)).view(B, H, num_blocks, block, G)  # (B, H, nb, W, G)
        scores = torch.cat([scores, side], dim=-1)  # (B, H, nb, W, 3W + G)
        side_ok = global_valid[:, None, None, None, :].expand(B, 1, num_blocks, block, G)
        allowed = torch.cat([allowed.expand(B, 1, num_blocks, block, 3 * block), side_ok], dim=-1)

    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)  # masked keys get exactly zero probability
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs[..., : 3 * block], v3)  # (B, H, nb, W, D)
    if global_k is not None:
        out = out + torch.matmul(probs[..., 3 * block :], upcast(global_v)[:, :, None])  # (B, H, nb, W, D)
    # A row with nothing allowed would be uniform; zero it on the (W, D) output, not the probabilities.
    out = out * allowed.any(-1, keepdim=True)  # (B, H, nb, W, D)
    return out.reshape(B, H, num_blocks * block, D)[:, :, :L].to(q.dtype)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor | None,
    *,
    radius: int = 127,
    max_distance: int = 128,
    key_padding_mask: torch.Tensor | None = None,
    global_k: torch.Tensor | None = None,
    global_v: torch.Tensor | None = None,
    global_bias_table: torch.Tensor | None = None,
    global_block_size: int = 16,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """LongT5 local / transient-global attention. q/k/v `(B, H, L, D)`, bias tables `(num_buckets, H)`,
    key_padding_mask `(B, L)`, global_k/global_v `(B, H, L // global_block_size, D)` -> `(B, H, L, D)`."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"local_attention expects q, k, v of one shape (B, H, L, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if radius < 0:
        raise ValueError(f"local_attention: radius must be >= 0; got {radius}")
    B, H, L, D = q.shape
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, L):
        raise ValueError(
            f"local_attention: key_padding_mask must be (B={B}, L={L}); got {tuple(key_padding_mask.shape)}"
        )
    if (global_k is None) != (global_v is None):
        raise ValueError("local_attention: pass both global_k and global_v, or neither")
    if global_k is not None:
        G = L // global_block_size
        expected = (B, H, G, D)
        if tuple(global_k.shape) != expected or tuple(global_v.shape) != expected:
            raise ValueError(
                f"local_attention: global_k and global_v must be {expected} (G = L // global_block_size); "
                f"got {tuple(global_k.shape)} and {tuple(global_v.shape)}"
            )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"local_attention: dropout_p must be in [0, 1); got {dropout_p}")
    kwargs = dict(
        radius=radius,
        max_distance=max_distance,
        key_padding_mask=key_padding_mask,
        global_k=global_k,
        global_v=global_v,
        global_bias_table=global_bias_table,
        global_block_size=global_block_size,
        dropout_p=dropout_p,
    )
    unsupported = functools.partial(_unsupported, q, bias_table, max_distance, True)
    if use_triton("local_attention", HAS_TRITON_KERNEL, q, k, v, unsupported=unsupported):
        return _local_attention_triton(q, k, v, bias_table, **kwargs)
    return local_attention_reference(q, k, v, bias_table, **kwargs)
