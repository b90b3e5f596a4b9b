"""Readers of columnar data, through the libraries that own the formats (imported when used):

- `read_parquet`: a parquet file, with `pyarrow`, streamed a batch of rows at a time;
- `load_saved_dataset`: a `datasets` `save_to_disk` directory (a Dataset, or a DatasetDict and a split);
- `load_hub_dataset`: a dataset name (and config) as `datasets.load_dataset` resolves it: the
  hub (or its cache, under `HF_HOME`; `HF_HUB_OFFLINE=1`/`HF_DATASETS_OFFLINE=1` keep it offline),
  or a local directory of data files;
- `read_dataset`: the examples of a loaded `datasets.Dataset`, streamed a batch at a time from
  its memory-mapped Arrow files.

Only the top-level columns that the fields name are read. An error names the row
(`FILE:row N`, counted from 1).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path

from .readers import Example, fields

_ROWS = 1024  # rows decoded at a time
_INSTALL = 'pip install "fastseq[finetune]"'


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        package = name.split(".")[0]
        # A user's to fix, reported as such in one line (an ImportError would read as fastseq's fault).
        raise ValueError(f"reading this data needs the `{package}` package: {_INSTALL}") from None


def _columns(source_field: str, target_field: str, available: list[str]) -> list[str]:
    """The top-level columns holding the two fields (`translation` for `translation.en`)."""
    wanted = []
    for name in (source_field, target_field):
        column = name if name in available else name.split(".")[0]
        if column not in available:
            raise ValueError(
                f"no column {column!r} for the field {name!r}; the data has {available}. Choose the fields with "
                "--source-field / --target-field"
            )
        if column not in wanted:
            wanted.append(column)
    return wanted


def parquet_rows(path: str | Path) -> int:
    """The number of rows of a parquet file, from its footer."""
    pq = _import("pyarrow.parquet")
    return _parquet_file(pq, Path(path)).metadata.num_rows


def _parquet_file(pq, path: Path):
    try:
        return pq.ParquetFile(path)
    except OSError as err:
        raise ValueError(f"{path} cannot be read as parquet ({err}); check the file") from None
    except Exception as err:  # pyarrow's ArrowInvalid: not a parquet file
        raise ValueError(f"{path} is not a parquet file ({str(err).splitlines()[0]}); check the file") from None


def read_parquet(path: str | Path, source_field: str = "source", target_field: str = "target") -> Iterator[Example]:
    """The examples of a parquet file, a batch of rows at a time (memory holds one batch)."""
    pq = _import("pyarrow.parquet")
    path = Path(path)
    file = _parquet_file(pq, path)
    try:
        columns = _columns(source_field, target_field, file.schema_arrow.names)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    row = 0
    for batch in file.iter_batches(batch_size=_ROWS, columns=columns):
        for record in batch.to_pylist():
            row += 1
            yield fields(record, source_field, target_field, f"{path}:row {row}")


def load_saved_dataset(path: str | Path, split: str):
    """A `datasets.save_to_disk` directory as a Dataset: the directory's Dataset, or the `split`
    of its DatasetDict."""
    datasets = _import("datasets")
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise ValueError(
            f"{path} is a directory but not one `datasets.save_to_disk` wrote ({err}); pass a data file or such a "
            "directory"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{path} has the splits {sorted(loaded)}, not {split!r}; choose one with --train-split "
                             "or --eval-split")  # fmt: skip
        return loaded[split]
    return loaded


def load_hub_dataset(name: str, config: str | None, split: str):
    """`datasets.load_dataset(name, config, split=split)`, with errors in one line."""
    datasets = _import("datasets")
    try:
        return datasets.load_dataset(name, config, split=split)
    except ValueError as err:  # an unknown split or config
        raise ValueError(f"--dataset-name {name}: {' '.join(str(err).split())}") from None
    except (ConnectionError, FileNotFoundError) as err:
        raise ValueError(
            f"--dataset-name {name}: not found ({' '.join(str(err).split())[:300]}); check the name, or with "
            "HF_HUB_OFFLINE=1 load it once online so that it is in the cache"
        ) from None
    except Exception as err:  # datasets' own errors: DatasetNotFoundError, a gated repository, ...
        if type(err).__module__.startswith("datasets") or type(err).__module__.startswith("huggingface_hub"):
            raise ValueError(f"--dataset-name {name}: {type(err).__name__}: {' '.join(str(err).split())}") from None
        raise


def cache_directory(dataset) -> str | None:
    """The directory of a loaded Dataset's Arrow files (what fingerprints it); None in memory."""
    files = dataset.cache_files
    return str(Path(files[0]["filename"]).parent) if files else None


def read_dataset(dataset, where: str, source_field: str = "source", target_field: str = "target") -> Iterator[Example]:
    """The examples of a `datasets.Dataset`, a batch of rows at a time."""
    try:
        columns = _columns(source_field, target_field, list(dataset.column_names))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    row = 0
    for batch in dataset.select_columns(columns).with_format("arrow").iter(batch_size=_ROWS):
        for record in batch.to_pylist():
            row += 1
            yield fields(record, source_field, target_field, f"{where}:row {row}")
