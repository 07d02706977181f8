"""ActivationLoader: exact epochs, resumable batch sequence, both read paths, decoding, scaling,
hook alignment, thread shutdown and error hand-over."""

from __future__ import annotations

import gc
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.errors import UserError
from shared.store import (
    HookStats,
    Manifest,
    Store,
    acts_path,
    create_store,
    from_storage,
    open_store,
    seal,
    to_storage,
)
from train_sae.training.loader import THREAD_NAME, ActivationLoader, BatchPlan

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: pipelines/bench/


def make_store(
    path: Path,
    data: dict[str, torch.Tensor],
    *,
    dtype: str = "float32",
    chunk_rows: int = 128,
    compression: str | None = None,
    stats: bool = True,
    shard_rows: int | None = None,
) -> Store:
    """A complete store holding `data` ({hook: [n_rows, d_in]}), stats from the stored values."""
    n_rows = next(iter(data.values())).shape[0]
    manifest = Manifest(
        model="test", hooks=list(data), d_in={h: x.shape[1] for h, x in data.items()},
        dtype=dtype, n_rows=n_rows, context_size=1, seed=0, chunk_rows=chunk_rows,
        compression=compression, shard_rows=shard_rows,
    )
    group = create_store(path, manifest)
    for hook, x in data.items():
        stored = to_storage(x, dtype)
        group[acts_path(hook)][...] = stored
        values = from_storage(stored, dtype).double()
        if stats:
            manifest.stats[hook] = HookStats(
                mean=values.mean(0).tolist(), mean_norm=values.norm(dim=1).mean().item()
            )
    seal(group, manifest)
    return open_store(path)


def with_row_ids(n_rows: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """Random rows whose column 0 is the row's index (exact in float32)."""
    x = torch.randn(n_rows, d_in, generator=torch.Generator().manual_seed(seed))
    x[:, 0] = torch.arange(n_rows, dtype=torch.float32)
    return x


def collect(loader: ActivationLoader) -> list[dict[str, torch.Tensor]]:
    return list(loader)


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


@pytest.fixture
def id_store(tmp_path: Path) -> Store:
    # 1000 rows in chunks of 128: the last chunk is short (and its file padded)
    return make_store(tmp_path / "ids", {"h": with_row_ids(1000, 8)})


@pytest.mark.parametrize("batch_size", [64, 100, 1000])
def test_every_row_once_per_epoch(id_store: Store, batch_size: int) -> None:
    n_rows, epochs = id_store.n_rows, 3
    n_batches = -(-epochs * n_rows // batch_size)
    loader = ActivationLoader(id_store, ["h"], batch_size, n_batches, seed=5, normalize=False)
    assert len(loader) == n_batches
    batches = collect(loader)
    assert len(batches) == n_batches and len(loader) == 0
    assert all(b["h"].shape == (batch_size, 8) and b["h"].dtype == torch.float32 for b in batches)
    stream = torch.cat([b["h"][:, 0] for b in batches]).long()
    orders = [stream[e * n_rows : (e + 1) * n_rows] for e in range(epochs)]
    for order in orders:
        assert torch.equal(order.sort().values, torch.arange(n_rows))
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])


def test_seed_picks_the_order(id_store: Store) -> None:
    def ids(seed: int) -> torch.Tensor:
        return torch.cat([b["h"][:, 0] for b in ActivationLoader(id_store, ["h"], 100, 10, seed=seed)])

    assert torch.equal(ids(1), ids(1))
    assert not torch.equal(ids(1), ids(2))


def test_resume_yields_the_same_tail(id_store: Store) -> None:
    full = collect(ActivationLoader(id_store, ["h"], 96, 40, seed=3))
    for start in (0, 1, 10, 11, 39, 40):
        resumed = ActivationLoader(id_store, ["h"], 96, 40, seed=3, start_batch=start)
        assert len(resumed) == 40 - start
        tail = collect(resumed)
        assert len(tail) == 40 - start
        for a, b in zip(full[start:], tail, strict=True):
            assert torch.equal(a["h"], b["h"])
        if start < 40:
            assert torch.equal(resumed.batch(start)["h"], full[start]["h"])


def test_iterating_again_continues(id_store: Store) -> None:
    full = collect(ActivationLoader(id_store, ["h"], 50, 12))
    loader = ActivationLoader(id_store, ["h"], 50, 12)
    first = []
    for b in loader:
        first.append(b)
        if len(first) == 5:
            break
    assert len(loader) == 7
    rest = collect(loader)
    assert [torch.equal(a["h"], b["h"]) for a, b in zip(full, first + rest, strict=True)] == [True] * 12


def test_plan_segments_are_contiguous_and_cover_the_batch() -> None:
    plan = BatchPlan(n_rows=1000, chunk_rows=128, batch_size=300, seed=0)
    for i in range(20):
        segs = plan.segments(i)
        assert sum(s.n for s in segs) == 300
        for s in segs:
            length = 128 if s.chunk < 7 else 1000 - 7 * 128
            assert 0 <= s.start and s.start + s.n <= length and s.n > 0


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_memmap_and_zarr_paths_agree(tmp_path: Path, dtype: str) -> None:
    """Memory-mapped chunk files, memory-mapped shards (offsets from the shard index), and
    compressed shards through the zarr API give the same batches."""
    data = {"a": with_row_ids(700, 16, seed=1), "b": torch.randn(700, 24)}
    plain = make_store(tmp_path / "plain", data, dtype=dtype, chunk_rows=100)
    sharded = make_store(tmp_path / "sharded", data, dtype=dtype, chunk_rows=100, shard_rows=300)
    packed = make_store(tmp_path / "packed", data, dtype=dtype, chunk_rows=100, shard_rows=300,
                        compression="zstd")
    assert plain.memmappable() and sharded.memmappable() and not packed.memmappable()
    shard = packed.object_file(acts_path("b"), 0)
    assert shard.stat().st_size < 300 * 24 * np.dtype(np.float32).itemsize  # really compressed
    got_plain = collect(ActivationLoader(plain, ["a", "b"], 64, 25, seed=7))
    for other in (sharded, packed):
        got = collect(ActivationLoader(other, ["a", "b"], 64, 25, seed=7))
        for p, q in zip(got_plain, got, strict=True):
            assert torch.equal(p["a"], q["a"]) and torch.equal(p["b"], q["b"])


@pytest.mark.parametrize("compression", [None, "zstd"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_decode_is_exact(tmp_path: Path, dtype: str, compression: str | None) -> None:
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(4)) * 3
    x[:4, :3] = torch.tensor([[1.0, -2.5, 0.0], [65504.0, -65504.0, 6.103515625e-05],
                              [3.140625, -0.0078125, 256.0], [1e-3, 0.1, -7.0]])
    store = make_store(tmp_path / "s", {"h": x}, dtype=dtype, chunk_rows=64, compression=compression)
    stored = to_storage(x, dtype)  # what the store holds, in storage dtype
    expected_rows = from_storage(stored, dtype).float()  # [300, 12] exact widening
    if dtype == "bfloat16":  # bf16 is the top half of a float32's bits
        widened = (stored.astype(np.uint32) << 16).view(np.float32)
        assert np.array_equal(widened, expected_rows.numpy())
    loader = ActivationLoader(store, ["h"], 128, 5, seed=2, normalize=False)
    for i, got in enumerate(loader):
        rows = torch.cat([
            expected_rows[s.chunk * 64 + s.start : s.chunk * 64 + s.start + s.n]
            for s in loader.plan.segments(i)
        ])
        assert torch.equal(got["h"], rows)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scaling_is_sqrt_d_over_mean_norm(tmp_path: Path, dtype: str) -> None:
    x = with_row_ids(512, 64) * 0.01 + 2.0  # mean norm far from sqrt(64)
    store = make_store(tmp_path / "s", {"h": x}, dtype=dtype)
    mean_norm = store.manifest.stats["h"].mean_norm
    scaled = ActivationLoader(store, ["h"], 512, 1)
    raw = ActivationLoader(store, ["h"], 512, 1, normalize=False)
    assert scaled.scales == {"h": math.sqrt(64) / mean_norm} and raw.scales == {"h": 1.0}
    a, b = next(iter(scaled))["h"], next(iter(raw))["h"]
    assert torch.equal(a, b * scaled.scales["h"])
    # one batch is the whole store, so its mean norm is exactly sqrt(d_in) after scaling
    assert a.double().norm(dim=1).mean().item() == pytest.approx(8.0, rel=1e-6)
    assert b.double().norm(dim=1).mean().item() == pytest.approx(mean_norm, rel=1e-6)


def test_hooks_are_read_at_the_same_rows(tmp_path: Path) -> None:
    ids = torch.arange(900, dtype=torch.float32)
    a = torch.randn(900, 8)
    b = torch.randn(900, 20)
    a[:, 0], b[:, 3] = ids, 2 * ids + 1
    store = make_store(tmp_path / "s", {"a": a, "b": b, "c": torch.randn(900, 4)}, chunk_rows=70)
    loader = ActivationLoader(store, ["b", "a"], 128, 15, seed=9, normalize=False)
    for batch in loader:
        assert list(batch) == ["b", "a"]
        assert batch["a"].shape == (128, 8) and batch["b"].shape == (128, 20)
        assert torch.equal(batch["b"][:, 3], 2 * batch["a"][:, 0] + 1)
        rows = batch["a"][:, 0].long()
        assert torch.equal(batch["b"], b[rows])


def _wait_no_threads(timeout: float = 5.0) -> list[threading.Thread]:
    deadline = time.monotonic() + timeout
    while loader_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return loader_threads()


def count_builds(loader: ActivationLoader) -> list[int]:
    """Record the index of every batch the loader's thread builds."""
    built: list[int] = []
    build = loader._build
    loader._build = lambda i, reader: built.append(i) or build(i, reader)  # type: ignore[method-assign]
    return built


def test_early_break_stops_the_thread(id_store: Store) -> None:
    loader = ActivationLoader(id_store, ["h"], 10, 10_000, prefetch=2)
    built = count_builds(loader)
    for n, _ in enumerate(loader):
        assert len(loader_threads()) == 1
        if n == 3:
            break
    assert loader_threads() == []  # CPython closes the dropped generator right away
    assert len(loader) == 10_000 - 4
    assert len(built) <= 4 + 2 + 1  # consumed, queued, one in hand: no work after the break


def test_exception_in_consumer_stops_the_thread(id_store: Store) -> None:
    def train() -> None:
        for _ in ActivationLoader(id_store, ["h"], 10, 10_000):
            raise ValueError("diverged")

    with pytest.raises(ValueError, match="diverged"):
        train()
    assert _wait_no_threads() == []


def test_dropped_iterator_and_close_stop_the_thread(id_store: Store) -> None:
    loader = ActivationLoader(id_store, ["h"], 10, 10_000)
    it = iter(loader)
    next(it)
    assert len(loader_threads()) == 1
    del it
    gc.collect()
    assert _wait_no_threads() == []

    it = iter(loader)
    next(it)
    loader.close()
    assert list(it) == []  # a closed loader ends its iteration
    assert _wait_no_threads() == []


def test_prefetch_bounds_batches_built_ahead(id_store: Store) -> None:
    loader = ActivationLoader(id_store, ["h"], 10, 1000, prefetch=3)
    built = count_builds(loader)
    it = iter(loader)
    next(it)
    time.sleep(0.5)  # the producer fills the queue and must then wait
    # consumed 1, queued <= 3, one more built and waiting to be put
    assert len(built) <= 1 + 3 + 1
    assert len(built) >= 4
    it.close()


def test_missing_chunk_file_is_reported_in_the_consumer(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", {"h": with_row_ids(1000, 8)}, chunk_rows=100)
    loader = ActivationLoader(store, ["h"], 100, 30, prefetch=2)
    victim = store.object_file(acts_path("h"), 6)
    victim.unlink()
    got = 0
    with pytest.raises(UserError, match=r"row chunk 6 of acts/h .*/c/6/0.* is missing.*recreate"):
        for _ in loader:
            got += 1
    assert got < 10  # the first epoch reaches chunk 6 before its end
    assert _wait_no_threads() == []


def test_truncated_chunk_file_is_reported(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", {"h": torch.randn(300, 8)}, chunk_rows=100)
    victim = store.object_file(acts_path("h"), 2)
    victim.write_bytes(victim.read_bytes()[:-4])
    with pytest.raises(UserError, match="has 3196 bytes, expected 3200"):
        collect(ActivationLoader(store, ["h"], 100, 3))


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-4], r"row chunk \d of acts/h .* cannot be located: the shard index fails its "
                       "crc32c; the store at .* is damaged"),
    (lambda b: b[:40], "cannot be located: the shard is too short to hold its index"),
    (lambda b: b[:3200] + b[-4 - 48:], r"row chunk ([12]) .*cannot be located: inner chunk \1 "
                                       "lies past the end of the shard's data"),
])
def test_a_damaged_shard_is_reported(tmp_path: Path, damage, message) -> None:
    store = make_store(tmp_path / "s", {"h": torch.randn(300, 8)}, chunk_rows=100,
                       shard_rows=300)
    victim = store.object_file(acts_path("h"), 0)
    victim.write_bytes(damage(victim.read_bytes()))
    with pytest.raises(UserError, match=message):
        collect(ActivationLoader(store, ["h"], 100, 3))


def test_corrupt_compressed_chunk_is_reported(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", {"h": torch.randn(300, 8)}, chunk_rows=100, compression="zstd")
    store.object_file(acts_path("h"), 1).write_bytes(b"not zstd at all")
    with pytest.raises(UserError, match="cannot read rows 100-200 of hook 'h'.*damaged"):
        collect(ActivationLoader(store, ["h"], 100, 3))
    assert _wait_no_threads() == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hooks": []}, "no hooks to load"),
        ({"hooks": ["h", "h"]}, "listed twice"),
        ({"hooks": ["nope"]}, "hook 'nope' is not in store"),
        ({"batch_size": 0}, "batch size must be between 1 and the store's 1000 rows"),
        ({"batch_size": 1001}, "batch size must be between 1 and the store's 1000 rows"),
        ({"n_batches": -1}, "number of batches must be >= 0"),
        ({"start_batch": 11}, "start batch 11 is outside 0..10"),
        ({"prefetch": 0}, "prefetch must be >= 1"),
        ({"device": "gpu9"}, "unknown device 'gpu9'"),
        ({"device": "meta"}, "device 'meta' is not supported"),
    ],
)
def test_bad_arguments_are_user_errors(id_store: Store, kwargs: dict, message: str) -> None:
    args = {"hooks": ["h"], "batch_size": 10, "n_batches": 10, **kwargs}
    with pytest.raises(UserError, match=message):
        ActivationLoader(id_store, **args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_user_error(id_store: Store) -> None:
    with pytest.raises(UserError, match="CUDA is not available"):
        ActivationLoader(id_store, ["h"], 10, 10, device="cuda")


def test_missing_stats_need_normalize_off(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", {"h": torch.randn(100, 4)}, stats=False)
    with pytest.raises(UserError, match="no mean-norm statistic for hook 'h'"):
        ActivationLoader(store, ["h"], 10, 10)
    assert ActivationLoader(store, ["h"], 10, 10, normalize=False).scales == {"h": 1.0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", {"a": torch.randn(1000, 32), "b": torch.randn(1000, 16)},
                       dtype="bfloat16")
    cpu = collect(ActivationLoader(store, ["a", "b"], 128, 20, seed=1))
    gpu_loader = ActivationLoader(store, ["a", "b"], 128, 20, seed=1, device="cuda")
    assert gpu_loader.ship_raw  # bf16 crosses to the GPU as 16 bits
    assert gpu_loader.batch(0)["a"].device.type == "cuda"
    for c, g in zip(cpu, gpu_loader, strict=True):
        assert g["a"].device.type == "cuda"
        assert torch.equal(c["a"], g["a"].cpu()) and torch.equal(c["b"], g["b"].cpu())


def test_bench_measures_both_rates(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipelines.bench.loader import app, measure, write_bench_store

    write_bench_store(tmp_path / "b", n_rows=3000, d_in=16, chunk_rows=1000)
    store = open_store(tmp_path / "b")
    assert store.manifest.stats["bench"].mean_norm == pytest.approx(4.0, rel=0.05)  # ~sqrt(16)
    r = measure(tmp_path / "b", batch_size=512, seconds=0.05)
    assert r["passes"] >= 2 and r["store_bytes"] == 3000 * 16 * 4
    assert r["loader_rows_per_s"] > 0 and r["fromfile_rows_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["loader_rows_per_s"] / r["fromfile_rows_per_s"])
    out = CliRunner().invoke(app, ["--rows", "2048", "--d-in", "8", "--chunk-rows", "500",
                                   "--batch-size", "256", "--seconds", "0.05",
                                   "--workdir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "ratio loader / fromfile:" in out.output


def test_bench_refuses_a_compressed_store(tmp_path: Path) -> None:
    from pipelines.bench.loader import measure

    make_store(tmp_path / "z", {"h": torch.randn(100, 4)}, compression="zstd")
    with pytest.raises(UserError, match="is compressed"):
        measure(tmp_path / "z", batch_size=10, seconds=0.01)


def test_reads_a_synthetic_store(tmp_path: Path) -> None:
    from synthetic import make_sparse_data, write_synthetic_store

    x, _ = make_sparse_data(2048, 32, n_directions=64, n_active=4, seed=0)
    store = write_synthetic_store(tmp_path / "syn", x, chunk_rows=500, dtype="bfloat16")
    batches = collect(ActivationLoader(store, ["synthetic"], 256, 8, seed=1))
    epoch = torch.cat([b["synthetic"] for b in batches])  # [2048, 32], every row once
    assert epoch.double().norm(dim=1).mean().item() == pytest.approx(math.sqrt(32), rel=1e-5)
    stored = x.to(torch.bfloat16).float() * ActivationLoader(store, ["synthetic"], 256, 8).scales["synthetic"]
    assert torch.equal(epoch[torch.argsort(epoch.sum(1))], stored[torch.argsort(stored.sum(1))])


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_a_share_of_the_rows_reads_only_those_rows(tmp_path: Path, compression) -> None:
    """A data-parallel rank's loader (rows=slice) gives exactly its rows of every batch: the
    shares of 3 loaders, side by side, are the whole loader's batches (also across chunk ends
    and epochs)."""
    store = make_store(tmp_path / "s", {"h": with_row_ids(700, 8)}, chunk_rows=100,
                       shard_rows=300, compression=compression)
    whole = collect(ActivationLoader(store, ["h"], 96, 20, seed=5, normalize=False))
    shares = [collect(ActivationLoader(store, ["h"], 96, 20, seed=5, normalize=False,
                                       rows=slice(r * 32, (r + 1) * 32))) for r in range(3)]
    for i, batch in enumerate(whole):
        assert torch.equal(torch.cat([s[i]["h"] for s in shares]), batch["h"])
    share = ActivationLoader(store, ["h"], 96, 20, seed=5, normalize=False, rows=slice(32, 64))
    assert torch.equal(share.batch(7, whole=True)["h"], whole[7]["h"])
    with pytest.raises(UserError, match="not a non-empty contiguous range"):
        ActivationLoader(store, ["h"], 96, 20, rows=slice(50, 50))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("normalize", [True, False])
def test_16_bit_batches_shipped_raw_widen_to_the_same_floats(tmp_path: Path, dtype: str,
                                                             normalize: bool) -> None:
    """The path a GPU takes (the stored 16 bits copied, widened and scaled on the device), forced
    on the CPU, gives the bytes the host-widening path gives."""
    x = torch.randn(700, 12, generator=torch.Generator().manual_seed(5)) * 4
    store = make_store(tmp_path / "s", {"a": x, "b": x[:, :5] + 1}, dtype=dtype, chunk_rows=64)
    host = ActivationLoader(store, ["a", "b"], 128, 9, seed=3, normalize=normalize)
    raw = ActivationLoader(store, ["a", "b"], 128, 9, seed=3, normalize=normalize, ship_raw=True)
    assert not host.ship_raw and raw.ship_raw
    for h, r in zip(host, raw, strict=True):
        for hook in ("a", "b"):
            assert r[hook].dtype == torch.float32 and torch.equal(h[hook], r[hook])
    assert torch.equal(host.batch(4, whole=True)["a"], raw.batch(4, whole=True)["a"])


class RecordingMover:
    """Stands in for the CUDA copy stream (`_CopyStream`) on the CPU: records when each batch's
    copy is queued and when it is handed over."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def start(self, move):
        batch = move()
        self.events.append(("start", int(batch["h"][0, 0])))
        return batch

    def ready(self, batch):
        self.events.append(("ready", int(batch["h"][0, 0])))
        return batch


def test_next_batch_is_copied_while_this_one_trains(id_store: Store, monkeypatch) -> None:
    full = collect(ActivationLoader(id_store, ["h"], 100, 6, seed=2, normalize=False))
    mover = RecordingMover()
    monkeypatch.setattr(ActivationLoader, "_copy_stream", lambda self: mover)
    loader = ActivationLoader(id_store, ["h"], 100, 6, seed=2, normalize=False)
    got = []
    for b in loader:
        got.append(b)
        if len(got) == 3:  # a consumer that stops and comes back gets the same batches
            break
    assert len(loader) == 3
    got += collect(loader)
    assert all(torch.equal(a["h"], b["h"]) for a, b in zip(full, got, strict=True))
    first = [int(b["h"][0, 0]) for b in full]
    # batch i + 1's copy is queued before batch i is handed over (to train on)
    assert mover.events[:6] == [("start", first[0]), ("start", first[1]), ("ready", first[0]),
                                ("start", first[2]), ("ready", first[1]), ("start", first[3])]
    readies = [i for kind, i in mover.events if kind == "ready"]
    assert readies == first
