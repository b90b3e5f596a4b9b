"""What every native model shares: outputs, config round trips, the shift of labels, saving."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastseq.files import save_pretrained
from fastseq.kernels import linear_cross_entropy

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
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
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


def shift_right(labels: torch.Tensor, decoder_start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Decoder inputs from labels `(B, L)`: start token first, labels shifted right, -100 -> pad."""
    shifted = labels.new_zeros(labels.shape)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


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
        """Write `config.json` and safetensors weights (sharded above `max_shard_size`), atomically."""
        save_pretrained(self, path, max_shard_size=max_shard_size)

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

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, decoder_input_ids, encoder_states, attention_mask=None, decoder_attention_mask=None, cache=None):
        raise NotImplementedError

    def num_decoder_layers(self) -> int:
        raise NotImplementedError

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Greedy decoding or sampling with a KV cache; see `fastseq.generation.generate`."""
        from fastseq.generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)

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
        encoder_outputs: torch.Tensor | None = None,
        return_logits: bool | None = None,
        label_smoothing: float = 0.0,
    ) -> Seq2SeqOutput:
        """input_ids `(B, Le)`, labels `(B, Ld)` with -100 ignored. Logits `(B, Ld, vocab)` are
        returned when `return_logits` is True; by default whenever there is no loss or the model
        is in eval mode (training with labels skips them: the loss never needs them). The loss is
        label-smoothed by `label_smoothing` eps (HF's `label_smoothing_factor`)."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels (decoder inputs are made from labels)")
            decoder_input_ids = shift_right(labels, self.config.decoder_start_token_id, self.config.pad_token_id)
        encoder_states = self.encode(input_ids, attention_mask) if encoder_outputs is None else encoder_outputs
        h = self.decode(decoder_input_ids, encoder_states, attention_mask, decoder_attention_mask)
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
