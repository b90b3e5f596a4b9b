"""Kernel-backed forwards for the attention modules of `transformers` T5, mT5, UMT5, LongT5 and
BlenderbotSmall models (used by `fastseq.patch`).

What `transformers` hands an attention module, and what these forwards make of it:
- The mask comes as a 4D tensor (`(B, 1, Lq, Lk)`, additive float for eager attention, bool for
  SDPA), a 2D key mask, or None. The kernels take a `(B, Lk)` key mask plus a causal flag, so the
  4D mask is read back into those and, outside `torch.compile`, checked to be exactly that
  pattern (once per mask object: every layer of a stack gets the same one). A mask that is not
  (a custom 4D mask, a flex-attention block mask) makes the module run its own forward.
- T5 computes the `(1, H, Lq, Lk)` position bias in its first layer and hands the tensor to the
  next layers. Patched, the first layer hands on its `(num_buckets, H)` bias table instead (LongT5
  transient-global: both tables stacked, `(2, num_buckets, H)`), and every layer computes the bias
  inside the kernel from it. The table is read through its embedding module's call, so DeepSpeed
  ZeRO-3 gathers it, and it travels as a tensor, so gradients reach it through re-entrant
  activation checkpointing. UMT5 keeps a table per layer and uses its own.
- LongT5's local and transient-global encoder layers get a blocked `(B, 1, nb, block, 3 block)`
  mask (local) or the `(B, L)` mask itself (transient-global); both become the `(B, L)` key mask.
- When attention weights are asked for (`output_attentions=True`), a layer runs its own forward:
  the kernels never build the weights. A stack decides that in its first layer, so the other
  layers follow; a table reaching a layer that must fall back is an error, never a guess.
"""

from __future__ import annotations

import functools
import inspect
import weakref

import torch

from fastseq import kernels

ORIGINAL = "_fastseq_original_forward"  # instance attribute holding the forward a patch replaced
CLASS_ORIGINALS: dict[type, object] = {}  # class -> its own forward, while `patch_transformers` is active


def original_forward(module: torch.nn.Module):
    """The forward `transformers` gave this module (before any fastseq patch), bound to it."""
    if ORIGINAL in module.__dict__:
        return module.__dict__[ORIGINAL]
    for cls in type(module).__mro__:
        if cls in CLASS_ORIGINALS:
            return CLASS_ORIGINALS[cls].__get__(module)
    raise RuntimeError(f"fastseq.patch: {type(module).__name__} has no original forward recorded")


@functools.lru_cache(maxsize=64)
def _signature(function, bound: bool) -> inspect.Signature:
    signature = inspect.signature(function)
    if bound:  # a method's signature as seen through an instance: without `self`
        signature = signature.replace(parameters=list(signature.parameters.values())[1:])
    return signature


def call_arguments(forward, args, kwargs) -> dict:
    """The arguments of a call to `forward` by name, as `forward` binds them (its **kwargs merged in).
    Patched forwards read their inputs this way, so a `transformers` release that renames or
    reorders an argument of the forward they replace is followed, not misread."""
    signature = _signature(getattr(forward, "__func__", forward), hasattr(forward, "__func__"))
    bound = signature.bind(*args, **kwargs)
    arguments = dict(bound.arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


# The KV cache argument of the attention forwards: `cache` from transformers 5.24, `past_key_values` before.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(call: dict):
    """The `transformers` cache object of an attention call (bound by `call_arguments`), or None."""
    for name in CACHE_ARGUMENTS:
        if call.get(name) is not None:
            return call[name]
    return None


def shared_tables(position_bias) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """The (table, global table) a patched first layer handed on as `position_bias`, or None when
    `position_bias` is a bias tensor of `transformers`' own (4D for T5, 5D for LongT5) or None."""
    if isinstance(position_bias, torch.Tensor) and position_bias.dim() == 2:
        return position_bias, None
    if isinstance(position_bias, torch.Tensor) and position_bias.dim() == 3:
        return position_bias[0], position_bias[1]
    return None


def bias_table(embedding: torch.nn.Embedding) -> torch.Tensor:
    """The `(num_buckets, H)` table through the embedding's own call (ZeRO-3 gathers it there)."""
    return embedding(torch.arange(embedding.num_embeddings, device=embedding.weight.device))


class _Fallback(Exception):
    """This call cannot go to the kernel; the module runs its own forward."""


def capturing_attentions() -> bool:
    """True while a `transformers` model collects attention weights (`output_attentions=True`)."""
    from transformers.utils.output_capturing import _active_collector

    collected = _active_collector.get()
    return bool(collected) and ("attentions" in collected or "cross_attentions" in collected)


# One decoded mask is remembered: every layer of a stack is handed the same mask object.
_MEMO: dict = {"ref": None, "version": None, "key": None, "value": None}


def _memoized(mask: torch.Tensor, key: tuple, decode):
    if torch.compiler.is_compiling():
        return decode(False)
    ref = _MEMO["ref"]
    if ref is not None and ref() is mask and _MEMO["version"] == mask._version and _MEMO["key"] == key:
        value = _MEMO["value"]
    else:
        try:
            value = decode(True)
        except _Fallback as why:
            value = why
        _MEMO.update(ref=weakref.ref(mask), version=mask._version, key=key, value=value)
    if isinstance(value, _Fallback):
        raise value
    return value


def _attend_from_4d(mask: torch.Tensor, verify: bool) -> torch.Tensor:
    """The bool `attend` view of a transformers 4D mask (True = attend)."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.dtype.is_floating_point:
        return mask != 0
    if verify and not ((mask == 0) | (mask <= torch.finfo(mask.dtype).min / 2)).all():
        raise _Fallback("the additive mask holds values other than 0 and -inf (a bias, not a mask)")
    return mask == 0


def _no_empty_row(kpm: torch.Tensor, verify: bool) -> torch.Tensor:
    """`kpm` `(B, Lk)`, unless a row attends to nothing. The kernels give such a row zeros, while
    `transformers` adds its mask's minimum to every score and so averages over every key (uniformly in
    fp32; LongT5's local attention adds -1e10, which leaves a rounded softmax): the module's own forward
    gives its numbers. Checked with the mask's other checks (not under torch.compile, which sees no data)."""
    if verify and not bool(kpm.any(-1).all()):
        raise _Fallback("a row is all padding")
    return kpm


def key_padding(mask, B: int, Lq: int, causal: bool, q_offset: int) -> torch.Tensor | None:
    """The `(B, Lk)` bool key mask equivalent to `mask` (with `causal` applied by the kernel); raises
    `_Fallback` when `mask` is not of that form, or when a row attends to no key at all. Reads nothing
    but the mask, so it runs before any cache is touched."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise _Fallback(f"mask of type {type(mask).__name__}")
    Lk = mask.shape[-1]
    if mask.dim() == 2:
        if mask.shape[0] != B:
            raise _Fallback(f"2D mask of shape {tuple(mask.shape)}")
        return _memoized(mask, ("2d", B, Lk), lambda verify: _no_empty_row(mask != 0, verify))
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, B) or mask.shape[2] not in (1, Lq):
        raise _Fallback(f"mask of shape {tuple(mask.shape)}")

    def decode(verify: bool) -> torch.Tensor:
        attend = _attend_from_4d(mask, verify)  # (B or 1, 1, Lq or 1, Lk)
        # The last query row sees every key that is not padding, causal or not: it sits at the last position.
        kpm = attend[:, 0, -1, :].expand(B, Lk).contiguous()  # (B, Lk)
        if verify:
            expected = kpm[:, None, None, :]  # (B, 1, 1, Lk)
            if causal:
                rows = torch.arange(Lq, device=mask.device)[:, None] + q_offset
                expected = expected & (torch.arange(Lk, device=mask.device)[None, :] <= rows)  # (B, 1, Lq, Lk)
            shape = (B, 1, Lq, Lk)
            if not torch.equal(attend.expand(shape), expected.expand(shape)):
                raise _Fallback("the mask is not a key-padding mask (plus causal)")
        return _no_empty_row(kpm, verify)

    return _memoized(mask, ("4d", B, Lq, Lk, causal, q_offset), decode)


def _kept(holder: torch.Tensor, key: tuple, make):
    """`make()`, made once for the layers that share `holder`, the tensor the first layer hands on to the
    others, and kept on it. A layer that non-reentrant checkpointing recomputes is handed the same tensor
    and finds it as the forward did; re-entrant checkpointing hands on a detached copy, which makes its own."""
    if torch.compiler.is_compiling():
        return make()
    key = (*key, holder._version)
    kept = getattr(holder, "_fastseq_position_bias", None)
    if kept is not None and kept[0] == key:
        return kept[1]
    value = make()
    holder._fastseq_position_bias = (key, value)
    return value


def _position_bias(table: torch.Tensor | None, bidirectional: bool, max_distance: int):
    """`table` as a `kernels.PositionBias`, made once for the layers it is handed on to (`_kept`)."""
    if table is None:
        return None

    def make():
        return kernels.PositionBias(table, bidirectional=bidirectional, max_distance=max_distance)

    return _kept(table, (bidirectional, max_distance), make)


def _heads(x: torch.Tensor, B: int, D: int) -> torch.Tensor:
    return x.view(B, x.shape[1], -1, D).transpose(1, 2)  # (B, H, L, D)


def _project_kv(hidden, kv_states, cache, layer_idx, k_proj, v_proj, D):
    """Keys and values as `transformers` forms them, through its cache classes -> k `(B, H, Lk, D)`, v."""
    from transformers.cache_utils import EncoderDecoderCache

    B = hidden.shape[0]
    is_cross = kv_states is not None
    layer_cache, is_updated = cache, False
    if isinstance(cache, EncoderDecoderCache):
        is_updated = cache.is_updated.get(layer_idx)
        layer_cache = cache.cross_attention_cache if is_cross else cache.self_attention_cache
    if is_cross and cache is not None and is_updated:
        return layer_cache.layers[layer_idx].keys, layer_cache.layers[layer_idx].values
    source = kv_states if is_cross else hidden
    k = _heads(k_proj(source), B, D)  # (B, H, Lk, D)
    v = _heads(v_proj(source), B, D)
    if cache is not None:
        k, v = layer_cache.update(k, v, layer_idx)
        if is_cross and isinstance(cache, EncoderDecoderCache):
            cache.is_updated[layer_idx] = True
    return k, v


def _dense_attention(module, hidden, kv_states, mask, cache, *, projections, D, scale, table, max_distance):
    """Shared body of the T5 / UMT5 / BlenderbotSmall forwards -> `(B, Lq, H * D)` before the output
    projection."""
    q_proj, k_proj, v_proj = projections
    B, Lq = hidden.shape[:2]
    is_cross = kv_states is not None
    causal = bool(getattr(module, "is_causal", False)) and not is_cross
    # Tokens already in the self-attention cache (as transformers counts them, before this step's update).
    q_offset = int(cache.get_seq_length(module.layer_idx)) if cache is not None and not is_cross else 0
    kpm = key_padding(mask, B, Lq, causal, q_offset)  # before the cache is touched: a fallback must find it as it was
    q = _heads(q_proj(hidden), B, D)  # (B, H, Lq, D)
    k, v = _project_kv(hidden, kv_states, cache, module.layer_idx, k_proj, v_proj, D)  # (B, H, Lk, D)
    if kpm is not None and kpm.shape[1] != k.shape[2]:
        raise RuntimeError(f"fastseq.patch: the mask covers {kpm.shape[1]} keys but there are {k.shape[2]}")
    bidirectional = not module.is_decoder
    out = kernels.bucketed_attention(
        q,
        k,
        v,
        _position_bias(table, bidirectional, max_distance),
        bidirectional=bidirectional,
        max_distance=max_distance,
        causal=causal,
        key_padding_mask=kpm,
        q_offset=q_offset,
        scale=scale,
        dropout_p=module.dropout if module.training else 0.0,
    )  # (B, H, Lq, D)
    return out.transpose(1, 2).reshape(B, Lq, -1)


def _t5_family_attention(module, hidden, kv_states, mask, cache, table) -> torch.Tensor:
    """T5 / mT5 / UMT5 / LongT5 attention through the kernel, output projection included -> `(B, Lq, d_model)`."""
    out = _dense_attention(
        module,
        hidden,
        kv_states,
        mask,
        cache,
        projections=(module.q, module.k, module.v),
        D=module.key_value_proj_dim,
        scale=module.scaling,
        table=table,
        max_distance=module.relative_attention_max_distance,
    )
    return module.o(out)


def _refuse_shared(module, position_bias, why: str):
    if shared_tables(position_bias) is not None:
        raise RuntimeError(
            f"fastseq.patch: {type(module).__name__} must run its own forward ({why}) but an earlier layer "
            "ran the kernel and passed no position-bias tensor; unpatch the model (fastseq.unpatch) for this call"
        )


def t5_attention_forward(self, *args, **kwargs):
    """T5 / mT5 / LongT5 (decoder and global) attention -> (output, position bias for the next layer, None)."""
    call = call_arguments(original_forward(self), args, kwargs)
    position_bias = call.get("position_bias")
    shared = shared_tables(position_bias)
    # LongT5's decoder still passes output_attentions down; the newer models collect through hooks.
    weights_wanted = bool(call.get("output_attentions")) or capturing_attentions()
    own = (position_bias is not None and shared is None) or weights_wanted
    if not own:
        if shared is not None:
            table = shared[0]
        else:
            table = bias_table(self.relative_attention_bias) if self.has_relative_attention_bias else None
        try:
            kv_states, mask = call.get("key_value_states"), call.get("mask")
            out = _t5_family_attention(self, call["hidden_states"], kv_states, mask, cache_argument(call), table)
            return out, table, None
        except _Fallback as why:
            _refuse_shared(self, position_bias, str(why))
    _refuse_shared(self, position_bias, "attention weights were asked for")
    return original_forward(self)(*args, **kwargs)


def umt5_attention_forward(self, *args, **kwargs):
    """UMT5 attention (a bias table in every layer) -> (output, None)."""
    if not capturing_attentions():
        call = call_arguments(original_forward(self), args, kwargs)
        table = bias_table(self.relative_attention_bias) if self.has_relative_attention_bias else None
        try:
            hidden, kv_states = call["hidden_states"], call.get("encoder_hidden_states")
            out = _t5_family_attention(self, hidden, kv_states, call.get("attention_mask"), cache_argument(call), table)
            return out, None
        except _Fallback:
            pass
    return original_forward(self)(*args, **kwargs)


def bart_attention_forward(self, *args, **kwargs):
    """BlenderbotSmall attention (scaled, projections with biases, no position bias) -> (output, None)."""
    if not capturing_attentions():
        call = call_arguments(original_forward(self), args, kwargs)
        try:
            out = _dense_attention(
                self,
                call["hidden_states"],
                call.get("key_value_states"),
                call.get("attention_mask"),
                cache_argument(call),
                projections=(self.q_proj, self.k_proj, self.v_proj),
                D=self.head_dim,
                scale=self.scaling,
                table=None,
                max_distance=128,
            )
            return self.out_proj(out), None
        except _Fallback:
            pass
    return original_forward(self)(*args, **kwargs)


def _local_key_padding(mask, B: int, L: int, block: int) -> torch.Tensor | None:
    """The `(B, L)` key mask behind LongT5's blocked local mask `(B, 1, nb, block, 3 block)`."""
    if mask is None:
        return None
    nb = -(-L // block)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, 1, nb, block, 3 * block):
        raise _Fallback(f"local mask of shape {tuple(getattr(mask, 'shape', ()))}")

    def decode(verify: bool) -> torch.Tensor:
        from transformers.models.longt5.modeling_longt5 import _get_local_attention_mask

        idx = torch.arange(block, device=mask.device)
        # Token t = blk * block + i attends to itself at column block + i of its block's row i.
        kpm = (mask[:, 0, :, idx, block + idx] != 0).reshape(B, nb * block)[:, :L].contiguous()  # (B, L)
        if verify and not torch.equal(_get_local_attention_mask(kpm, block, mask.device), mask != 0):
            raise _Fallback("the local mask is not made from a key-padding mask")
        return _no_empty_row(kpm, verify)

    return _memoized(mask, ("local", B, L, block), decode)


def _global_key_padding(mask, B: int, L: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, L):
        raise _Fallback(f"transient-global mask of shape {tuple(getattr(mask, 'shape', ()))}")

    def decode(verify: bool) -> torch.Tensor:
        if verify and not ((mask == 0) | (mask == 1)).all():
            raise _Fallback("the transient-global mask holds values other than 0 and 1")
        return _no_empty_row(mask != 0, verify)

    return _memoized(mask, ("global", B, L), decode)


def _longt5_encoder_attention(self, args, kwargs, *, transient_global: bool):
    call = call_arguments(original_forward(self), args, kwargs)
    hidden_states, mask, position_bias = call["hidden_states"], call.get("mask"), call.get("position_bias")
    shared = shared_tables(position_bias)
    if not call.get("output_attentions") and not self.is_decoder and (position_bias is None or shared is not None):
        try:
            B, L, _ = hidden_states.shape
            D = self.key_value_proj_dim
            if transient_global:
                kpm = _global_key_padding(mask, B, L)
            else:
                kpm = _local_key_padding(mask, B, L, self.block_len)
            if shared is None:
                own = self.has_relative_attention_bias
                shared = (
                    bias_table(self.relative_attention_bias) if own else None,
                    bias_table(self.global_relative_attention_bias) if own and transient_global else None,
                )
            table, global_table = shared
            handed_on = table if global_table is None else torch.stack([table, global_table])
            holder = handed_on if position_bias is None else position_bias  # the tensor the layers share
            max_distance = self.relative_attention_max_distance

            def biases():
                return tuple(
                    None if t is None else kernels.PositionBias(t, bidirectional=True, max_distance=max_distance)
                    for t in (table, global_table)
                )

            bias, global_bias = biases() if holder is None else _kept(holder, ("longt5", max_distance), biases)
            if holder is not handed_on and hasattr(holder, "_fastseq_position_bias"):
                handed_on._fastseq_position_bias = holder._fastseq_position_bias  # the next layer finds them too
            q, k, v = (_heads(proj(hidden_states), B, D) for proj in (self.q, self.k, self.v))  # (B, H, L, D)
            extra = {}
            if transient_global:
                globals_ = self.global_input_layer_norm(
                    kernels.global_aggregate(hidden_states, kpm, self.global_block_size)
                )  # (B, G, d_model)
                extra = dict(
                    global_k=_heads(self.k(globals_), B, D),  # (B, H, G, D)
                    global_v=_heads(self.v(globals_), B, D),
                    global_bias_table=global_bias,
                    global_block_size=self.global_block_size,
                )
            out = kernels.local_attention(
                q,
                k,
                v,
                bias,
                radius=self.local_radius,
                max_distance=max_distance,
                key_padding_mask=kpm,
                dropout_p=self.dropout if self.training else 0.0,
                **extra,
            )  # (B, H, L, D)
            return (self.o(out.transpose(1, 2).reshape(B, L, -1)), handed_on)
        except _Fallback as why:
            _refuse_shared(self, position_bias, str(why))
    _refuse_shared(self, position_bias, "attention weights were asked for")
    return original_forward(self)(*args, **kwargs)


def longt5_local_forward(self, *args, **kwargs):
    """LongT5 local encoder attention -> (output, bias table for the next layer)."""
    return _longt5_encoder_attention(self, args, kwargs, transient_global=False)


def longt5_transient_global_forward(self, *args, **kwargs):
    """LongT5 transient-global encoder attention -> (output, both bias tables for the next layer)."""
    return _longt5_encoder_attention(self, args, kwargs, transient_global=True)


# class name -> kernel-backed forward
ATTENTION_FORWARDS = {
    "T5Attention": t5_attention_forward,
    "MT5Attention": t5_attention_forward,
    "LongT5Attention": t5_attention_forward,
    "UMT5Attention": umt5_attention_forward,
    "LongT5LocalAttention": longt5_local_forward,
    "LongT5TransientGlobalAttention": longt5_transient_global_forward,
    "BlenderbotSmallAttention": bart_attention_forward,
}
