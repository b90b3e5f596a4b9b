"""Generation for the encoder-decoder models: greedy decoding and sampling with a KV cache.

The encoder runs once; the decoder runs one token per step against `fastseq.models.cache.KVCache`
(self-attention keys and values appended in place, cross-attention keys and values computed at
the first step). Rows that have produced eos continue with the pad token, as `transformers` does,
and decoding stops when every row has finished or after `max_new_tokens`. The result starts with
the decoder start token, as `transformers`' `generate` returns it.
"""

from __future__ import annotations

import torch

from .models.cache import KVCache


def _setting(value, config, name: str):
    return value if value is not None else getattr(config, name, None)


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """One token per row from `(B, V)` fp32 logits: temperature, then top-k, then nucleus (top-p)
    filtering, in that order."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it reaches top_p; the most likely token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    decoder_start_token_id: int | None = None,
    forced_eos_token_id: int | None = None,
) -> torch.Tensor:
    """Token ids `(B, 1 + n)`, n <= max_new_tokens: the decoder start token, then the generated
    tokens (pad after a row's eos). Greedy by default; `do_sample` draws from the distribution
    shaped by `temperature`, `top_k` and `top_p` (reproducible with `generator`). Token settings
    default to the model's config (`forced_eos_token_id` too: eos forced at the last step)."""
    config = model.config
    eos = _setting(eos_token_id, config, "eos_token_id")
    pad = _setting(pad_token_id, config, "pad_token_id")
    start = _setting(decoder_start_token_id, config, "decoder_start_token_id")
    forced_eos = _setting(forced_eos_token_id, config, "forced_eos_token_id")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature} (use do_sample=False for greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    was_training = model.training
    model.eval()
    try:
        B = input_ids.shape[0]
        encoder_states = model.encode(input_ids, attention_mask)  # (B, Le, d_model)
        cache = KVCache(model.num_decoder_layers(), capacity=max_new_tokens)
        tokens = torch.full((B, 1), start, dtype=torch.long, device=input_ids.device)
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        bias = model.logits_bias()
        for step in range(max_new_tokens):
            h = model.decode(tokens[:, -1:], encoder_states, attention_mask, None, cache=cache)  # (B, 1, d_model)
            logits = model.lm_head(h[:, -1]).float()  # (B, V)
            if bias is not None:
                logits = logits + bias.float()
            if forced_eos is not None and step == max_new_tokens - 1:
                vocab = torch.arange(logits.shape[-1], device=logits.device)
                logits = torch.where(vocab == forced_eos, 0.0, -torch.inf).expand_as(logits)
            if do_sample:
                next_tokens = _sample(logits, temperature, top_k, top_p, generator)
            else:
                next_tokens = logits.argmax(-1)  # (B,)
            if eos is not None:
                next_tokens = torch.where(finished, pad, next_tokens)
                finished |= next_tokens == eos
            tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
            if eos is not None and bool(finished.all()):
                break
        return tokens
    finally:
        model.train(was_training)
