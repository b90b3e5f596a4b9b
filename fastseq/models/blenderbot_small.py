"""BlenderbotSmall: a post-LayerNorm encoder-decoder with learned positions and scaled attention."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastseq.kernels import bucketed_attention

from .base import (
    AttentionMask,
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

_ACTIVATIONS = {
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass
class BlenderbotSmallConfig(HFConfig):
    vocab_size: int = 50265  # tokens in the vocabulary
    max_position_embeddings: int = 512  # longest sequence the learned positions cover
    d_model: int = 512  # width of the residual stream
    encoder_layers: int = 8
    decoder_layers: int = 8
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 2048  # inner width of the encoder feed-forward
    decoder_ffn_dim: int = 2048  # inner width of the decoder feed-forward
    activation_function: str = "gelu"  # feed-forward activation
    dropout: float = 0.1  # residual and embedding dropout
    attention_dropout: float = 0.0  # dropout of attention probabilities
    activation_dropout: float = 0.0  # dropout after the feed-forward activation
    init_std: float = 0.02  # standard deviation of the initial weights
    scale_embedding: bool = False  # multiply encoder token embeddings by sqrt(d_model)
    tie_word_embeddings: bool = True  # the LM head shares the input embedding matrix
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    decoder_start_token_id: int = 1
    forced_eos_token_id: int | None = 2
    model_type: str = "blenderbot-small"
    # Stacks ("encoder", "decoder") whose token embedding is a matrix of its own instead of `shared`
    # (a checkpoint stores it, with other values); written to config.json only when not empty.
    separate_embeddings: list[str] = field(default_factory=list, metadata={"omit_if_empty": True})
    extra: dict[str, Any] = field(default_factory=dict)  # other config.json keys, written back as read

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every field in the range the model can run with; a ValueError names the field and the range."""
        for name in (
            "vocab_size",
            "max_position_embeddings",
            "d_model",
            "encoder_layers",
            "decoder_layers",
            "encoder_attention_heads",
            "decoder_attention_heads",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
        ):
            check_int(self, name, 1)  # fmt: skip
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            check_float(self, name, 0.0, 1.0, open_high=True)
        check_float(self, "init_std", 0.0)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            check_int(self, name, 0, self.vocab_size - 1)
        check_int(self, "forced_eos_token_id", 0, self.vocab_size - 1, optional=True)
        check_bool(self, "scale_embedding")
        check_bool(self, "tie_word_embeddings")
        check_separate_embeddings(self)
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(
                f"activation_function is {self.activation_function!r}; it must be one of "
                f"{', '.join(sorted(_ACTIVATIONS))}"
            )
        for heads, name in ((self.encoder_attention_heads, "encoder"), (self.decoder_attention_heads, "decoder")):
            if self.d_model % heads:
                raise ValueError(f"d_model {self.d_model} is not divisible by {name}_attention_heads {heads}")

    def to_hf_dict(self) -> dict[str, Any]:
        out = super().to_hf_dict()
        out["is_encoder_decoder"] = True
        return out


class BlenderbotSmallAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: AttentionMask,
        causal: bool = False,
        kv_states: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """With `cache`: self-attention appends this call's keys and values and attends to every
        step so far; cross-attention computes the encoder's once."""
        B, L, d = x.shape
        q = self.split_heads(self.q_proj(x))  # (B, H, Lq, D)
        q_offset = 0
        if kv_states is not None:

            def project():
                return self.split_heads(self.k_proj(kv_states)), self.split_heads(self.v_proj(kv_states))

            k, v = project() if cache is None else cache.cross(project)  # (B, H, Lk, D)
        else:
            k, v = self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))  # (B, H, Lk, D)
            if cache is not None:
                q_offset = cache.owner.length
                k, v = cache.append(k, v)  # (B, H, past + Lk, D)
        out = bucketed_attention(
            q,
            k,
            v,
            None,
            causal=causal,
            q_offset=q_offset,
            scale=self.head_dim**-0.5,
            dropout_p=self.dropout if self.training else 0.0,
            **mask._asdict(),
        )  # (B, H, Lq, D)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, d))  # (B, Lq, d_model)


class _FeedForward(nn.Module):
    def __init__(self, config: BlenderbotSmallConfig, ffn_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, config.d_model)
        self.activation = _ACTIVATIONS[config.activation_function]
        self.activation_dropout = config.activation_dropout

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation(self.fc1(x))  # (B, L, ffn_dim)
        return self.fc2(F.dropout(h, p=self.activation_dropout, training=self.training))


class BlenderbotSmallEncoderLayer(_FeedForward):
    def __init__(self, config: BlenderbotSmallConfig):
        super().__init__(config, config.encoder_ffn_dim)
        self.self_attn = BlenderbotSmallAttention(
            config.d_model, config.encoder_attention_heads, config.attention_dropout
        )
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        h = self.self_attn(x, mask=mask)
        x = self.self_attn_layer_norm(x + F.dropout(h, p=self.dropout, training=self.training))
        h = self.ffn(x)
        x = self.final_layer_norm(x + F.dropout(h, p=self.dropout, training=self.training))
        if x.dtype == torch.float16 and not torch.isfinite(x).all():
            limit = torch.finfo(torch.float16).max - 1000
            x = torch.clamp(x, min=-limit, max=limit)
        return x


class BlenderbotSmallDecoderLayer(_FeedForward):
    def __init__(self, config: BlenderbotSmallConfig):
        super().__init__(config, config.decoder_ffn_dim)
        heads, drop = config.decoder_attention_heads, config.attention_dropout
        self.self_attn = BlenderbotSmallAttention(config.d_model, heads, drop)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.encoder_attn = BlenderbotSmallAttention(config.d_model, heads, drop)
        self.encoder_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model)
        self.dropout = config.dropout

    def forward(self, x, mask, encoder_states, encoder_mask, cache=None) -> torch.Tensor:
        h = self.self_attn(x, mask=mask, causal=True, cache=cache)
        x = self.self_attn_layer_norm(x + F.dropout(h, p=self.dropout, training=self.training))
        h = self.encoder_attn(x, mask=encoder_mask, kv_states=encoder_states, cache=cache)
        x = self.encoder_attn_layer_norm(x + F.dropout(h, p=self.dropout, training=self.training))
        h = self.ffn(x)
        return self.final_layer_norm(x + F.dropout(h, p=self.dropout, training=self.training))


class BlenderbotSmallEncoder(nn.Module):
    gradient_checkpointing = False

    def __init__(self, config: BlenderbotSmallConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList([BlenderbotSmallEncoderLayer(config) for _ in range(config.encoder_layers)])
        self.layernorm_embedding = nn.LayerNorm(config.d_model)
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.dropout = config.dropout

    def forward(
        self, input_ids: torch.Tensor, mask: AttentionMask, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`positions` `(B, L)`: each token's learned position (packed rows restart them per segment);
        by default 0, 1, ... (a row then has at most max_position_embeddings tokens; given positions
        are the caller's to keep below it, as the packing data keeps each example's)."""
        if positions is None:
            _check_positions(input_ids, self.embed_positions)
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed_tokens(input_ids) * self.embed_scale + self.embed_positions(positions)  # (B, L, d)
        x = F.dropout(self.layernorm_embedding(x), p=self.dropout, training=self.training)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x


class BlenderbotSmallDecoder(nn.Module):
    gradient_checkpointing = False

    def __init__(self, config: BlenderbotSmallConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList([BlenderbotSmallDecoderLayer(config) for _ in range(config.decoder_layers)])
        self.layernorm_embedding = nn.LayerNorm(config.d_model)
        self.dropout = config.dropout

    def forward(
        self,
        input_ids: torch.Tensor,
        mask: AttentionMask,
        encoder_states: torch.Tensor,
        encoder_mask: AttentionMask,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`mask`: the self-attention's; `encoder_mask`: the cross-attention's; `positions` `(B, L)` as
        the encoder's (by default continuing from the cache)."""
        past = 0 if cache is None else cache.length
        if positions is None:
            _check_positions(input_ids, self.embed_positions, past)
            positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        # The decoder normalises the token embeddings before adding positions, as the reference does.
        x = self.layernorm_embedding(self.embed_tokens(input_ids)) + self.embed_positions(positions)  # (B, L, d)
        x = F.dropout(x, p=self.dropout, training=self.training)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, mask, encoder_states, encoder_mask, use_reentrant=False)
            else:
                x = layer(x, mask, encoder_states, encoder_mask, None if cache is None else cache[i])
        if cache is not None:
            cache.length += input_ids.shape[1]
        return x


def _check_positions(input_ids: torch.Tensor, positions: nn.Embedding, past: int = 0) -> None:
    if past + input_ids.shape[1] > positions.num_embeddings:
        raise ValueError(
            f"sequence length {past + input_ids.shape[1]} exceeds max_position_embeddings={positions.num_embeddings}; "
            "truncate the inputs (or generate fewer tokens)"
        )


class BlenderbotSmallModel(nn.Module):
    def __init__(self, config: BlenderbotSmallConfig):
        super().__init__()
        self.shared = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        encoder_embed, decoder_embed = token_embeddings(config, self.shared)
        self.encoder = BlenderbotSmallEncoder(config, encoder_embed)
        self.decoder = BlenderbotSmallDecoder(config, decoder_embed)


def init_blenderbot_module(module: nn.Module, std: float) -> None:
    """BlenderbotSmall's initialisation of one module (its own parameters only): normal weights, zero
    biases, unit LayerNorms. Also used where modules are initialized one at a time (ZeRO-3, pipeline)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class BlenderbotSmallBase(PreTrainedModel):
    config_class = BlenderbotSmallConfig

    def init_weights(self) -> None:
        """Hugging Face's initialisation: normal(0, init_std) weights, zero biases, unit LayerNorms."""
        with torch.no_grad():
            for module in self.modules():
                init_blenderbot_module(module, self.config.init_std)


class BlenderbotSmallForConditionalGeneration(BlenderbotSmallBase, Seq2SeqModel):
    hf_architectures = {"blenderbot-small": "BlenderbotSmallForConditionalGeneration"}
    ignored_checkpoint_keys = ()

    def __init__(self, config: BlenderbotSmallConfig):
        super().__init__()
        self.config = config
        self.model = BlenderbotSmallModel(config)
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))
        self.lm_head = LMHead(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()
            self.tie_weights()

    @property
    def shared(self) -> nn.Embedding:
        return self.model.shared

    def tied_parameters(self) -> dict[str, str]:
        tied = {f"model.{stack}.embed_tokens.weight": "model.shared.weight" for stack in ("encoder", "decoder")
                if stack not in self.config.separate_embeddings}  # fmt: skip
        if self.config.tie_word_embeddings:
            tied["lm_head.weight"] = "model.shared.weight"
        return tied

    def tie_weights(self) -> None:
        for stack in ("encoder", "decoder"):
            if stack not in self.config.separate_embeddings:
                getattr(self.model, stack).embed_tokens = self.model.shared
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.shared.weight

    def num_decoder_layers(self) -> int:
        return len(self.model.decoder.layers)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        segment_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids `(B, Le)` -> encoder states `(B, Le, d_model)`."""
        return self.model.encoder(input_ids, AttentionMask.of(attention_mask, segment_ids, segment_ids), positions)

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
        """Decoder states `(B, Ld, d_model)`; with `cache`, of the steps after those already cached."""
        mask, encoder_mask = AttentionMask.decoder_pair(decoder_attention_mask, attention_mask, decoder_segment_ids,
                                                        segment_ids)  # fmt: skip
        return self.model.decoder(decoder_input_ids, mask, encoder_states, encoder_mask, cache, decoder_positions)

    def logits_bias(self) -> torch.Tensor:
        return self.final_logits_bias[0]  # (vocab,)
