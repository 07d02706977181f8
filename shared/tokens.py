"""Token sources: stream documents, tokenize them and pack them into fixed-length sequences.

Packing (the same for text and for pre-tokenized rows):
1. each document is tokenized without special tokens (a pre-tokenized row is used as it is);
   empty documents are skipped;
2. documents are joined into one token stream with the tokenizer's EOS token (BOS if it has no
   EOS) between consecutive documents;
3. the stream is cut into sequences of `context_size` tokens, or of `context_size - 1` tokens
   with the BOS token put in front when `prepend_bos`; a final partial sequence is dropped.

Pre-tokenized rows are always re-packed this way, even rows that already have `context_size`
tokens, so every sequence follows the same rules whatever the source.

The order is fixed: files sorted by path, rows in file order, hub datasets in their streaming
order. Sequence i is therefore the same on every run, which lets a resumed run skip exactly
`start_sequence` sequences and lets an evaluation read held-out sequences after the cached ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shared.errors import fail, first_line

TEXT_SUFFIXES = (".txt", ".md")
ROW_SUFFIXES = (".jsonl", ".json", ".parquet")
_TOKENIZE_BATCH = 256  # documents tokenized per call (the fast tokenizers batch in Rust)


@dataclass
class TokenSpec:
    """Where tokens come from and how they are packed; recorded in the store manifest."""

    dataset: str | None = None
    """None: the embedded Shakespeare plays; a local .txt/.md/.jsonl/.json/.parquet file or a
    folder of them; otherwise a Hugging Face hub dataset name (streamed)."""
    text_column: str = "text"
    """Column holding the document text (jsonl/json/parquet/hub rows)."""
    token_column: str | None = None
    """Column holding pre-tokenized rows (a list of ints per row); overrides text_column."""
    split: str = "train"
    """Split of a hub dataset (local files have no splits)."""
    context_size: int = 128
    """Tokens per packed sequence, BOS included."""
    prepend_bos: bool = True
    """Start every packed sequence with the tokenizer's BOS token."""
    drop_special: bool = False
    """Mark positions holding the BOS, EOS or pad token (the prepended BOS, the document
    separators, padding in pre-tokenized rows) as not to be cached."""
    first_position: int = 0
    """Mark positions before this one (0 = the BOS when prepended) as not to be cached, like the
    start of SAELens' `seqpos_slice`: early positions can carry outsized activations (attention
    sinks). They still run through the model as context."""

    def __post_init__(self) -> None:
        min_size = 2 if self.prepend_bos else 1
        if self.context_size < min_size:
            fail(f"context size {self.context_size} is too small; use at least {min_size}")
        if not 0 <= self.first_position < self.context_size:
            fail(f"first position {self.first_position} must be in 0..{self.context_size - 1} "
                 f"(the context size is {self.context_size})")
        if self.dataset is None and self.token_column is not None:
            fail("the embedded Shakespeare text is not pre-tokenized; drop --token-column")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TokenBatch:
    tokens: Tensor  # [batch, context_size] int64
    seq_index: Tensor  # [batch] int64, global index of each packed sequence
    keep: Tensor  # [batch, context_size] bool, positions to cache


def check_source(spec: TokenSpec, tokenizer: Any) -> None:
    """Raise UserError now for a source that cannot work with this tokenizer, a missing file or
    column (checked on the first row), instead of partway through a run."""
    if spec.token_column is None and tokenizer is None:
        fail(
            "this model has no tokenizer; use --token-column with pre-tokenized data "
            "(or give the model a tokenizer)"
        )
    if spec.prepend_bos and (tokenizer is None or tokenizer.bos_token_id is None):
        fail(
            "prepending BOS (the default --bos) needs a BOS token but the model has no "
            "tokenizer (or its tokenizer has no BOS); pass --no-bos"
        )
    if spec.drop_special and tokenizer is None:
        fail("--drop-special needs the model's tokenizer to know its special tokens; drop the flag")
    if spec.dataset is None:
        from shared.embedded import shakespeare_files

        shakespeare_files()
    else:
        first = _rows(spec, spec.token_column or spec.text_column)
        next(first, None)
        first.close()


def iter_token_batches(
    spec: TokenSpec,
    tokenizer: Any,
    batch_size: int,
    start_sequence: int = 0,
    max_sequences: int | None = None,
    d_vocab: int | None = None,
) -> Iterator[TokenBatch]:
    """Packed sequences start_sequence, start_sequence + 1, ... in batches of `batch_size`.

    Stops after `max_sequences` sequences or when the source runs out; the last batch may be
    smaller. `d_vocab`, when given, makes a token id outside [0, d_vocab) a UserError (data
    tokenized for another model) instead of an index error inside the model. The source is
    checked (`check_source`) when this is called, not when iteration starts.
    """
    if batch_size < 1:
        fail(f"batch size {batch_size} must be at least 1")
    if start_sequence < 0:
        fail(f"start sequence {start_sequence} must not be negative")
    check_source(spec, tokenizer)
    stop = None if max_sequences is None else start_sequence + max_sequences
    special = _special_ids(tokenizer) if spec.drop_special else []
    return _batches(spec, tokenizer, batch_size, start_sequence, stop, d_vocab, special)


def kept_positions(spec: TokenSpec) -> int:
    """The most positions of one packed sequence that can be cached."""
    return spec.context_size - spec.first_position


def _batches(
    spec: TokenSpec,
    tokenizer: Any,
    batch_size: int,
    start: int,
    stop: int | None,
    d_vocab: int | None,
    special: list[int],
) -> Iterator[TokenBatch]:
    rows: list[list[int]] = []
    indices: list[int] = []
    if stop is not None and stop <= start:
        return
    for index, row in enumerate(_packed_sequences(spec, tokenizer, d_vocab)):
        if index < start:
            continue
        rows.append(row)
        indices.append(index)
        if len(rows) == batch_size:
            yield _make_batch(rows, indices, special, spec.first_position)
            rows, indices = [], []
        if stop is not None and index + 1 >= stop:
            break
    if rows:
        yield _make_batch(rows, indices, special, spec.first_position)


def count_sequences(spec: TokenSpec, tokenizer: Any, limit: int | None = None) -> int:
    """How many packed sequences the source gives, counting no further than `limit`."""
    check_source(spec, tokenizer)
    n = 0
    if limit is not None and limit <= 0:
        return 0
    for _ in _packed_sequences(spec, tokenizer, None):
        n += 1
        if limit is not None and n >= limit:
            break
    return n


def _make_batch(rows: list[list[int]], indices: list[int], special: list[int],
                first_position: int) -> TokenBatch:
    tokens = torch.tensor(rows, dtype=torch.int64)  # [batch, context_size]
    if special:
        keep = ~torch.isin(tokens, torch.tensor(special, dtype=torch.int64))
    else:
        keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, :first_position] = False
    return TokenBatch(tokens=tokens, seq_index=torch.tensor(indices, dtype=torch.int64), keep=keep)


def _special_ids(tokenizer: Any) -> list[int]:
    if tokenizer is None:
        return []
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------------------------------------
# packing


def _packed_sequences(spec: TokenSpec, tokenizer: Any, d_vocab: int | None) -> Iterator[list[int]]:
    """Every packed sequence of the source, in order (each a list of context_size ints)."""
    bos = [int(tokenizer.bos_token_id)] if spec.prepend_bos else []
    separator = _separator(tokenizer)
    body = spec.context_size - len(bos)
    buffer: list[int] = []
    first = True
    for doc in _documents(spec, tokenizer):
        if not doc:
            continue
        if d_vocab is not None:
            _check_ids(doc, d_vocab, spec)
        if not first and separator is not None:
            buffer.append(separator)
        first = False
        buffer.extend(doc)
        if len(buffer) >= body:
            n_full = len(buffer) // body
            for i in range(n_full):
                yield bos + buffer[i * body : (i + 1) * body]
            del buffer[: n_full * body]


def _separator(tokenizer: Any) -> int | None:
    if tokenizer is None:
        return None
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return int(token_id)
    return None


def _check_ids(doc: list[int], d_vocab: int, spec: TokenSpec) -> None:
    lo, hi = min(doc), max(doc)
    if lo < 0 or hi >= d_vocab:
        bad = lo if lo < 0 else hi
        fail(
            f"token id {bad} in {spec.dataset} is outside the model's vocabulary (size {d_vocab}); "
            "the data was tokenized for another model"
        )


def _documents(spec: TokenSpec, tokenizer: Any) -> Iterator[list[int]]:
    """Token ids of each document, in order."""
    if spec.token_column is not None:
        yield from _rows(spec, spec.token_column)
        return
    texts = _texts(spec)
    for chunk in _chunks(texts, _TOKENIZE_BATCH):
        yield from tokenizer(chunk, add_special_tokens=False)["input_ids"]


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _texts(spec: TokenSpec) -> Iterator[str]:
    if spec.dataset is None:
        from shared.embedded import shakespeare_files

        for path in shakespeare_files():
            yield path.read_text(encoding="utf-8")
        return
    yield from _rows(spec, spec.text_column)


def _rows(spec: TokenSpec, column: str) -> Iterator[Any]:
    """Values of `column` (text or token lists) row by row, checked for type."""
    want_tokens = column == spec.token_column
    assert spec.dataset is not None
    path = Path(spec.dataset).expanduser()
    if path.exists():
        for file in _local_files(path):
            for n, value in enumerate(_file_values(file, column, want_tokens)):
                yield _checked(value, want_tokens, column, f"row {n} of {file}")
    elif _looks_like_path(spec.dataset):
        fail(f"dataset file {spec.dataset} does not exist; check the path")
    else:
        for n, value in enumerate(_hub_values(spec, column)):
            yield _checked(value, want_tokens, column, f"row {n} of {spec.dataset}")


def _checked(value: Any, want_tokens: bool, column: str, where: str) -> Any:
    if want_tokens:
        if not isinstance(value, list | tuple):
            fail(f"{where}: column {column!r} must hold a list of token ids, not {type(value).__name__}")
        bad = [t for t in value if isinstance(t, bool) or not isinstance(t, int)]
        if bad:
            kind = "null" if bad[0] is None else type(bad[0]).__name__
            fail(f"{where}: column {column!r} holds {kind} values ({bad[0]!r}); token ids must "
                 "be whole numbers")
        return list(value)
    if not isinstance(value, str):
        fail(f"{where}: column {column!r} must hold text, not {type(value).__name__}")
    return value


def _looks_like_path(name: str) -> bool:
    return name.endswith(TEXT_SUFFIXES + ROW_SUFFIXES) or name.startswith((".", "/", "~"))


def _local_files(path: Path) -> list[Path]:
    suffixes = TEXT_SUFFIXES + ROW_SUFFIXES
    if path.is_file():
        if path.suffix not in suffixes:
            fail(f"dataset file {path} has an unsupported type; use {', '.join(suffixes)} files")
        return [path]
    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        fail(f"dataset folder {path} has no {', '.join(suffixes)} files")
    return files


def _file_values(file: Path, column: str, want_tokens: bool) -> Iterator[Any]:
    if file.suffix in TEXT_SUFFIXES:
        if want_tokens:
            fail(f"{file} is plain text and has no token column; drop --token-column")
        yield _read(file)  # one document per text file
    elif file.suffix == ".jsonl":
        with _open(file) as f:  # bytes, decoded line by line to name a line that is not UTF-8
            for line_no, raw in enumerate(f, 1):
                line = _decode(raw, f"line {line_no} of {file}")
                if line.strip():
                    yield _column(_json(line, file, line_no), column, file)
    elif file.suffix == ".json":
        rows = _json(_read(file), file, None)
        if not isinstance(rows, list):
            fail(f"{file} must hold a JSON list of row objects (or use .jsonl, one row per line)")
        for row in rows:
            yield _column(row, column, file)
    else:
        yield from _parquet_values(file, column)


def _open(file: Path):
    try:
        return file.open("rb")
    except OSError as e:
        fail(f"cannot read dataset file {file}: {e.strerror}")


def _read(file: Path) -> str:
    with _open(file) as f:
        return _decode(f.read(), f"dataset file {file}")


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"{where} is not UTF-8 text (byte {e.start}); convert it to UTF-8, e.g. with iconv")


def _json(text: str, file: Path, line_no: int | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {line_no} of {file}" if line_no else str(file)
        fail(f"{where} is not valid JSON ({e.msg})")


def _column(row: Any, column: str, file: Path) -> Any:
    if not isinstance(row, dict):
        fail(f"{file} holds a {type(row).__name__} where a row object was expected")
    if column not in row:
        fail(_missing_column(column, list(row), str(file)))
    return row[column]


def _missing_column(column: str, columns: list[str], where: str) -> str:
    return f"{where} has no column {column!r}; its columns are {columns}; choose one of them"


def _parquet_values(file: Path, column: str) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except (OSError, pa.ArrowInvalid) as e:
        fail(f"cannot read parquet file {file}: {e}")
    names = parquet.schema_arrow.names
    if column not in names:
        fail(_missing_column(column, names, str(file)))
    for batch in parquet.iter_batches(batch_size=1024, columns=[column]):
        yield from batch.column(0).to_pylist()


def _hub_values(spec: TokenSpec, column: str) -> Iterator[Any]:
    import datasets

    assert spec.dataset is not None
    try:
        stream = datasets.load_dataset(spec.dataset, split=spec.split, streaming=True)
    except (OSError, ValueError, ConnectionError) as e:
        fail(
            f"cannot open hub dataset {spec.dataset!r} (split {spec.split!r}): {first_line(e)}; "
            "check the name, the split and the network, or pass a local file"
        )
    columns = list(stream.features) if stream.features is not None else None
    if columns is not None and column not in columns:
        fail(_missing_column(column, columns, f"hub dataset {spec.dataset}"))
    for row in stream:
        if column not in row:
            fail(_missing_column(column, list(row), f"hub dataset {spec.dataset}"))
        yield row[column]


def source_fingerprint(spec: TokenSpec) -> dict[str, Any]:
    """What the token source is, by content (shared.fingerprint): the bytes of the local files in
    the order they are read, or a hub dataset's name, split and revision, plus the column read.
    Packing options (context size, BOS, ...) are not part of it: they cut the same stream
    differently. Local files have no splits, so the split is not part of theirs."""
    from shared.fingerprint import digest_of, files_fingerprint

    column = {"token_column": spec.token_column} if spec.token_column else {
        "text_column": spec.text_column}
    if spec.dataset is None:
        from shared.embedded import shakespeare_files

        files, kind = list(shakespeare_files()), "embedded"
    elif Path(spec.dataset).expanduser().exists():
        files, kind = _local_files(Path(spec.dataset).expanduser()), "local"
    else:
        revision = _hub_revision(spec.dataset)
        return {"kind": "hub", "name": spec.dataset, "split": spec.split, "revision": revision,
                **column, "digest": digest_of([spec.dataset, spec.split, revision, column])}
    if all(f.suffix in TEXT_SUFFIXES for f in files):
        column = {}  # a text file is one document whatever the column option says
    fp = files_fingerprint(files, kind, **column)
    if spec.dataset is not None:  # where it was read (not part of the digest)
        fp["path"] = str(Path(spec.dataset).expanduser().resolve())
    fp["files_digest"] = fp["digest"]  # the bytes alone, for "same files, other column"
    fp["digest"] = digest_of([fp["digest"], column])
    return fp


def _hub_revision(name: str) -> str | None:
    """The commit of a hub dataset, when the hub can be asked (None offline: then only the
    name and split can be compared)."""
    try:
        from huggingface_hub import HfApi, constants

        return None if constants.HF_HUB_OFFLINE else HfApi().dataset_info(name, timeout=10).sha
    except Exception:  # noqa: BLE001 - the revision is extra knowledge, never a requirement
        return None
