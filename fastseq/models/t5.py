"""T5 (v1.0 and v1.1), mT5 and ByT5: one encoder-decoder, several configurations.

Parameter names are Hugging Face's, so a `transformers` state dict loads with
`strict=True`. Attention, feed-forward, norms and the loss go through
`fastseq.kernels`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastseq.kernels import PositionBias, bucketed_attention, gated_ffn, gated_gelu, relu_ffn, rms_norm

from .base import (
    AttentionMask,
    EncoderOutput,
    HFConfig,
    LMHead,
    PreTrainedModel,
    Seq2SeqModel,
    check_bool,
    check_float,
    check_int,
    check_separate_embeddings,
    token_embeddings,
)
from .cache import KVCache, LayerCache

_FFN_KINDS = ("relu", "gated-gelu")


@dataclass
class T5Config(HFConfig):
    vocab_size: int = 32128  # tokens in the vocabulary (mT5: 250112, ByT5: 384)
    d_model: int = 512  # width of the residual stream
    d_kv: int = 64  # width of one attention head
    d_ff: int = 2048  # inner width of the feed-forward block
    num_layers: int = 6  # encoder blocks
    num_decoder_layers: int | None = None  # decoder blocks; None = num_layers
    num_heads: int = 8  # attention heads
    relative_attention_num_buckets: int = 32  # rows of the relative-position bias table
    relative_attention_max_distance: int = 128  # distances beyond this share the last bucket
    dropout_rate: float = 0.1  # every dropout of the model, attention probabilities included
    layer_norm_epsilon: float = 1e-6  # RMSNorm epsilon
    feed_forward_proj: str = "relu"  # "relu" (T5 v1.0) or "gated-gelu" (v1.1, mT5, ByT5, LongT5)
    tie_word_embeddings: bool = True  # the LM head shares the input embedding matrix
    scale_decoder_outputs: bool | None = None  # scale by d_model**-0.5 before the head; None: T5 when tied
    initializer_factor: float = 1.0  # multiplies every initial standard deviation
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0  # first decoder input; T5 starts with the pad token
    model_type: str = "t5"  # "t5" or "mt5": the same architecture, kept for config.json
    # Stacks ("encoder", "decoder") whose token embedding is a matrix of its own instead of `shared`
    # (a checkpoint stores it, with other values); written to config.json only when not empty.
    separate_embeddings: list[str] = field(default_factory=list, metadata={"omit_if_empty": True})
    extra: dict[str, Any] = field(default_factory=dict)  # other config.json keys, written back as read

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        self.validate()
        if self.scale_decoder_outputs is None:
            # T5 v1.0 rescales because its head is the embedding; mT5 never rescales.
            self.scale_decoder_outputs = self.tie_word_embeddings and self.model_type != "mt5"

    def validate(self) -> None:
        """Every field in the range the model can run with; a ValueError names the field and the range."""
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads"):
            check_int(self, name, 1)
        # The encoder's buckets are halved per direction and half of those are exact distances: at least one.
        check_int(self, "relative_attention_num_buckets", 4)
        # The logarithmic buckets span from the exact ones to max_distance (log(max_distance / exact) > 0).
        check_int(self, "relative_attention_max_distance", self.relative_attention_num_buckets // 2 + 1)
        check_float(self, "dropout_rate", 0.0, 1.0, open_high=True)
        check_float(self, "layer_norm_epsilon", 0.0, open_low=True)
        check_float(self, "initializer_factor", 0.0, open_low=True)
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            check_int(self, name, 0, self.vocab_size - 1)
        check_bool(self, "tie_word_embeddings")
        check_separate_embeddings(self)
        if self.scale_decoder_outputs is not None:
            check_bool(self, "scale_decoder_outputs")
        if self.feed_forward_proj not in _FFN_KINDS:
            raise ValueError(
                f"feed_forward_proj is {self.feed_forward_proj!r}; it must be one of {', '.join(_FFN_KINDS)}"
            )

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    def to_hf_dict(self) -> dict[str, Any]:
        out = super().to_hf_dict()
        out["is_encoder_decoder"] = True
        return out


class T5LayerNorm(nn.Module):
    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def _fusable(*layers: nn.Module) -> bool:
    """Whether the fused feed-forward may read these layers' weights: each is a plain `nn.Linear`. A
    layer replaced by an adapter-carrying module (LoRA) runs as its own module instead."""
    return all(type(layer) is nn.Linear for layer in layers)


class T5DenseActDense(nn.Module):
    """T5 v1.0 feed-forward: wo(dropout(relu(wi(x))))."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # relu_ffn recomputes the (B, L, d_ff) activation in backward instead of keeping it.
        if not _fusable(self.wi, self.wo):
            return self.wo(self.dropout(torch.relu(self.wi(x))))  # (B, L, d_model)
        p = self.dropout.p if self.training else 0.0
        return relu_ffn(x, self.wi.weight, self.wo.weight, dropout_p=p)  # (B, L, d_model)


class T5DenseGatedActDense(nn.Module):
    """T5 v1.1 feed-forward: wo(dropout(gelu_tanh(wi_0(x)) * wi_1(x)))."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gated_ffn recomputes the (B, L, d_ff) activation in backward instead of keeping it.
        if not _fusable(self.wi_0, self.wi_1, self.wo):
            return self.wo(self.dropout(gated_gelu(self.wi_0(x), self.wi_1(x))))  # (B, L, d_model)
        p = self.dropout.p if self.training else 0.0
        return gated_ffn(x, self.wi_0.weight, self.wi_1.weight, self.wo.weight, dropout_p=p)  # (B, L, d_model)


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        ffn = T5DenseGatedActDense if config.is_gated else T5DenseActDense
        self.DenseReluDense = ffn(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class T5Attention(nn.Module):
    """Multi-head attention with T5's bucketed relative-position bias (no 1/sqrt(d) scale)."""

    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, is_decoder: bool):
        super().__init__()
        self.n_heads = config.num_heads
        self.d_kv = config.d_kv
        self.is_decoder = is_decoder
        self.max_distance = config.relative_attention_max_distance
        self.dropout = config.dropout_rate
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, self.d_kv).transpose(1, 2)  # (B, H, L, D)

    def forward(
        self,
        x: torch.Tensor,
        *,
        bias_table: torch.Tensor | None,
        mask: AttentionMask,
        causal: bool = False,
        kv_states: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """With `cache` (decoding step by step): self-attention appends this call's keys and values
        and attends to every step so far; cross-attention computes the encoder's once."""
        B, L, _ = x.shape
        q = self.split_heads(self.q(x))  # (B, H, Lq, D)
        q_offset = 0
        if kv_states is not None:

            def project():
                return self.split_heads(self.k(kv_states)), self.split_heads(self.v(kv_states))  # (B, H, Lk, D)

            k, v = project() if cache is None else cache.cross(project)
        else:
            k, v = self.split_heads(self.k(x)), self.split_heads(self.v(x))  # (B, H, Lk, D)
            if cache is not None:
                q_offset = cache.owner.length
                k, v = cache.append(k, v)  # (B, H, past + Lk, D)
        out = bucketed_attention(
            q,
            k,
            v,
            bias_table,
            bidirectional=not self.is_decoder,
            max_distance=self.max_distance,
            q_offset=q_offset,
            causal=causal,
            scale=1.0,
            dropout_p=self.dropout if self.training else 0.0,
            **mask._asdict(),
        )  # (B, H, Lq, D)
        return self.o(out.transpose(1, 2).reshape(B, L, self.n_heads * self.d_kv))  # (B, Lq, d_model)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, is_decoder: bool):
        super().__init__()
        self.SelfAttention = T5Attention(
            config, has_relative_attention_bias=has_relative_attention_bias, is_decoder=is_decoder
        )
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.causal = is_decoder

    def position_tables(self) -> dict[str, torch.Tensor]:
        """Bias tables this layer owns (layer 0 owns them; every layer uses them)."""
        return {"bias_table": self.SelfAttention.relative_attention_bias.weight}

    def position_biases(self, tables: dict[str, torch.Tensor] | None = None) -> dict[str, PositionBias]:
        """The tables (this layer's own by default) as every layer of the stack reads them, made once
        per forward."""
        attention = self.SelfAttention
        tables = self.position_tables() if tables is None else tables
        return {
            name: PositionBias(table, bidirectional=not attention.is_decoder, max_distance=attention.max_distance)
            for name, table in tables.items()
        }

    def forward(
        self, x: torch.Tensor, tables: dict[str, torch.Tensor], mask: AttentionMask, cache=None
    ) -> torch.Tensor:
        out = self.SelfAttention(
            self.layer_norm(x), bias_table=tables["bias_table"], mask=mask, causal=self.causal, cache=cache
        )
        return x + self.dropout(out)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(config, has_relative_attention_bias=False, is_decoder=True)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor, encoder_states: torch.Tensor, encoder_mask: AttentionMask, cache=None):
        out = self.EncDecAttention(
            self.layer_norm(x), bias_table=None, mask=encoder_mask, kv_states=encoder_states, cache=cache
        )
        return x + self.dropout(out)


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """Keep fp16 activations finite, as the reference does after each sub-layer."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, min=-limit, max=limit)


class T5Block(nn.Module):
    def __init__(self, config: T5Config, self_attention: nn.Module, *, is_decoder: bool):
        super().__init__()
        self.layer = nn.ModuleList([self_attention])
        if is_decoder:
            self.layer.append(T5LayerCrossAttention(config))
        self.layer.append(T5LayerFF(config))
        self.is_decoder = is_decoder

    def forward(self, x, tables, mask, encoder_states=None, encoder_mask=None, cache=None) -> torch.Tensor:
        if cache is None:
            x = clamp_fp16(self.layer[0](x, tables, mask))
        else:
            x = clamp_fp16(self.layer[0](x, tables, mask, cache))
        if self.is_decoder:
            x = clamp_fp16(self.layer[1](x, encoder_states, encoder_mask, cache))
        return clamp_fp16(self.layer[-1](x))


SelfAttentionFactory = Callable[[int], nn.Module]


class T5Stack(nn.Module):
    """Embedding dropout, blocks, final RMSNorm and dropout. Layer 0 owns the bias tables."""

    gradient_checkpointing = False

    def __init__(
        self,
        config: T5Config,
        embed_tokens: nn.Embedding,
        num_layers: int,
        *,
        is_decoder: bool,
        self_attention: SelfAttentionFactory | None = None,
    ):
        super().__init__()
        if self_attention is None:

            def self_attention(i: int) -> nn.Module:
                return T5LayerSelfAttention(config, has_relative_attention_bias=i == 0, is_decoder=is_decoder)

        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList(
            [T5Block(config, self_attention(i), is_decoder=is_decoder) for i in range(num_layers)]
        )
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(
        self,
        input_ids: torch.Tensor,
        mask: AttentionMask,
        encoder_states: torch.Tensor | None = None,
        encoder_mask: AttentionMask | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """`mask`: the self-attention's; `encoder_mask`: the cross-attention's (decoder)."""
        x = self.dropout(self.embed_tokens(input_ids))  # (B, L, d_model)
        # What every layer shares is made once here: the bias tables as the kernels read them, the masks as bool.
        tables = self.block[0].layer[0].position_biases()
        mask = mask.for_layers()
        encoder_mask = encoder_mask.for_layers() if encoder_mask is not None else None
        checkpointed = self.gradient_checkpointing and self.training and cache is None
        for i, block in enumerate(self.block):
            if checkpointed:
                x = checkpoint(block, x, tables, mask, encoder_states, encoder_mask, use_reentrant=False)
            else:
                x = block(x, tables, mask, encoder_states, encoder_mask, None if cache is None else cache[i])
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.dropout(self.final_layer_norm(x))


def init_t5_module(module: nn.Module, config: T5Config) -> None:
    """Hugging Face's T5 initialisation, module by module."""
    factor = config.initializer_factor
    d_model, d_kv, heads = config.d_model, config.d_kv, config.num_heads
    if isinstance(module, T5LayerNorm):
        nn.init.constant_(module.weight, factor)
    elif isinstance(module, T5DenseActDense):
        nn.init.normal_(module.wi.weight, std=factor * d_model**-0.5)
        nn.init.normal_(module.wo.weight, std=factor * config.d_ff**-0.5)
    elif isinstance(module, T5DenseGatedActDense):
        nn.init.normal_(module.wi_0.weight, std=factor * d_model**-0.5)
        nn.init.normal_(module.wi_1.weight, std=factor * d_model**-0.5)
        nn.init.normal_(module.wo.weight, std=factor * config.d_ff**-0.5)
    elif isinstance(module, T5Attention):
        nn.init.normal_(module.q.weight, std=factor * (d_model * d_kv) ** -0.5)
        nn.init.normal_(module.k.weight, std=factor * d_model**-0.5)
        nn.init.normal_(module.v.weight, std=factor * d_model**-0.5)
        nn.init.normal_(module.o.weight, std=factor * (heads * d_kv) ** -0.5)
        for name in ("relative_attention_bias", "global_relative_attention_bias"):
            if hasattr(module, name):
                nn.init.normal_(getattr(module, name).weight, std=factor * d_model**-0.5)


class _T5Base(PreTrainedModel):
    config_class = T5Config

    def init_weights(self) -> None:
        """Initialise every parameter as Hugging Face does for a new model."""
        with torch.no_grad():
            for module in self.modules():
                init_t5_module(module, self.config)
            nn.init.normal_(self.shared.weight, std=self.config.initializer_factor)
            for stack in (self.encoder, getattr(self, "decoder", None)):
                if stack is not None and stack.embed_tokens is not self.shared:
                    nn.init.normal_(stack.embed_tokens.weight, std=self.config.initializer_factor)
            head = getattr(self, "lm_head", None)
            if head is not None and head.weight is not self.shared.weight:
                nn.init.normal_(head.weight, std=self.config.initializer_factor)


class T5ForConditionalGeneration(_T5Base, Seq2SeqModel):
    hf_architectures = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration"}
    ignored_checkpoint_keys = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)

    def __init__(self, config: T5Config, *, encoder_self_attention: SelfAttentionFactory | None = None):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        encoder_embed, decoder_embed = token_embeddings(config, self.shared)
        self.encoder = T5Stack(
            config, encoder_embed, config.num_layers, is_decoder=False, self_attention=encoder_self_attention
        )
        self.decoder = T5Stack(config, decoder_embed, config.num_decoder_layers, is_decoder=True)
        self.lm_head = LMHead(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def tied_parameters(self) -> dict[str, str]:
        tied = {f"{stack}.embed_tokens.weight": "shared.weight" for stack in ("encoder", "decoder")
                if stack not in self.config.separate_embeddings}  # fmt: skip
        if self.config.tie_word_embeddings:
            tied["lm_head.weight"] = "shared.weight"
        return tied

    def tie_weights(self) -> None:
        for stack in ("encoder", "decoder"):
            if stack not in self.config.separate_embeddings:
                getattr(self, stack).embed_tokens = self.shared
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    def num_decoder_layers(self) -> int:
        return len(self.decoder.block)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        segment_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids `(B, Le)` -> encoder states `(B, Le, d_model)`. `positions` are not read: the
        bias stays over row positions, exact for packed rows since no attended pair crosses a segment."""
        return self.encoder(input_ids, AttentionMask.of(attention_mask, segment_ids, segment_ids))

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        segment_ids: torch.Tensor | None = None,
        decoder_segment_ids: torch.Tensor | None = None,
        decoder_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder states `(B, Ld, d_model)`, rescaled for the head when the config says so. With
        `cache`, `decoder_input_ids` are the steps after those already cached."""
        mask, encoder_mask = AttentionMask.decoder_pair(decoder_attention_mask, attention_mask, decoder_segment_ids,
                                                        segment_ids)  # fmt: skip
        h = self.decoder(decoder_input_ids, mask, encoder_states, encoder_mask, cache)
        if self.config.scale_decoder_outputs:
            h = h * self.config.d_model**-0.5
        return h


class T5EncoderModel(_T5Base):
    hf_architectures = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel"}
    ignored_checkpoint_keys = ("decoder.*", "lm_head.weight")

    def __init__(self, config: T5Config, *, encoder_self_attention: SelfAttentionFactory | None = None):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        encoder_embed, _ = token_embeddings(config, self.shared)
        self.encoder = T5Stack(
            config, encoder_embed, config.num_layers, is_decoder=False, self_attention=encoder_self_attention
        )
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def tied_parameters(self) -> dict[str, str]:
        return {} if "encoder" in self.config.separate_embeddings else {"encoder.embed_tokens.weight": "shared.weight"}

    def tie_weights(self) -> None:
        if "encoder" not in self.config.separate_embeddings:
            self.encoder.embed_tokens = self.shared

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> EncoderOutput:
        """input_ids `(B, L)` -> last_hidden_state `(B, L, d_model)`."""
        return EncoderOutput(last_hidden_state=self.encoder(input_ids, AttentionMask(attention_mask)))
