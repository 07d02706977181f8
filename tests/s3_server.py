"""A real S3 server for tests: moto's server in a subprocess on 127.0.0.1.

The storage layer talks to it over HTTP exactly as it would to AWS or MinIO (s3fs, aiobotocore,
real sockets), so the tests exercise request signing, byte ranges, listings and error codes,
not a patched client. moto keeps its buckets in the server's memory: they vanish when it stops.

    with S3Server() as server:
        server.create_bucket("b")
        ... AWS_ENDPOINT_URL=server.endpoint ...
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import BinaryIO

# moto accepts any credentials; these are what botocore signs with in the tests
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the moment of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """`python -m moto.server` on 127.0.0.1 at a free port; `start()` returns once it answers
    HTTP (or raises after `start_timeout_s`), `stop()` ends the process (and only it)."""

    def __init__(self, start_timeout_s: float = 30.0):
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.port = 0
        # its log goes to a file: a pipe nobody reads fills up after a few hundred requests
        # (werkzeug logs every one) and the server then blocks on write, answering nothing
        self._log: BinaryIO | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        # A port found free can be taken before the server binds it: try a few.
        for _ in range(3):
            self.port = free_port()
            self._log = tempfile.TemporaryFile()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                env={**os.environ, **CREDENTIALS},
            )
            if self._wait_until_up():
                return self
            err = self._end()
        raise RuntimeError(f"moto server did not start on 127.0.0.1: {err[-2000:]}")

    def _wait_until_up(self) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:  # it exited (e.g. the port was taken)
                return False
            try:
                with urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1):
                    return True
            except urllib.error.HTTPError:  # any HTTP answer means it is serving
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def _end(self) -> str:
        """Stop the process; return what it logged."""
        if self.proc is not None:
            proc, self.proc = self.proc, None
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        if self._log is None:
            return ""
        log, self._log = self._log, None
        with log:
            log.seek(0)
            return log.read().decode(errors="replace")

    def log(self) -> str:
        """What the server has logged so far: one line per request, as
        `"GET /bucket/key HTTP/1.1" 200 -` (werkzeug's access log)."""
        if self._log is None:
            return ""
        fd = self._log.fileno()  # the server writes through the same file offset: pread only
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    def stop(self) -> None:
        self._end()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self):
        """A boto3 S3 client for this server (set-up and inspection in tests)."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def delete_bucket(self, name: str) -> None:
        """Remove a bucket and every object in it (tests leave nothing behind)."""
        client = self.client()
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys})
        with contextlib.suppress(client.exceptions.NoSuchBucket):
            client.delete_bucket(Bucket=name)
