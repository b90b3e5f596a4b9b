"""Generation for the encoder-decoder models: greedy decoding, sampling and beam search with a KV cache.

The encoder runs once; the decoder runs one token per step against `fastseq.models.cache.KVCache`
(self-attention keys and values appended in place, cross-attention keys and values computed at
the first step). Rows that have produced eos continue with the pad token, as `transformers` does,
and decoding stops when every row has finished or after `max_new_tokens`. The result starts with
the decoder start token, as `transformers`' `generate` returns it.

Each step's scores pass through `transformers`' logits processors, in its order and on the same
values (raw logits for greedy decoding and sampling, log-probabilities in beam search), so the
tokens are its tokens: `repetition_penalty` (a score of a token already in the row, decoder start
token included, is divided by the penalty, or multiplied when negative), `no_repeat_ngram_size`
(a token that would complete an n-gram the row already holds is banned), `min_new_tokens` (eos is
banned until that many tokens are generated), then the forced eos at the last step. Sampling then
applies temperature, top-k and top-p.

Beam search follows `transformers`' vectorised algorithm, so its outputs are the same tokens:
each step keeps the 2K best continuations of the K running beams, the best K that do not end
(eos, or the length limit) run on, and those that end among the first K enter the K finished
hypotheses with the score `sum of log-probs / generated_length ** length_penalty`. The search
stops when every finished slot is filled and no running beam can beat the worst of them
(`early_stopping=False`, the length taken as the current one; `"never"` with a positive
`length_penalty` takes the length limit, the best a running beam could reach), when K hypotheses
are finished (`early_stopping=True`), or at the length limit.

`settings_from_file` reads a model directory's `generation_config.json` as `transformers`' `generate`
does (an encoder-decoder's `max_length` and `min_length` count the decoder start token).
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path

import torch

from .models.cache import KVCache

# The most tokens one call generates. The KV cache is allocated for `max_new_tokens` up front (t5-small:
# 24 KiB per row and token), so a typo such as 1e9 would ask for terabytes; 65,536 is 8x LongT5's
# longest published targets. A model with learned positions (BlenderbotSmall) allows fewer.
MAX_NEW_TOKENS = 1 << 16


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


def _processed(scores: torch.Tensor, sequences: torch.Tensor, rules: dict) -> torch.Tensor:
    """`(N, V)` fp32 scores after `transformers`' logits processors, in its order. `sequences` `(N, t)`:
    each row's tokens so far, the decoder start token first; `rules` from `_rules`."""
    generated = sequences.shape[1] - 1
    if rules["repetition_penalty"] != 1.0:
        scores = _penalize_repetitions(scores, sequences, rules["repetition_penalty"])
    if rules["no_repeat_ngram_size"]:
        scores = _ban_repeated_ngrams(scores, sequences, rules["no_repeat_ngram_size"])
    if rules["eos"] is not None and generated < rules["min_new_tokens"]:
        scores = scores.index_fill(1, torch.tensor([rules["eos"]], device=scores.device), float("-inf"))
    if rules["forced_eos"] is not None and generated == rules["max_new_tokens"] - 1:
        scores = _force(scores, rules["forced_eos"])
    return scores


def _penalize_repetitions(scores: torch.Tensor, sequences: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: the score of every token in the row is divided by `penalty` (multiplied when
    negative). Ids past the scores (a padded embedding) land in a spare column that is dropped."""
    V = scores.shape[-1]
    ids = sequences.clamp(max=V)  # (N, t)
    padded = torch.nn.functional.pad(scores, (0, 1))  # (N, V + 1)
    seen = padded.gather(1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, ids, seen)[:, :V]


def _ban_repeated_ngrams(scores: torch.Tensor, sequences: torch.Tensor, n: int) -> torch.Tensor:
    """-inf for each token that would complete an n-gram already in the row: every window of n tokens
    whose first n - 1 match the row's last n - 1 bans its last token."""
    t = sequences.shape[1]
    if t < n:
        return scores
    prefix = sequences[:, t + 1 - n :]  # (N, n - 1)
    windows = sequences.unfold(1, n, 1)  # (N, t - n + 1, n)
    matches = (windows[..., :-1] == prefix[:, None, :]).all(-1)  # (N, t - n + 1)
    V = scores.shape[-1]
    banned = torch.zeros(scores.shape[0], V + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=V), V), True)
    return scores.masked_fill(banned[:, :V], float("-inf"))


def _logits(model, tokens, encoder_states, attention_mask, cache, bias) -> torch.Tensor:
    h = model.decode(tokens, encoder_states, attention_mask, None, cache=cache)  # (N, 1, d_model)
    logits = model.lm_head(h[:, -1]).float()  # (N, V)
    return logits if bias is None else logits + bias.float()


def _force(logits: torch.Tensor, token: int) -> torch.Tensor:
    """Only `token` allowed (score 0, everything else -inf)."""
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    return torch.where(vocab == token, 0.0, -torch.inf).expand_as(logits)


def _beam_search(
    model, encoder_states, attention_mask, *, num_beams, max_new_tokens, length_penalty, early_stopping, pad, start,
    rules,
) -> torch.Tensor:  # fmt: skip
    B, K = encoder_states.shape[0], num_beams
    eos = rules["eos"]
    device = encoder_states.device
    max_len = 1 + max_new_tokens
    encoder_states = encoder_states.repeat_interleave(K, dim=0)  # (B * K, Le, d_model)
    if attention_mask is not None:
        attention_mask = attention_mask.repeat_interleave(K, dim=0)
    cache = KVCache(model.num_decoder_layers(), capacity=max_new_tokens)
    bias = model.logits_bias()
    keep = 2 * K  # candidates per step: enough that K can run on even if K of them end
    fill = pad if pad else eos  # transformers fills unused positions with `pad_token_id or eos_token_id`
    running = torch.full((B, K, max_len), fill, dtype=torch.long, device=device)
    running[:, :, 0] = start
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = -1e9  # the K beams start identical: only the first may expand
    finished = running.clone()
    finished_scores = torch.full((B, K), -1e9, device=device)
    finished_lengths = torch.zeros(B, K, dtype=torch.long, device=device)
    slot_filled = torch.zeros(B, K, dtype=torch.bool, device=device)
    open_batch = torch.ones(B, 1, dtype=torch.bool, device=device)  # a running beam may still improve
    first_k = torch.arange(keep, device=device) < K
    rows = torch.arange(B, device=device)[:, None]
    for cur_len in range(1, max_len):
        tokens = running[:, :, cur_len - 1].reshape(B * K, 1)
        log_probs = torch.log_softmax(_logits(model, tokens, encoder_states, attention_mask, cache, bias), dim=-1)
        log_probs = _processed(log_probs, running[:, :, :cur_len].reshape(B * K, cur_len), rules)
        V = log_probs.shape[-1]
        total = (log_probs.view(B, K, V) + running_scores[:, :, None]).reshape(B, K * V)
        cand_scores, cand_index = torch.topk(total, keep)  # (B, 2K)
        cand_beam, cand_token = cand_index // V, cand_index % V
        candidates = running[rows, cand_beam]  # (B, 2K, max_len)
        candidates[:, :, cur_len] = cand_token
        ends = cand_token == eos if eos is not None else torch.zeros_like(cand_token, dtype=torch.bool)
        ends = ends | (cur_len + 1 >= max_len)
        # The best K continuations that do not end run on.
        next_index = torch.topk(cand_scores - ends.float() * 1e9, K).indices  # (B, K)
        running = candidates[rows, next_index]
        running_scores = (cand_scores - ends.float() * 1e9).gather(1, next_index)
        source_beam = cand_beam.gather(1, next_index)  # (B, K)
        # Endings among the first K candidates compete for the K finished slots.
        entered = ends & first_k[None, :]
        scores = cand_scores / (cur_len**length_penalty)  # over the cur_len tokens generated with this one
        if early_stopping is True:
            scores = scores - (slot_filled.all(-1, keepdim=True)).float() * 1e9
        scores = scores - (~open_batch).float() * 1e9 - (~entered).float() * 1e9
        merged_scores = torch.cat([finished_scores, scores], dim=1)  # (B, 3K)
        best = torch.topk(merged_scores, K).indices
        finished = torch.cat([finished, candidates], dim=1)[rows, best]
        finished_scores = merged_scores.gather(1, best)
        lengths = torch.full_like(cand_token, cur_len + 1)
        finished_lengths = torch.cat([finished_lengths, lengths], dim=1).gather(1, best)
        slot_filled = torch.cat([slot_filled, entered], dim=1).gather(1, best)
        cache.reorder((rows * K + source_beam).reshape(-1))
        # Can a running beam still beat the worst finished one (at the current length)?
        hoped = max_new_tokens if early_stopping == "never" and length_penalty > 0 else cur_len
        best_running = running_scores[:, :1] / (hoped**length_penalty)
        worst = torch.where(slot_filled, finished_scores.min(dim=1, keepdim=True).values, -1e9)
        open_batch = open_batch & (best_running > worst).any(-1, keepdim=True)
        if not open_batch.any() or (early_stopping is True and slot_filled.all()) or ends.all():
            break
    length = int(finished_lengths[:, 0].max())
    return finished[:, 0, :length]


def _is_integer(value) -> bool:
    """An integer of any kind (Python's, numpy's), not a bool: what a count among the settings must be."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_settings(config, *, max_new_tokens: int, num_beams: int = 1, do_sample: bool = False,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, length_penalty: float = 1.0,
                   repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                   min_new_tokens: int = 0, early_stopping: bool | str = False) -> None:  # fmt: skip
    """Every setting of a generation by the model of `config`, before any work (`fastseq train` checks
    its evaluation's at start): a bad one is a ValueError naming it, its value and the fix."""
    counts = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, top_k=top_k,
                  no_repeat_ngram_size=no_repeat_ngram_size, min_new_tokens=min_new_tokens)  # fmt: skip
    for name, value in counts.items():
        if not _is_integer(value):
            raise ValueError(f"{name} must be an integer; got {value!r}")
    positions = position_limit(config)
    limit = min(MAX_NEW_TOKENS, positions or MAX_NEW_TOKENS)
    if not 1 <= max_new_tokens <= limit:
        why = "the KV cache is allocated up front"
        if limit == positions:
            why = f"the model's learned positions cover {positions} tokens"
        raise ValueError(f"max_new_tokens must be between 1 and {limit} ({why}); got {max_new_tokens}")
    # Greedy search and beams read no temperature (as in transformers): only sampling's is checked.
    if do_sample and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature} (use do_sample=False for greedy)")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: no top-k filtering); got {top_k}")
    if not 0 < top_p <= 1:  # NaN fails here too
        raise ValueError(f"top_p must be in (0, 1] (1: no nucleus filtering); got {top_p}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1 (1: no beam search); got {num_beams}")
    if num_beams > 1 and do_sample:
        raise ValueError("beam sampling is not supported; use num_beams=1 with do_sample, or do_sample=False")
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number; got {length_penalty}")
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0: none); got {repetition_penalty}")
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0 (0: off); got {no_repeat_ngram_size}")
    if min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be >= 0; got {min_new_tokens}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be true, false or 'never' (as transformers); got {early_stopping!r}")


# What a model directory trained by `fastseq train` records besides generation_config.json: the run's source
# prefix and its max source and target lengths, which `fastseq generate` applies.
PREDICTION_CONFIG = "prediction_config.json"


def read_json_file(path: Path) -> dict:
    """A JSON object file of a model directory (empty when absent); a damaged one is a ValueError naming it."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or remove the file") from None
    if not isinstance(data, dict):
        from fastseq.data.readers import json_kind

        raise ValueError(f"{path} holds {json_kind(data)}, not a JSON object; fix or remove the file")
    return data


# The generation_config.json fields that `settings_from_file` reads, and the `generate` setting each is.
FILE_SETTINGS = {"num_beams": "num_beams", "max_new_tokens": "max_new_tokens", "min_new_tokens": "min_new_tokens",
                 "length_penalty": "length_penalty", "no_repeat_ngram_size": "no_repeat_ngram_size",
                 "repetition_penalty": "repetition_penalty", "early_stopping": "early_stopping"}  # fmt: skip


# The type each field `settings_from_file` reads must have: what the error says, and the test.
_FIELD_TYPES = {
    "an integer": (("num_beams", "max_new_tokens", "min_new_tokens", "no_repeat_ngram_size", "max_length",
                    "min_length"), _is_integer),
    "a number": (("length_penalty", "repetition_penalty"),
                 lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "true, false or \"never\"": (("early_stopping",), lambda v: isinstance(v, bool) or v == "never"),
}  # fmt: skip


def settings_from_file(generation_config: dict, file: str | Path = "generation_config.json") -> dict:
    """The `generate` settings a model directory's generation_config.json (`file`, for the errors) sets,
    with the meaning `transformers`' `generate` gives them: `max_new_tokens` (else `max_length` - 1, as
    an encoder-decoder's `max_length` counts the decoder start token), `min_new_tokens` (else
    `min_length` - 1), `num_beams`, `length_penalty`, `no_repeat_ngram_size`, `repetition_penalty`
    and `early_stopping`. A field left out, or null, is not set; one of another type is a ValueError
    naming the file."""
    for what, (keys, fits) in _FIELD_TYPES.items():
        for key in keys:
            value = generation_config.get(key)
            if value is not None and not fits(value):
                raise ValueError(f"{file}: {key} is {value!r}; it must be {what}: fix or remove the field")
    settings = {name: generation_config[key] for key, name in FILE_SETTINGS.items()
                if generation_config.get(key) is not None}  # fmt: skip
    for length, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        if new not in settings and generation_config.get(length) is not None:
            settings[new] = max(generation_config[length] - 1, 0)
    return settings


def recorded_prediction(recorded: dict, file: str | Path = PREDICTION_CONFIG) -> tuple[str | None, int | None]:
    """The source prefix and max source length that prediction_config.json (`recorded`, read from `file`)
    holds, None where it holds none; a value of another type is a ValueError naming the file."""
    prefix, limit = recorded.get("source_prefix"), recorded.get("max_source_length")
    if prefix is not None and not isinstance(prefix, str):
        raise ValueError(f"{file}: source_prefix is {prefix!r}; it must be text: fix or remove the field")
    if limit is not None and (not _is_integer(limit) or limit < 1):
        raise ValueError(f"{file}: max_source_length is {limit!r}; it must be an integer >= 1: fix or remove the field")
    return prefix, limit


def position_limit(config) -> int | None:
    """The most decoder positions the model of `config` has (learned position embeddings), or None
    (T5's relative positions have no limit)."""
    return getattr(config, "max_position_embeddings", None)


def _check_inputs(config, input_ids, attention_mask) -> None:
    """`generate`'s inputs: integer ids `(B, L)` with B, L >= 1, each in the model's vocabulary, and a
    mask of their shape; anything else is a ValueError saying what was given."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in _ID_DTYPES:
        got = f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids)
        raise ValueError(f"input_ids must be an integer tensor (batch, length); got {got}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} holds no token; give each row at least one (its eos)")
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape
    ):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}; got {got}")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= config.vocab_size:
        raise ValueError(f"input_ids hold {low if low < 0 else high}, outside the model's vocabulary (0 to "
                         f"{config.vocab_size - 1}); encode the inputs with the model's tokenizer")  # fmt: skip


_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 20,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    min_new_tokens: int = 0,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    decoder_start_token_id: int | None = None,
    forced_eos_token_id: int | None = None,
) -> torch.Tensor:
    """Token ids `(B, 1 + n)`, n <= max_new_tokens: the decoder start token, then the generated
    tokens (pad after a row's eos). Greedy by default; `do_sample` draws from the distribution
    shaped by `temperature`, `top_k` and `top_p` (reproducible with `generator`); `num_beams` > 1
    runs beam search (`length_penalty`, `early_stopping`) and returns the best hypothesis.
    `repetition_penalty`, `no_repeat_ngram_size` and `min_new_tokens` shape every step's scores as
    `transformers`' processors of those names do. Token settings default to the model's config
    (`forced_eos_token_id` too: eos forced at the last step). `max_new_tokens` is at most
    `MAX_NEW_TOKENS`, and at most the model's learned positions where it has them."""
    config = model.config
    _check_inputs(config, input_ids, attention_mask)
    eos = _setting(eos_token_id, config, "eos_token_id")
    pad = _setting(pad_token_id, config, "pad_token_id")
    start = _setting(decoder_start_token_id, config, "decoder_start_token_id")
    check_settings(config, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample,
                   temperature=temperature, top_k=top_k, top_p=top_p, length_penalty=length_penalty,
                   repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                   min_new_tokens=min_new_tokens, early_stopping=early_stopping)  # fmt: skip
    rules = dict(
        eos=eos, forced_eos=_setting(forced_eos_token_id, config, "forced_eos_token_id"),
        max_new_tokens=max_new_tokens, repetition_penalty=float(repetition_penalty),
        no_repeat_ngram_size=no_repeat_ngram_size, min_new_tokens=min_new_tokens,
    )  # fmt: skip
    was_training = model.training
    model.eval()
    try:
        B = input_ids.shape[0]
        encoder_states = model.encode(input_ids, attention_mask)  # (B, Le, d_model)
        if num_beams > 1:
            return _beam_search(
                model, encoder_states, attention_mask, num_beams=num_beams, max_new_tokens=max_new_tokens,
                length_penalty=length_penalty, early_stopping=early_stopping, pad=pad, start=start, rules=rules,
            )  # fmt: skip
        cache = KVCache(model.num_decoder_layers(), capacity=max_new_tokens)
        tokens = torch.full((B, 1), start, dtype=torch.long, device=input_ids.device)
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        bias = model.logits_bias()
        for _ in range(max_new_tokens):
            logits = _logits(model, tokens[:, -1:], encoder_states, attention_mask, cache, bias)  # (B, V)
            logits = _processed(logits, tokens, rules)
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
