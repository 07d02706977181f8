"""shared/storage.py: store locations on local disk, file://, memory:// and a real S3 server.

S3 is moto's server in a subprocess on 127.0.0.1 (tests/s3_server.py), reached over HTTP by s3fs
as AWS or MinIO would be: the endpoint comes only from AWS_ENDPOINT_URL, so a passing round trip
also shows that botocore honours it. Each test gets its own bucket.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import typer
import zarr
from conftest import clear_fsspec_instances  # the s3_server and s3 fixtures live there
from s3_server import CREDENTIALS, free_port

from shared.errors import UserError, run_cli
from shared.storage import (
    Location,
    ReadAhead,
    check_tmp_dir,
    location,
    parse_storage_options,
    scratch_dir,
)

# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(params=["local", "file", "memory", "s3"])
def store_loc(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Location]:
    """A validated location for a store that does not exist yet, on each kind of storage."""
    kind = request.param
    if kind == "local":
        yield location(str(tmp_path / "store"))
    elif kind == "file":
        yield location((tmp_path / "store").as_uri())
    elif kind == "memory":
        root = f"memory://test-{uuid.uuid4().hex}"
        yield location(root + "/store")
        import fsspec

        with contextlib.suppress(FileNotFoundError):  # the test may have removed it all
            fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)
    else:
        yield location(request.getfixturevalue("s3").url("store"))


# --- storage options -------------------------------------------------------------------------


def test_storage_options_are_json_else_strings_and_dotted_keys_nest():
    opts = parse_storage_options([
        "anon=true", "default_block_size=8388608", "endpoint_url=http://127.0.0.1:9000",
        'client_kwargs={"region_name": "eu-west-1"}', "client_kwargs.verify=false",
        "config_kwargs.retries.max_attempts=3", 'key="123"', "token=",
    ])
    assert opts == {
        "anon": True, "default_block_size": 8388608, "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"region_name": "eu-west-1", "verify": False},
        "config_kwargs": {"retries": {"max_attempts": 3}}, "key": "123", "token": "",
    }
    assert parse_storage_options([]) == {}


@pytest.mark.parametrize("pairs, says", [
    (["anon"], "is not KEY=VALUE"),
    (["=1"], "is not KEY=VALUE"),
    (["a..b=1"], "is not KEY=VALUE"),
    (["anon=true", "anon=false"], "anon is given twice"),
    (['c={"r": 1}', "c.r=2"], "c.r is given twice"),
    (["a.c.r=2", 'a.c={"r": 1}'], "a.c.r is given twice"),
    (["c=1", "c.r=2"], "c is already set to a value"),
])
def test_malformed_storage_options_are_refused_in_one_line(pairs, says):
    with pytest.raises(UserError, match=says) as e:
        parse_storage_options(pairs)
    assert "\n" not in str(e.value)


# --- round trips -------------------------------------------------------------------------------


def test_files_round_trip(store_loc: Location):
    loc = store_loc
    assert not loc.exists() and loc.list() == [] and loc.list("missing") == []
    data = bytes(range(256)) * 40
    loc.write_bytes_atomic("a/b.bin", data)
    loc.write_bytes_atomic("a/c/d.json", b"{}")
    loc.write_bytes_atomic("top.txt", b"v1")
    loc.write_bytes_atomic("top.txt", b"version 2")  # replaced whole
    assert loc.read_bytes("a/b.bin") == data
    assert loc.read_range("a/b.bin", 100, 1100) == data[100:1100]
    assert loc.size("a/b.bin") == len(data) and loc.read_bytes("top.txt") == b"version 2"
    assert loc.list() == ["a", "top.txt"] and loc.list("a") == ["b.bin", "c"]
    assert loc.join("a", "c").read_bytes("d.json") == b"{}"
    assert loc.join("a").list("c") == ["d.json"]
    assert loc.exists("a/b.bin") and not loc.exists("a/nope")
    with pytest.raises(FileNotFoundError):
        loc.read_bytes("a/nope")
    with pytest.raises(FileNotFoundError):
        loc.size("a/nope")
    loc.remove("top.txt")
    loc.remove("top.txt")  # already gone: nothing to do
    assert loc.list() == ["a"]
    loc.remove("a", recursive=True)
    assert not loc.exists("a/b.bin") and loc.list() == []
    if loc.is_local:  # temp + rename left no temporary sibling behind
        assert sorted(p.name for p in loc.local_path.rglob("*")) == []


def test_s3_objects_land_under_the_url_and_the_endpoint_comes_from_the_environment(s3):
    loc = location(s3.url("stores/one/"))
    assert loc.url == f"s3://{s3.name}/stores/one" and str(loc) == loc.url
    assert location(f"s3a://{s3.name}/stores/one").url == loc.url
    loc.write_bytes_atomic("x/state.json", b'{"step": 3}')
    obj = s3.server.client().get_object(Bucket=s3.name, Key="stores/one/x/state.json")
    assert obj["Body"].read() == b'{"step": 3}'


def test_storage_options_reach_the_filesystem(s3, monkeypatch):
    # the environment points nowhere: only the option can find the server
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    for pair in (f"endpoint_url={s3.endpoint}", f"client_kwargs.endpoint_url={s3.endpoint}"):
        loc = location(s3.url("s"), parse_storage_options([pair]))
        loc.write_bytes_atomic("f", pair.encode())
        assert loc.read_bytes("f") == pair.encode()


def test_zarr_round_trip_with_sharding(store_loc: Location):
    x = np.arange(256 * 8, dtype=np.float32).reshape(256, 8)
    g = zarr.open_group(store=store_loc.zarr_store(read_only=False), mode="w")
    a = g.create_array("acts/h", shape=x.shape, chunks=(16, 8), shards=(64, 8), dtype="f4")
    a[:] = x
    g.attrs["manifest"] = {"n_rows": 256}
    # four shard objects, not sixteen chunk files
    assert store_loc.list("acts/h/c") == ["0", "1", "2", "3"]
    r = zarr.open_group(store=store_loc.zarr_store(read_only=True), mode="r")
    assert r.attrs["manifest"] == {"n_rows": 256}
    np.testing.assert_array_equal(r["acts/h"][10:100], x[10:100])  # partial shards
    np.testing.assert_array_equal(r["acts/h"][:], x)
    with pytest.raises(ValueError, match="read-only"):
        r["acts/h"][0] = 1.0


# --- errors ------------------------------------------------------------------------------------


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_unknown_scheme_and_missing_packages_name_the_fix(monkeypatch):
    with pytest.raises(UserError, match=r"unknown URL scheme nosuch://") as e:
        location("nosuch://bucket/x")
    _one_line(e)
    # filesystem packages not installed (hidden here, whether or not they are): fsspec
    # imports a protocol's class on first use and keeps it in its registry
    registry = sys.modules["fsspec.registry"]._registry
    for scheme, module, extra in (("s3", "s3fs", "s3"), ("s3a", "s3fs", "s3"),
                                  ("gs", "gcsfs", "gcs")):
        monkeypatch.delitem(registry, scheme, raising=False)
        monkeypatch.setitem(sys.modules, module, None)
        with pytest.raises(UserError) as e:
            location(f"{scheme}://bucket/x", option="--store")
        assert _one_line(e).startswith(f"--store {scheme}://bucket/x: ")
        assert f"pip install 'sae-cache[{extra}]'" in str(e.value)
    monkeypatch.setitem(sys.modules, "adlfs", None)
    monkeypatch.delitem(registry, "az", raising=False)
    with pytest.raises(UserError, match="needs the package adlfs.*pip install adlfs"):
        location("az://container/x")


@pytest.mark.parametrize("text, says", [
    ("s3://", "names no bucket"),
    ("simplecache::s3://b/x", "chained fsspec URLs"),
    ("", "is empty"),
])
def test_malformed_urls_are_refused(text, says):
    with pytest.raises(UserError, match=says) as e:
        location(text)
    _one_line(e)


def test_storage_options_on_a_local_path_are_refused(tmp_path):
    for text in (str(tmp_path / "s"), (tmp_path / "s").as_uri()):
        with pytest.raises(UserError, match="applies only to remote URLs"):
            location(text, {"anon": True})


def test_unreachable_endpoint_is_one_line_within_seconds(monkeypatch):
    port = free_port()  # nothing listens there
    for var, value in CREDENTIALS.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    clear_fsspec_instances()
    t0 = time.monotonic()
    with pytest.raises(UserError, match="cannot reach the storage server") as e:
        location("s3://bucket/store")
    assert time.monotonic() - t0 < 8
    message = _one_line(e)
    assert f"127.0.0.1:{port}" in message and "AWS_ENDPOINT_URL" in message
    # check=False skips the probe: nothing is contacted
    assert location("s3://bucket/store", check=False).root == "bucket/store"


def test_missing_bucket_is_one_line(s3):
    with pytest.raises(UserError, match=f"bucket {s3.name}-gone does not exist") as e:
        location(f"s3://{s3.name}-gone/store")
    assert s3.endpoint in _one_line(e) and "create it" in str(e.value)


def test_location_errors_exit_2_through_run_cli(s3, monkeypatch, capsys):
    app = typer.Typer()

    @app.command()
    def open_store(out: str) -> None:
        location(out)

    monkeypatch.setattr(sys, "argv", ["prog", f"s3://{s3.name}-gone/x"])
    with pytest.raises(SystemExit) as e:
        run_cli(app)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and err.count("\n") == 1 and "does not exist" in err


# --- scratch folders ---------------------------------------------------------------------------


def test_scratch_dir_is_stable_per_store_and_checked(tmp_path, s3, monkeypatch):
    a = location(s3.url("a"))
    b = location(s3.url("b"))
    first = scratch_dir(a)
    assert first == scratch_dir(location(s3.url("a/"))) and first != scratch_dir(b)
    assert first.name.startswith("sae-cache-") and first.parent.is_dir()
    assert scratch_dir(a, str(tmp_path / "scratch")) == tmp_path / "scratch" / first.name
    # the same bucket and key on another endpoint is another store
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert scratch_dir(location(s3.url("a"), check=False)) != first
    assert scratch_dir(location(str(tmp_path / "local"))) is None  # work stays in the store
    local_with_tmp = scratch_dir(location(str(tmp_path / "local")), str(tmp_path / "t"))
    assert local_with_tmp.parent == tmp_path / "t"
    with pytest.raises(UserError, match="--tmp-dir s3://b/t is a URL"):
        check_tmp_dir("s3://b/t")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        scratch_dir(a, str(tmp_path / "file" / "sub"))


# --- read-ahead --------------------------------------------------------------------------------


def test_read_ahead_is_parallel_bounded_and_in_order():
    depth, n = 4, 40
    lock = threading.Lock()
    live = max_live = 0  # fetches started whose value the consumer has not taken yet
    barrier = threading.Barrier(depth, timeout=5)  # the first `depth` fetches run at once

    def fetch(k: int) -> bytes:
        nonlocal live, max_live
        with lock:
            live += 1
            max_live = max(max_live, live)
        if k < depth:
            barrier.wait()
        time.sleep(0.002)
        return k.to_bytes(2, "little") * 512

    seen = []
    with ReadAhead(fetch, depth=depth) as ra:
        ra.prefetch(range(n // 2))
        ra.prefetch(range(n // 2, n))  # queued later, still in order
        for key, value in ra.results():
            with lock:
                live -= 1
            seen.append(key)
            assert value == key.to_bytes(2, "little") * 512
            time.sleep(0.003)  # a slow consumer: the window fills up
        assert ra.pending() == 0
    assert seen == list(range(n))
    assert max_live == depth  # reached: parallel; never exceeded: bounded


def test_read_ahead_errors_out_of_order_and_close():
    calls = []

    def fetch(k: int) -> int:
        calls.append(k)
        if k == 3:
            raise OSError("boom")
        time.sleep(0.01)
        return k * 10

    ra = ReadAhead(fetch, depth=2)
    ra.prefetch(range(100))
    assert ra.get(0) == 0
    assert ra.get(50) == 500  # not started yet: fetched here, and dropped from the queue
    assert ra.get(1) == 10 and ra.get(2) == 20
    with pytest.raises(OSError, match="boom"):
        ra.get(3)
    assert ra.get(4) == 40
    ra.close()
    assert len(calls) <= 8 and calls.count(50) == 1  # the other queued keys were never fetched
    with pytest.raises(RuntimeError, match="closed"):
        ra.prefetch([1])
    with pytest.raises(ValueError):
        ReadAhead(fetch, depth=0)


def test_read_ahead_of_byte_ranges_on_s3(s3):
    loc = location(s3.url("shards"))
    data = np.random.default_rng(0).bytes(1 << 20)
    loc.write_bytes_atomic("s0", data)
    ranges = [(i, min(i + 100_000, len(data))) for i in range(0, len(data), 100_000)]
    with ReadAhead(lambda r: loc.read_range("s0", *r), depth=4) as ra:
        ra.prefetch(ranges)
        assert b"".join(ra.get(r) for r in ranges) == data


def test_read_only_s3_zarr_store_reads_a_chunk_with_one_get_and_no_head(s3):
    loc = location(s3.url("z"))
    g = zarr.open_group(store=loc.zarr_store(read_only=False), mode="w")
    g.create_array("a", shape=(64, 4), chunks=(64, 4), dtype="f4")[:] = 1.0
    a = zarr.open_group(store=loc.zarr_store(read_only=True), mode="r")["a"]
    before = len(s3.server.log())
    assert float(a[:].sum()) == 256.0
    chunk = f"/{s3.name}/z/a/c/0/0 "
    requests = [line for line in s3.server.log()[before:].splitlines() if chunk in line]
    assert len(requests) == 1 and '"GET ' in requests[0], requests
    # the user's own setting stays: s3fs then asks the object's size first
    a = zarr.open_group(store=location(s3.url("z"), {"max_concurrency": 4}).zarr_store(),
                        mode="r")["a"]
    before = len(s3.server.log())
    a[:]
    requests = [line for line in s3.server.log()[before:].splitlines() if chunk in line]
    assert ['"HEAD ' in line for line in requests] == [True, False], requests
