"""The memory a model needs and a machine has, from a model's config before anything is built:
`fastseq train` refuses a model larger than its memory, and `fastseq plan` counts with the same
figures."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

GIB = 2**30


def host_memory_gib() -> float:
    """This machine's memory: /proc/meminfo's MemTotal, else the pages sysconf reports."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GIB
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def meta_model(config):
    """The model `config` describes, on the meta device (nothing allocated)."""
    from fastseq.models import FAMILIES

    _, classes, default = FAMILIES[config.model_type]
    with torch.device("meta"):
        return classes[default](config)


def parameter_count(config) -> int:
    """Parameters (tied ones once) of the model `config` describes, counted on the meta device with
    one and two layers on each side: every layer of a stack after its first is alike (the first
    alone holds T5's relative position bias), so a config of a billion layers is counted at once,
    and nothing is allocated."""
    sides = ("encoder_layers", "decoder_layers") if config.model_type == "blenderbot-small" else (
        "num_layers", "num_decoder_layers")  # fmt: skip
    layers = [getattr(config, side) for side in sides]

    def count(*per_side: int) -> int:
        model = meta_model(dataclasses.replace(config, **dict(zip(sides, per_side, strict=True))))
        return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

    first = [min(n, 1) for n in layers]
    base = count(*first)
    grown = [count(*(f + (i == side) for i, f in enumerate(first))) - base for side in range(2)]
    return base + sum(max(n - 1, 0) * extra for n, extra in zip(layers, grown, strict=True))


def check_parameter_memory(config, memory: float, whose: str) -> int:
    """Refuse, before anything is built, a model whose fp32 parameters alone need more than `memory`
    bytes (`whose`: whose memory that is, in words); returns its parameter count."""
    params = parameter_count(config)
    if 4 * params > memory:
        raise ValueError(f"the model needs {_bytes(4 * params)} for its {params:,} parameters (fp32), more than "
                         f"{whose} {_bytes(memory)}; lower its sizes (num_layers, d_model, d_ff, vocab_size "
                         "...)")  # fmt: skip
    return params


def _bytes(n: float) -> str:
    return next(f"{n / 1024**k:.1f} {unit}" for k, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (0, "B"))
                if n >= 1024**k or k == 0)  # fmt: skip
