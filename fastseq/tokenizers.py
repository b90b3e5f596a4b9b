"""Tokenizers of the T5 family and BlenderbotSmall, read from (and written to) Hugging Face model
directories, encoding exactly as `transformers` does.

- `T5Tokenizer`: a SentencePiece model (`spiece.model`) with `extra_ids` sentinels
  `<extra_id_0>` ... at the top of the vocabulary (`<extra_id_0>` is the last id), pad 0, eos 1,
  unk 2, eos appended. A sentinel the tokenizer does not have (`<extra_id_100>` with 100 extra
  ids) is an error, never silently split into pieces.
- `ByT5Tokenizer`: UTF-8 bytes offset by 3 (pad 0, eos 1, unk 2), 125 sentinels after the bytes
  (`<extra_id_0>` = 259, as `transformers` numbers them).
- `BlenderbotSmallTokenizer`: lower-cased BPE over `vocab.json` + `merges.txt`, `@@ ` joining
  the pieces of a word, no eos appended.

`load_tokenizer(path)` picks the class from the files of a model directory. Every tokenizer
encodes a batch with padding (either side, optionally to a multiple), truncation and a length
cap, and decodes with or without the special tokens.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .files import atomic_write
from .hub import HubModelNotFound, model_directory

_SENTINEL = re.compile(r"<extra_id_(\d+)>")
_MAX_EXTRA_IDS = 10_000  # T5 has 100 sentinels, ByT5 125; each is a special token matched in every text


class Tokenizer:
    """What every tokenizer shares: special tokens matched in the text before the vocabulary sees
    it, eos handling, batching and decoding. Subclasses supply `_encode_text`, `_decode_ids` and
    the special-token table."""

    pad_token: str
    eos_token: str
    unk_token: str
    add_eos: bool = True
    strip_around: frozenset[str] = frozenset()  # special tokens that swallow the whitespace beside them
    padding_side: str = "right"
    model_max_length: int | None = None
    drops_unknown_ids: bool = True  # decode drops ids past the vocabulary (else: the subclass maps them)

    def __init__(self, special_tokens: dict[str, int]):
        self.special_tokens = dict(special_tokens)  # token text -> id
        self.special_ids = {i: t for t, i in self.special_tokens.items()}
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

    # --- vocabulary --------------------------------------------------------------------------

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def pad_token_id(self) -> int:
        return self.special_tokens[self.pad_token]

    @property
    def eos_token_id(self) -> int:
        return self.special_tokens[self.eos_token]

    @property
    def unk_token_id(self) -> int:
        return self.special_tokens[self.unk_token]

    def _check_sentinels(self, text: str) -> None:
        pass

    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_ids(self, ids: list[int], *, skip_special_tokens: bool) -> str:
        raise NotImplementedError

    # --- encoding ----------------------------------------------------------------------------

    def encode(
        self, text: str, *, add_special_tokens: bool = True, max_length: int | None = None, truncation: bool = False
    ) -> list[int]:
        """Token ids of one text: special tokens in the text become their ids, the rest goes
        through the vocabulary; eos appended (T5, ByT5). With `truncation`, at most `max_length`
        ids, eos kept last."""
        if not isinstance(text, str):
            raise TypeError(f"{type(self).__name__}.encode takes a str; got {type(text).__name__}")
        self._check_sentinels(text)
        parts = self._special_pattern.split(text)  # text, special, text, ..., text
        for i in range(1, len(parts), 2):
            if parts[i] in self.strip_around:
                parts[i - 1], parts[i + 1] = parts[i - 1].rstrip(), parts[i + 1].lstrip()
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self._encode_text(part))
        eos = [self.eos_token_id] if add_special_tokens and self.add_eos else []
        if truncation:
            limit = max_length if max_length is not None else self.model_max_length
            if limit is None:
                raise ValueError("truncation=True needs max_length (the tokenizer has no model_max_length)")
            if limit < len(eos):
                raise ValueError(f"max_length={limit} leaves no room for the eos token")
            ids = ids[: limit - len(eos)]
        return ids + eos

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        padding: bool | str = True,
        max_length: int | None = None,
        truncation: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        add_special_tokens: bool = True,
        return_tensors: str | None = "pt",
    ) -> dict:
        """Batch encode. `padding`: True / "longest" (to the longest row), "max_length" (to
        `max_length`) or False (lists of unequal length, `return_tensors=None` only). Returns
        `input_ids` and `attention_mask` (tensors with `return_tensors="pt"`, else lists)."""
        if isinstance(texts, str):
            texts = [texts]
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right'; got {side!r}")
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length'; got {padding!r}")
        rows = [
            self.encode(t, add_special_tokens=add_special_tokens, max_length=max_length, truncation=truncation)
            for t in texts
        ]
        pad = padding not in (False, "do_not_pad")
        if not pad and return_tensors is not None and len({len(r) for r in rows}) > 1:
            raise ValueError("rows of different lengths need padding to become a tensor; pass padding=True")
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max_length
        else:
            target = max((len(r) for r in rows), default=0)
        if pad and pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        input_ids, attention_mask = [], []
        for row in rows:
            fill = max(target - len(row), 0) if pad else 0
            pads, ones = [self.pad_token_id] * fill, [1] * len(row)
            if side == "right":
                input_ids.append(row + pads), attention_mask.append(ones + [0] * fill)
            else:
                input_ids.append(pads + row), attention_mask.append([0] * fill + ones)
        if return_tensors == "pt":
            return {
                "input_ids": torch.tensor(input_ids, dtype=torch.long).reshape(len(rows), -1),
                "attention_mask": torch.tensor(attention_mask, dtype=torch.long).reshape(len(rows), -1),
            }
        if return_tensors is not None:
            raise ValueError(f"return_tensors must be 'pt' or None; got {return_tensors!r}")
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # --- decoding ----------------------------------------------------------------------------

    def decode(self, ids: Iterable[int] | torch.Tensor, *, skip_special_tokens: bool = False) -> str:
        """The text of `ids`. An id the tokenizer does not have (a padded vocabulary's: FLAN-T5 has
        32,128 ids and 32,100 tokens, mT5 250,112 and 250,100) is dropped, as `transformers` does."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if self.drops_unknown_ids:
            size = len(self)
            ids = [i for i in ids if 0 <= i < size]
        return self._decode_ids(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, *, skip_special_tokens: bool = False) -> list[str]:
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]

    # --- files -------------------------------------------------------------------------------

    def _config(self) -> dict:
        return {"padding_side": self.padding_side, "model_max_length": self.model_max_length}

    def _write_config(self, path: Path, extra: dict) -> None:
        config = {k: v for k, v in {**self._config(), **extra}.items() if v is not None}
        _write_json(path / "tokenizer_config.json", config)
        specials = {"pad_token": self.pad_token, "eos_token": self.eos_token, "unk_token": self.unk_token}
        specials.update({k: v for k, v in extra.items() if k == "bos_token"})
        sentinels = [t for t in self.special_tokens if _SENTINEL.fullmatch(t)]
        if sentinels:
            specials["additional_special_tokens"] = sorted(sentinels, key=lambda t: int(_SENTINEL.fullmatch(t)[1]))
        _write_json(path / "special_tokens_map.json", specials)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _read_text(file: Path) -> str:
    """A tokenizer file's text; an unreadable or non-UTF-8 file is an error that names it."""
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start}); copy it again") from err


def _read_json(file: Path):
    try:
        return json.loads(_read_text(file))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err.msg} at line {err.lineno}); fix or replace the file") from err
    except RecursionError:
        raise ValueError(f"{file} is not valid JSON (nested too deep to read); fix or replace the file") from None


def _read_vocab(file: Path) -> dict[str, int]:
    """BlenderbotSmall's vocab.json: an object of token -> id, the ids exactly 0 ... N-1 (a gap would be a
    model id the tokenizer cannot read back)."""
    vocab = _read_json(file)
    if not isinstance(vocab, dict):
        raise ValueError(f"{file} holds a JSON {type(vocab).__name__}; a vocab.json is an object of token -> id")
    bad = next(((t, i) for t, i in vocab.items() if isinstance(i, bool) or not isinstance(i, int) or i < 0), None)
    if bad is not None:
        raise ValueError(f"{file}: token {bad[0]!r} has id {bad[1]!r}; every id must be an integer >= 0")
    ids = set(vocab.values())
    if len(ids) != len(vocab) or ids != set(range(len(vocab))):
        missing = next((i for i in range(len(vocab)) if i not in ids), None)
        problem = f"id {missing} is missing" if missing is not None else "an id appears twice"
        raise ValueError(
            f"{file}: the ids must be 0 ... {len(vocab) - 1}, one per token, but {problem}; use the vocab.json the "
            "model was trained with"
        )
    return vocab


def _write_json(path: Path, value) -> None:
    text = json.dumps(value, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _copy_into(source: Path, target: Path) -> None:
    """Copy a vocabulary file into a save directory (nothing to do when it is already there)."""
    if target.resolve() != source.resolve():
        atomic_write(target, lambda tmp: tmp.write_bytes(source.read_bytes()))


class _SentinelTokenizer(Tokenizer):
    """A tokenizer with `extra_ids` sentinels `<extra_id_0>` ... (T5's span-corruption markers)."""

    extra_ids: int

    def sentinel_id(self, n: int) -> int:
        """The id of `<extra_id_n>`."""
        if not 0 <= n < self.extra_ids:
            raise ValueError(f"sentinel {n} is out of range: this tokenizer has {self.extra_ids}")
        return self.special_tokens[f"<extra_id_{n}>"]

    def _check_sentinels(self, text: str) -> None:
        for match in _SENTINEL.finditer(text):
            if int(match[1]) >= self.extra_ids:
                raise ValueError(
                    f"{type(self).__name__}: the text contains {match[0]}, but this tokenizer has {self.extra_ids} "
                    f"sentinels (<extra_id_0> ... <extra_id_{self.extra_ids - 1}>); it would be split into ordinary "
                    "pieces. Use a sentinel below the count, or a tokenizer built with more extra_ids"
                )


class T5Tokenizer(_SentinelTokenizer):
    """T5 / mT5 SentencePiece tokenizer with sentinels at the top of the vocabulary."""

    pad_token, eos_token, unk_token = "<pad>", "</s>", "<unk>"

    def __init__(self, spiece_model: str | os.PathLike, *, extra_ids: int = 100, **config):
        import sentencepiece as spm

        self.spiece_model = Path(spiece_model)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(self.spiece_model))
        except (RuntimeError, OSError) as err:  # sentencepiece raises RuntimeError or OSError for a bad file
            raise ValueError(
                f"{self.spiece_model} is not a SentencePiece model ({_first_line(err)}); it is empty, truncated or "
                "another kind of file: copy spiece.model again from the model it belongs to"
            ) from err
        self.extra_ids = extra_ids
        size = self.sp.get_piece_size()
        expected = {self.pad_token: 0, self.eos_token: 1, self.unk_token: 2}
        found = {self.sp.id_to_piece(i): i for i in range(min(3, size))}
        if self.sp.unk_id() != 2 or any(found.get(t) != i for t, i in expected.items() if t != self.unk_token):
            raise ValueError(
                f"{self.spiece_model}: T5 needs pad = 0, eos = 1, unk = 2 in the SentencePiece model; got pieces "
                f"{[self.sp.id_to_piece(i) for i in range(min(3, size))]} and unk id {self.sp.unk_id()}. Train it "
                "with pad_id=0, eos_id=1, unk_id=2, bos_id=-1"
            )
        specials = dict(expected)
        specials.update({f"<extra_id_{i}>": size + extra_ids - 1 - i for i in range(extra_ids)})
        super().__init__(specials)
        self.padding_side = config.get("padding_side", "right")
        self.model_max_length = config.get("model_max_length")

    def __len__(self) -> int:
        return self.sp.get_piece_size() + self.extra_ids

    def _encode_text(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _decode_ids(self, ids: list[int], *, skip_special_tokens: bool) -> str:
        # Each token's text with SentencePiece's word marker as a space; one leading space dropped.
        pieces = []
        for i in ids:
            if i in self.special_ids:
                if not skip_special_tokens:
                    pieces.append(self.special_ids[i])
            else:
                pieces.append(self.sp.id_to_piece(i))
        text = "".join(pieces).replace("\u2581", " ")
        return text[1:] if text.startswith(" ") else text

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        _copy_into(self.spiece_model, path / "spiece.model")
        self._write_config(path, {"tokenizer_class": "T5Tokenizer", "extra_ids": self.extra_ids})


class ByT5Tokenizer(_SentinelTokenizer):
    """ByT5: every UTF-8 byte is a token (id = byte + 3)."""

    pad_token, eos_token, unk_token = "<pad>", "</s>", "<unk>"
    strip_around = frozenset((pad_token, eos_token, unk_token))  # as transformers' ByT5 defines them
    _OFFSET = 3

    def __init__(self, *, extra_ids: int = 125, **config):
        self.extra_ids = extra_ids
        specials = {self.pad_token: 0, self.eos_token: 1, self.unk_token: 2}
        specials.update({f"<extra_id_{i}>": 256 + self._OFFSET + i for i in range(extra_ids)})
        super().__init__(specials)
        self.padding_side = config.get("padding_side", "right")
        self.model_max_length = config.get("model_max_length")

    def __len__(self) -> int:
        return 256 + self._OFFSET + self.extra_ids

    def _encode_text(self, text: str) -> list[int]:
        return [b + self._OFFSET for b in text.encode("utf-8")]

    def _decode_ids(self, ids: list[int], *, skip_special_tokens: bool) -> str:
        out, run = [], bytearray()
        for i in ids:
            if self._OFFSET <= i < 256 + self._OFFSET:
                run.append(i - self._OFFSET)
                continue
            out.append(run.decode("utf-8", errors="ignore"))
            run = bytearray()
            if not skip_special_tokens:
                out.append(self.special_ids[i])
        out.append(run.decode("utf-8", errors="ignore"))
        return "".join(out)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._write_config(path, {"tokenizer_class": "ByT5Tokenizer", "extra_ids": self.extra_ids})


class BlenderbotSmallTokenizer(Tokenizer):
    """BlenderbotSmall's lower-cased BPE: punctuation split off, words ending in `</w>`, the pieces
    of a word joined by `@@ `."""

    pad_token, eos_token, unk_token, bos_token = "__null__", "__end__", "__unk__", "__start__"
    add_eos = False
    drops_unknown_ids = False

    def __init__(self, vocab_file: str | os.PathLike, merges_file: str | os.PathLike, **config):
        self.vocab_file, self.merges_file = Path(vocab_file), Path(merges_file)
        self.encoder: dict[str, int] = _read_vocab(self.vocab_file)
        self.decoder = {i: t for t, i in self.encoder.items()}
        lines = _read_text(self.merges_file).split("\n")[1:-1]  # a version header, a last newline
        self.ranks = {tuple(line.split()): rank for rank, line in enumerate(lines)}
        missing = [t for t in (self.pad_token, self.eos_token, self.unk_token, self.bos_token) if t not in self.encoder]
        if missing:
            raise ValueError(f"{self.vocab_file}: the vocabulary lacks the special tokens {missing}")
        super().__init__({t: self.encoder[t] for t in (self.pad_token, self.eos_token, self.unk_token, self.bos_token)})
        self._cache: dict[str, str] = {}
        self.padding_side = config.get("padding_side", "right")
        self.model_max_length = config.get("model_max_length")

    def __len__(self) -> int:
        return len(self.encoder)

    @property
    def bos_token_id(self) -> int:
        return self.special_tokens[self.bos_token]

    def _merge(self, word: tuple[str, ...]) -> tuple[str, ...]:
        """Apply the merges, lowest rank first, until none applies."""
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:], strict=True))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def _bpe(self, chunk: str) -> str:
        if chunk in self._cache:
            return self._cache[chunk]
        text = re.sub("([.,!?()])", r" \1", chunk)
        text = re.sub("(')", r" \1 ", text)
        text = re.sub(r"\s{2,}", " ", text)
        if "\n" in text:
            text = text.replace("\n", " __newln__")
        words = []
        for token in text.split(" "):
            if not token:
                continue
            token = token.lower()
            symbols = (*token[:-1], token[-1] + "</w>")
            if len(symbols) == 1:
                words.append(token)
                continue
            pieces = "@@ ".join(self._merge(symbols))[: -len("</w>")]
            words.append(pieces)
        self._cache[chunk] = result = " ".join(words)
        return result

    def _encode_text(self, text: str) -> list[int]:
        unk = self.unk_token_id
        ids = []
        for chunk in re.findall(r"\S+\n?", text):
            for token in self._bpe(chunk).split(" "):
                ids.append(self.encoder.get(token.lower(), unk))
        return ids

    def _decode_ids(self, ids: list[int], *, skip_special_tokens: bool) -> str:
        # An id the vocabulary lacks reads as the unknown token, as in `transformers`.
        tokens = [
            self.decoder.get(i, self.unk_token) for i in ids if not (skip_special_tokens and i in self.special_ids)
        ]
        return " ".join(tokens).replace("@@ ", "").strip()

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        _copy_into(self.vocab_file, path / "vocab.json")
        _copy_into(self.merges_file, path / "merges.txt")
        self._write_config(path, {"tokenizer_class": "BlenderbotSmallTokenizer", "bos_token": self.bos_token})


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory (or hub id, through `huggingface_hub`'s cache):
    `spiece.model` (T5, mT5), `vocab.json` + `merges.txt` (BlenderbotSmall), or a
    `tokenizer_config.json` naming `ByT5Tokenizer`."""
    path = Path(path)
    if not path.is_dir():
        try:
            path = model_directory(path)
        except HubModelNotFound as err:
            raise FileNotFoundError(
                f"{path}: not a directory; pass a model directory holding the tokenizer files, or a hub id ({err})"
            ) from None
    config = _tokenizer_config(path / "tokenizer_config.json")
    kwargs = {k: config[k] for k in ("padding_side", "model_max_length") if config.get(k) is not None}
    name = config.get("tokenizer_class") or ""
    if (path / "spiece.model").exists():
        return T5Tokenizer(path / "spiece.model", extra_ids=config.get("extra_ids", 100), **kwargs)
    if (path / "vocab.json").exists() and (path / "merges.txt").exists():
        return BlenderbotSmallTokenizer(path / "vocab.json", path / "merges.txt", **kwargs)
    if isinstance(name, str) and name.startswith("ByT5"):
        return ByT5Tokenizer(extra_ids=config.get("extra_ids", 125), **kwargs)
    raise FileNotFoundError(
        f"{path}: no tokenizer found. Expected spiece.model (T5, mT5), vocab.json + merges.txt "
        "(BlenderbotSmall), or a tokenizer_config.json with tokenizer_class ByT5Tokenizer"
    )


def _tokenizer_config(file: Path) -> dict:
    """tokenizer_config.json (empty when absent), its fields checked: `extra_ids` an integer >= 0,
    `padding_side` left or right, `model_max_length` a positive integer (transformers' "no limit"
    marker, about 1e30, reads as none)."""
    if not file.exists():
        return {}
    config = _read_json(file)
    if not isinstance(config, dict):
        raise ValueError(f"{file} holds a JSON {type(config).__name__}, not an object of settings; fix or remove it")
    extra = config.get("extra_ids", 0)
    if isinstance(extra, bool) or not isinstance(extra, int) or not 0 <= extra <= _MAX_EXTRA_IDS:
        raise ValueError(
            f"{file}: extra_ids is {extra!r}; it must be an integer in 0 ... {_MAX_EXTRA_IDS} (the number of sentinels)"
        )
    if config.get("padding_side") not in (None, "left", "right"):
        raise ValueError(f"{file}: padding_side is {config['padding_side']!r}; it must be 'left' or 'right'")
    length = config.get("model_max_length")
    if isinstance(length, (int, float)) and not isinstance(length, bool) and length > 1e12:
        config = {k: v for k, v in config.items() if k != "model_max_length"}
    elif length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise ValueError(f"{file}: model_max_length is {length!r}; it must be an integer >= 1")
    return config


def check_vocabulary(tokenizer: Tokenizer, vocab_size: int) -> None:
    """A tokenizer whose ids reach past the model's embedding is an error (the first batch would
    index out of range on the GPU)."""
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} ids but the model's vocabulary has {vocab_size}; "
            "use the tokenizer the model was trained with, or a model whose vocab_size is at least the tokenizer's"
        )
