"""The PyTorch reference of `bucketed_attention`: T5's bucket function, the bias it gives, and attention
in fp32 math. The semantic specification the kernels are tested against."""

from __future__ import annotations

import math

import torch

from .._backend import upcast


def relative_position_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each relative position (`key - query`), int64, same shape as the input.

    Half of the buckets (per sign when bidirectional) are exact small distances,
    the other half are logarithmically wider bins up to `max_distance`; every
    distance beyond it shares the last bucket. Computed in float32 exactly as
    Mesh TensorFlow and Hugging Face do, so the buckets agree bit for bit.
    """
    relative_position = relative_position.long()
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log(0) = -inf only where is_small picks the exact branch; the clamp keeps the cast defined.
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).clamp(min=-1.0).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


def relative_bias(
    bias_table: torch.Tensor,
    query_length: int,
    key_length: int,
    *,
    bidirectional: bool,
    max_distance: int,
    q_offset: int = 0,
) -> torch.Tensor:
    """The `(H, Lq, Lk)` bias of a bias table, built once per call.

    The buckets depend only on `j - i`, so they are computed over the
    `Lq + Lk - 1` distinct distances and gathered into the `(Lq, Lk)` grid.
    """
    device = bias_table.device
    distances = torch.arange(-(query_length - 1), key_length, device=device) - q_offset  # (Lq + Lk - 1,)
    buckets = relative_position_bucket(
        distances, bidirectional=bidirectional, num_buckets=bias_table.shape[0], max_distance=max_distance
    )
    per_distance = upcast(bias_table)[buckets].t()  # (H, Lq + Lk - 1)
    i = torch.arange(query_length, device=device)[:, None]
    j = torch.arange(key_length, device=device)[None, :]
    return per_distance[:, j - i + (query_length - 1)]  # (H, Lq, Lk)


def bucketed_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor | None = None, *,
    bidirectional: bool = True, max_distance: int = 128,  # T5's buckets
    causal: bool = False, key_padding_mask: torch.Tensor | None = None, q_offset: int = 0,  # the masks
    scale: float = 1.0, dropout_p: float = 0.0,
    q_segment_ids: torch.Tensor | None = None, k_segment_ids: torch.Tensor | None = None,  # packed rows
) -> torch.Tensor:  # fmt: skip
    """Plain PyTorch attention with fp32 math. q `(B, H, Lq, D)`, k/v `(B, H, Lk, D)` -> `(B, H, Lq, D)`.

    A query row with no key to attend (all masked) returns zeros, not NaN.
    """
    Lq, Lk = q.shape[2], k.shape[2]
    scores = torch.matmul(upcast(q), upcast(k).transpose(-1, -2))  # (B, H, Lq, Lk)
    if scale != 1.0:
        scores = scores * scale
    if bias_table is not None:
        bias = relative_bias(
            bias_table, Lq, Lk, bidirectional=bidirectional, max_distance=max_distance, q_offset=q_offset
        )
        scores = scores + bias.to(scores.dtype).unsqueeze(0)  # (B, H, Lq, Lk)
    allowed = None
    if key_padding_mask is not None:
        allowed = (key_padding_mask != 0)[:, None, None, :]  # (B, 1, 1, Lk)
    if causal:
        i = torch.arange(Lq, device=q.device)[:, None] + q_offset
        j = torch.arange(Lk, device=q.device)[None, :]
        future_ok = (j <= i)[None, None]  # (1, 1, Lq, Lk)
        allowed = future_ok if allowed is None else allowed & future_ok
    if q_segment_ids is not None:
        q_seg, k_seg = q_segment_ids[:, None, :, None], k_segment_ids[:, None, None, :]  # (B, 1, Lq, 1), (B, 1, 1, Lk)
        same = (q_seg == k_seg) & (k_seg > 0)
        allowed = same if allowed is None else allowed & same  # (B, 1, Lq, Lk)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=True)
    v_acc = upcast(v)
    out = torch.matmul(probs.to(v_acc.dtype), v_acc)  # (B, H, Lq, D)
    if allowed is not None:
        # Masked keys already get exactly zero probability; a row with every key masked would be
        # uniform instead, so zero those rows on the (Lq, D) output rather than the (Lq, Lk) probabilities.
        out = out * allowed.any(-1, keepdim=True)
    return out.to(q.dtype)
