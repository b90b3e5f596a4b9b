"""Attention with T5's bucketed relative-position bias.

The bias of query i and key j is `bias_table[bucket(j - (q_offset + i)), h]`,
where `bucket` is T5's relative-position bucket function. The reference below
is the semantic specification; the Triton kernel (when present) must match it.
"""

from __future__ import annotations

import math

import torch

from ._backend import upcast, use_triton

HAS_TRITON_KERNEL = False


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


def _check_inputs(q, k, v, bias_table, key_padding_mask) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"bucketed_attention expects q, k, v of shape (B, H, L, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, _, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(
            f"bucketed_attention: k and v must be (B={B}, H={H}, Lk, D={D}); got k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if bias_table is not None and (bias_table.dim() != 2 or bias_table.shape[1] != H):
        raise ValueError(
            f"bucketed_attention: bias_table must be (num_buckets, H={H}); got {tuple(bias_table.shape)}"
        )
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, k.shape[2]):
        raise ValueError(
            f"bucketed_attention: key_padding_mask must be (B={B}, Lk={k.shape[2]}); "
            f"got {tuple(key_padding_mask.shape)}"
        )


def bucketed_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor | None = None,
    *,
    bidirectional: bool = True,
    max_distance: int = 128,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    q_offset: int = 0,
    scale: float = 1.0,
    dropout_p: float = 0.0,
) -> torch.Tensor:
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


def bucketed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor | None = None,
    *,
    bidirectional: bool = True,
    max_distance: int = 128,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    q_offset: int = 0,
    scale: float = 1.0,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """T5 attention. q `(B, H, Lq, D)`, k/v `(B, H, Lk, D)`, bias_table `(num_buckets, H)` or None,
    key_padding_mask `(B, Lk)` (nonzero = attend) -> `(B, H, Lq, D)` in q's dtype."""
    _check_inputs(q, k, v, bias_table, key_padding_mask)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"bucketed_attention: dropout_p must be in [0, 1); got {dropout_p}")
    use_triton("bucketed_attention", HAS_TRITON_KERNEL, q, k, v)
    return bucketed_attention_reference(
        q,
        k,
        v,
        bias_table,
        bidirectional=bidirectional,
        max_distance=max_distance,
        causal=causal,
        key_padding_mask=key_padding_mask,
        q_offset=q_offset,
        scale=scale,
        dropout_p=dropout_p,
    )
