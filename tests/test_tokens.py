"""shared/tokens.py: packing, ordering, skipping, masks and errors, on the tiny word tokenizer.

With the tiny tokenizer the word tN is token N, BOS=1, EOS=2 (the separator), PAD=0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import as_text, tiny_docs

from shared.errors import UserError
from shared.tokens import TokenSpec, check_source, count_sequences, iter_token_batches

# Documents [4 5 6], [7 8], [9 10 11 12]  ->  stream 4 5 6 2 7 8 2 9 10 11 12
DOCS = [[4, 5, 6], [7, 8], [9, 10, 11, 12]]
ROWS_BOS_4 = [[1, 4, 5, 6], [1, 2, 7, 8], [1, 2, 9, 10]]  # context 4 with BOS; "11 12" dropped
ROWS_NO_BOS_4 = [[4, 5, 6, 2], [7, 8, 2, 9]]  # context 4 without BOS; "10 11 12" dropped


def _write_jsonl(path: Path, docs: list[list[int]]) -> Path:
    path.write_text("".join(json.dumps({"text": as_text(d), "tokens": d}) + "\n" for d in docs))
    return path


def _all_rows(spec: TokenSpec, tokenizer, **kwargs) -> list[list[int]]:
    return [row for b in iter_token_batches(spec, tokenizer, 2, **kwargs) for row in b.tokens.tolist()]


def _reference_rows(docs: list[list[int]], context: int, bos: bool) -> list[list[int]]:
    """Packing written out the slow obvious way, for the longer random fixtures."""
    stream: list[int] = []
    for i, doc in enumerate(docs):
        stream += ([2] if i else []) + doc
    body = context - 1 if bos else context
    return [([1] if bos else []) + stream[i : i + body] for i in range(0, len(stream) - body + 1, body)]


def test_packing_exact_rows_from_text(tmp_path: Path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", DOCS)
    assert _all_rows(TokenSpec(str(path), context_size=4), tiny_tokenizer) == ROWS_BOS_4
    no_bos = TokenSpec(str(path), context_size=4, prepend_bos=False)
    assert _all_rows(no_bos, tiny_tokenizer) == ROWS_NO_BOS_4


def test_packing_pre_tokenized_column_without_tokenizer(tmp_path: Path):
    path = _write_jsonl(tmp_path / "d.jsonl", DOCS)
    spec = TokenSpec(str(path), token_column="tokens", context_size=4, prepend_bos=False)
    # No tokenizer: no separator is known, so documents are simply concatenated.
    assert _all_rows(spec, None) == [[4, 5, 6, 7], [8, 9, 10, 11]]


def test_same_rows_from_every_file_format(tmp_path: Path, tiny_tokenizer, tiny_jsonl, tiny_parquet):
    docs = tiny_docs()
    expected = _reference_rows(docs, 8, bos=True)
    assert len(expected) == 7  # 45 tokens + 5 separators = 50 = 7 * 7 + 1
    json_file = tmp_path / "docs.json"
    json_file.write_text(json.dumps([{"text": as_text(d), "tokens": d} for d in docs]))
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, doc in enumerate(docs):  # one document per text file, read in sorted path order
        (txt_dir / f"doc{i:02d}.txt").write_text(as_text(doc))
    for source in (tiny_jsonl, tiny_parquet, json_file):
        for column in (None, "tokens"):
            spec = TokenSpec(str(source), token_column=column, context_size=8)
            assert _all_rows(spec, tiny_tokenizer) == expected, (source, column)
    assert _all_rows(TokenSpec(str(txt_dir), context_size=8), tiny_tokenizer) == expected


def test_folder_reads_files_in_sorted_order(tmp_path: Path, tiny_tokenizer):
    folder = tmp_path / "data"
    (folder / "b").mkdir(parents=True)
    _write_jsonl(folder / "b" / "x.jsonl", [DOCS[2]])
    _write_jsonl(folder / "a.jsonl", [DOCS[0]])
    pq.write_table(pa.table({"text": [as_text(DOCS[1])]}), folder / "a2.parquet")
    (folder / "notes.csv").write_text("ignored")
    assert _all_rows(TokenSpec(str(folder), context_size=4), tiny_tokenizer) == ROWS_BOS_4


def test_empty_documents_are_skipped(tmp_path: Path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [DOCS[0], [], DOCS[1], [], DOCS[2]])
    assert _all_rows(TokenSpec(str(path), context_size=4), tiny_tokenizer) == ROWS_BOS_4


def test_batches_indices_start_and_max(tmp_path: Path, tiny_tokenizer, tiny_jsonl):
    spec = TokenSpec(str(tiny_jsonl), context_size=8)
    full = _reference_rows(tiny_docs(), 8, bos=True)  # 7 sequences
    batches = list(iter_token_batches(spec, tiny_tokenizer, batch_size=4))
    assert [b.tokens.shape for b in batches] == [(4, 8), (3, 8)]
    assert batches[0].tokens.dtype == torch.int64 and batches[0].seq_index.dtype == torch.int64
    assert torch.cat([b.seq_index for b in batches]).tolist() == [0, 1, 2, 3, 4, 5, 6]

    resumed = list(iter_token_batches(spec, tiny_tokenizer, batch_size=4, start_sequence=2))
    assert torch.cat([b.tokens for b in resumed]).tolist() == full[2:]
    assert torch.cat([b.seq_index for b in resumed]).tolist() == [2, 3, 4, 5, 6]

    window = list(iter_token_batches(spec, tiny_tokenizer, 2, start_sequence=1, max_sequences=3))
    assert torch.cat([b.tokens for b in window]).tolist() == full[1:4]
    assert torch.cat([b.seq_index for b in window]).tolist() == [1, 2, 3]
    assert list(iter_token_batches(spec, tiny_tokenizer, 2, start_sequence=7)) == []
    assert list(iter_token_batches(spec, tiny_tokenizer, 2, max_sequences=0)) == []


def test_count_sequences(tiny_tokenizer, tiny_jsonl):
    spec = TokenSpec(str(tiny_jsonl), context_size=8)
    assert count_sequences(spec, tiny_tokenizer) == 7
    assert count_sequences(spec, tiny_tokenizer, limit=4) == 4
    assert count_sequences(TokenSpec(str(tiny_jsonl), context_size=8, prepend_bos=False), tiny_tokenizer) == 6


def test_drop_special_mask(tmp_path: Path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", DOCS)
    spec = TokenSpec(str(path), context_size=4, drop_special=True)
    (batch, *_) = list(iter_token_batches(spec, tiny_tokenizer, 8))
    assert batch.tokens.tolist() == ROWS_BOS_4
    # BOS at position 0 and the EOS separators are not cached.
    assert batch.keep.tolist() == [
        [False, True, True, True],
        [False, False, True, True],
        [False, False, True, True],
    ]
    # Padding inside pre-tokenized rows (PAD=0) is dropped as well.
    padded = _write_jsonl(tmp_path / "p.jsonl", [[4, 5, 0, 0]])
    spec = TokenSpec(str(padded), token_column="tokens", context_size=4, prepend_bos=False, drop_special=True)
    (batch,) = list(iter_token_batches(spec, tiny_tokenizer, 8))
    assert batch.keep.tolist() == [[True, True, False, False]]
    keep_all = TokenSpec(str(path), context_size=4)
    assert all(b.keep.all() for b in iter_token_batches(keep_all, tiny_tokenizer, 8))


def test_first_position_mask_combines_with_drop_special(tmp_path: Path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", DOCS)
    spec = TokenSpec(str(path), context_size=4, drop_special=True, first_position=2)
    (batch, *_) = list(iter_token_batches(spec, tiny_tokenizer, 8))
    assert batch.tokens.tolist() == ROWS_BOS_4  # the tokens (the model's context) are unchanged
    assert batch.keep.tolist() == [[False, False, True, True]] * 3
    spec = TokenSpec(str(path), context_size=4, first_position=3)
    assert all(b.keep.tolist() == [[False] * 3 + [True]] * len(b.keep)
               for b in iter_token_batches(spec, tiny_tokenizer, 2))


def test_token_spec_round_trips_to_dict():
    spec = TokenSpec("data.jsonl", token_column="tokens", context_size=64, drop_special=True,
                     first_position=3)
    assert TokenSpec(**spec.to_dict()) == spec
    assert json.loads(json.dumps(spec.to_dict()))["context_size"] == 64


def test_missing_column_names_existing_columns(tmp_path: Path, tiny_tokenizer, tiny_jsonl, tiny_parquet):
    for source in (tiny_jsonl, tiny_parquet):
        with pytest.raises(UserError, match=r"has no column 'body'; its columns are \['text', 'tokens'\]"):
            iter_token_batches(TokenSpec(str(source), text_column="body"), tiny_tokenizer, 4)
        with pytest.raises(UserError, match="has no column 'ids'"):
            count_sequences(TokenSpec(str(source), token_column="ids"), tiny_tokenizer)


def test_missing_or_unusable_files(tmp_path: Path, tiny_tokenizer):
    with pytest.raises(UserError, match="does not exist"):
        check_source(TokenSpec(str(tmp_path / "nope.jsonl")), tiny_tokenizer)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="has no .txt"):
        check_source(TokenSpec(str(empty)), tiny_tokenizer)
    csv = tmp_path / "x.csv"
    csv.write_text("a,b")
    with pytest.raises(UserError, match="unsupported type"):
        check_source(TokenSpec(str(csv)), tiny_tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "t4"}\n{oops\n')
    with pytest.raises(UserError, match="line 2 of .*bad.jsonl is not valid JSON"):
        count_sequences(TokenSpec(str(bad)), tiny_tokenizer)
    obj = tmp_path / "obj.json"
    obj.write_text('{"text": "t4"}')
    with pytest.raises(UserError, match="JSON list of row objects"):
        check_source(TokenSpec(str(obj)), tiny_tokenizer)
    wrong = _write_jsonl(tmp_path / "w.jsonl", DOCS)
    with pytest.raises(UserError, match="column 'text' must hold a list of token ids"):
        check_source(TokenSpec(str(wrong), token_column="text"), tiny_tokenizer)
    with pytest.raises(UserError, match="plain text and has no token column"):
        txt = tmp_path / "a.txt"
        txt.write_text("t4 t5")
        check_source(TokenSpec(str(txt), token_column="tokens"), tiny_tokenizer)


def test_tokenizer_requirements(tmp_path: Path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", DOCS)
    for prepend_bos in (True, False):
        with pytest.raises(UserError, match="this model has no tokenizer; use --token-column"):
            check_source(TokenSpec(str(path), prepend_bos=prepend_bos), None)
    with pytest.raises(UserError, match="pass --no-bos"):
        check_source(TokenSpec(str(path), token_column="tokens"), None)
    with pytest.raises(UserError, match="--drop-special needs"):
        check_source(TokenSpec(str(path), token_column="tokens", prepend_bos=False, drop_special=True), None)


def test_token_ids_outside_vocab(tmp_path: Path):
    path = _write_jsonl(tmp_path / "d.jsonl", [[4, 5, 6, 99, 7]])
    spec = TokenSpec(str(path), token_column="tokens", context_size=2, prepend_bos=False)
    assert len(_all_rows(spec, None)) == 2  # no check without d_vocab
    with pytest.raises(UserError, match=r"token id 99 .* outside the model's vocabulary \(size 64\)"):
        _all_rows(spec, None, d_vocab=64)


def test_bad_spec_values(tiny_tokenizer, tiny_jsonl):
    with pytest.raises(UserError, match="context size 1 is too small"):
        TokenSpec(str(tiny_jsonl), context_size=1)
    TokenSpec(str(tiny_jsonl), context_size=1, prepend_bos=False)
    with pytest.raises(UserError, match="not pre-tokenized"):
        TokenSpec(None, token_column="tokens")
    with pytest.raises(UserError, match=r"first position 4 must be in 0\.\.3"):
        TokenSpec(str(tiny_jsonl), context_size=4, first_position=4)
    with pytest.raises(UserError, match="first position -1"):
        TokenSpec(str(tiny_jsonl), first_position=-1)
    with pytest.raises(UserError, match="batch size 0"):
        iter_token_batches(TokenSpec(str(tiny_jsonl)), tiny_tokenizer, 0)


def test_hub_dataset_offline_is_one_clear_error(tiny_tokenizer):
    # conftest sets HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1: the hub cannot be reached.
    with pytest.raises(UserError, match="cannot open hub dataset 'someone/no-such-dataset'"):
        check_source(TokenSpec("someone/no-such-dataset"), tiny_tokenizer)
