"""`fastseq plan`: which way to train a model on a cluster, with how much memory, and the command.

The planner takes `fastseq train`'s own options (micro-batch, accumulation, sequence lengths,
optimizer, precision, gradient checkpointing), so its figures are those of the run it prints.

Model states per parameter, DeepSpeed's accounting (its `estimate_zero2/zero3_model_states_mem_needs`
for bf16 with Adam, which the figures match):

    16-bit parameters 2 B, 16-bit gradients 2 B, fp32 gradients 4 B, fp32 master weights 4 B,
    optimizer state s B  (AdamW s = 8)

Adafactor keeps each matrix's second moment factored (rows + columns, fp32), a vector's per element,
and T5's Adafactor no first moment. Under ZeRO it steps the matrices its flat partitions are pieces
of (`fastseq.distributed.partitions`) and keeps the factored moment of each matrix it holds a piece
of whole: under ZeRO-3 every rank holds a piece of every matrix, so each keeps all of them (megabytes)
and 1/N of the vectors'; under ZeRO-1/2 the matrices its partition of the parameters laid end to end
reaches and its elements of the vectors, the largest rank's figure (`end_to_end_state`).

In fp32 the parameters and gradients are 4 B and there is no master copy.
- one process (one GPU, no DeepSpeed): fp32 parameters and gradients, autocast's 16-bit copy of
  the weights, and the optimizer's state (Adafactor's factored rows and columns: O(n + m) per matrix).
- ZeRO-1: parameters and 16-bit gradients replicated, the fp32 state partitioned over all GPUs.
- ZeRO-2: parameters replicated, gradients and the fp32 state partitioned.
- ZeRO-2 + offload optimizer: parameters on each GPU; gradients and fp32 state on the CPU.
- ZeRO-3: everything partitioned, plus the largest layer gathered (4 B per parameter).
- ZeRO-3 + offload optimizer: 16-bit parameters partitioned on the GPUs; the rest on the CPU.
- ZeRO-3 + offload params+optimizer: only the gathered largest layer on a GPU.
- Pipeline (ZeRO-1) x data parallel: a stage's parameters and gradients on each of its GPUs, its fp32
  state partitioned over the data-parallel replicas.
The offload configs run DeepSpeed's CPU AdamW (their "optimizer" section), whatever --optimizer says.
CPU figures carry DeepSpeed's 1.5x allowance for pinned buffers, as its estimators do.

Activations (16-bit elements, or 4 B in fp32) that fastseq's kernels keep for the backward pass (the
fused attention and loss keep no L x L scores and no logits), per token and layer: about
4 d_model + 4 inner + 2 d_ff in the encoder and 6 d_model + 6 inner + 2 d_ff in the decoder
(`_per_token`), plus the embeddings' and final norms' outputs: what the Triton kernels' saved
tensors measured (under the interpreter, within 2%). With gradient checkpointing each layer's input
is kept and one layer at a time is recomputed. At the peak, in the backward pass, come the head's
weight gradient (the fused loss computes it in the forward pass) and the gradients of the layer being
differentiated (`activation_bytes`). A pipeline stage
holds its share of the layers for up to min(stages, accumulation) micro-batches in flight (1F1B).
tests/distributed/test_plan.py checks these figures against the memory a one-process run allocates.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastseq.lora import DEFAULT_TARGETS
from fastseq.memory import GIB, check_parameter_memory, meta_model, parameter_count
from fastseq.optim import factored, factored_numel

from . import config as ds_config
from .partitions import end_to_end, pieces

_BUFFER = 1.5  # DeepSpeed's additional_buffer_factor for CPU memory
HEADROOM = 0.9  # a strategy fits when it needs at most 90% of a GPU's and of a node's memory
LORA_RANK = 16  # the rank the plan offers when only LoRA fits (FLAN-T5 XL/XXL's usual 16, on q and v)
LR_FOR_OFFLOAD = 1e-4  # what the printed command passes when an offload config needs --lr and none was given


@dataclass
class Setup:
    """What a training run does per GPU that changes its memory: `fastseq train`'s options."""

    batch_size: int = 1  # micro-batch per GPU
    grad_accum: int = 1
    source_length: int = 512
    target_length: int = 128
    optimizer: str = "adafactor"
    precision: str = "bf16"  # bf16, fp16 or fp32 (auto resolves to bf16 on GPUs)
    gradient_checkpointing: bool = False
    lora_r: int = 0  # LoRA's rank: the base frozen (in bf16 under mixed precision), the adapters trained
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    pretrained: bool = True  # pretrained weights: LoRA can adapt them (random ones it refuses)

    @property
    def mixed(self) -> bool:
        return self.precision in ("bf16", "fp16")


@dataclass
class Cluster:
    gpus: int
    gpus_per_node: int
    gpu_mem: float  # GiB per GPU
    cpu_mem: float  # GiB per node

    @property
    def nodes(self) -> int:
        return self.gpus // self.gpus_per_node


@dataclass
class Sizes:
    """A model's parameter counts, from its config on the meta device."""

    config: object
    params: int  # unique parameters
    largest: int  # the largest single module's own parameters
    factored_state: int  # bytes of Adafactor's factored second moments of the matrices (rows + columns, fp32)
    vector_state: int  # bytes of Adafactor's second moments of the vectors (one per element, fp32)
    shapes: tuple[tuple[int, ...], ...]  # every unique parameter's shape, in the order the optimizer gets them
    stages: dict[int, int]  # pipeline stages (2, 4, 8 ...) -> the largest stage's parameters
    linears: list[tuple[str, int, int]] = field(default_factory=list)  # each nn.Linear: (its name, in, out)

    def adapters(self, setup: Setup) -> tuple[int, int]:
        """LoRA's adapters under `setup`: their parameters (r x in and out x r per targeted layer) and
        the bytes of the optimizer's state for them (AdamW's two moments; Adafactor's factored ones)."""
        r = setup.lora_r
        shapes = [shape for name, n_in, n_out in self.linears if name in setup.lora_targets
                  for shape in ((r, n_in), (n_out, r))]  # fmt: skip
        count = sum(a * b for a, b in shapes)
        if setup.optimizer == "adamw":
            return count, 8 * count
        return count, sum(4 * factored_numel(shape) for shape in shapes)


@dataclass
class Row:
    strategy: str
    config: str | None  # the shipped DeepSpeed config (None: one process, no DeepSpeed)
    params: float  # bytes per GPU
    grads: float
    optimizer: float
    activations: float
    cpu_per_node: float  # bytes
    rank: int = 0  # communication cost order: lower is cheaper
    note: str = ""  # said under the recommendation
    cpu_adamw: bool = False  # the config's optimizer (DeepSpeed's CPU AdamW) replaces --optimizer

    @property
    def gpu_total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


@dataclass
class Verdict:
    """Whether a row fits, and if not, the smallest change of options that makes it fit."""

    row: Row
    fits: bool
    change: dict = field(default_factory=dict)  # option -> value that makes it fit ({} if none does)


def model_sizes(config) -> Sizes:
    """Parameter counts of the model `config` describes, counted on the meta device."""
    model = meta_model(config)
    unique = {id(p): p for p in model.parameters()}.values()
    total = parameter_count(config)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    matrices = [4 * factored_numel(tuple(p.shape)) for p in unique if factored(tuple(p.shape))]
    vectors = sum(4 * p.numel() for p in unique if not factored(tuple(p.shape)))
    shapes = tuple(tuple(p.shape) for p in unique)
    linears = [(name.rsplit(".", 1)[-1], m.in_features, m.out_features) for name, m in model.named_modules()
               if type(m) is torch.nn.Linear]  # fmt: skip
    return Sizes(config, total, largest, sum(matrices), vectors, shapes, _stage_sizes(config), linears)


def _stage_sizes(config) -> dict[int, int]:
    from .stages import layer_parameter_counts, stage_parameter_counts

    counts = layer_parameter_counts(config)
    sizes, stages = {}, 2
    while stages <= len(counts):
        sizes[stages] = max(stage_parameter_counts(config, stages, counts))
        stages *= 2
    return sizes


def _per_token(config) -> tuple[int, int, int, int, int, int]:
    """(encoder layers, decoder layers, d_model, elements an encoder layer keeps per token, the same for
    a decoder layer, and per source token for each decoder layer), as the kernels save them for the
    backward pass (inner = heads x d_kv):
    - encoder layer: both norms' inputs and outputs (4 d_model), q, k, v and the attention output
      (4 inner), the FFN's two input projections (2 d_ff; the fused FFN recomputes the rest);
    - decoder layer: three norms' inputs and outputs (6 d_model), self-attention's q, k, v and output
      and cross-attention's q and output (6 inner), the FFN's 2 d_ff;
    - cross-attention's keys and values of the encoder output: 2 inner per source token and decoder layer."""
    if config.model_type == "blenderbot-small":
        enc, dec, d, ff = config.encoder_layers, config.decoder_layers, config.d_model, config.encoder_ffn_dim
        inner = d
    else:
        enc, dec, d, ff = config.num_layers, config.num_decoder_layers, config.d_model, config.d_ff
        inner = config.num_heads * config.d_kv
    return enc, dec, d, 4 * d + 4 * inner + 2 * ff, 6 * d + 6 * inner + 2 * ff, 2 * inner


def activation_bytes(config, setup: Setup) -> float:
    """Activations of one micro-batch at their peak, in the backward pass (see the module's docstring):
    what the forward pass kept, the head's weight gradient that the fused loss computes in the forward
    pass (vocabulary x d_model, fp32), and the gradients of the layer being differentiated: about one
    more layer's worth; with checkpointing, that layer recomputed and differentiated: about 1.8 layers
    (fitted to the kernels' measured peak on two configurations, within 9%)."""
    enc, dec, d, enc_layer, dec_layer, cross = _per_token(config)
    size = 2 if setup.mixed else 4
    source = setup.batch_size * setup.source_length
    target = setup.batch_size * setup.target_length
    ends = (
        2 * d * (source + target)
    )  # the embeddings' outputs and the final norms' (the encoder output, the head's input)
    layer = max(source * enc_layer, target * dec_layer + source * cross)  # the largest layer's activations
    if setup.gradient_checkpointing:
        kept = d * (source * enc + target * dec)  # each layer's input
        return size * (ends + kept + 1.8 * layer) + 4 * config.vocab_size * d
    kept = source * (enc_layer * enc + cross * dec) + target * dec_layer * dec
    return size * (ends + kept + layer) + 4 * config.vocab_size * d


def end_to_end_state(shapes: tuple[tuple[int, ...], ...], ranks: int) -> list[int]:
    """Adafactor's state bytes (fp32) on each of `ranks` ranks under ZeRO-1/2, for one parameter group
    of `shapes`: DeepSpeed lays the parameters end to end in one flat buffer (no per-parameter
    padding: its default `parameter_alignment` false), pads it to a multiple of 2 x ranks elements and
    cuts it into equal partitions. A rank keeps the whole factored moment of each matrix its
    partition reaches, and one value per element it holds of the vectors."""
    numels = [math.prod(shape) for shape in shapes]
    align = 2 * ranks
    size = -(-sum(numels) // align) * align // ranks
    state = []
    for rank in range(ranks):
        held = pieces(numels, end_to_end(numels), rank * size, (rank + 1) * size)
        state.append(sum(4 * (factored_numel(shapes[p.index]) if factored(shapes[p.index]) else p.length)
                         for p in held))  # fmt: skip
    return state


def optimizer_bytes(setup: Setup, sizes: Sizes, ranks: int = 1, every_matrix: bool = False) -> float:
    """The optimizer's own state per GPU when `ranks` partition it (see the module's docstring):
    AdamW's two moments, or Adafactor's second moments, with every matrix's factored moment on each
    rank under ZeRO-3 (`every_matrix`), and under ZeRO-1/2 the largest rank's (`end_to_end_state`)."""
    if setup.optimizer == "adamw":
        return 8 * sizes.params / ranks
    if every_matrix:
        return sizes.factored_state + sizes.vector_state / ranks
    return max(end_to_end_state(sizes.shapes, ranks))


def plan(sizes: Sizes, cluster: Cluster, setup: Setup) -> list[Row]:
    """Per-GPU and per-node memory of each strategy for the model of `sizes` on `cluster`."""
    P, N, per_node = sizes.params, cluster.gpus, cluster.gpus_per_node
    acts = activation_bytes(sizes.config, setup)
    if setup.lora_r:
        return _lora_rows(sizes, cluster, setup, acts)
    w = 2 if setup.mixed else 4  # parameter (and gradient) bytes on the GPU
    fp32_grads, master = (4, 4) if setup.mixed else (0, 0)
    adam = 8 * P  # the offload configs' CPU AdamW
    gathered = (2 * w) * sizes.largest
    rows = []
    if N == 1:
        rows.append(Row("one process (no DeepSpeed)", None, (4 + (2 if setup.mixed else 0)) * P, 4 * P,
                        optimizer_bytes(setup, sizes), acts, 4 * P * _BUFFER, 0))  # fmt: skip
    model_cpu = 4 * P * per_node * _BUFFER  # each rank reads the model on the CPU
    sharded_state = master * P / N + optimizer_bytes(setup, sizes, N)
    offloaded = dict(grads=0, optimizer=0, activations=acts, cpu_adamw=True)
    rows += [
        Row("ZeRO-1", "zero1", w * P, w * P + fp32_grads * P / N, sharded_state, acts, model_cpu, rank=1),
        Row("ZeRO-2", "zero2", w * P, (w + fp32_grads) * P / N, sharded_state, acts, model_cpu, rank=2),
        Row(
            "ZeRO-2 + offload optimizer",
            "zero2_offload",
            w * P,
            cpu_per_node=P * max(4 * N, 16) * _BUFFER,
            rank=3,
            **offloaded,
        ),  # fmt: skip
        Row(
            "ZeRO-3",
            "zero3",
            w * P / N + gathered,
            4 * P / N,
            master * P / N + optimizer_bytes(setup, sizes, N, every_matrix=True),
            acts,
            4 * sizes.largest * per_node * _BUFFER,
            rank=4,
        ),  # fmt: skip
        *_pipelines(sizes, cluster, setup, acts, optimizer_bytes(setup, sizes) / P, fp32_grads + master),
        Row(
            "ZeRO-3 + offload optimizer",
            "zero3_offload_optimizer",
            w * P / N + gathered,
            cpu_per_node=(8 * P + adam) / cluster.nodes * _BUFFER,
            rank=20,
            **offloaded,
        ),  # fmt: skip
        Row(
            "ZeRO-3 + offload params+optimizer",
            "zero3_offload",
            gathered,
            cpu_per_node=(10 * P + adam) / cluster.nodes * _BUFFER,
            rank=21,
            **offloaded,
        ),  # fmt: skip
    ]
    return rows


def _lora_rows(sizes: Sizes, cluster: Cluster, setup: Setup, acts: float) -> list[Row]:
    """LoRA: the frozen base has no gradients and no optimizer state; the adapters (A parameters) have
    fp32 weights, gradients and state, partitioned under ZeRO. One process holds the base in bf16 under
    mixed precision (no fp32 copy: it never changes); DeepSpeed holds the whole module in the config's
    precision and an fp32 master copy of the adapters. Pipeline stages do not run LoRA, and offloading
    an optimizer state of megabytes gains nothing: those rows are left out."""
    P, N, per_node = sizes.params, cluster.gpus, cluster.gpus_per_node
    A, state = sizes.adapters(setup)
    w = 2 if setup.mixed else 4
    fp32_grads, master = (4, 4) if setup.mixed else (0, 0)
    gathered = (2 * w) * sizes.largest
    rows = []
    if N == 1:
        rows.append(Row("one process (no DeepSpeed)", None, w * P + 4 * A, 4 * A, state, acts, 4 * P * _BUFFER, 0))
    model_cpu = 4 * P * per_node * _BUFFER
    adapters_state = master * A / N + state / N
    return rows + [
        Row("ZeRO-1", "zero1", w * (P + A), (w + fp32_grads / N) * A, adapters_state, acts, model_cpu, rank=1),
        Row("ZeRO-2", "zero2", w * (P + A), (w + fp32_grads) * A / N, adapters_state, acts, model_cpu, rank=2),
        Row("ZeRO-3", "zero3", w * (P + A) / N + gathered, 4 * A / N, adapters_state, acts,
            4 * sizes.largest * per_node * _BUFFER, rank=4),
    ]  # fmt: skip


def _pipelines(sizes: Sizes, cluster: Cluster, setup: Setup, acts: float, state_per_param: float, fp32_state: int):
    """Pipeline x data parallel rows for 2, 4, 8 ... stages that divide the GPUs."""
    w = 2 if setup.mixed else 4
    shipped = set(ds_config.shipped())
    rows = []
    for stages, stage in sizes.stages.items():
        if stages <= cluster.gpus and cluster.gpus % stages == 0:
            data_parallel = cluster.gpus // stages
            in_flight = min(stages, setup.grad_accum)  # 1F1B: the first stage's micro-batches in flight
            name = "pipeline" if stages == 2 else f"pipeline{stages}"
            rows.append(Row(
                f"pipeline {stages} stages x {data_parallel} data parallel", name if name in shipped else None,
                w * stage, w * stage, (fp32_state + state_per_param) * stage / data_parallel,
                acts * in_flight / stages, 4 * stage * cluster.gpus_per_node * _BUFFER, 10 + stages.bit_length(),
                "" if setup.grad_accum >= 2 * stages else
                f"with --grad-accum {setup.grad_accum} the stages wait for each other most of a step (the pipeline "
                f"bubble): raise --grad-accum well above {stages}",
            ))  # fmt: skip
    return rows


def fits(row: Row, cluster: Cluster) -> bool:
    # 10% of a GPU is left for the CUDA context, the allocator's fragmentation and temporary buffers,
    # and 10% of a node's memory for the system and the data pipeline.
    return row.gpu_total <= HEADROOM * cluster.gpu_mem * GIB and row.cpu_per_node <= HEADROOM * cluster.cpu_mem * GIB


def _changes(setup: Setup) -> list[dict]:
    """Changes of options that lower memory, cumulative, in the order a user would try them."""
    steps, change = [], {}
    if not setup.gradient_checkpointing:
        change = {**change, "gradient_checkpointing": True}
        steps.append(change)
    if setup.optimizer != "adafactor":
        change = {**change, "optimizer": "adafactor"}
        steps.append(change)
    if not setup.mixed:
        change = {**change, "precision": "bf16"}
        steps.append(change)
    batch, accum = setup.batch_size, setup.grad_accum
    while batch > 1:  # the same examples per step: half the micro-batch, twice the accumulation
        batch, accum = (batch + 1) // 2, accum * 2
        change = {**change, "batch_size": batch, "grad_accum": accum}
        steps.append(change)
    if not setup.lora_r and setup.pretrained:  # the last resort (adapters, not every weight): alone, then with the rest
        steps += [{"lora_r": LORA_RANK}, {**change, "lora_r": LORA_RANK}]
    return steps


def verdicts(sizes: Sizes, cluster: Cluster, setup: Setup) -> list[Verdict]:
    """Each strategy, whether it fits as asked, and otherwise the first change that makes it fit."""
    rows = plan(sizes, cluster, setup)
    out = [Verdict(row, fits(row, cluster)) for row in rows]
    for change in _changes(setup):
        changed = {r.strategy: r for r in plan(sizes, cluster, dataclasses.replace(setup, **change))}
        for verdict in out:
            row = changed.get(verdict.row.strategy)  # LoRA plans no pipeline and no offload
            if not verdict.fits and not verdict.change and row is not None and fits(row, cluster):
                verdict.change = change
    return out


def recommend(found: list[Verdict], cluster: Cluster) -> tuple[Verdict | None, str]:
    """The cheapest in communication of the strategies that fit (a shipped config or one process),
    else of those a change of options makes fit; and the reason, in words."""
    usable = [v for v in found if v.row.config is not None or v.row.rank == 0]
    fitting = sorted((v for v in usable if v.fits), key=lambda v: v.row.rank)
    if fitting:
        best = fitting[0]
        cheaper = [v for v in usable if v.row.rank < best.row.rank]
        why = "the least communication of the strategies that fit with 10% headroom"
        if cheaper:
            why += "; cheaper ones do not fit (" + "; ".join(shortfall(v.row, cluster) for v in cheaper) + ")"
        return best, why
    changed = sorted((v for v in usable if v.change), key=lambda v: (len(v.change), v.row.rank))
    if changed:
        best = changed[0]
        return best, f"nothing fits as asked; with {_flags(best.change)} it does, with the least communication"
    return None, "nothing fits, whatever the options: add GPUs, GPU memory or host memory"


def judge(chosen: Verdict, cluster: Cluster) -> tuple[Verdict | None, str]:
    """The verdict on the one strategy a user chose (`--deepspeed`), in words."""
    if chosen.fits:
        return chosen, "the config you chose fits with 10% headroom"
    if chosen.change:
        return chosen, f"the config you chose does not fit as asked; with {_flags(chosen.change)} it does"
    return None, f"the config you chose does not fit, whatever the options: {shortfall(chosen.row, cluster)}"


def shortfall(row: Row, cluster: Cluster) -> str:
    """What a row needs beyond the cluster's memory (with the headroom), in words."""
    needs = []
    if row.gpu_total > HEADROOM * cluster.gpu_mem * GIB:
        needs.append(f"{row.gpu_total / GIB:.1f} GiB per GPU of {HEADROOM * cluster.gpu_mem:.1f} usable")
    if row.cpu_per_node > HEADROOM * cluster.cpu_mem * GIB:
        needs.append(
            f"{row.cpu_per_node / GIB:.1f} GiB host memory per node of {HEADROOM * cluster.cpu_mem:.1f} usable"
        )
    return f"{row.strategy} needs {' and '.join(needs)}"


def _flags(change: dict) -> str:
    parts = []
    for name, value in change.items():
        flag = "--" + name.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


# ---- the command ------------------------------------------------------------------------------------


def setup_of(args, config) -> Setup:
    """The Setup of a `TrainArgs` for the model of `config` (precision auto: bf16, as on a GPU; the
    source length `fastseq train` would use)."""
    from fastseq.train.data import max_source_length

    return Setup(batch_size=args.batch_size, grad_accum=args.grad_accum, source_length=max_source_length(args, config),
                 target_length=args.max_target_length, optimizer=args.optimizer,
                 precision="bf16" if args.precision == "auto" else args.precision,
                 gradient_checkpointing=args.gradient_checkpointing, lora_r=args.lora_r,
                 lora_targets=args.lora.targets if args.lora else DEFAULT_TARGETS,
                 pretrained=_pretrained(args))  # fmt: skip


def strategy_of(config: dict) -> str:
    """The shipped config a DeepSpeed config is equivalent to, for the plan's memory figures."""
    stages = ds_config.pipeline_stages(config)
    if stages:
        return "pipeline" if stages == 2 else f"pipeline{stages}"
    zero = config.get("zero_optimization", {})
    offloaded = {k for k in ("offload_optimizer", "offload_param") if zero.get(k, {}).get("device", "none") != "none"}
    stage = ds_config.zero_stage(config)
    if stage == 3:
        return {0: "zero3", 1: "zero3_offload_optimizer", 2: "zero3_offload"}[len(offloaded)]
    if stage == 2:
        return "zero2_offload" if offloaded else "zero2"
    return "zero1"


MASTER_PORT = 29500  # DeepSpeed's and torchrun's default rendezvous port


def _train_flags(verdict: Verdict, options: dict) -> list[str]:
    """`fastseq train`'s flags for `verdict`'s strategy: the options given and the change that makes
    it fit (the offload configs' CPU AdamW needs --optimizer adamw and an --lr)."""
    import shlex

    options = {k: v for k, v in {**options, **verdict.change}.items() if k != "deepspeed"}
    if verdict.row.cpu_adamw:  # the config's optimizer: --lr fills its "lr": "auto"
        options.update(optimizer="adamw", lr=options.get("lr") or LR_FOR_OFFLOAD)
    flags = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False and value is not None:
            flags += [flag, shlex.quote(str(value))]
    return flags


def command(verdict: Verdict, options: dict, cluster: Cluster, deepspeed: str | None = None) -> str:
    """The launch command of `verdict`'s strategy with the train options `options` (field -> value,
    in TrainArgs order) and the change that makes it fit."""
    import shlex

    flags = _train_flags(verdict, options)
    if verdict.row.config is None:
        return " ".join(["fastseq", "train", *flags])
    launcher = ["deepspeed"]
    if cluster.nodes > 1:
        launcher += ["--hostfile", "HOSTFILE", "--num_nodes", str(cluster.nodes)]
    launcher += ["--num_gpus", str(cluster.gpus_per_node), "--module", "fastseq.train"]
    return " ".join([*launcher, "--deepspeed", shlex.quote(deepspeed or verdict.row.config), *flags])


def node_commands(verdict: Verdict, options: dict, cluster: Cluster, deepspeed: str | None = None) -> list[str]:
    """For more than one node, the launches that need no ssh between nodes, each run on every node
    (node R of 0 ... nodes - 1; MASTER the first node's address): DeepSpeed's launcher with --no_ssh
    (it reads the hostfile for the world's shape), and torchrun."""
    import shlex

    if cluster.nodes < 2 or verdict.row.config is None:
        return []
    train = ["--deepspeed", shlex.quote(deepspeed or verdict.row.config), *_train_flags(verdict, options)]
    nodes, per_node = str(cluster.nodes), str(cluster.gpus_per_node)
    return [
        " ".join(["deepspeed", "--hostfile", "HOSTFILE", "--no_ssh", "--num_nodes", nodes, "--node_rank", "R",
                  "--master_addr", "MASTER", "--master_port", str(MASTER_PORT), "--num_gpus", per_node, "--module",
                  "fastseq.train", *train]),
        " ".join(["torchrun", "--nnodes", nodes, "--node-rank", "R", "--nproc-per-node", per_node, "--master-addr",
                  "MASTER", "--master-port", str(MASTER_PORT), "-m", "fastseq.train", *train]),
    ]  # fmt: skip


def table(found: list[Verdict], cluster: Cluster) -> str:
    head = (f"{'strategy':<38} {'params':>7} {'grads':>7} {'optim':>7} {'acts':>7} {'per GPU':>7} "
            f"{'GPU per node':>12} {'host per node':>13}  fits  config")  # fmt: skip
    lines = [head, "-" * len(head)]
    for v in found:
        r = v.row
        fit = "yes" if v.fits else "no"
        lines.append(
            f"{r.strategy:<38} {r.params / GIB:7.1f} {r.grads / GIB:7.1f} {r.optimizer / GIB:7.1f} "
            f"{r.activations / GIB:7.1f} {r.gpu_total / GIB:7.1f} {r.gpu_total * cluster.gpus_per_node / GIB:12.1f} "
            f"{r.cpu_per_node / GIB:13.1f}  {fit:<4}  {r.config or '-'}"
        )
    return "\n".join(lines)


_SETUP_FIELDS = {f.name for f in dataclasses.fields(Setup)}


def lora_line(sizes: Sizes, cluster: Cluster, setup: Setup) -> str:
    """What LoRA trains under `setup`, and on one GPU what a bf16 and an 8-bit base need."""
    count, _ = sizes.adapters(setup)
    line = (f"LoRA r={setup.lora_r} on {','.join(setup.lora_targets)}: {count / 1e6:.1f}M adapter parameters "
            f"({100 * count / sizes.params:.2f}% of the model) train, with their gradients and optimizer state; the "
            "base is frozen")  # fmt: skip
    if cluster.gpus == 1 and setup.mixed:
        one = plan(sizes, cluster, setup)[0]
        eight_bit = one.gpu_total - sizes.params  # 1 B per base parameter instead of 2
        line += (f". One GPU needs {one.gpu_total / GIB:.1f} GiB with a bf16 base (fastseq's), "
                 f"{eight_bit / GIB:.1f} GiB with an 8-bit one (bitsandbytes' int8, not a base fastseq "
                 "trains)")  # fmt: skip
    return line


def _pretrained(args) -> bool:
    """Whether the planned run fine-tunes pretrained weights: a model named without --random-init (a
    preset's name or a hub id that `fastseq train` downloads, which planning does not)."""
    return args.model is not None and not args.random_init


def _model_config(args):
    """The planned model's config: a preset's published config by its name (planning needs no
    weights, so no --random-init and no download); otherwise a model directory or a hub id as
    `fastseq train` resolves them."""
    from fastseq import presets
    from fastseq.train.engine import model_config

    if args.model in presets.PRESETS and not Path(args.model).is_dir():
        return presets.config(args.model)
    return model_config(args)


def show(args, options: dict, cluster: Cluster, *, cpu_from_machine: bool) -> None:
    """`fastseq plan`: the table of strategies for `args.model` on `cluster`, what would make the
    others fit, the recommended one with the reason, and its launch command.

    args: the run's TrainArgs; options: the train options given (field -> value) for the command."""
    config = _model_config(args)
    args.check_lora(config, _pretrained(args), needs_peft=False)  # refused here as `fastseq train` refuses them
    check_parameter_memory(config, cluster.gpus * cluster.gpu_mem * GIB + cluster.nodes * cluster.cpu_mem * GIB,
                           "the cluster's GPU and host memory together,")  # fmt: skip
    if args.deepspeed:  # the config a user chose is refused here as `fastseq train` refuses it
        asked = ds_config.load(args.deepspeed)
        ds_config.resolve_run(asked, args, config, cluster.gpus)
    sizes = model_sizes(config)
    setup = setup_of(args, config)
    found = verdicts(sizes, cluster, setup)
    host = "this machine's memory; --cpu-mem to change it" if cpu_from_machine else "--cpu-mem"
    options_text = (f"micro-batch {setup.batch_size} x {setup.source_length} -> {setup.target_length} tokens, "
                    f"accumulation {setup.grad_accum}, {setup.precision}, {setup.optimizer}"
                    f"{', gradient checkpointing' if setup.gradient_checkpointing else ''}")  # fmt: skip
    print(f"{args.model or 'the default model'}: {sizes.params / 1e9:.2f}B parameters (largest layer "
          f"{sizes.largest / 1e6:.0f}M) on {cluster.gpus} GPU(s) ({cluster.gpus_per_node} per node) of "
          f"{cluster.gpu_mem:g} GiB, {cluster.cpu_mem:.1f} GiB host memory per node ({host}); "
          f"{options_text}. GiB:")  # fmt: skip
    print(table(found, cluster))
    if setup.optimizer == "adafactor" and not setup.lora_r:
        zero3 = optimizer_bytes(setup, sizes, cluster.gpus, every_matrix=True) / 2**20
        zero12 = optimizer_bytes(setup, sizes, cluster.gpus) / 2**20
        master = "; the optim column adds the fp32 master weights" if setup.mixed else ""
        print(f"optim: Adafactor's second moments, factored per matrix ({sizes.factored_state / 2**20:.1f} MiB for "
              f"the model): per GPU {zero3:.1f} MiB under ZeRO-3, {zero12:.1f} MiB under ZeRO-1/2{master}")  # fmt: skip
    fitting = [v.row.strategy for v in found if v.fits]
    print(f"fits: {', '.join(fitting) if fitting else 'nothing as asked'}")
    for v in found:
        if not v.fits:
            how = f"fits with {_flags(v.change)}" if v.change else "no change of options makes it fit"
            print(f"  {shortfall(v.row, cluster)}; {how}")
    if args.deepspeed:
        wanted = strategy_of(asked)
        chosen = [v for v in found if v.row.config == wanted]
        if not chosen:
            raise ValueError(f"--deepspeed {args.deepspeed} is a {wanted} config, which {cluster.gpus} GPUs cannot run")
        best, why = judge(chosen[0], cluster)
    else:
        best, why = recommend(found, cluster)
    if best is None:
        print(f"recommended: none; {why}")
        return
    lora = dataclasses.replace(setup, **{k: v for k, v in best.change.items() if k in _SETUP_FIELDS})
    if lora.lora_r:
        print(lora_line(sizes, cluster, lora))
    config_text = f" (config {ds_config.find(args.deepspeed or best.row.config)})" if best.row.config else ""
    print(f"recommended: {best.row.strategy}{config_text}: {why}")
    if best.row.cpu_adamw:
        print("  its config trains with DeepSpeed's CPU AdamW (--optimizer adamw); set --lr to yours")
    if best.row.note:
        print(f"  {best.row.note}")
    if cluster.nodes > 1:
        print(f"  HOSTFILE: one line per node, `hostname slots={cluster.gpus_per_node}` (DeepSpeed's hostfile), the "
              "same on every node")  # fmt: skip
    print(command(best, options, cluster, args.deepspeed))
    forms = node_commands(best, options, cluster, args.deepspeed)
    if forms:
        print(f"or, without ssh between the nodes (SLURM, Kubernetes), on each node R = 0 ... {cluster.nodes - 1} "
              f"({cluster.gpus_per_node} ranks each; MASTER: node 0's address; --output-dir on a disk every node "
              "shares):")  # fmt: skip
        print("\n".join(forms))
