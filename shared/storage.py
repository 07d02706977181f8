"""Where a store lives: a local folder or an fsspec URL (`s3://`, `gs://`, `file://`, `memory://`).

One job: turn what the user typed (`--out`, `--store`) plus storage options into a `Location`
that reads, writes, lists and removes files relative to the store's root, and opens it as a Zarr
store; refuse, in one line naming the fix, a URL that cannot work (unknown scheme, filesystem
package not installed, endpoint unreachable, bucket missing, access denied) before any work.

    loc = location("s3://bucket/stores/gelu1l", parse_storage_options(["anon=false"]))
    g = zarr.open_group(store=loc.zarr_store(read_only=True), mode="r")
    loc.write_bytes_atomic("state.json", b"...")      # temp + rename locally, one PUT remotely
    with ReadAhead(lambda r: loc.read_range("acts/h/c/0/0", *r), depth=8) as ra:
        ra.prefetch(ranges)                             # fetched in parallel, at most 8 held
        for r in ranges: use(ra.get(r))

Configuration is fsspec's own, nothing invented here:
- the environment: for S3 botocore's `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
  `AWS_SESSION_TOKEN`, `AWS_PROFILE`, `AWS_DEFAULT_REGION` and `AWS_ENDPOINT_URL` (an
  S3-compatible server: MinIO, R2, moto; honoured by botocore >= 1.31, which every s3fs this
  project accepts brings); for GCS `GOOGLE_APPLICATION_CREDENTIALS`; and fsspec's
  `FSSPEC_<PROTOCOL>_<KWARG>` variables and config files;
- `--storage-option KEY=VALUE`, repeatable: keyword arguments of the filesystem class
  (`s3fs.S3FileSystem`, `gcsfs.GCSFileSystem`, ...). VALUE is parsed as JSON when it parses
  (`anon=true`, `client_kwargs={"region_name":"eu-west-1"}`, `default_block_size=8388608`) and is
  a string otherwise (`endpoint_url=http://127.0.0.1:9000`); quote a string that looks like JSON
  (`key='"123"'`). A dotted KEY sets a nested value: `client_kwargs.region_name=eu-west-1` is
  `client_kwargs={"region_name": "eu-west-1"}`, and several of them merge.

Filesystem packages are extras: `pip install 'sae-cache[s3]'` (s3fs) and `'sae-cache[gcs]'`
(gcsfs); any other fsspec implementation works once its package is installed.

API:
- `parse_storage_options(pairs)`: `--storage-option` values -> the filesystem's kwargs.
- `location(text, storage_options, option=..., check=True)`: a validated `Location`.
- `Location`: `url`, `protocol`, `root`, `is_local`, `local_path`, `options`, `fs`, `join`,
  `path`, `exists`, `read_bytes`, `read_range`, `write_bytes_atomic`, `list`, `remove`,
  `size`, `zarr_store`.
- `check_tmp_dir(text)`, `scratch_dir(loc, tmp_dir)`: the local folder for a remote store's
  work files (bucket files, resume state), found again by `--resume`.
- `ReadAhead(fetch, depth)`: parallel fetches ahead of use, at most `depth` held at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Generic, TypeVar

from shared.atomic import atomic_write, check_out
from shared.errors import fail, first_line

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")

# The extra that brings a protocol's filesystem package (pyproject's optional dependencies).
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}

# The reachability probe must answer in seconds, not after s3fs's 5 retries of botocore's 5
# attempts of a 5 s connect timeout; these go under the user's own options, for the probe only.
_PROBE_OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {"config_kwargs": {"connect_timeout": 3, "read_timeout": 5,
                             "retries": {"max_attempts": 1}}},
}
PROBE_TIMEOUT_S = 15.0


# --- storage options ------------------------------------------------------------------------

def parse_storage_options(pairs: Iterable[str], option: str = "--storage-option") -> dict:
    """`KEY=VALUE` strings -> filesystem kwargs. VALUE is JSON when it parses, else a string; a
    dotted KEY (`client_kwargs.region_name=x`) sets a nested value. A pair without `=`, an empty
    key, a key given twice or a key that is both a value and a parent of others is refused."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            fail(f"{option} {pair!r} is not KEY=VALUE; write e.g. {option} anon=true or "
                 f"{option} endpoint_url=http://127.0.0.1:9000")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        _set_nested(out, [p.strip() for p in parts], value, pair, option)
    return out


def _set_nested(d: dict, parts: list[str], value: Any, pair: str, option: str) -> None:
    """Set d[parts[0]][parts[1]]... = value; a mapping given for a key that already holds one
    is merged into it, key by key."""
    root = d
    for i in range(len(parts) - 1):
        child = d.setdefault(parts[i], {})
        if not isinstance(child, dict):
            fail(f"{option} {pair!r}: {'.'.join(parts[:i + 1])} is already set to a value, not "
                 "a mapping; give it once, as KEY={...} JSON or as dotted KEY.SUB=VALUE pairs")
        d = child
    last = parts[-1]
    if last not in d:
        d[last] = value
    elif isinstance(d[last], dict) and isinstance(value, dict):
        for k, v in value.items():
            _set_nested(root, [*parts, k], v, pair, option)
    else:
        fail(f"{option} {'.'.join(parts)} is given twice; give each option once")


def _merge_under(defaults: Mapping, options: Mapping) -> dict:
    """`options` over `defaults`, mappings merged key by key (the user's values win)."""
    out = dict(defaults)
    for k, v in options.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge_under(out[k], v)
        else:
            out[k] = v
    return out


# --- the location ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Location:
    """A store's root. `url` is normalised (`file:///abs/path`, `s3://bucket/key`), `root` the
    path inside `fs`; `local_path` is set for local stores (a path or `file://` URL), which are
    read and written with plain file operations. Paths given to the methods are relative to the
    root, with `/` separators. Build it with `location()`, which validates."""

    url: str
    protocol: str
    root: str
    local_path: Path | None = None
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def is_local(self) -> bool:
        return self.local_path is not None

    def __str__(self) -> str:  # for messages: what the user would type
        return str(self.local_path) if self.local_path is not None else self.url

    @cached_property
    def fs(self):
        """The fsspec filesystem (created on first use; fsspec reuses one instance per set of
        options in a process, so `Location`s of one store share connections)."""
        from fsspec.core import url_to_fs

        return url_to_fs(self.url, **self.options)[0]  # with host/port from the URL (ftp, ...)

    def path(self, rel: str = "") -> str:
        """The path of `rel` inside `fs` (for `fs.cat_file` and friends)."""
        rel = rel.strip("/")
        if not rel:
            return self.root
        return f"{self.root.rstrip('/')}/{rel}" if self.root.strip("/") else f"{self.root}{rel}"

    def _local(self, rel: str) -> Path:
        assert self.local_path is not None
        return self.local_path / rel.strip("/") if rel.strip("/") else self.local_path

    def join(self, *parts: str) -> Location:
        """The location of a folder below this one (same filesystem and options)."""
        rel = "/".join(p.strip("/") for p in parts if p.strip("/"))
        root = self.path(rel)
        url = f"{self.url.rstrip('/')}/{rel}" if rel else self.url
        local = self._local(rel) if self.local_path is not None else None
        return Location(url=url, protocol=self.protocol, root=root, local_path=local,
                        options=self.options)

    def exists(self, rel: str = "") -> bool:
        if self.local_path is not None:
            return self._local(rel).exists()
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        """A whole file; FileNotFoundError when it is missing."""
        if self.local_path is not None:
            return self._local(rel).read_bytes()
        return self.fs.cat_file(self.path(rel))

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file (one ranged GET remotely)."""
        if self.local_path is not None:
            with open(self._local(rel), "rb") as f:
                f.seek(start)
                return f.read(max(0, end - start))
        # keywords: s3fs's cat_file takes version_id as its second positional argument
        return self.fs.cat_file(self.path(rel), start=start, end=end)

    def write_bytes_atomic(self, rel: str, data: bytes, durable: bool = False) -> None:
        """Replace a file so that readers see the old bytes or all the new ones. Locally: a
        temporary sibling renamed into place (fsynced first when `durable`), parents created.
        Remotely: one `pipe_file`, an object store PUT (or a multipart upload, which also
        appears only when complete), so there is nothing to rename."""
        if self.local_path is not None:
            path = self._local(rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: tmp.write_bytes(data), durable=durable)
        else:
            self.fs.pipe_file(self.path(rel), data)

    def list(self, rel: str = "") -> list[str]:
        """The sorted names (not paths) directly inside folder `rel`; [] when it does not exist
        (object stores have no empty folders, so local stores answer the same)."""
        if self.local_path is not None:
            try:
                return sorted(os.listdir(self._local(rel)))
            except (FileNotFoundError, NotADirectoryError):
                return []
        path = self.path(rel).rstrip("/")
        try:
            # refresh: another process (a killed run, a second rank) may have written since
            entries = self.fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries
                 if e.strip("/") != path.strip("/")}  # some filesystems list the folder itself
        return sorted(names)

    def remove(self, rel: str, recursive: bool = False) -> None:
        """Delete a file (or, with `recursive`, a folder and everything in it); nothing to do
        when it is already gone, so an interrupted clean-up can simply run again."""
        if self.local_path is not None:
            path = self._local(rel)
            if path.is_dir() and not path.is_symlink():
                if recursive:
                    shutil.rmtree(path)
                else:
                    path.rmdir()
            else:
                path.unlink(missing_ok=True)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(rel), recursive=recursive)
        self.fs.invalidate_cache(self.path(rel))

    def size(self, rel: str) -> int:
        """A file's size in bytes; FileNotFoundError when it is missing."""
        if self.local_path is not None:
            return self._local(rel).stat().st_size
        return int(self.fs.size(self.path(rel)))

    def zarr_store(self, read_only: bool = True):
        """A Zarr v3 store at this root, for `zarr.open_group(store=...)`: a `LocalStore` for
        local stores, an `FsspecStore` (its own asynchronous filesystem instance, created from
        the same URL and options) for remote ones.

        Read-only S3 stores default to s3fs's `max_concurrency=1`: with more, s3fs sends a HEAD
        before every whole-object GET (to split objects above its block size into parallel
        ranged GETs), one extra round trip per chunk or shard that zarr reads; zarr already
        reads many objects at once. Measured on moto with 20 ms per request: 1.6x faster
        whole-chunk reads. `--storage-option max_concurrency=N` sets it back."""
        from zarr.storage import FsspecStore, LocalStore

        if self.local_path is not None:
            return LocalStore(self.local_path, read_only=read_only)
        options = dict(self.options)
        if read_only and self.protocol == "s3":
            options.setdefault("max_concurrency", 1)
        return FsspecStore.from_url(self.url, storage_options=options, read_only=read_only)


def location(text: str, storage_options: Mapping[str, Any] | None = None, *,
             option: str = "--out", check: bool = True) -> Location:
    """The store root named by `text` (a local path, `file://` URL or fsspec URL), refused with
    one line when its scheme is unknown or its filesystem package is not installed, and, with
    `check` and a remote URL, when a fast probe finds its endpoint unreachable, its bucket
    missing or access denied. Local paths are not probed: `shared.atomic.check_out` is the
    check for a local output. `option` names the flag in messages."""
    options = dict(storage_options or {})
    if not text:
        fail(f"{option} is empty; give a folder or a URL such as s3://bucket/path")
    if "::" in text:
        fail(f"{option} {text}: chained fsspec URLs (a::b://...) are not supported; give the "
             "store's own URL (s3://..., gs://...) or a local folder")
    m = _URL.match(text)
    if m is None:
        return _local(Path(text).expanduser(), options, text, option)
    cls = _filesystem_class(m.group(1).lower(), text, option)
    from fsspec.implementations.local import LocalFileSystem

    if issubclass(cls, LocalFileSystem):
        return _local(Path(cls._strip_protocol(text)), options, text, option)
    protocol = cls.protocol if isinstance(cls.protocol, str) else cls.protocol[0]
    root = cls._strip_protocol(text).rstrip("/") or cls._strip_protocol(text)
    # the URL as typed, with the protocol's first name (s3a:// is s3://) and no trailing /
    url = f"{protocol}://{text[m.end():].rstrip('/')}"
    loc = Location(url=url, protocol=protocol, root=root, options=options)
    if hasattr(cls, "split_path") and not root.strip("/").split("/")[0]:
        fail(f"{option} {text} names no bucket; write {protocol}://BUCKET/PATH")
    if check:
        _probe(loc, option, bucket_store=hasattr(cls, "split_path"))
    return loc


def as_location(where: str | Path | Location) -> Location:
    """A Location as it is, anything else (a path, or a URL already checked elsewhere) without a
    probe: for code that accepts both."""
    return where if isinstance(where, Location) else location(str(where), check=False)


def _local(path: Path, options: dict, text: str, option: str) -> Location:
    if options:
        fail(f"{option} {text} is a local path; --storage-option applies only to remote URLs "
             "(s3://..., gs://...); drop it")
    absolute = path if path.is_absolute() else Path.cwd() / path
    return Location(url=f"file://{absolute.as_posix()}", protocol="file",
                    root=absolute.as_posix(), local_path=path, options=options)


def _filesystem_class(scheme: str, text: str, option: str) -> type:
    """fsspec's class for `scheme`, or one line naming what to install."""
    from fsspec.registry import get_filesystem_class, known_implementations, registry

    if scheme not in registry and scheme not in known_implementations:
        fail(f"{option} {text}: unknown URL scheme {scheme}://; give a local folder or an "
             "fsspec URL such as s3://bucket/path or gs://bucket/path")
    try:
        return get_filesystem_class(scheme)
    except ImportError:
        if scheme in EXTRAS:
            fail(f"{option} {text}: {scheme}:// needs the optional filesystem package; install "
                 f"it with pip install 'sae-cache[{EXTRAS[scheme]}]'")
        package = known_implementations.get(scheme, {}).get("class", "").split(".")[0]
        fail(f"{option} {text}: {scheme}:// needs the package {package or 'that implements it'}"
             f", which is not installed; install it with pip install {package or '...'}")


def _endpoint(loc: Location) -> str | None:
    """The S3 endpoint the options or environment choose (None: AWS's own)."""
    if loc.protocol != "s3":
        return None
    return (loc.options.get("endpoint_url")
            or (loc.options.get("client_kwargs") or {}).get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))


def _where(loc: Location) -> str:
    endpoint = _endpoint(loc)
    return f" at endpoint {endpoint}" if endpoint else ""


def _address(loc: Location) -> str:
    """Where the user sets the server's address, for messages."""
    if loc.protocol == "s3":
        return "AWS_ENDPOINT_URL or --storage-option endpoint_url=..."
    return "the URL and --storage-option values"


def _probe(loc: Location, option: str, bucket_store: bool) -> None:
    """Ask the filesystem about the bucket (or the root) once, with short timeouts and no
    retries, on a watchdog thread; turn the answer into one line when it is not good."""
    from fsspec.core import url_to_fs

    opts = _merge_under(_PROBE_OPTIONS.get(loc.protocol, {}), loc.options)
    bucket = loc.root.strip("/").split("/")[0]
    result: dict[str, BaseException | None] = {}

    def ask() -> None:
        try:
            fs = url_to_fs(loc.url, skip_instance_cache=True, **opts)[0]
            if isinstance(getattr(fs, "retries", None), int):
                fs.retries = 1  # s3fs's own retry loop (a class attribute, not an option)
            if bucket_store:
                fs.info(bucket)
            else:
                with contextlib.suppress(FileNotFoundError):  # an output not written yet
                    fs.info(loc.root)
            result["error"] = None
        except BaseException as e:  # reported on the caller's thread below
            result["error"] = e

    # A daemon thread: a probe hung in a filesystem without timeouts cannot hold up exit.
    thread = threading.Thread(target=ask, name="storage-probe", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    if "error" not in result:
        fail(f"{option} {loc}: no answer within {PROBE_TIMEOUT_S:.0f} s{_where(loc)}; check "
             f"the address ({_address(loc)}), the network and that the server is running")
    if result["error"] is not None:
        fail(_explain(loc, result["error"], option, bucket))


def _explain(loc: Location, e: BaseException, option: str, bucket: str) -> str:
    """One line for a failed probe: what is wrong with the location and how to fix it."""
    names = {c.__name__ for c in type(e).__mro__}
    where = _where(loc)
    if isinstance(e, FileNotFoundError):
        return (f"{option} {loc}: bucket {bucket} does not exist{where}; create it first "
                f"or check the URL")
    if isinstance(e, PermissionError):
        return (f"{option} {loc}: access to bucket {bucket} denied{where} ({first_line(e)}); "
                "check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                "GOOGLE_APPLICATION_CREDENTIALS) or pass --storage-option anon=true for a public "
                "bucket")
    if names & {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}:
        return (f"{option} {loc}: no credentials found ({first_line(e)}); set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass "
                "--storage-option anon=true for a public bucket")
    if (isinstance(e, ConnectionError | TimeoutError)
            or any("Connect" in n or "Timeout" in n for n in names)):
        return (f"{option} {loc}: cannot reach the storage server ({first_line(e)}); check "
                f"the address ({_address(loc)}), the network and that the server is running")
    return (f"{option} {loc}: cannot open it ({type(e).__name__}: {first_line(e)}); check the "
            "URL and --storage-option values")


# --- local scratch space for remote stores --------------------------------------------------

def check_tmp_dir(text: str, option: str = "--tmp-dir") -> Path:
    """A local folder that exists or can be created, and is writable; refused in one line."""
    if _URL.match(text):
        fail(f"{option} {text} is a URL; it must be a local folder (work files are appended "
             "and memory-mapped), e.g. --tmp-dir /scratch")
    path = Path(text).expanduser()
    check_out(path, option)
    return path


def scratch_dir(loc: Location, tmp_dir: str | None = None) -> Path | None:
    """The local folder for the temporary work files of a store at `loc`: for a remote store,
    `<tmp_dir or the system temp folder>/sae-cache-<hash of the URL and endpoint>`, the same
    folder on every run so `--resume` finds its work again; for a local store, None without
    `--tmp-dir` (its work files live inside the store) and the hashed folder with it. The
    folder is not created here."""
    if tmp_dir is None and loc.is_local:
        return None
    base = check_tmp_dir(tmp_dir) if tmp_dir is not None else Path(tempfile.gettempdir())
    if tmp_dir is None:
        check_out(base, "--tmp-dir")  # the system temp folder, refused like a --tmp-dir
    key = json.dumps([loc.url.rstrip("/"), _endpoint(loc)])
    return base / f"sae-cache-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


# --- reading ahead ----------------------------------------------------------------------------

K = TypeVar("K")
V = TypeVar("V")


class ReadAhead(Generic[K, V]):
    """Fetch keys (byte ranges, chunk keys, row blocks) on a thread pool ahead of their use,
    holding at most `depth` of them at once, fetching or fetched and not yet taken: memory is
    bounded by `depth` results, however many keys are queued.

        with ReadAhead(lambda r: loc.read_range(path, *r), depth=8) as ra:
            ra.prefetch(ranges)
            for r in ranges:
                block = ra.get(r)

    Keys are started in the order `prefetch` queued them; `get(key)` waits for the oldest
    queued copy of `key`, frees its slot and starts the next queued key. A `get` of a key not
    yet started fetches it on the calling thread (only out-of-order use does that). An error
    in `fetch` is raised by the `get` of its key. `results()` yields (key, value) in queue
    order. Use it as a context manager, or call `close()`, to stop the threads."""

    def __init__(self, fetch: Callable[[K], V], depth: int = 8, workers: int | None = None):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.depth = depth
        self._fetch = fetch
        self._pool = ThreadPoolExecutor(max_workers=min(workers or depth, depth),
                                        thread_name_prefix="read-ahead")
        # queued keys in order; the first `_started` of them have a future
        self._queue: deque[tuple[K, Future | None]] = deque()
        self._started = 0
        self._held = 0  # fetches started whose value `get` has not yet handed out
        self._lock = threading.Lock()
        self._closed = False

    def prefetch(self, keys: Iterable[K]) -> None:
        """Queue keys, in the order they will be used, and start as many as `depth` allows."""
        with self._lock:
            if self._closed:
                raise RuntimeError("ReadAhead is closed")
            self._queue.extend((k, None) for k in keys)
            self._fill()

    def _fill(self) -> None:
        while self._held < self.depth and self._started < len(self._queue):
            key, _ = self._queue[self._started]
            self._queue[self._started] = (key, self._pool.submit(self._fetch, key))
            self._started += 1
            self._held += 1

    def pending(self) -> int:
        """Keys queued and not yet taken by `get`."""
        return len(self._queue)

    def get(self, key: K) -> V:
        with self._lock:
            i = next((i for i, (k, _) in enumerate(self._queue) if k == key), None)
            future = None
            if i is not None:
                future = self._queue[i][1]
                del self._queue[i]
                if future is not None:
                    self._started -= 1
        if future is None:
            return self._fetch(key)  # never queued, or not started yet: fetch it here
        try:
            return future.result()
        finally:
            with self._lock:  # the slot is free once the value is in the caller's hands
                self._held -= 1
                if not self._closed:
                    self._fill()

    def results(self) -> Iterator[tuple[K, V]]:
        """(key, value) for every queued key, in queue order (keys queued meanwhile too)."""
        while True:
            with self._lock:
                if not self._queue:
                    return
                key = self._queue[0][0]
            yield key, self.get(key)

    def close(self) -> None:
        """Drop queued keys, cancel fetches not begun, wait for the running ones."""
        with self._lock:
            self._closed = True
            futures = [f for _, f in self._queue if f is not None]
            self._queue.clear()
            self._started = 0  # `_held` drains as the `get`s under way return
        for f in futures:
            f.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ReadAhead[K, V]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
