"""Where the examples of a run come from: a file of any supported format (compressed or a pipe),
a `datasets` directory, or a dataset name. A `DataSource` opens a fresh reader from the start as
often as the source can be read again (a pipe only once), and says what identifies its content."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .readers import (
    COMPRESSED,
    Example,
    format_of,
    is_stream,
    read_csv,
    read_json,
    read_jsonl,
    read_sniffed,
    read_text,
)
from .tables import cache_directory, load_hub_dataset, load_saved_dataset, parquet_rows, read_dataset, read_parquet

FORMATS = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".tsv": read_csv, ".parquet": read_parquet}


@dataclass(frozen=True)
class DataSource:
    label: str  # how errors and log lines name it: "--data train.jsonl"
    open: Callable[[], Iterator]  # a reader from the first example
    rereadable: bool  # False for a pipe: read once, so one epoch at most
    fingerprint_path: str | None  # a file or directory whose content identifies the data; None: a pipe
    num_examples: int | None  # known without reading it (parquet's footer, a Dataset's rows), else None


def read_examples(
    path: str | Path, source_field: str = "source", target_field: str = "target", *, split: str = "train"
) -> Iterator[Example]:
    """Source/target pairs of a data file by its format (`.jsonl`, `.json`, `.csv`, `.tsv`,
    `.parquet`, each also `.gz`/`.bz2`/`.xz` but parquet), of a pipe by its content, or of a
    `datasets` directory (its `split` when it holds a DatasetDict)."""
    path = Path(path)
    if path.is_dir():
        return read_dataset(load_saved_dataset(path, split), f"{path}[{split}]", source_field, target_field)
    kind = format_of(path)
    if kind == ".parquet" and path.suffix.lower() in COMPRESSED:
        raise ValueError(f"{path}: parquet compresses its own columns; decompress the file first")
    if kind in FORMATS:
        return FORMATS[kind](path, source_field, target_field)
    if is_stream(path) and not kind:
        return read_sniffed(path, source_field, target_field)
    raise ValueError(
        f"{path}: unknown data format {kind or path.name!r}; use .jsonl, .json, .csv, .tsv or .parquet (optionally "
        ".gz), a `datasets` directory (or .txt for --task denoise)"
    )


def file_source(path: str, label: str, source_field: str, target_field: str, *, split: str = "train",
                text: bool = False) -> DataSource:  # fmt: skip
    """A data file, pipe or `datasets` directory; `text`: a file of documents, one a line, for
    --task denoise (any name; `.gz`/`.bz2`/`.xz` decompressed)."""
    file = Path(path)
    if text:
        if file.is_dir():
            raise ValueError(f"{label}: --task denoise reads plain text, one document per line (.txt, or .txt.gz)")
        return DataSource(label, lambda: read_text(file), not is_stream(file), _identity(file), None)
    if file.is_dir():
        dataset = load_saved_dataset(file, split)
        where = f"{file}[{split}]"
        return DataSource(label, lambda: read_dataset(dataset, where, source_field, target_field), True, str(file),
                          dataset.num_rows)  # fmt: skip
    rows = parquet_rows(file) if format_of(file) == ".parquet" and not is_stream(file) else None
    read_examples(file, source_field, target_field)  # checks the format; its reader opens nothing until read
    return DataSource(label, lambda: read_examples(file, source_field, target_field), not is_stream(file),
                      _identity(file), rows)  # fmt: skip


def hub_source(name: str, config: str | None, split: str, label: str, source_field: str,
               target_field: str) -> DataSource:  # fmt: skip
    """A split of a dataset `datasets.load_dataset` resolves (hub, cache or a local directory)."""
    dataset = load_hub_dataset(name, config, split)
    where = f"{name}[{split}]"
    return DataSource(label, lambda: read_dataset(dataset, where, source_field, target_field), True,
                      cache_directory(dataset), dataset.num_rows)  # fmt: skip


def _identity(file: Path) -> str | None:
    return None if is_stream(file) else str(file)
