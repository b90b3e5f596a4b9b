"""`fastseq plan`: which DeepSpeed strategy fits a model on a cluster, and with how much memory.

Model states are counted per parameter, for bf16 mixed precision with Adam (DeepSpeed's accounting,
so the figures agree with its `estimate_zero2/zero3_model_states_mem_needs`):

    16-bit parameters 2 B, 16-bit gradients 2 B, fp32 gradients 4 B, fp32 master weights 4 B,
    Adam moments 8 B  ->  18 B per parameter beyond the 16-bit parameters

- ZeRO-2: parameters replicated (2 P), the other 18 P partitioned over all GPUs.
- ZeRO-2 + optimizer offload: 2 P on each GPU; the 16 P of fp32 state on the CPU.
- ZeRO-3: everything partitioned, 18 P / N (16-bit parameters 2 B, gradients 4 B, fp32 master
  weights and Adam moments 12 B), plus the largest layer gathered (4 B per parameter).
- ZeRO-3 + optimizer offload: 2 P / N on the GPUs; 16 P on the CPUs.
- ZeRO-3 + parameter and optimizer offload: only the gathered largest layer on a GPU; 18 P on the CPUs.
- Pipeline (ZeRO-1) x data parallel: a stage's 16-bit parameters and gradients on each of its GPUs,
  its fp32 state partitioned over the data-parallel replicas.
CPU figures carry DeepSpeed's 1.5x allowance for pinned buffers, as its estimators do.

Activations are an estimate for fastseq's kernels, without activation checkpointing (bf16, per
token and layer: about 16 d_model + 2 d_ff bytes in the encoder, 22 d_model + 2 d_ff in the
decoder; the fused attention and loss keep no L x L scores and no logits). A pipeline stage holds
the activations of up to `stages` micro-batches in flight (1F1B).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastseq import presets

GIB = 2**30
_BUFFER = 1.5  # DeepSpeed's additional_buffer_factor for CPU memory


@dataclass
class Row:
    strategy: str
    params: float  # bytes per GPU
    grads: float
    optimizer: float
    activations: float
    cpu_per_node: float  # bytes

    @property
    def gpu_total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


def model_sizes(preset: str) -> tuple[int, int, object]:
    """(unique parameters, largest single module's own parameters, config) counted on the meta device."""
    model = presets.build(preset, device="meta")
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest, model.config


def _layers(config) -> tuple[int, int, int, int]:
    if config.model_type == "blenderbot-small":
        return config.encoder_layers, config.decoder_layers, config.d_model, config.encoder_ffn_dim
    return config.num_layers, config.num_decoder_layers, config.d_model, config.d_ff


def activation_bytes(config, batch: int, seq: int, target: int, layer_fraction: float = 1.0) -> float:
    """bf16 activations of one micro-batch of `batch` examples kept for the backward pass."""
    enc, dec, d, ff = _layers(config)
    per_encoder_token = 2 * (16 * d + 2 * ff) * enc
    per_decoder_token = 2 * (22 * d + 2 * ff) * dec
    return layer_fraction * batch * (seq * per_encoder_token + target * per_decoder_token)


def plan(preset: str, *, gpus: int, gpus_per_node: int | None = None, batch: int = 1, seq: int = 512,
         target: int = 128, sizes: tuple | None = None) -> list[Row]:  # fmt: skip
    """Per-GPU and per-node memory of each strategy for `preset` on `gpus` GPUs (`sizes`: what
    `model_sizes(preset)` returns, when the caller has it already)."""
    gpus_per_node = gpus_per_node or min(gpus, 8)
    if gpus % gpus_per_node:
        raise ValueError(f"--gpus {gpus} is not a multiple of --gpus-per-node {gpus_per_node}")
    nodes = gpus // gpus_per_node
    P, largest, config = sizes or model_sizes(preset)
    acts = activation_bytes(config, batch, seq, target)
    gathered = 4 * largest
    rows = [
        Row("ZeRO-2", 2 * P, 6 * P / gpus, 12 * P / gpus, acts, 4 * P * gpus_per_node * _BUFFER),
        Row("ZeRO-2 + offload optimizer", 2 * P, 0, 0, acts, P * max(4 * gpus, 16) * _BUFFER),
        Row(
            "ZeRO-3", 2 * P / gpus + gathered, 4 * P / gpus, 12 * P / gpus, acts, largest * 4 * gpus_per_node * _BUFFER
        ),  # fmt: skip
        Row("ZeRO-3 + offload optimizer", 2 * P / gpus + gathered, 0, 0, acts, 16 * P / nodes * _BUFFER),
        Row("ZeRO-3 + offload params+optimizer", gathered, 0, 0, acts, 18 * P / nodes * _BUFFER),
    ]
    from .stages import layer_parameter_counts, stage_parameter_counts

    layer_count = len(layer_parameter_counts(config))
    stages = 2
    while stages <= min(gpus, layer_count):
        if gpus % stages == 0:
            data_parallel = gpus // stages
            stage = max(stage_parameter_counts(config, stages))
            # 1F1B: the first stage keeps `stages` micro-batches of its 1/stages of the layers.
            rows.append(
                Row(
                    f"pipeline {stages} stages x {data_parallel} data parallel",
                    2 * stage,
                    2 * stage,
                    (4 + 4 + 8) * stage / data_parallel,
                    acts,
                    4 * stage * gpus_per_node * _BUFFER,
                )  # fmt: skip
            )
        stages *= 2
    return rows


def fits(row: Row, gpu_mem_gb: float, cpu_mem_gb: float) -> bool:
    # 10% of a GPU is left for the CUDA context, the allocator's fragmentation and temporary buffers.
    return row.gpu_total <= 0.9 * gpu_mem_gb * GIB and row.cpu_per_node <= cpu_mem_gb * GIB


def table(rows: list[Row], *, gpu_mem_gb: float, cpu_mem_gb: float, gpus_per_node: int) -> str:
    head = (f"{'strategy':<38} {'params':>8} {'grads':>8} {'optim':>8} {'acts':>8} {'GPU':>8} "
            f"{'per node GPU':>13} {'per node CPU':>13}  fits")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.strategy:<38} {r.params / GIB:8.1f} {r.grads / GIB:8.1f} {r.optimizer / GIB:8.1f} "
            f"{r.activations / GIB:8.1f} {r.gpu_total / GIB:8.1f} {r.gpu_total * gpus_per_node / GIB:13.1f} "
            f"{r.cpu_per_node / GIB:13.1f}  {'yes' if fits(r, gpu_mem_gb, cpu_mem_gb) else 'no'}"
        )
    return "\n".join(lines)


def show(model: str, *, gpus: int, gpus_per_node: int | None, gpu_mem: float, cpu_mem: float, batch: int, seq: int,
         target: int) -> None:  # fmt: skip
    """`fastseq plan`: print the table of strategies for `model` on the cluster, and what fits."""
    gpus_per_node = gpus_per_node or min(gpus, 8)
    sizes = model_sizes(model)
    rows = plan(model, gpus=gpus, gpus_per_node=gpus_per_node, batch=batch, seq=seq, target=target, sizes=sizes)
    P, largest, _ = sizes
    print(f"{model}: {P / 1e9:.2f}B parameters (largest layer {largest / 1e6:.0f}M) on {gpus} GPUs "
          f"({gpus_per_node} per node) of {gpu_mem:g} GB, {cpu_mem:g} GB CPU per node; "
          f"micro-batch {batch} x {seq} -> {target} tokens, bf16 + Adam. GiB:")  # fmt: skip
    print(table(rows, gpu_mem_gb=gpu_mem, cpu_mem_gb=cpu_mem, gpus_per_node=gpus_per_node))
    fitting = [r.strategy for r in rows if fits(r, gpu_mem, cpu_mem)]
    print(f"fits: {', '.join(fitting) if fitting else 'nothing; add GPUs or CPU memory, or shorten the batch'}")
