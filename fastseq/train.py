"""`fastseq train`: the embedded default run.

With no arguments it trains a small T5 v1.1 on a synthetic task generated in
memory (reverse a word), with byte-level (ByT5) token ids, on whatever device
is there; it shows progress, reports held-out exact-match accuracy from greedy
decoding, and writes a Hugging Face checkpoint at the end.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .models import T5Config, T5ForConditionalGeneration

log = logging.getLogger(__name__)

PAD, EOS, OFFSET = 0, 1, 3  # ByT5: pad 0, eos 1, unk 2, byte b -> b + 3
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def encode(text: str) -> list[int]:
    """ByT5 ids of a string: its UTF-8 bytes offset by 3, then eos."""
    return [b + OFFSET for b in text.encode("utf-8")] + [EOS]


def decode(ids: list[int]) -> str:
    out = bytearray()
    for i in ids:
        if i == EOS:
            break
        if i >= OFFSET:
            out.append(i - OFFSET)
    return out.decode("utf-8", errors="replace")


def make_examples(n: int, rng: random.Random, min_len: int = 3, max_len: int = 8) -> list[tuple[str, str]]:
    words = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(min_len, max_len))) for _ in range(n)]
    return [(f"reverse: {w}", w[::-1]) for w in words]


def collate(pairs: list[tuple[str, str]], device: torch.device) -> dict[str, torch.Tensor]:
    sources = [encode(s) for s, _ in pairs]
    targets = [encode(t) for _, t in pairs]
    Le, Ld = max(map(len, sources)), max(map(len, targets))
    input_ids = torch.tensor([s + [PAD] * (Le - len(s)) for s in sources], device=device)
    labels = torch.tensor([t + [-100] * (Ld - len(t)) for t in targets], device=device)
    return {"input_ids": input_ids, "attention_mask": (input_ids != PAD).long(), "labels": labels}


@torch.no_grad()
def greedy(model: T5ForConditionalGeneration, input_ids, attention_mask, max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding for the held-out score; recomputes the decoder each step (no KV cache)."""
    encoder_states = model.encode(input_ids, attention_mask)
    B = input_ids.shape[0]
    decoder_ids = torch.full((B, 1), model.config.decoder_start_token_id, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = model(
            input_ids, attention_mask, decoder_ids, encoder_outputs=encoder_states, return_logits=True
        ).logits[:, -1]  # (B, vocab)
        next_ids = torch.where(done, PAD, logits.argmax(-1))
        decoder_ids = torch.cat([decoder_ids, next_ids[:, None]], dim=1)
        done |= next_ids == EOS
        if done.all():
            break
    return decoder_ids[:, 1:].tolist()


def exact_match(model, pairs, device, batch_size: int = 128) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        batch = collate(chunk, device)
        outputs = greedy(model, batch["input_ids"], batch["attention_mask"], batch["labels"].shape[1] + 2)
        hits += sum(decode(out) == target for out, (_, target) in zip(outputs, chunk, strict=True))
    model.train()
    return hits / max(len(pairs), 1)


def default_config() -> T5Config:
    """A small T5 v1.1 with the ByT5 vocabulary."""
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


def run(args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model = T5ForConditionalGeneration(default_config()).to(device).train()
    held_out = make_examples(args.eval_examples, random.Random(args.seed + 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / args.warmup) * max(0.0, 1 - step / args.steps)
    )
    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc="train", unit="step", disable=args.quiet)
    loss_value = float("nan")
    for step in progress:
        batch = collate(make_examples(args.batch_size, rng), device)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
        if step % 20 == 0 or step == args.steps - 1:
            progress.set_postfix(loss=f"{loss_value:.4f}")
    accuracy = exact_match(model, held_out, device)
    elapsed = time.perf_counter() - start
    out = Path(args.output_dir)
    model.save_pretrained(out)
    summary = {"loss": loss_value, "exact_match": accuracy, "seconds": elapsed}
    print(
        f"fastseq train: {args.steps} steps on {device} in {elapsed:.1f}s, final loss {loss_value:.4f}, "
        f"held-out exact match {accuracy:.1%} ({len(held_out)} examples), checkpoint in {out}"
    )
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    parser.add_argument("--eval-examples", type=int, default=256, help="held-out examples for exact match")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--output-dir", default="runs/default", help="where the checkpoint is written")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
