"""Shared fixtures: a tiny offline tokenizer, tiny random-model configs and small datasets.

The tiny tokenizer is a word-level vocabulary where the word `tN` has token id N (N >= 4), so
expected token rows can be written down directly: "t5 t6" -> [5, 6]. Special tokens:
<pad>=0, <bos>=1, <eos>=2, <unk>=3.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from s3_server import CREDENTIALS, S3Server

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TINY_VOCAB = 64
PAD, BOS, EOS, UNK = 0, 1, 2, 3

TINY_MODEL_CONFIG = {
    "n_layers": 3,
    "d_model": 16,
    "n_ctx": 32,
    "d_head": 4,
    "n_heads": 4,
    "d_mlp": 32,
    "d_vocab": TINY_VOCAB,
    "act_fn": "gelu",
    "normalization_type": "LN",
    "seed": 0,
}


def write_tiny_tokenizer(folder: Path) -> Path:
    """Save a word-level PreTrainedTokenizerFast with ids tN -> N to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, "<unk>": UNK}
    vocab.update({f"t{i}": i for i in range(4, TINY_VOCAB)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture
def tiny_model_json(tmp_path: Path) -> Path:
    """A random-model config (3 layers, d_model 16, no tokenizer); load with `random:<path>`."""
    path = tmp_path / "tiny_model.json"
    path.write_text(json.dumps(TINY_MODEL_CONFIG))
    return path


@pytest.fixture
def tiny_model_json_with_tokenizer(tmp_path: Path, tiny_tokenizer_dir: Path) -> Path:
    """Like tiny_model_json, but its `tokenizer_name` points at the tiny offline tokenizer."""
    path = tmp_path / "tiny_model_tok.json"
    path.write_text(json.dumps({**TINY_MODEL_CONFIG, "tokenizer_name": str(tiny_tokenizer_dir)}))
    return path


TINY_MODEL = dict(n_layers=2, d_model=32, d_mlp=64, n_heads=4, d_head=8, d_vocab=100, n_ctx=32,
                  act_fn="gelu", normalization_type="LN", seed=0)


def write_tiny_run_inputs(root: Path, context_size: int, n_seq: int = 40) -> Path:
    """`root/tiny.json` (a 2-layer random model for `--model random:...`) and `root/tok.parquet`
    (`n_seq` pre-tokenized rows of `context_size` ids in column `ids`); returns root."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "tiny.json").write_text(json.dumps(TINY_MODEL))
    ids = np.random.default_rng(0).integers(0, 100, size=(n_seq, context_size))
    pq.write_table(pa.table({"ids": ids.tolist()}), root / "tok.parquet")
    return root


def tiny_docs(n_docs: int = 6, seed: int = 0) -> list[list[int]]:
    """Documents of varying length made of ids 4..TINY_VOCAB-1 (deterministic)."""
    import random

    rng = random.Random(seed)
    return [
        [rng.randrange(4, TINY_VOCAB) for _ in range(rng.randrange(3, 15))] for _ in range(n_docs)
    ]


def as_text(doc: list[int]) -> str:
    return " ".join(f"t{i}" for i in doc)


@pytest.fixture
def tiny_jsonl(tmp_path: Path) -> Path:
    """A .jsonl file with a `text` column (words tN) and a pre-tokenized `tokens` column."""
    path = tmp_path / "docs.jsonl"
    with path.open("w") as f:
        for doc in tiny_docs():
            f.write(json.dumps({"text": as_text(doc), "tokens": doc}) + "\n")
    return path


@pytest.fixture
def tiny_parquet(tmp_path: Path) -> Path:
    """The same documents as tiny_jsonl, as a parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = tiny_docs()
    path = tmp_path / "docs.parquet"
    table = pa.table({"text": [as_text(d) for d in docs], "tokens": docs})
    pq.write_table(table, path, row_group_size=2)
    return path


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests' matmuls are tiny and this machine has 2 shared cores: one thread is far faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def invoke(main: Callable[[], None], prog: str, monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    """Run a CLI's `main()` with argv in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [prog, *map(str, argv)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


class SmallDisk:
    """A small tmpfs at `path` (see the `small_disk` fixture): `leave_free(n)` fills it with a
    filler file until about n bytes are free (tmpfs counts whole 4 KiB pages), `fill()` leaves
    none, `make_space()` deletes the filler again."""

    def __init__(self, path: Path):
        self.path = path
        self.filler = path / "filler"

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def leave_free(self, nbytes: int) -> None:
        extra = self.free() - nbytes
        if extra > 0:
            with open(self.filler, "ab") as f:
                f.write(bytes(extra))

    def fill(self) -> None:
        self.leave_free(0)

    def make_space(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs mounted under tmp_path (root only; skipped where it cannot be mounted),
    unmounted afterwards."""
    import gc
    import subprocess

    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = tmp_path / "small-disk"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield SmallDisk(path)
    finally:
        gc.collect()  # memory maps and files of a failed in-process run
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def lock_held_elsewhere(folder: Path, command: str):
    """Hold `folder`'s output lock on another thread (as another run would) inside the block."""
    import threading

    from shared.lock import exclusive

    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with exclusive(folder, command):
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(10)
    try:
        yield
    finally:
        release.set()
        t.join()


def flip_chunk_byte(store: Path, array: str, chunk: int, at: int = 5) -> None:
    """Flip byte `at` of row chunk `chunk` of `array` where it lies on disk (its own file, or
    its place in a shard), leaving every other byte alone."""
    from shared.store import open_store

    span = open_store(store, require_complete=False).chunk_span(array, chunk)
    data = bytearray(span.file.read_bytes())
    data[span.offset + at] ^= 0xFF
    span.file.write_bytes(bytes(data))


def swap_chunk_bytes(store: Path, array: str, a: int, b: int) -> None:
    """Exchange the stored bytes of row chunks `a` and `b` of `array` (in one shard, or two
    chunk files): each is intact, but in the other's place."""
    from shared.store import open_store

    s = open_store(store, require_complete=False)
    spans = [s.chunk_span(array, c) for c in (a, b)]
    blobs = [span.file.read_bytes()[span.offset:span.offset + span.nbytes] for span in spans]
    for span, blob in zip(spans, reversed(blobs), strict=True):
        data = bytearray(span.file.read_bytes())
        data[span.offset:span.offset + span.nbytes] = blob
        span.file.write_bytes(bytes(data))


# --- a real S3 server (moto) on 127.0.0.1, for remote stores ------------------------------------

@dataclass
class S3Bucket:
    server: S3Server
    name: str

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def url(self, path: str = "") -> str:
        return f"s3://{self.name}/{path}" if path else f"s3://{self.name}"


def clear_fsspec_instances() -> None:
    """fsspec caches one filesystem per set of options: drop them so that no test reuses a
    client bound to another test's environment (endpoint, credentials)."""
    from s3fs import S3FileSystem
    from zarr.core.sync import sync

    # The asynchronous instances FsspecStore made hold an aiohttp session on zarr's event loop
    # that s3fs never closes (it registers its finalizer for synchronous instances only);
    # close them there, or aiohttp warns "Unclosed client session" when they are collected.
    for fs in list(S3FileSystem._cache.values()):
        creator = getattr(fs, "_s3creator", None)
        if fs.asynchronous and creator is not None:
            sync(creator.__aexit__(None, None, None))
    S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    """A fresh bucket on the session's moto server, with the environment pointing s3fs at it
    (AWS_ENDPOINT_URL and test credentials, nothing from the user's own AWS set-up)."""
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
                "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    for var, value in CREDENTIALS.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    clear_fsspec_instances()
    bucket = S3Bucket(s3_server, f"test-{uuid.uuid4().hex[:16]}")
    s3_server.create_bucket(bucket.name)
    yield bucket
    clear_fsspec_instances()
    s3_server.delete_bucket(bucket.name)


def store_objects(root: str) -> dict[str, bytes]:
    """Every object below a store root (a local folder or an s3:// URL), by relative key."""
    from shared.storage import location

    loc = location(root, check=False)
    if loc.local_path is not None:
        return {p.relative_to(loc.local_path).as_posix(): p.read_bytes()
                for p in loc.local_path.rglob("*") if p.is_file()}
    fs = loc.fs
    fs.invalidate_cache()
    return {key[len(loc.root) + 1:]: fs.cat_file(key) for key in fs.find(loc.root)}
