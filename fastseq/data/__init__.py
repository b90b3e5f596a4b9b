"""Training data, in one place: a reader per format, where a run's examples come from, the
collators that turn examples into tensors, and length-bucketed batching as a resumable stream.

- `readers`: text formats (JSON Lines, JSON arrays, CSV/TSV, plain text; compressed or piped);
- `tables`: parquet (`pyarrow`), `datasets` directories and dataset names (`datasets`);
- `sources`: `DataSource` (a file, pipe, `datasets` directory or dataset name) and `read_examples`;
- `collators`: `Seq2SeqCollator`, T5's span corruption (`SpanCorruptionCollator`);
- `batching`: `bucketed_batches`, token lengths and `FileStream`;
- `packing`: several examples a row (`pack_rows`, `packed_batches`, `PackingCollator`).
"""

from .batching import Cuts, FileStream, TokenLengths, bucketed_batches, take
from .collators import (
    Seq2SeqCollator,
    SpanCorruptionCollator,
    compute_input_and_target_lengths,
    random_spans_noise_mask,
    rng_state,
    set_rng_state,
    span_corrupt,
)
from .packing import PackingCollator, pack_rows, packed_batches
from .readers import Example, field, fields, format_of, is_stream, read_csv, read_json, read_jsonl, read_text
from .sources import DataSource, file_source, hub_source, read_examples
from .tables import load_hub_dataset, load_saved_dataset, read_dataset, read_parquet

__all__ = [
    "Cuts", "DataSource", "Example", "FileStream", "PackingCollator", "Seq2SeqCollator", "SpanCorruptionCollator",
    "TokenLengths", "bucketed_batches", "compute_input_and_target_lengths", "field", "fields", "file_source",
    "format_of", "hub_source", "is_stream", "load_hub_dataset", "load_saved_dataset", "pack_rows", "packed_batches",
    "random_spans_noise_mask", "read_csv", "read_dataset", "read_examples", "read_json", "read_jsonl", "read_parquet",
    "read_text", "rng_state", "set_rng_state", "span_corrupt", "take",
]  # fmt: skip
