"""The packed token sequences in the store (`sequences`): what `cache-acts run` writes equals the
token source's packing, every row's token sits at its (seq_index, position), a resumed run
writes the same bytes, damage is refused, and stores without them still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import write_tiny_run_inputs
from synthetic import write_synthetic_store

from cache_acts.run import RunConfig, run_cache
from cache_acts.state import RunState
from shared.errors import UserError
from shared.store import MANIFEST_KEY, SEQUENCES, WORK_DIR, open_store
from shared.tokens import TokenSpec, iter_token_batches

CTX = 12
HOOK = "blocks.0.hook_resid_post"


def _cache(root: Path, out: Path, **kw) -> RunConfig:
    spec = TokenSpec(dataset=str(root / "tok.parquet"), token_column="ids", context_size=CTX,
                     prepend_bos=False, first_position=kw.pop("first_position", 0))
    cfg = RunConfig(out=out, tokens=spec, model=f"random:{root / 'tiny.json'}", hooks=[HOOK],
                    batch_size=3, chunk_rows=32, shard_rows=64, **kw)
    run_cache(cfg)
    return cfg


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return write_tiny_run_inputs(tmp_path_factory.mktemp("seq"), CTX, n_seq=30)


def _packed(cfg: RunConfig, n: int) -> np.ndarray:
    """The first n packed sequences of the token source, as the model saw them."""
    rows = [b.tokens for b in iter_token_batches(cfg.tokens, None, 7)]
    return torch.cat(rows)[:n].numpy()


@pytest.mark.parametrize("max_tokens, first_position", [(None, 0), (200, 3)])
def test_run_stores_the_packed_sequences(inputs, tmp_path, max_tokens, first_position):
    """Every sequence a row comes from, no more: `--tokens 200` cuts the 17th sequence (of 9
    kept positions each after --first-position 3) in the middle of a batch of 3."""
    cfg = _cache(inputs, tmp_path / "s", max_tokens=max_tokens, first_position=first_position)
    store = open_store(tmp_path / "s")
    seq = np.asarray(store.array("seq_index")[:])
    pos = np.asarray(store.array("position")[:])
    tok = np.asarray(store.array("token_ids")[:])
    n_seq = int(seq.max()) + 1
    assert store.has_sequences and store.manifest.n_sequences == n_seq
    assert n_seq == (30 if max_tokens is None else -(-200 // (CTX - first_position)))
    sequences = store.read_sequences(np.arange(n_seq))
    assert sequences.dtype == np.int32 and sequences.shape == (n_seq, CTX)
    np.testing.assert_array_equal(sequences, _packed(cfg, n_seq))
    np.testing.assert_array_equal(sequences[seq, pos], tok)  # each row's context is right
    # readable by any Zarr client, as documented
    raw = zarr.open_group(str(tmp_path / "s"), mode="r")[SEQUENCES][:]
    np.testing.assert_array_equal(raw, sequences)


def test_a_resumed_run_writes_the_same_sequences(inputs, tmp_path, monkeypatch):
    """Stopped in pass 1 after some commits (the source raises), then resumed: the store,
    sequences included, has the bytes of an uninterrupted run."""
    _cache(inputs, tmp_path / "ref", shuffle_memory=4096)
    import cache_acts.run as run_module

    real = run_module.iter_token_batches
    calls = {"n": 0}

    def failing(*a, **k):
        for batch in real(*a, **k):
            calls["n"] += 1
            if calls["n"] == 6:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(run_module, "iter_token_batches", failing)
    with pytest.raises(KeyboardInterrupt):
        _cache(inputs, tmp_path / "cut", shuffle_memory=4096)
    monkeypatch.setattr(run_module, "iter_token_batches", real)
    state = RunState.load(tmp_path / "cut" / WORK_DIR)
    assert state is not None and 0 < state.rows_done < 360  # stopped partway, after commits
    spec = TokenSpec(dataset=str(inputs / "tok.parquet"), token_column="ids", context_size=CTX,
                     prepend_bos=False)
    run_cache(RunConfig(out=tmp_path / "cut", tokens=spec, model=f"random:{inputs / 'tiny.json'}",
                        hooks=[HOOK], batch_size=3, chunk_rows=32, shard_rows=64,
                        shuffle_memory=4096), resume=True)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(cut) for p in cut.rglob("*") if p.is_file())
    assert any(f.parts[0] == SEQUENCES for f in files)
    for f in files:
        assert (ref / f).read_bytes() == (cut / f).read_bytes(), f


def test_damaged_sequences_are_refused(inputs, tmp_path):
    _cache(inputs, tmp_path / "s")
    (shard,) = [p for p in (tmp_path / "s" / SEQUENCES / "c").rglob("*") if p.is_file()]
    data = bytearray(shard.read_bytes())
    data[7] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sequences in store .* does not match its checksum"):
        open_store(tmp_path / "s").read_sequences(np.array([0]))


def test_stores_without_sequences_still_load(inputs, tmp_path):
    """A store from before `sequences` existed (no array, no manifest fields) and a synthetic
    one load and say they have none; --overwrite of a store with sequences replaces it."""
    _cache(inputs, tmp_path / "s")
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "s", old)
    shutil.rmtree(old / SEQUENCES)
    group = zarr.open_group(str(old), mode="r+")
    manifest = dict(group.attrs[MANIFEST_KEY])
    for key in ("n_sequences", "sequence_chunk_rows"):
        manifest.pop(key)
    manifest["checksums"] = {k: v for k, v in manifest["checksums"].items() if k != SEQUENCES}
    group.attrs[MANIFEST_KEY] = json.loads(json.dumps(manifest))
    store = open_store(old)
    assert not store.has_sequences and store.n_rows == open_store(tmp_path / "s").n_rows
    synthetic = write_synthetic_store(tmp_path / "syn", torch.randn(50, 4))
    assert not synthetic.has_sequences
    run_cache(RunConfig(out=tmp_path / "s", tokens=TokenSpec(
        dataset=str(inputs / "tok.parquet"), token_column="ids", context_size=CTX,
        prepend_bos=False), model=f"random:{inputs / 'tiny.json'}", hooks=[HOOK], batch_size=3,
        chunk_rows=32, shard_rows=64, max_tokens=100), overwrite=True)
    assert open_store(tmp_path / "s").manifest.n_sequences == -(-100 // CTX)
