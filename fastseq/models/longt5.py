"""LongT5: T5 v1.1 with a local (or transient-global) encoder self-attention.

The decoder, the cross-attention and the feed-forward blocks are T5's. The
encoder attends within `local_radius` of each token through
`fastseq.kernels.local_attention`; the transient-global variant adds one
global token per `global_block_size` tokens, built by
`fastseq.kernels.global_aggregate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastseq.kernels import PositionBias, global_aggregate, local_attention

from .base import AttentionMask, check_int
from .t5 import T5Attention, T5Config, T5EncoderModel, T5ForConditionalGeneration, T5LayerNorm

_ATTENTION_TYPES = ("local", "transient-global")


@dataclass
class LongT5Config(T5Config):
    local_radius: int = 127  # tokens seen on each side; blocks are local_radius + 1 long
    global_block_size: int = 16  # tokens summed into one transient-global token
    encoder_attention_type: str = "local"  # "local" or "transient-global"
    model_type: str = "longt5"

    def validate(self) -> None:
        super().validate()
        check_int(self, "local_radius", 1)
        check_int(self, "global_block_size", 1)
        if self.encoder_attention_type not in _ATTENTION_TYPES:
            raise ValueError(
                f"encoder_attention_type is {self.encoder_attention_type!r}; it must be one of "
                f"{', '.join(_ATTENTION_TYPES)}"
            )


class LongT5LocalAttention(T5Attention):
    def __init__(self, config: LongT5Config, *, has_relative_attention_bias: bool):
        super().__init__(config, has_relative_attention_bias=has_relative_attention_bias, is_decoder=False)
        self.radius = config.local_radius

    def forward(self, x: torch.Tensor, *, tables: dict, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.split_heads(self.q(x)), self.split_heads(self.k(x)), self.split_heads(self.v(x))  # (B, H, L, D)
        out = local_attention(
            q,
            k,
            v,
            tables["bias_table"],
            radius=self.radius,
            max_distance=self.max_distance,
            key_padding_mask=key_padding_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, L, D)
        return self.o(out.transpose(1, 2).reshape(B, L, self.n_heads * self.d_kv))  # (B, L, d_model)


class LongT5TransientGlobalAttention(T5Attention):
    def __init__(self, config: LongT5Config, *, has_relative_attention_bias: bool):
        super().__init__(config, has_relative_attention_bias=has_relative_attention_bias, is_decoder=False)
        self.radius = config.local_radius
        self.global_block_size = config.global_block_size
        if has_relative_attention_bias:
            self.global_relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.global_input_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, *, tables: dict, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.split_heads(self.q(x)), self.split_heads(self.k(x)), self.split_heads(self.v(x))  # (B, H, L, D)
        globals_ = self.global_input_layer_norm(global_aggregate(x, key_padding_mask, self.global_block_size))
        global_k = self.split_heads(self.k(globals_))  # (B, H, G, D)
        global_v = self.split_heads(self.v(globals_))  # (B, H, G, D)
        out = local_attention(
            q,
            k,
            v,
            tables["bias_table"],
            radius=self.radius,
            max_distance=self.max_distance,
            key_padding_mask=key_padding_mask,
            global_k=global_k,
            global_v=global_v,
            global_bias_table=tables["global_bias_table"],
            global_block_size=self.global_block_size,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, L, D)
        return self.o(out.transpose(1, 2).reshape(B, L, self.n_heads * self.d_kv))  # (B, L, d_model)


class _LongT5LayerSelfAttention(nn.Module):
    attention_name: str

    def __init__(self, config: LongT5Config, attention: T5Attention):
        super().__init__()
        setattr(self, self.attention_name, attention)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    @property
    def attention(self) -> T5Attention:
        return getattr(self, self.attention_name)

    def position_tables(self) -> dict[str, torch.Tensor]:
        tables = {"bias_table": self.attention.relative_attention_bias.weight}
        if hasattr(self.attention, "global_relative_attention_bias"):
            tables["global_bias_table"] = self.attention.global_relative_attention_bias.weight
        return tables

    def position_biases(self, tables: dict[str, torch.Tensor] | None = None) -> dict[str, PositionBias]:
        """The tables (this layer's own by default) as every layer of the stack reads them (both
        bidirectional), made once per forward."""
        max_distance = self.attention.max_distance
        tables = self.position_tables() if tables is None else tables
        return {
            name: PositionBias(table, bidirectional=True, max_distance=max_distance) for name, table in tables.items()
        }

    def forward(self, x: torch.Tensor, tables: dict, mask: AttentionMask) -> torch.Tensor:
        if mask.q_segment_ids is not None:
            raise ValueError(
                "LongT5 does not pack: its local and transient-global attention take no segment ids; "
                "train it without --pack"
            )
        out = self.attention(self.layer_norm(x), tables=tables, key_padding_mask=mask.key_padding_mask)
        return x + self.dropout(out)


class LongT5LayerLocalSelfAttention(_LongT5LayerSelfAttention):
    attention_name = "LocalSelfAttention"


class LongT5LayerTransientGlobalSelfAttention(_LongT5LayerSelfAttention):
    attention_name = "TransientGlobalSelfAttention"


def encoder_self_attention(config: LongT5Config):
    def make(i: int) -> nn.Module:
        if config.encoder_attention_type == "local":
            return LongT5LayerLocalSelfAttention(
                config, LongT5LocalAttention(config, has_relative_attention_bias=i == 0)
            )
        return LongT5LayerTransientGlobalSelfAttention(
            config, LongT5TransientGlobalAttention(config, has_relative_attention_bias=i == 0)
        )

    return make


class LongT5ForConditionalGeneration(T5ForConditionalGeneration):
    hf_architectures = {"longt5": "LongT5ForConditionalGeneration"}
    config_class = LongT5Config

    def __init__(self, config: LongT5Config):
        super().__init__(config, encoder_self_attention=encoder_self_attention(config))


class LongT5EncoderModel(T5EncoderModel):
    hf_architectures = {"longt5": "LongT5EncoderModel"}
    config_class = LongT5Config

    def __init__(self, config: LongT5Config):
        super().__init__(config, encoder_self_attention=encoder_self_attention(config))
