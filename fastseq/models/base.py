"""What every native model shares: outputs, config round trips, the shift of labels, saving."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from fastseq.files import save_pretrained, write_json
from fastseq.kernels import linear_cross_entropy

GENERATION_CONFIG = "generation_config.json"
# Keys of a Hugging Face config.json that are derived or bookkeeping, never read back.
_DERIVED_KEYS = {"dense_act_fn", "is_gated_act", "transformers_version", "architectures", "torch_dtype", "dtype"}


@dataclass
class Seq2SeqOutput:
    loss: torch.Tensor | None = None  # scalar fp32, mean over labels != -100
    logits: torch.Tensor | None = None  # (B, Ld, vocab), only when asked for
    encoder_last_hidden_state: torch.Tensor | None = None  # (B, Le, d_model)
    decoder_last_hidden_state: torch.Tensor | None = None  # (B, Ld, d_model), before the LM head


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor  # (B, L, d_model)


def check_int(config, name: str, low: int, high: int | None = None, *, optional: bool = False) -> None:
    """`config.<name>` is an integer in [low, high] (None allowed when `optional`); else a ValueError
    that names the field, its value and the range."""
    value = getattr(config, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"an integer in {low} ... {high}" if high is not None else f"an integer >= {low}"
        raise ValueError(f"{name} is {value!r}; it must be {allowed}")


def check_float(config, name: str, low: float, high: float | None = None, *, open_low: bool = False,
                open_high: bool = False) -> None:  # fmt: skip
    """`config.<name>` is a finite number in the range (ends open or closed); else a ValueError."""
    value = getattr(config, name)
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < low or (open_low and value == low) or (high is not None and (
            value > high or (open_high and value == high))):  # fmt: skip
        left, right = "(" if open_low else "[", ")" if open_high or high is None else "]"
        raise ValueError(
            f"{name} is {value!r}; it must be a number in {left}{low}, {high if high is not None else 'inf'}{right}"
        )


def check_bool(config, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, bool):
        raise ValueError(f"{name} is {value!r}; it must be true or false")


def check_separate_embeddings(config) -> None:
    value = config.separate_embeddings
    if not isinstance(value, list) or not set(value) <= {"encoder", "decoder"} or len(set(value)) != len(value):
        raise ValueError(f"separate_embeddings is {value!r}; it must be a list of 'encoder' and/or 'decoder'")


def token_embeddings(config, shared: nn.Embedding) -> tuple[nn.Embedding, nn.Embedding]:
    """The encoder's and the decoder's token embedding: `shared`, or a matrix of its own for a stack in
    `config.separate_embeddings` (as `transformers` loads a checkpoint whose stack embedding differs)."""
    padding = shared.padding_idx

    def embedding(stack: str) -> nn.Embedding:
        if stack in config.separate_embeddings:
            return nn.Embedding(config.vocab_size, config.d_model, padding_idx=padding)
        return shared

    return embedding("encoder"), embedding("decoder")


class HFConfig:
    """Mixin for config dataclasses that mirror a Hugging Face config.json.

    Known fields map one to one onto config.json keys; other keys are kept in
    `extra` and written back unchanged.
    """

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> HFConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k not in _DERIVED_KEYS}
        return cls(**known, extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and not (f.metadata.get("omit_if_empty") and not value):
                out[f.name] = value
        return out


class LMHead(nn.Linear):
    """The output projection. Given labels it returns the loss instead of the logits, computed in
    chunks by `linear_cross_entropy` inside its own call, so DeepSpeed ZeRO-3 gathers its weight
    for the loss (forward and backward) as for any Linear."""

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """hidden `(..., d)` -> logits `(..., vocab)`; with labels `(...)`: the mean loss, scalar fp32
        (label-smoothed by `label_smoothing`, as `torch.nn.CrossEntropyLoss`)."""
        if labels is None:
            return super().forward(hidden)
        return linear_cross_entropy(hidden, self.weight, labels, bias=bias, label_smoothing=label_smoothing)


def shift_right(
    labels: torch.Tensor, decoder_start_token_id: int, pad_token_id: int, segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Decoder inputs from labels `(B, L)`: start token first, labels shifted right, -100 -> pad.
    With `segment_ids` `(B, L)` (packed rows) the start token also opens every later segment, so one
    example's last label never feeds the next example."""
    shifted = labels.new_zeros(labels.shape)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    if segment_ids is not None:
        starts = segment_ids[:, 1:] != segment_ids[:, :-1]  # (B, L - 1): position j + 1 opens a segment
        shifted[:, 1:] = shifted[:, 1:].masked_fill(starts & (segment_ids[:, 1:] != 0), decoder_start_token_id)
    return shifted.masked_fill(shifted == -100, pad_token_id)


class AttentionMask(NamedTuple):
    """Which keys each query may attend: `bucketed_attention`'s mask arguments."""

    key_padding_mask: torch.Tensor | None = None  # (B, Lk), nonzero = attend
    q_segment_ids: torch.Tensor | None = None  # (B, Lq), packed rows: 1, 2, ... per example, 0 = padding
    k_segment_ids: torch.Tensor | None = None  # (B, Lk)

    @classmethod
    def of(
        cls,
        key_padding_mask: torch.Tensor | None,
        q_segment_ids: torch.Tensor | None = None,
        k_segment_ids: torch.Tensor | None = None,
    ) -> AttentionMask:
        """The padding mask, or for packed rows the segment ids alone: padding is segment 0, which
        meets no query, so a padding mask (segment ids != 0) would add nothing."""
        if q_segment_ids is None:
            return cls(key_padding_mask)
        return cls(None, q_segment_ids, k_segment_ids)

    @classmethod
    def decoder_pair(
        cls,
        decoder_attention_mask: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        decoder_segment_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> tuple[AttentionMask, AttentionMask]:
        """The decoder's two masks: its self-attention's (a target token sees its own segment) and the
        cross-attention's (a target token sees the source tokens of its segment)."""
        return (
            cls.of(decoder_attention_mask, decoder_segment_ids, decoder_segment_ids),
            cls.of(attention_mask, decoder_segment_ids, segment_ids),
        )

    def for_layers(self) -> AttentionMask:
        """The same mask with the padding mask as bool (nonzero = attend), made once per forward and
        shared by every layer: the attention launchers convert one mask tensor once (`key_bias`), and
        LongT5's global aggregation reads a bool mask as it is."""
        mask = self.key_padding_mask
        if mask is None or mask.dtype == torch.bool:
            return self
        return self._replace(key_padding_mask=mask != 0)


class PreTrainedModel(nn.Module):
    """Base of the native models: a config, tied-parameter bookkeeping and `save_pretrained`."""

    config_class: type = HFConfig
    # model_type -> the Hugging Face class name written to config.json ("architectures")
    hf_architectures: dict[str, str] = {}
    # Checkpoint keys that older or other exports carry and that this model does not use.
    ignored_checkpoint_keys: tuple[str, ...] = ()

    def tied_parameters(self) -> dict[str, str]:
        """State-dict keys that alias another key's parameter (alias -> source)."""
        return {}

    def tie_weights(self) -> None:
        """Re-establish parameter sharing (after loading with `assign=True`)."""

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        """Recompute each layer's activations in backward instead of keeping them (training only)."""
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = enabled

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, path, *, max_shard_size: int | str = "5GB") -> None:
        """Write `config.json` and safetensors weights (sharded above `max_shard_size`), and for a
        model that generates `generation_config.json`, every file atomically."""
        save_pretrained(self, path, max_shard_size=max_shard_size)
        generation = self.generation_config()
        if generation is not None:
            write_json(Path(path) / GENERATION_CONFIG, generation)

    def generation_config(self) -> dict[str, Any] | None:
        """What `transformers` reads from generation_config.json (None: the model does not generate)."""
        return None

    def hf_config(self) -> dict[str, Any]:
        """The config.json of this model: its config, its Hugging Face class and its dtype."""
        name = self.hf_architectures.get(self.config.model_type)
        if name is None:
            raise ValueError(f"{type(self).__name__} is not a model of family {self.config.model_type!r}")
        floating = [p.dtype for p in self.parameters() if p.is_floating_point()]
        dtype = str(floating[0]).removeprefix("torch.") if floating else "float32"
        return {**self.config.to_hf_dict(), "architectures": [name], "dtype": dtype}


class Seq2SeqModel(PreTrainedModel):
    """Encoder-decoder with an LM head: subclasses supply `encode`, `decode` and the head."""

    lm_head: nn.Linear

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        segment_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        cache=None,
        *,
        segment_ids: torch.Tensor | None = None,
        decoder_segment_ids: torch.Tensor | None = None,
        decoder_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def num_decoder_layers(self) -> int:
        raise NotImplementedError

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Greedy decoding or sampling with a KV cache; see `fastseq.generation.generate`."""
        from fastseq.generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    def generation_config(self) -> dict[str, Any]:
        """The special tokens generation starts and stops with, as `transformers` writes them."""
        names = ("bos_token_id", "decoder_start_token_id", "eos_token_id", "forced_eos_token_id", "pad_token_id")
        return {name: getattr(self.config, name) for name in names if getattr(self.config, name, None) is not None}

    def logits_bias(self) -> torch.Tensor | None:
        """A bias added to every logit (vocab,), or None."""
        return None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        segment_ids: torch.Tensor | None = None,
        decoder_segment_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        decoder_positions: torch.Tensor | None = None,
        encoder_outputs: torch.Tensor | None = None,
        return_logits: bool | None = None,
        label_smoothing: float = 0.0,
    ) -> Seq2SeqOutput:
        """input_ids `(B, Le)`, labels `(B, Ld)` with -100 ignored. Logits `(B, Ld, vocab)` are
        returned when `return_logits` is True; by default whenever there is no loss or the model
        is in eval mode (training with labels skips them: the loss never needs them). The loss is
        label-smoothed by `label_smoothing` eps (HF's `label_smoothing_factor`).

        Packed rows (several examples per row) give segment_ids `(B, Le)` and decoder_segment_ids
        `(B, Ld)` (1, 2, ... per example, 0 = padding) and may give positions `(B, Le)` and
        decoder_positions `(B, Ld)` (restarting at 0 in each segment; read by learned positions only).
        Attention then stays within a segment (the padding masks are not read), and labels are
        shifted right per segment."""
        if (segment_ids is None) != (decoder_segment_ids is None):
            raise ValueError("pass segment_ids and decoder_segment_ids together (packed rows), or neither")
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels (decoder inputs are made from labels)")
            decoder_input_ids = shift_right(
                labels, self.config.decoder_start_token_id, self.config.pad_token_id, decoder_segment_ids
            )
        if encoder_outputs is None:
            encoder_states = self.encode(input_ids, attention_mask, segment_ids=segment_ids, positions=positions)
        else:
            encoder_states = encoder_outputs
        h = self.decode(
            decoder_input_ids,
            encoder_states,
            attention_mask,
            decoder_attention_mask,
            segment_ids=segment_ids,
            decoder_segment_ids=decoder_segment_ids,
            decoder_positions=decoder_positions,
        )
        bias = self.logits_bias()
        loss = None
        if labels is not None:
            loss = self.lm_head(h, labels=labels, bias=bias, label_smoothing=label_smoothing)
        if return_logits is None:
            return_logits = labels is None or not self.training
        logits = None
        if return_logits:
            logits = self.lm_head(h) if bias is None else self.lm_head(h) + bias
        return Seq2SeqOutput(
            loss=loss, logits=logits, encoder_last_hidden_state=encoder_states, decoder_last_hidden_state=h
        )
