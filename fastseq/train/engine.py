"""The engines the training loop runs on. An engine builds the model and optimizer, runs
forward-backward on the micro-batches of a step, steps the optimizer, saves and loads its state,
and writes the trained model; nothing else. The loop (`fastseq.train.loop`) does the rest, the
same for every engine.

`LocalEngine` is one process on one device. DeepSpeed ZeRO and pipeline stages are in
`fastseq.distributed`."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from fastseq import hub, presets
from fastseq.checkpoint import fit_embeddings, from_pretrained, read_model_config, stored_embeddings
from fastseq.files import SAFE_INDEX, SAFE_WEIGHTS, SHARD_RE, copy_file, save_safetensors, write_json
from fastseq.hub import HubModelNotFound, model_directory
from fastseq.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from fastseq.models import FAMILIES, T5Config
from fastseq.models.base import GENERATION_CONFIG
from fastseq.optim import make_optimizer, make_schedule
from fastseq.tokenizers import ByT5Tokenizer, Tokenizer, check_vocabulary, load_tokenizer

from .args import TrainArgs
from .state import check_optimizer_state, check_scheduler_state, read_tensors

_T5_FAMILY = ("t5", "mt5", "longt5", "umt5")
# What `Engine.save_weights` writes of a model into a directory (besides the safetensors shards).
MODEL_FILES = ("config.json", GENERATION_CONFIG, SAFE_WEIGHTS, SAFE_INDEX, ADAPTER_CONFIG, ADAPTER_WEIGHTS)
log = logging.getLogger("fastseq.train")


class NonFiniteError(FloatingPointError):
    """The loss or the gradient of a step is not finite; nothing of that step was kept or saved."""


class Engine:
    """How a run executes. Attributes the loop reads:
    - `name`: how the summary line calls it;
    - `kind`: what its checkpoints are ("one process", "DeepSpeed ZeRO-2", ...): a checkpoint
      resumes only on the kind and number of ranks that wrote it;
    - `device`, `rank`, `world`: this process, and how many run;
    - `node_first`: whether this rank is the first on its node (it renames its node's part of a
      checkpoint when each node writes the output directory on its own disk);
    - `data_parallel`, `data_rank`: how many different micro-batches a step's micro-batch slot
      gets, and which one is this rank's;
    - `model`: the module to evaluate (greedy decoding), or None where the engine cannot;
    - `autocast`: the dtype evaluation runs under, or None."""

    name = "engine"
    kind = "one process"
    device = torch.device("cpu")
    rank, world = 0, 1
    node_first = True
    data_parallel, data_rank = 1, 0
    model: nn.Module | None = None
    autocast: torch.dtype | None = None
    adapters = None  # under LoRA: the peft wrapper of `model`'s adapters (`fastseq.lora`)

    def build(self, config) -> None:
        """Build the model (random, or from `--model`'s directory) and the optimizer."""
        raise NotImplementedError

    def on_first_rank(self, fn, *args):
        """`fn(*args)` on the first rank; its result, or its error raised on every rank."""
        return fn(*args)

    def forward_backward(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Forward and backward over a step's micro-batches (host tensors); the mean loss on this
        rank, a device scalar not yet read (reading it would synchronise)."""
        raise NotImplementedError

    def step(self) -> float | None:
        """Apply the step's gradients; the gradient norm before clipping, where the engine knows it.
        Raises `NonFiniteError`, leaving the parameters as they were, on a non-finite gradient."""
        raise NotImplementedError

    def learning_rate(self) -> float:
        """The learning rate of the first parameter group after the step's schedule update, i.e. what the
        next step applies (as HF's Trainer logs it); Adafactor's relative step size when it runs
        without a learning rate (`fastseq.optim.RelativeStep`)."""
        raise NotImplementedError

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (one collective for all)."""
        return values

    def barrier(self) -> None:
        """Wait for every rank."""

    def save(self, directory: Path) -> dict:
        """Write this engine's state (model, optimizer, schedule) into `directory`, on every rank;
        returns what `load` needs besides the files (JSON)."""
        raise NotImplementedError

    def load(self, directory: Path, meta: dict) -> None:
        raise NotImplementedError

    def rank_files(self, directory: Path, state: dict) -> list[str]:
        """The files of checkpoint `directory` (its trainer state `state`) this rank reads besides
        its RNG states."""
        return []

    def repartitions(self, directory: Path, state: dict) -> bool:
        """Whether this engine resumes checkpoint `directory`, written by another number of ranks or
        another engine kind, by re-partitioning its state (ZeRO)."""
        return False

    def save_model(self, out: Path, checkpoint: Path) -> None:
        """The trained model as a Hugging Face directory at `out` (from the final `checkpoint`)."""
        raise NotImplementedError

    def save_model_of(self, checkpoint: Path, out: Path) -> None:
        """The model of this run's `checkpoint` at `out`, from the checkpoint's files
        (`--load-best-model-at-end`): one process's checkpoint holds a model directory (under LoRA the
        adapters), copied as it is."""
        copy_model_files(checkpoint, out)

    def save_weights(self, directory: Path) -> None:
        """What a directory of the run holds of the model: its Hugging Face files, or under LoRA the
        adapters in peft's format and the generation config (the base stays where `--model` is)."""
        if self.adapters is None:
            self.model.save_pretrained(directory)
            return
        from fastseq.lora import save_adapters

        save_adapters(self.adapters, directory)
        generation = self.model.generation_config()
        if generation is not None:
            write_json(Path(directory) / GENERATION_CONFIG, generation)

    def set_rates(self, lr: float | None, weight_decay: float) -> None:
        """Use `lr` and `weight_decay` from now on instead of those a resumed checkpoint had."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the engine holds beyond the process (a process group) once the run is over."""


def copy_model_files(source: Path, dest: Path) -> list[str]:
    """Copy what `Engine.save_weights` wrote of a model into `source` (config.json,
    generation_config.json, the safetensors weights or shards and their index; under LoRA peft's
    adapter files) into `dest`, each atomically; their names."""
    names = sorted(p.name for p in Path(source).iterdir() if p.name in MODEL_FILES or SHARD_RE.fullmatch(p.name))
    for name in names:
        copy_file(Path(source) / name, Path(dest) / name)
    return names


# ---- the model and tokenizer of a run -----------------------------------------------------------


def default_config() -> T5Config:
    """The embedded default: a small T5 v1.1 with the ByT5 vocabulary."""
    return T5Config(
        vocab_size=384,
        d_model=128,
        d_kv=32,
        d_ff=384,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=64,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )


def model_config(args: TrainArgs):
    """The config of the model the run trains, without building it. `--model` is a directory, else a
    Hugging Face Hub id (from the cache, or downloaded when online: `args.model` becomes the local
    directory), else, with `--random-init` only, a preset; `--random-init` with a directory takes its
    config and random weights."""
    if args.model is None:
        log.info("the embedded default model (a small T5 v1.1) with random weights")
        return default_config()
    if args.random_init:
        if Path(args.model).is_dir():
            config, _ = read_model_config(args.model)
            config.separate_embeddings = []
        elif args.model in presets.PRESETS:
            config = presets.config(args.model)
        else:
            raise ValueError(f"--model {args.model!r} --random-init: {args.model!r} is neither a directory nor a "
                             "preset; name a preset (fastseq.presets.PRESETS) or a model directory")  # fmt: skip
        log.info("--model %s with random weights (--random-init)", args.model)
        return config
    try:
        args.model = str(model_directory(args.model))
    except HubModelNotFound as err:
        preset = "name a preset with --random-init for random weights"
        if args.model in presets.PRESETS:
            preset = f"add --random-init to train preset {args.model} from random weights"
        raise ValueError(
            f"--model {err}: pass a model directory or a hub id (downloaded when online; `hf download NAME` fills "
            f"the cache), or {preset}"
        ) from None
    config, _ = read_model_config(args.model)  # a model_type fastseq does not train is refused there
    fit_embeddings(config, *stored_embeddings(args.model, config))  # as from_pretrained does
    return config


def check_model_memory(args: TrainArgs, config) -> None:
    """The model's fp32 parameters against the memory the run has, before anything is built: one
    process, its device's (a GPU's, or this machine's); under DeepSpeed, which partitions them, this
    machine's host and GPU memory together, times the nodes."""
    import os

    from fastseq.memory import GIB, check_parameter_memory, host_memory_gib

    host = host_memory_gib() * GIB
    gpus = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    if args.deepspeed:
        nodes = max(int(os.environ.get("WORLD_SIZE", 1)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)
        check_parameter_memory(config, nodes * (host + sum(gpus)), f"the {nodes} node(s)' host and GPU memory,")
        return
    device = run_device(args)
    if device.type == "cuda":
        check_parameter_memory(config, gpus[device.index or 0], f"{device}'s")
    else:
        check_parameter_memory(config, host, "this machine's")


def model_class(config) -> type:
    _, classes, default = FAMILIES[config.model_type]
    return classes[default]


def run_tokenizer(args: TrainArgs, config) -> Tokenizer:
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    elif args.model is not None and Path(args.model).is_dir():
        tokenizer = load_tokenizer(args.model)
    elif args.model is not None and "byt5" not in args.model:
        raise ValueError(
            f"preset {args.model!r} is built with random weights and needs a tokenizer: pass "
            "--tokenizer DIR (a directory with spiece.model or vocab.json + merges.txt)"
        )
    else:
        tokenizer = ByT5Tokenizer()
    check_vocabulary(tokenizer, config.vocab_size)
    return tokenizer


def run_device(args: TrainArgs) -> torch.device:
    return resolve_device(args.device)


def resolve_device(name: str | None) -> torch.device:
    """The device `--device NAME` asks for (None: cuda if there is one, else cpu), checked against this machine."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: this machine has no CUDA device; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0 ...)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: fastseq runs on cpu or cuda")
    return device


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` computes in bf16: a CUDA GPU that says so (Ampere or newer), a CPU whose oneDNN
    does (AVX512-BF16 or AMX, or AVX512BW, on which it converts)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type != "cpu" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_precision(args: TrainArgs, device: torch.device) -> None:
    """--precision bf16 on a device without bf16, before anything is built."""
    if args.precision == "bf16" and not bf16_supported(device):
        kind = "GPU (bf16 needs Ampere or newer)" if device.type == "cuda" else "CPU (oneDNN reports no bf16 support)"
        raise ValueError(f"--precision bf16: this {kind} does not compute in bf16; use --precision fp32"
                         f"{' (what auto takes on a CPU)' if device.type == 'cpu' else ''}")  # fmt: skip


def autocast_dtype(args: TrainArgs, config, device: torch.device) -> torch.dtype | None:
    """None for fp32; bf16/fp16 autocast otherwise."""
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and config.model_type in _T5_FAMILY and not args.force_fp16:
        raise ValueError(
            "fp16 is refused for T5-family models: their activations (the FFN output in particular) "
            "overflow fp16's range of 65504 in pretrained checkpoints and the loss turns to NaN. Use "
            "--precision bf16 (Ampere or newer), fp32, or pass --force-fp16 to train in fp16 anyway"
        )
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def add_lora(args: TrainArgs, model: nn.Module, autocast: torch.dtype | None):
    """Under `--lora-r`: adapters on `model`'s target layers, everything else frozen; the frozen base
    is held in bf16 when the run computes in bf16 (it never changes, so it needs no fp32 copy), as
    `transformers` loads it with `torch_dtype=torch.bfloat16`. Returns the peft wrapper, or None."""
    settings = args.lora
    if settings is None:
        return None
    from fastseq.lora import add_adapters

    if autocast is torch.bfloat16:
        model.to(torch.bfloat16)
    wrapper = add_adapters(model, settings, base=hub.model_name(args.model), seed=args.seed)
    log.info("LoRA r=%d alpha=%g on %s: %s trained parameters of %s", settings.r, settings.alpha,
             ",".join(settings.targets), f"{sum(p.numel() for p in trained_parameters(model)):,}",
             f"{sum(p.numel() for p in model.parameters()):,}")  # fmt: skip
    return wrapper


def trained_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer steps: all of them, or the adapters' under LoRA."""
    return [p for p in model.parameters() if p.requires_grad]


def apply_rates(optimizer, scheduler, lr: float | None, weight_decay: float) -> None:
    """Set every parameter group's weight decay and, for a schedule (`LambdaLR`), its base rate: the
    rate now is `lr` times the schedule's factor at the current step. Adafactor's relative step
    (`lr` None) has no rate to set."""
    for group in optimizer.param_groups:
        group["weight_decay"] = weight_decay
    if lr is None or not isinstance(scheduler, LambdaLR):
        return
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [lr] * len(groups)
    for group, factor in zip(groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"], group["lr"] = lr, lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports


def schedule(args: TrainArgs):
    """The learning-rate schedule as a function of the optimizer (what DeepSpeed takes)."""
    return lambda optimizer: make_schedule(
        optimizer, args.schedule, warmup_steps=args.warmup_steps, total_steps=args.steps
    )


# ---- one process ------------------------------------------------------------------------------


class LocalEngine(Engine):
    """One process on one device: autocast (bf16, or fp16 with a loss scaler), clipping, and a
    gradient check before every optimizer step."""

    def __init__(self, args: TrainArgs, device: torch.device):
        self.name, self.device, self.args = str(device), device, args

    def build(self, config) -> None:
        args, device = self.args, self.device
        if args.pretrained:
            model = from_pretrained(args.model)
        else:
            with torch.device(device):
                model = model_class(config)(config)
        self.model = model.to(device)
        self.model.gradient_checkpointing_enable(args.gradient_checkpointing)
        self.model.train()
        self.autocast = autocast_dtype(args, config, device)
        self.adapters = add_lora(args, self.model, self.autocast)
        self.optimizer = make_optimizer(args.optimizer, trained_parameters(self.model), lr=args.learning_rate(),
                                        weight_decay=args.weight_decay)  # fmt: skip
        self.scheduler = schedule(args)(self.optimizer)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast is torch.float16)

    def forward_backward(self, micro_batches):
        total = torch.zeros((), device=self.device)
        for batch in micro_batches:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                loss = self.model(**batch, label_smoothing=self.args.label_smoothing).loss / len(micro_batches)
            self.scaler.scale(loss).backward()
            total += loss.detach()
        return total

    def step(self):
        self.scaler.unscale_(self.optimizer)
        clip = self.args.clip if self.args.clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if not math.isfinite(norm) and not self.scaler.is_enabled():  # fp16's scaler skips such a step itself
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"the gradient norm is {norm}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def learning_rate(self):
        return self.scheduler.get_last_lr()[0]

    def save(self, directory):
        self.save_weights(directory)
        state = self.optimizer.state_dict()
        tensors, scalars = {}, {}
        for index, values in state["state"].items():
            for name, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer/{index}/{name}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(index), {})[name] = value
        save_safetensors(tensors, directory / "trainer_state.safetensors")
        scheduler = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        return {"optimizer": {"scalars": scalars, "param_groups": state["param_groups"]}, "scheduler": scheduler,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}  # fmt: skip

    def load(self, directory, meta):
        if self.adapters is not None:
            from fastseq.lora import load_adapters

            load_adapters(self.adapters, directory)
        else:
            state = from_pretrained(directory).state_dict()
            with torch.no_grad():
                for name, value in self.model.state_dict().items():
                    value.copy_(state[name])
        optimizer: dict[int, dict] = {}
        file = Path(directory) / "trainer_state.safetensors"
        tensors = read_tensors(file)
        check_optimizer_state(file, tensors, [p for group in self.optimizer.param_groups for p in group["params"]])
        for key, value in tensors.items():
            _, index, name = key.split("/", 2)
            optimizer.setdefault(int(index), {})[name] = value
        for index, values in meta["optimizer"]["scalars"].items():
            optimizer.setdefault(int(index), {}).update(values)
        self.optimizer.load_state_dict({"state": optimizer, "param_groups": meta["optimizer"]["param_groups"]})
        scheduler = dict(meta["scheduler"])
        check_scheduler_state(Path(directory) / "trainer_state.json", scheduler)
        if "base_lrs" in scheduler:  # a LambdaLR: its functions are rebuilt, not stored
            scheduler["lr_lambdas"] = [None] * len(self.optimizer.param_groups)
        self.scheduler.load_state_dict(scheduler)
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])

    def set_rates(self, lr, weight_decay):
        apply_rates(self.optimizer, self.scheduler, lr, weight_decay)

    def save_model(self, out, checkpoint):
        self.save_weights(out)
