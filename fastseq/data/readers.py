"""Readers of text formats, one per format; each streams its file and never holds it in memory.

- `read_jsonl`: one JSON object per line (JSON Lines);
- `read_json`: a `.json` file holding one array of objects, read element by element; a `.json`
  file that is not an array is read as JSON Lines, as `datasets`' json loader reads it;
- `read_csv`: a header row, comma- or (for `.tsv`) tab-separated;
- `read_text`: one document per non-blank line (the denoising task's input).

Any of them may be compressed (`.gz`, `.bz2`, `.xz`) and may be a pipe (a FIFO, or `<(zcat f.gz)`).
A byte-order mark at the start is dropped. A malformed record is an error naming `file:line`.
Fields are named by a path: `translation.en` is `record["translation"]["en"]` (a key that holds
the dot itself is taken first).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

Example = tuple[str, str]  # (source, target)

COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_CHUNK = 1 << 16  # characters read at a time from a JSON array


def is_stream(path: str | Path) -> bool:
    """Whether `path` is a pipe or another non-regular file: it can be read once only."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def format_of(path: str | Path) -> str:
    """The format's extension of a data file (`.jsonl` for `train.jsonl.gz`), lower case."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _open(path: Path) -> io.TextIOWrapper:
    """A text handle on a data file: decompressed by its extension, UTF-8 with any BOM dropped,
    lines untranslated (csv needs them so). Its `.buffer` can `peek` without consuming a pipe."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass the path of a data file")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass a data file (or a `datasets` save_to_disk directory)")
    opener = COMPRESSED.get(path.suffix.lower(), open)
    try:
        return io.TextIOWrapper(opener(path, "rb"), encoding="utf-8-sig", newline="")
    except OSError as err:
        raise ValueError(f"{path} cannot be read ({err.strerror}); check its permissions") from err


def _peek(handle: io.TextIOWrapper, path: Path) -> str:
    """The first non-blank character of a file not yet read, without consuming it."""
    try:
        head = handle.buffer.peek(4096)
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: the compressed file is damaged ({err}); recreate it") from None
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    return text[:1]


def _lines(handle: io.TextIOWrapper, path: Path) -> Iterator[str]:
    """The lines of an open text file, with errors that name the file and the line."""
    number = 0
    try:
        for line in handle:
            number += 1
            yield line
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}:{_first_bad_line(path)}: not UTF-8 text ({err.reason}); convert the file to "
                         "UTF-8") from None  # fmt: skip
    except (OSError, EOFError) as err:  # a damaged or truncated archive
        raise ValueError(f"{path}:{number + 1}: the compressed file is damaged ({err}); recreate it") from None


def _first_bad_line(path: Path) -> int | str:
    """The number of the first line of `path` that is not UTF-8. The text handle decodes the file in
    chunks, so its error cannot say where in the file it is; the bytes are read again, a line at a
    time, only when there is an error to report."""
    opener = COMPRESSED.get(path.suffix.lower(), open)
    try:
        with opener(path, "rb") as raw:
            for number, line in enumerate(raw, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    return number
    except (OSError, EOFError):
        pass
    return "?"


def _chars(handle: io.TextIOWrapper, path: Path) -> Iterator[str]:
    """An open text file in chunks of characters."""
    try:
        while chunk := handle.read(_CHUNK):
            yield chunk
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}:{_first_bad_line(path)}: not UTF-8 text ({err.reason}); convert the file to "
                         "UTF-8") from None  # fmt: skip
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: the compressed file is damaged ({err}); recreate it") from None


def valid_text(text: str, where: str) -> str:
    """Text that can be encoded: JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{where}: the text holds {text[err.start]!r}, a lone surrogate that is not a Unicode character; "
            "fix or drop that example"
        ) from None
    return text


MISSING = object()  # what `field` returns for a field the record does not have


def field(record: dict, name: str):
    """`record`'s field `name`, or `MISSING`; a dotted name descends into nested objects
    (`translation.en`), unless the record has a key that holds the dot itself."""
    if name in record:
        return record[name]
    value = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def json_kind(value) -> str:
    """What a JSON value is, in JSON's words with an article ("a number", "an object", "null"), for errors."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    kinds = ((str, "a string"), ((int, float), "a number"), (dict, "an object"), (list, "an array"))
    return next((kind for types, kind in kinds if isinstance(value, types)), f"a {type(value).__name__}")


def fields(record, source_field: str, target_field: str, where: str) -> Example:
    """The (source, target) strings of one record."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with {source_field!r} and {target_field!r}; got {record!r:.80}")
    source, target = field(record, source_field), field(record, target_field)
    missing = [name for name, value in ((source_field, source), (target_field, target)) if value is MISSING]
    if missing:
        raise ValueError(
            f"{where}: missing field(s) {missing}; the record has {sorted(record)}. Choose the fields with "
            "--source-field / --target-field (a dotted name such as translation.en reaches into an object)"
        )
    if not isinstance(source, str) or not isinstance(target, str):
        raise ValueError(
            f"{where}: {source_field!r} and {target_field!r} must be strings; got {json_kind(source)} and "
            f"{json_kind(target)}"
        )
    return valid_text(source, where), valid_text(target, where)


def _loads(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{where}: the JSON value is nested too deeply to read; flatten or drop that record") from None


def read_jsonl(path: str | Path, source_field: str = "source", target_field: str = "target") -> Iterator[Example]:
    """One JSON object per non-blank line."""
    path = Path(path)
    with _open(path) as handle:
        yield from _jsonl(handle, path, source_field, target_field)


def _jsonl(handle, path: Path, source_field: str, target_field: str) -> Iterator[Example]:
    for number, line in enumerate(_lines(handle, path), start=1):
        if line.strip():
            yield fields(_loads(line, f"{path}:{number}"), source_field, target_field, f"{path}:{number}")


def read_json(path: str | Path, source_field: str = "source", target_field: str = "target") -> Iterator[Example]:
    """A `.json` file: an array of objects, streamed one element at a time (an error names the
    line its element starts on); any other content is read as JSON Lines."""
    path = Path(path)
    with _open(path) as handle:
        if _peek(handle, path) == "[":
            yield from _array(_chars(handle, path), path, source_field, target_field)
        else:
            yield from _jsonl(handle, path, source_field, target_field)


def _array(chunks: Iterator[str], path: Path, source_field: str, target_field: str) -> Iterator[Example]:
    """The elements of a top-level JSON array, decoded one at a time from a growing buffer."""
    decoder = json.JSONDecoder()
    buffer, line = "", 1  # `line`: the line number where `buffer` starts
    started = finished = done = False
    while True:
        stripped = buffer.lstrip()  # whitespace, then the bracket or a comma between elements
        line += buffer.count("\n", 0, len(buffer) - len(stripped))
        buffer = stripped
        if len(buffer) < 2 and not done:  # too little to tell "]" from a value: read on
            chunk = next(chunks, None)
            done = chunk is None
            buffer += chunk or ""
            continue
        if not buffer:
            break
        if finished:
            raise ValueError(f"{path}:{line}: text after the end of the JSON array")
        if not started or buffer[0] in ",]":
            if not started and buffer[0] != "[":
                raise ValueError(f"{path}:{line}: expected a JSON array of objects")
            started, finished, buffer = True, buffer[0] == "]", buffer[1:]
            continue
        try:
            value, end = decoder.raw_decode(buffer)
        except json.JSONDecodeError as e:
            chunk = None if done else next(chunks, None)
            if chunk is not None:  # the element may go on in the next chunk
                buffer += chunk
                continue
            raise ValueError(f"{path}:{line + e.lineno - 1}: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise ValueError(
                f"{path}:{line}: the JSON value is nested too deeply to read; flatten or drop that record"
            ) from None
        if end == len(buffer) and not done:  # a number at the end of the buffer may go on
            chunk = next(chunks, None)
            done = chunk is None
            buffer += chunk or ""
            if not done:
                continue
        yield fields(value, source_field, target_field, f"{path}:{line}")
        line += buffer.count("\n", 0, end)
        buffer = buffer[end:]
    if started and not finished:
        raise ValueError(f"{path}:{line}: the JSON array is not closed (the file is truncated)")


def read_csv(path: str | Path, source_field: str = "source", target_field: str = "target") -> Iterator[Example]:
    """CSV with a header row; tab-separated when the file ends in `.tsv` (or `.tsv.gz`)."""
    path = Path(path)
    with _open(path) as handle:
        yield from _csv(handle, path, "\t" if format_of(path) == ".tsv" else ",", source_field, target_field)


def _csv(handle, path: Path, delimiter: str, source_field: str, target_field: str) -> Iterator[Example]:
    csv.field_size_limit(sys.maxsize)  # a document may be longer than csv's default 128 KiB field
    reader = csv.reader(_lines(handle, path), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return
        for name in dict.fromkeys((source_field, target_field)):
            if header.count(name) > 1:  # a dict of the row would keep the last one without a word
                raise ValueError(f"{path}:{reader.line_num}: the header names column {name!r} {header.count(name)} "
                                 "times; rename all but the one to read")  # fmt: skip
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{where}: {len(row)} fields, but the header has {len(header)} ({header})")
            yield fields(dict(zip(header, row, strict=True)), source_field, target_field, where)
    except csv.Error as err:
        raise ValueError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None


def read_sniffed(path: str | Path, source_field: str = "source", target_field: str = "target") -> Iterator[Example]:
    """A file whose name says no format (a pipe such as `<(zcat train.jsonl.gz)`), read by what it
    starts with: JSON (an array or JSON Lines) when `[` or `{`, else CSV (TSV when the header
    line holds a tab)."""
    path = Path(path)
    with _open(path) as handle:
        first = _peek(handle, path)
        if first == "[":
            yield from _array(_chars(handle, path), path, source_field, target_field)
        elif first == "{":
            yield from _jsonl(handle, path, source_field, target_field)
        else:
            head = handle.buffer.peek(4096).split(b"\n")[0]
            yield from _csv(handle, path, "\t" if b"\t" in head else ",", source_field, target_field)


def read_text(path: str | Path) -> Iterator[str]:
    """One document per non-blank line, stripped."""
    path = Path(path)
    with _open(path) as handle:
        for number, line in enumerate(_lines(handle, path), start=1):
            if line.strip():
                yield valid_text(line.strip(), f"{path}:{number}")
