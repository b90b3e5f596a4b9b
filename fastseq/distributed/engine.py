"""`fastseq train --deepspeed CONFIG` under the `deepspeed` launcher: ZeRO stages 1-3 (with offload)
and pipeline stages, checkpoints through the engine that resume exactly.

    deepspeed --num_gpus 8 --module fastseq.train --deepspeed configs/deepspeed/zero3.json \\
        --model google/t5-v1_1-xl --tokenizer DIR --data train.jsonl --batch-size 8 --lr 1e-4

Data parallelism: every rank reads the same stream and takes every world-th micro-batch, so the
stream position in a checkpoint is the same on every rank, and N ranks with accumulation A see the
micro-batches one process would see with accumulation N x A.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from fastseq import presets
from fastseq.checkpoint import from_pretrained, read_config, resolve_dtype
from fastseq.models import FAMILIES
from fastseq.optim import make_optimizer, make_schedule
from fastseq.tokenizers import ByT5Tokenizer, check_vocabulary, load_tokenizer

from . import config as ds_config
from . import zero

log = logging.getLogger("fastseq.distributed")


def _model_config(args):
    from fastseq.train import default_config

    if args.model is None:
        return default_config()
    if Path(args.model).is_dir():
        data = read_config(args.model)
        config = FAMILIES[data["model_type"]][0].from_hf_dict(data)
        if getattr(config, "tie_word_embeddings", False) and zero.head_is_distinct(args.model):
            config.tie_word_embeddings = False  # as from_pretrained does: the directory holds a head of its own
        return config
    return presets.config(args.model)


def _num_layers(model_config) -> int:
    if model_config.model_type == "blenderbot-small":
        return model_config.encoder_layers + model_config.decoder_layers
    return model_config.num_layers + model_config.num_decoder_layers


def _tokenizer(args):
    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    if args.model is not None and Path(args.model).is_dir():
        return load_tokenizer(args.model)
    if args.model is not None and "byt5" not in args.model:
        raise ValueError(f"preset {args.model!r} is built with random weights and needs --tokenizer DIR")
    return ByT5Tokenizer()


def _model_class(model_config):
    _, classes, default = FAMILIES[model_config.model_type]
    return classes[default]


def build_model(args, model_config, config: dict, device: torch.device):
    """The model, on `device`. Under ZeRO-3 it is built inside `deepspeed.zero.Init` (each rank holds
    its partitions only) and filled from the checkpoint directory or initialized module by module."""
    import deepspeed

    cls = _model_class(model_config)
    pretrained = args.model is not None and Path(args.model).is_dir()
    if ds_config.zero_stage(config) == 3:
        # dtype=None: zero.Init then takes the precision from the config's bf16/fp16 sections. An explicit
        # dtype goes through DeepSpeed's accelerator probe instead (`dtype or fp16 if is_fp16_supported()
        # else bf16 ...`), which on a CPU without oneDNN fp16 support builds an fp32 run's parameters in bf16.
        with deepspeed.zero.Init(config_dict_or_path=config, dtype=None):
            model = cls(model_config)
        zero.check_dtype(model, resolve_dtype(ds_config.precision(config)))
        if pretrained:
            zero.load_partitioned(model, args.model)
        else:
            zero.init_partitioned(model)
        zero.register_external_parameters(model)
        return model
    if pretrained:
        model = from_pretrained(args.model)
    else:
        with torch.device(device):
            model = cls(model_config)
    return model.to(device)


def _batches(stream, collator, world: int, rank: int, device):
    """This rank's micro-batch: every rank reads all `world` and keeps its own."""
    examples = [stream.next_batch() for _ in range(world)][rank]
    return {k: v.to(device) for k, v in collator(examples).items()}


def save(engine, out: Path, step: int, *, model_config, tokenizer, stream, collator, args) -> Path:
    """`OUTPUT/checkpoint-STEP/`: DeepSpeed's files (model, optimizer and scheduler partitions), plus
    trainer_state.json, config.json and the tokenizer. Written under a temporary name and renamed
    once every rank has finished, so a crash never leaves a half-written checkpoint."""
    name = f"checkpoint-{step}"
    tmp_tag = f".{name}.tmp"
    rank = torch.distributed.get_rank()
    if rank == 0 and (out / tmp_tag).exists():
        shutil.rmtree(out / tmp_tag)
    torch.distributed.barrier()
    engine.save_checkpoint(str(out), tag=tmp_tag, save_latest=False)
    torch.distributed.barrier()
    if rank == 0:
        tmp = out / tmp_tag
        meta = {
            "step": step,
            "data": stream.state_dict(),
            "collator": collator.state_dict() if hasattr(collator, "state_dict") else None,
            "args": {k: v for k, v in dataclasses.asdict(args).items() if k != "extra"},
            "world_size": torch.distributed.get_world_size(),
        }
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1) + "\n")
        (tmp / "config.json").write_text(json.dumps(model_config.to_hf_dict(), indent=2) + "\n")
        tokenizer.save_pretrained(tmp)
        final = out / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    torch.distributed.barrier()
    return out / name


def _resume(engine, out: Path, resume: str, stream, collator) -> int:
    from fastseq.train import latest_checkpoint

    path = latest_checkpoint(out) if resume == "latest" else Path(resume)
    if path is None or not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint to resume from in {path or out}")
    meta = json.loads((path / "trainer_state.json").read_text())
    world = torch.distributed.get_world_size()
    if meta.get("world_size") not in (None, world):
        log.warning("resuming a %s-rank checkpoint on %s ranks", meta["world_size"], world)
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"--resume: DeepSpeed found no engine checkpoint in {path}")
    stream.load_state_dict(meta["data"])
    if meta.get("collator") is not None and hasattr(collator, "load_state_dict"):
        collator.load_state_dict(meta["collator"])
    return int(meta["step"])


def save_final(config: dict, out: Path, model, model_config, tokenizer) -> None:
    """The trained model as a Hugging Face directory at the top of OUTPUT (rank 0 writes it; under
    ZeRO-3 the parameters are gathered one at a time into rank 0's CPU memory)."""
    rank = torch.distributed.get_rank()
    state = zero.gathered_state_dict(model) if ds_config.zero_stage(config) == 3 else None
    if rank != 0:
        return
    cls = _model_class(model_config)
    if state is None:
        model.save_pretrained(out)
    else:
        with torch.device("meta"):
            full = cls(model_config)
        full.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
        full.tie_weights()
        full.save_pretrained(out)
    tokenizer.save_pretrained(out)


def train_deepspeed(args) -> dict:
    import deepspeed

    from fastseq.train import _data

    if args.model is not None and not Path(args.model).is_dir() and args.model not in presets.PRESETS:
        raise ValueError(f"--model {args.model!r} is neither a directory nor a preset")
    raw = ds_config.load(args.deepspeed)
    on_gpu = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}") if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    model_config = _model_config(args)
    tokenizer = _tokenizer(args)
    check_vocabulary(tokenizer, model_config.vocab_size)
    lr = args.lr
    if lr is None and args.optimizer == "adafactor" and args.model is not None and Path(args.model).is_dir():
        lr = 1e-3
    config = ds_config.resolve(
        raw, model_config=model_config, world_size=world, micro_batch_size=args.batch_size,
        grad_accum=args.grad_accum, clip=args.clip, precision=args.precision, force_fp16=args.force_fp16,
        lr=lr, weight_decay=args.weight_decay, on_gpu=on_gpu,
        num_layers=_num_layers(model_config),
    )  # fmt: skip
    if ds_config.pipeline_stages(config):
        from .pipeline import train_pipeline

        return train_pipeline(args, config, model_config, tokenizer, device)
    model = build_model(args, model_config, config, device)
    model.gradient_checkpointing_enable(args.gradient_checkpointing)
    stream, collator, held_out, eval_collator = _data(args, tokenizer)
    if args.optimizer == "adafactor" and "optimizer" not in config:
        log.warning(
            "ZeRO hands the optimizer flat partitions of the parameters, so Adafactor's factored second moments "
            "and its parameter-scaled step work on those partitions, not on the matrices; AdamW "
            "(--optimizer adamw) behaves as in one process"
        )
    optimizer = None
    if "optimizer" not in config:
        optimizer = make_optimizer(args.optimizer, model.parameters(), lr=lr, weight_decay=args.weight_decay)

    def scheduler(opt):
        return make_schedule(opt, args.schedule, warmup_steps=args.warmup, total_steps=args.steps)

    engine, engine_optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=None if optimizer else model.parameters(),
        lr_scheduler=scheduler, config=config,
    )  # fmt: skip
    out = Path(args.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    start = _resume(engine, out, args.resume, stream, collator) if args.resume else 0
    if start >= args.steps:
        raise ValueError(f"the checkpoint is at step {start}, already past --steps {args.steps}")
    log_path = out / "metrics.jsonl"
    if rank == 0 and not args.resume and log_path.exists():
        log_path.unlink()
    engine.train()
    started = time.perf_counter()
    losses = []

    def checkpoint(step: int) -> Path:
        return save(engine, out, step, model_config=model_config, tokenizer=tokenizer, stream=stream,
                    collator=collator, args=args)  # fmt: skip

    def evaluate_held_out(step: int) -> dict:
        """Loss and exact match on the held-out examples. Every rank runs it (under ZeRO-3 each forward
        gathers the layers collectively); the ranks see the same examples, so they decode in step."""
        from fastseq.train import evaluate

        scores, outputs = evaluate(model, tokenizer, held_out, eval_collator, device)
        if rank == 0:
            with log_path.open("a") as f:
                f.write(json.dumps({"step": step, **scores}) + "\n")
        return scores

    window = time.perf_counter()
    for step in range(start, args.steps):
        loss_sum = torch.zeros((), device=device)
        tokens = 0
        for _ in range(args.grad_accum):
            batch = _batches(stream, collator, world, rank, device)
            tokens += int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float() / args.grad_accum
        torch.distributed.all_reduce(loss_sum)
        mean_loss = loss_sum.item() / world
        done = step + 1
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"the loss is {mean_loss} at step {done}; lower --lr")
        losses.append(mean_loss)
        if rank == 0:
            now = time.perf_counter()
            record = {"step": done, "loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "tokens_rank0": tokens,
                      "tokens_per_s": tokens * world / max(now - window, 1e-9)}  # fmt: skip
            window = now
            if on_gpu:
                record["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if not args.quiet and (done % args.log_every == 0 or done == args.steps):
                print(f"step {done}: loss {mean_loss:.4f}", file=sys.stderr)
        if held_out and args.eval_every and done % args.eval_every == 0 and done != args.steps:
            evaluate_held_out(done)
        if args.save_every and done % args.save_every == 0 and done != args.steps:
            checkpoint(done)
    final = evaluate_held_out(args.steps) if held_out else {}
    path = checkpoint(args.steps)
    save_final(config, out, model, model_config, tokenizer)
    elapsed = time.perf_counter() - started
    if rank == 0:
        stage = ds_config.zero_stage(config)
        print(
            f"fastseq train (DeepSpeed ZeRO-{stage}, {world} ranks): steps {start}-{args.steps} in {elapsed:.1f}s, "
            f"final loss {losses[-1]:.4f}"
            + (f", held-out exact match {final['exact_match']:.1%} ({len(held_out)} examples)" if final else "")
            + f", checkpoint in {out} ({path.name})"
        )
    return {"loss": losses[-1], "losses": losses, "seconds": elapsed, **final}
