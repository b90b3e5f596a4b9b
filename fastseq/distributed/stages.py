"""The encoder-decoder as a list of pipeline layers (`deepspeed.pipe.PipelineModule`).

The model is a list of layers; DeepSpeed cuts it into contiguous stages by parameter count and each
rank builds only its own (`LayerSpec`). What flows between layers is a tuple of tensors
(`stage_inputs` makes the first one):

    encoder side:  (hidden, encoder mask, decoder input ids[, packing ids][, bias table])
    decoder side:  (encoder output, encoder mask, hidden[, packing ids][, bias table])
    head:          hidden -> (hidden, head weight[, logits bias]); the last stage's loss function
                   computes the loss from them with the fused `linear_cross_entropy`, as the
                   single-process model does, so the logits (batch x length x vocabulary: the
                   largest tensor of an mT5 step) are never built

Packed rows (a batch with segment ids) carry the encoder's segment ids in place of its mask, and
integer packing ids after the three fixed tensors: the decoder's segment ids, then for
BlenderbotSmall the decoder's positions and the encoder's, each dropped by the layer of learned
positions that reads it. The integer masks and ids ride along untouched. T5's relative-position bias table (LongT5
transient-global: both tables, stacked) leaves the first block of each stack as a tensor and every
later block computes its bias from it in the kernel, on whatever stage it sits: its gradient flows
back through the pipeline to the block that owns it. A stack's last block also applies the final
norm and drops the table, so no tensor crosses a stage without being used there (DeepSpeed sends a
gradient back for every floating tensor it received).

The token embedding is a `TiedLayerSpec` ("embed") wherever it is used: encoder input, decoder
input and, when the model ties it, the LM head; DeepSpeed keeps the copies on different stages
equal by summing their gradients. An untied head (T5 v1.1, mT5) is a layer of its own.

Partitioning counts each layer's parameters on the meta device (nothing is allocated), so an 11B
model is cut without being built; an embedding counts once per stage that holds a copy of it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastseq.checkpoint import open_safetensors, weight_files
from fastseq.kernels import linear_cross_entropy
from fastseq.models.base import AttentionMask, shift_right
from fastseq.models.blenderbot_small import (
    BlenderbotSmallConfig,
    BlenderbotSmallDecoderLayer,
    BlenderbotSmallEncoderLayer,
)
from fastseq.models.longt5 import encoder_self_attention
from fastseq.models.t5 import (
    T5LayerCrossAttention,
    T5LayerFF,
    T5LayerNorm,
    T5LayerSelfAttention,
    clamp_fp16,
    init_t5_module,
)

# ---- layers ------------------------------------------------------------------------------------


def _tables_tensor(tables: dict[str, torch.Tensor]) -> torch.Tensor:
    if "global_bias_table" in tables:
        return torch.stack([tables["bias_table"], tables["global_bias_table"]])  # (2, num_buckets, H)
    return tables["bias_table"] * 1.0  # (num_buckets, H), a tensor of the graph (not the parameter itself)


def _tables_dict(table: torch.Tensor) -> dict[str, torch.Tensor]:
    if table.dim() == 3:
        return {"bias_table": table[0], "global_bias_table": table[1]}
    return {"bias_table": table}


def _position_biases(sublayer: nn.Module, table: torch.Tensor) -> dict:
    """The stage tuple's tables as `PositionBias`es, made once for the self-attention sub-layers of a stage:
    kept on the tensor they hand on to each other (after a stage boundary, or a re-entrant recompute's
    detached copy, a new tensor makes its own)."""
    kept = getattr(table, "_fastseq_position_biases", None)
    if kept is not None and kept[0] == table._version:
        return kept[1]
    biases = sublayer.position_biases(_tables_dict(table))
    table._fastseq_position_biases = (table._version, biases)
    return biases


def _split(inputs: tuple) -> tuple[tuple, list[torch.Tensor], list[torch.Tensor]]:
    """A stage tuple's three fixed tensors, its packing ids (the integer tensors after them; packed
    rows only) and its bias table (the floating one after them, if any)."""
    rest = inputs[3:]
    return inputs[:3], [t for t in rest if not t.is_floating_point()], [t for t in rest if t.is_floating_point()]


def _masks(mask: torch.Tensor, packing: list[torch.Tensor]) -> tuple[AttentionMask, AttentionMask, AttentionMask]:
    """The encoder self-attention's, the decoder self-attention's and the cross-attention's masks.
    `mask` is the encoder's attention mask or, for packed rows (`packing` starts with the decoder's
    segment ids), the encoder's segment ids."""
    if not packing:
        return AttentionMask(mask), AttentionMask(), AttentionMask(mask)
    return AttentionMask.of(None, mask, mask), *AttentionMask.decoder_pair(None, None, packing[0], mask)


def stage_inputs(config, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The first stage's tuple for a batch (packed rows when it has segment ids): the encoder input,
    the encoder mask, the decoder input ids (labels shifted right, per segment for packed rows) and
    the packing ids."""
    segments = batch.get("decoder_segment_ids")
    decoder_ids = shift_right(batch["labels"], config.decoder_start_token_id, config.pad_token_id, segments)
    if segments is None:
        return batch["input_ids"], batch["attention_mask"], decoder_ids
    positions = ()
    if config.model_type == "blenderbot-small":  # learned positions; T5's bias is over row positions
        positions = (batch["decoder_positions"], batch["positions"])
    return batch["input_ids"], batch["segment_ids"], decoder_ids, segments, *positions


class T5SubLayerPipe(nn.Module):
    """One sub-layer of a T5 / LongT5 block: its self-attention, cross-attention or FFN. Cutting at
    sub-layers (an FFN of T5-11B is 134M parameters, a whole decoder block 268M) lets the stages
    balance. The stack's first self-attention hands on its bias table and its last one drops it;
    the stack's last FFN applies the final norm."""

    def __init__(self, config, index: int, num_layers: int, part: str, *, is_decoder: bool):
        super().__init__()
        if part == "self" and is_decoder:
            self.sublayer = T5LayerSelfAttention(config, has_relative_attention_bias=index == 0, is_decoder=True)
        elif part == "self" and config.model_type == "longt5":
            self.sublayer = encoder_self_attention(config)(index)
        elif part == "self":
            self.sublayer = T5LayerSelfAttention(config, has_relative_attention_bias=index == 0, is_decoder=False)
        elif part == "cross":
            self.sublayer = T5LayerCrossAttention(config)
        else:
            self.sublayer = T5LayerFF(config)
        self.part, self.is_decoder = part, is_decoder
        self.first, self.last = index == 0, index == num_layers - 1
        if part == "ff" and self.last:
            self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = config.dropout_rate
        self.scale = config.d_model**-0.5 if is_decoder and config.scale_decoder_outputs else None

    def forward(self, inputs: tuple) -> tuple | torch.Tensor:
        fixed, packing, table = _split(inputs)
        if self.is_decoder:
            encoder_states, mask, x = fixed
        else:
            x, mask, decoder_ids = fixed
        encoder_mask, decoder_mask, cross_mask = _masks(mask, packing)
        if self.part == "self":
            table = [_tables_tensor(self.sublayer.position_tables())] if self.first else table
            layer_mask = (decoder_mask if self.is_decoder else encoder_mask).for_layers()
            x = clamp_fp16(self.sublayer(x, _position_biases(self.sublayer, table[0]), layer_mask))
            if self.last:
                table = []  # no later layer reads it: it must not cross a stage unused
        elif self.part == "cross":
            x = clamp_fp16(self.sublayer(x, encoder_states, cross_mask))
        else:
            x = clamp_fp16(self.sublayer(x))
            if self.last:
                x = F.dropout(self.final_layer_norm(x), p=self.dropout, training=self.training)
                if self.is_decoder:
                    return x * self.scale if self.scale is not None else x
        fixed = (encoder_states, mask, x) if self.is_decoder else (x, mask, decoder_ids)
        return (*fixed, *packing, *table)


class BlenderbotInputPipe(nn.Module):
    """BlenderbotSmall's learned positions and embedding LayerNorm, after the tied token embedding."""

    def __init__(self, config: BlenderbotSmallConfig, *, is_decoder: bool):
        super().__init__()
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.d_model)
        self.layernorm_embedding = nn.LayerNorm(config.d_model)
        self.is_decoder, self.dropout = is_decoder, config.dropout

    def forward(self, inputs: tuple) -> tuple:
        fixed, packing, _ = _split(inputs)
        if self.is_decoder:
            encoder_states, mask, tokens = fixed
        else:
            tokens, mask, decoder_ids = fixed
        if packing:  # packed rows: this stack's positions are the last packing ids, read here only
            *packing, positions = packing  # (B, L)
        else:
            positions = torch.arange(tokens.shape[1], device=tokens.device)  # (L,)
        positions = self.embed_positions(positions)  # (B, L, d) or (L, d)
        if self.is_decoder:  # the decoder normalises the token embeddings before adding positions
            x = self.layernorm_embedding(tokens) + positions
        else:
            x = self.layernorm_embedding(tokens + positions)
        x = F.dropout(x, p=self.dropout, training=self.training)
        return (encoder_states, mask, x, *packing) if self.is_decoder else (x, mask, decoder_ids, *packing)


class BlenderbotLayerPipe(nn.Module):
    def __init__(self, config: BlenderbotSmallConfig, index: int, num_layers: int, *, is_decoder: bool):
        super().__init__()
        self.layer = BlenderbotSmallDecoderLayer(config) if is_decoder else BlenderbotSmallEncoderLayer(config)
        self.is_decoder, self.last = is_decoder, index == num_layers - 1

    def forward(self, inputs: tuple) -> tuple | torch.Tensor:
        fixed, packing, _ = _split(inputs)
        encoder_mask, decoder_mask, cross_mask = _masks(fixed[1], packing)
        if self.is_decoder:
            encoder_states, mask, x = fixed
            x = self.layer(x, decoder_mask, encoder_states, cross_mask)
            return x if self.last else (encoder_states, mask, x, *packing)
        x, mask, decoder_ids = fixed
        return self.layer(x, encoder_mask), mask, decoder_ids, *packing


class HeadPipe(nn.Linear):
    """An untied LM head: hidden -> (hidden, its weight), for the fused loss."""

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__(d_model, vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return hidden, self.weight


class LogitsBiasPipe(nn.Module):
    """BlenderbotSmall's final logits bias (a buffer), handed to the fused loss with the head."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.register_buffer("final_logits_bias", torch.zeros(1, vocab_size))

    def forward(self, head: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (*head, self.final_logits_bias[0])


class TokenEmbedding(nn.Embedding):
    """The shared token embedding. Its own forward is the encoder's input (the first use, which
    DeepSpeed saves with the layer files); the decoder input and a tied head are `forward_fn`s."""

    def __init__(self, config):
        blenderbot = config.model_type == "blenderbot-small"
        super().__init__(config.vocab_size, config.d_model, padding_idx=config.pad_token_id if blenderbot else None)
        self.scale = math.sqrt(config.d_model) if getattr(config, "scale_embedding", False) else 1.0
        self.p = 0.0 if blenderbot else config.dropout_rate  # BlenderbotSmall drops out after its LayerNorm

    def forward(self, inputs: tuple) -> tuple:
        input_ids, *rest = inputs
        x = super().forward(input_ids)
        if self.scale != 1.0:
            x = x * self.scale
        return F.dropout(x, p=self.p, training=self.training), *rest


def _embed_decoder(module: TokenEmbedding, inputs: tuple) -> tuple:
    encoder_states, mask, decoder_ids, *packing = inputs
    x = nn.Embedding.forward(module, decoder_ids)
    return encoder_states, mask, F.dropout(x, p=module.p, training=module.training), *packing


def _tied_head(module: TokenEmbedding, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return hidden, module.weight


# ---- the layer list ------------------------------------------------------------------------------


@dataclass
class Layer:
    """One entry of the pipeline: how to build it, and the Hugging Face name of each of its tensors."""

    cls: type
    args: tuple
    kwargs: dict = field(default_factory=dict)
    tied: str | None = None
    forward_fn: object = None
    prefix: str = ""  # local name -> prefix + local name
    renames: dict = field(default_factory=dict)  # local name -> Hugging Face name, where not a prefix

    def hf_name(self, local: str) -> str:
        if local in self.renames:
            return self.renames[local]
        for head, target in self.renames.items():
            if head.endswith(".") and local.startswith(head):
                return target + local[len(head) :]
        return self.prefix + local


def _t5_sublayers(config, num_layers: int, *, is_decoder: bool) -> list[Layer]:
    stack = "decoder" if is_decoder else "encoder"
    parts = ("self", "cross", "ff") if is_decoder else ("self", "ff")
    out = []
    for i in range(num_layers):
        for position, part in enumerate(parts):
            renames = {"sublayer.": f"{stack}.block.{i}.layer.{position}."}
            if part == "ff" and i == num_layers - 1:
                renames["final_layer_norm.weight"] = f"{stack}.final_layer_norm.weight"
            out.append(
                Layer(T5SubLayerPipe, (config, i, num_layers, part), {"is_decoder": is_decoder}, renames=renames)
            )
    return out


def layers(config) -> list[Layer]:
    """The pipeline's layers for a model config (T5, mT5, LongT5 or BlenderbotSmall)."""
    if config.separate_embeddings:
        raise ValueError(
            f"the model has token embeddings of its own for {' and '.join(config.separate_embeddings)} (not tied to "
            "the shared one); pipeline stages share one embedding: train it with ZeRO or on one process"
        )
    blenderbot = config.model_type == "blenderbot-small"
    shared = "model.shared.weight" if blenderbot else "shared.weight"
    embed = dict(cls=TokenEmbedding, args=(config,), tied="embed", renames={"weight": shared})
    out = [Layer(**embed)]
    if blenderbot:
        enc, dec = config.encoder_layers, config.decoder_layers
        out.append(Layer(BlenderbotInputPipe, (config,), {"is_decoder": False}, prefix="model.encoder."))
        out += [Layer(BlenderbotLayerPipe, (config, i, enc), {"is_decoder": False},
                      renames={"layer.": f"model.encoder.layers.{i}."}) for i in range(enc)]  # fmt: skip
    else:
        enc, dec = config.num_layers, config.num_decoder_layers
        out += _t5_sublayers(config, enc, is_decoder=False)
    out.append(Layer(**embed, forward_fn=_embed_decoder))
    if blenderbot:
        out.append(Layer(BlenderbotInputPipe, (config,), {"is_decoder": True}, prefix="model.decoder."))
        out += [Layer(BlenderbotLayerPipe, (config, i, dec), {"is_decoder": True},
                      renames={"layer.": f"model.decoder.layers.{i}."}) for i in range(dec)]  # fmt: skip
    else:
        out += _t5_sublayers(config, dec, is_decoder=True)
    if config.tie_word_embeddings:
        out.append(Layer(**embed, forward_fn=_tied_head))
    else:
        out.append(Layer(HeadPipe, (config.d_model, config.vocab_size), renames={"weight": "lm_head.weight"}))
    if blenderbot:
        out.append(Layer(LogitsBiasPipe, (config.vocab_size,)))
    return out


def layer_parameter_counts(config) -> list[int]:
    """Parameters of each layer, counted on the meta device (nothing is allocated)."""
    counts = []
    with torch.device("meta"):
        for layer in layers(config):
            module = layer.cls(*layer.args, **layer.kwargs)
            counts.append(sum(p.numel() for p in module.parameters()))
    return counts


def partition(config, stages: int, counts: list[int] | None = None) -> list[int]:
    """Stage boundaries (stages + 1 layer indices), as DeepSpeed's "parameters" method cuts them
    (`counts`: what `layer_parameter_counts(config)` returns, when the caller has it already)."""
    from deepspeed.runtime import utils as ds_utils

    counts = counts or layer_parameter_counts(config)
    if stages > len(counts):
        raise ValueError(f"{stages} pipeline stages for {len(counts)} pipeline layers; use at most {len(counts)}")
    return ds_utils.partition_balanced(weights=counts, num_parts=stages)


def stage_parameter_counts(config, stages: int, counts: list[int] | None = None) -> list[int]:
    counts = counts or layer_parameter_counts(config)
    bounds = partition(config, stages, counts)
    return [sum(counts[bounds[s] : bounds[s + 1]]) for s in range(stages)]


# ---- the DeepSpeed module ------------------------------------------------------------------------


def head_loss(head: tuple[torch.Tensor, ...], labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The loss of the last stage: (hidden, weight[, bias]) against the labels, mean over labels
    != -100 in fp32, by the fused `linear_cross_entropy` (the logits are never built whole)."""
    hidden, weight, *bias = head
    return linear_cross_entropy(hidden, weight, labels, bias=bias[0] if bias else None, label_smoothing=label_smoothing)


def pipeline_module(config, stages: int, *, activation_checkpoint_interval: int = 0, label_smoothing: float = 0.0):
    """The `PipelineModule` of `config`: each rank builds only the layers of its stage; its loss is
    label-smoothed by `label_smoothing`."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    class _Module(PipelineModule):
        def _count_layer_params(self):  # on the meta device, not by building every layer on this rank
            return layer_parameter_counts(config)

    specs = []
    for layer in layers(config):
        if layer.tied:
            specs.append(TiedLayerSpec(layer.tied, layer.cls, *layer.args, forward_fn=layer.forward_fn, **layer.kwargs))
        else:
            specs.append(LayerSpec(layer.cls, *layer.args, **layer.kwargs))
    return _Module(
        layers=specs,
        num_stages=stages,
        loss_fn=functools.partial(head_loss, label_smoothing=label_smoothing),
        partition_method="parameters",
        activation_checkpoint_interval=activation_checkpoint_interval,
        # Only the blocks' layers: DeepSpeed's re-entrant checkpoint needs an input that requires grad,
        # which an embedding's integer ids are not.
        checkpointable_layers=["T5SubLayerPipe", "BlenderbotLayerPipe", "BlenderbotInputPipe"],
        dynamic_shape=True,
    )


def local_layers(module) -> list[tuple[int, nn.Module]]:
    """(global layer index, module) of the layers this rank built (a tied layer's later uses are
    functions of the first one and hold nothing of their own)."""
    return [
        (module._local_start + i, layer) for i, layer in enumerate(module.forward_funcs) if isinstance(layer, nn.Module)
    ]


def _local_tensors(module, config) -> dict[str, list[torch.Tensor]]:
    """Hugging Face name -> this rank's tensors that hold it (a tied embedding: one per stage)."""
    specs = layers(config)
    wanted: dict[str, list[torch.Tensor]] = {}
    for index, layer in local_layers(module):
        for local, tensor in layer.state_dict(keep_vars=True).items():
            wanted.setdefault(specs[index].hf_name(local), []).append(tensor)
    first_tied = {spec.tied: spec for spec in reversed(specs) if spec.tied}
    for key, tied in module.tied_modules.items():
        for local, tensor in tied.state_dict(keep_vars=True).items():
            name = first_tied[key].hf_name(local)
            if not any(t is tensor for t in wanted.get(name, [])):
                wanted.setdefault(name, []).append(tensor)
    return wanted


# Where a directory may keep the shared embedding instead.
_ALIASES = {
    "shared.weight": ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
    "model.shared.weight": ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"),
}


@torch.no_grad()
def load_directory(module, config, path: str | Path) -> None:
    """Fill this rank's layers from a model directory, reading only the tensors its stage holds."""
    wanted = _local_tensors(module, config)
    found: set[str] = set()
    for file in weight_files(Path(path)):
        with open_safetensors(file) as handle:
            keys = set(handle.keys())
            for name, tensors in wanted.items():
                key = next((k for k in (name, *_ALIASES.get(name, ())) if k in keys), None)
                if key is None or name in found:
                    continue
                value = handle.get_tensor(key)
                for tensor in tensors:
                    if tuple(tensor.shape) != tuple(value.shape):
                        raise ValueError(
                            f"{file.name}:{key} is {tuple(value.shape)}; the model wants {tuple(tensor.shape)}"
                        )
                    tensor.copy_(value)
                found.add(name)
    missing = sorted(n for n in set(wanted) - found if n != "final_logits_bias")
    if missing:
        raise ValueError(f"{path} has no weights for {missing[:10]}; check that config.json belongs to them")


@torch.no_grad()
def init_random(module, config) -> None:
    """Hugging Face's initialisation of this rank's layers."""
    if config.model_type == "blenderbot-small":
        from fastseq.models.blenderbot_small import init_blenderbot_module

        for part in module.modules():
            init_blenderbot_module(part, config.init_std)
        return
    for part in module.modules():
        init_t5_module(part, config)
        if isinstance(part, (TokenEmbedding, HeadPipe)):
            nn.init.normal_(part.weight, std=config.initializer_factor)


def state_dict_from_layers(config, layer_states: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Hugging Face names for the layer files of a pipeline checkpoint (`layer_XX-model_states.pt`)."""
    specs = layers(config)
    state = {}
    for index, tensors in layer_states.items():
        for local, tensor in tensors.items():
            state[specs[index].hf_name(local)] = tensor
    if config.model_type == "blenderbot-small":
        state.setdefault("final_logits_bias", torch.zeros(1, config.vocab_size))
    return state
