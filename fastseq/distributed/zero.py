"""ZeRO-3 for fastseq's native models: build without materializing the model on one rank, load a
(sharded) safetensors checkpoint straight into each rank's partitions, initialize random weights
module by module, and gather the whole model back only one tensor at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from fastseq.checkpoint import CheckpointError, weight_files
from fastseq.models.blenderbot_small import BlenderbotSmallBase, init_blenderbot_module
from fastseq.models.t5 import T5Attention, T5DenseActDense, T5DenseGatedActDense, T5LayerNorm, T5Stack, init_t5_module


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def check_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Raise unless every partition of `model` holds `dtype` (what the run's config asks for)."""
    found = {p.ds_tensor.dtype for p in model.parameters() if is_partitioned(p)}
    if found - {dtype}:
        raise RuntimeError(f"ZeRO-3 built the parameters in {sorted(map(str, found))}; the config asks for {dtype}")


def register_external_parameters(model: nn.Module) -> int:
    """Tell ZeRO-3 which parameters a module's forward reads from another module: the FFN kernels
    read their Linear children's weights and a stack reads its first layer's bias tables. DeepSpeed
    then gathers them for that forward and its backward. (The loss runs inside the LM head's own call.)
    Returns how many were registered."""
    import deepspeed

    pairs: list[tuple[nn.Module, nn.Parameter]] = []
    for module in model.modules():
        if isinstance(module, T5DenseGatedActDense):
            pairs += [(module, module.wi_0.weight), (module, module.wi_1.weight), (module, module.wo.weight)]
        elif isinstance(module, T5DenseActDense):
            pairs += [(module, module.wi.weight), (module, module.wo.weight)]
        elif isinstance(module, T5Stack):
            pairs += [(module, table) for table in module.block[0].layer[0].position_tables().values()]
    for module, param in pairs:
        deepspeed.zero.register_external_parameter(module, param)
    return len(pairs)


def _init_groups(model: nn.Module) -> Iterator[tuple[nn.Module, callable]]:
    """(module, init) pairs covering every parameter, each init touching only that module's subtree."""
    config = model.config
    if isinstance(model, BlenderbotSmallBase):

        def init_blenderbot(module: nn.Module) -> None:
            init_blenderbot_module(module, config.init_std)

        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
                yield module, init_blenderbot
        return
    for module in model.modules():
        if isinstance(module, (T5LayerNorm, T5DenseActDense, T5DenseGatedActDense, T5Attention)):
            yield module, lambda m: init_t5_module(m, config)
    factor = config.initializer_factor
    yield model.shared, lambda m: nn.init.normal_(m.weight, std=factor)
    head = getattr(model, "lm_head", None)
    if head is not None and head.weight is not model.shared.weight:
        yield head, lambda m: nn.init.normal_(m.weight, std=factor)


@torch.no_grad()
def init_partitioned(model: nn.Module) -> None:
    """Hugging Face's initialisation of a model whose parameters ZeRO-3 has partitioned: each module
    is gathered, initialized on rank 0 and partitioned again, so at most one layer is whole at once."""
    import deepspeed

    rank = torch.distributed.get_rank()
    for module, init in _init_groups(model):
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if rank == 0:
                init(module)


@torch.no_grad()
def load_partitioned(model: nn.Module, path: str | Path) -> None:
    """Copy a model directory's tensors into this rank's ZeRO-3 partitions, one tensor at a time
    (no rank ever holds the whole model, and no communication is needed)."""
    path = Path(path)
    params = dict(model.named_parameters(remove_duplicate=False))
    aliases = model.tied_parameters()
    rank = torch.distributed.get_rank()
    loaded: set[str] = set()
    for file in weight_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                names = [key] + [alias for alias, source in aliases.items() if source == key]
                names += [source for alias, source in aliases.items() if alias == key]
                targets = [n for n in names if n in params]
                if not targets:
                    continue
                full = handle.get_tensor(key)
                for name in targets:
                    _copy_partition(params[name], full, rank, f"{file.name}:{key}")
                    loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"{path} has no weights for {missing[:10]}; check that config.json belongs to them")


def _copy_partition(param: torch.Tensor, full: torch.Tensor, rank: int, where: str) -> None:
    if tuple(full.shape) != tuple(param.ds_shape if is_partitioned(param) else param.shape):
        raise CheckpointError(f"{where}: shape {tuple(full.shape)} does not fit the model's {tuple(param.ds_shape)}")
    if not is_partitioned(param):
        param.copy_(full)
        return
    part = param.ds_tensor
    n = part.ds_numel
    start = n * rank
    flat = full.reshape(-1).to(part.dtype)
    take = max(0, min(n, flat.numel() - start))
    part.zero_()
    if take:
        part.narrow(0, 0, take).copy_(flat.narrow(0, start, take))
    if param.numel() == full.numel():  # whole on every rank already (a small, persistent parameter)
        param.data.copy_(full.to(param.dtype))


def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on rank 0 (empty elsewhere), gathering one parameter at a time."""
    import deepspeed

    rank = torch.distributed.get_rank()
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[name] = param.detach().to("cpu", copy=True)
    for name, buffer in model.named_buffers():
        if rank == 0:
            state[name] = buffer.detach().to("cpu", copy=True)
    return state
