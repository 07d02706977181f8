"""Know data by its content: fingerprints of models, token sources and stores.

A name says where something came from; a fingerprint says what it is. `cache-acts` records the
fingerprints of its model(s) and token source in the store's manifest and in its resume state,
`train-sae` records the store's fingerprint in sweep.json and in its checkpoints, and `eval`
compares token sources by fingerprint to know which sequences a store has seen. A resume or an
evaluation whose inputs changed content under the same name is refused instead of mixing data.

A fingerprint is a dict with a `digest` (hex SHA-256) plus what a person needs to read it
(kind, name, file count, bytes). Two fingerprints describe the same thing when their digests
are equal (`same`). File contents are hashed in full (SHA-256 runs at about 1 GB/s on one core),
once per process per (path, size, mtime).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

_BLOCK = 1 << 20
SHORT = 12  # hex digits shown in messages


@lru_cache(maxsize=1024)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (cached for an unchanged path, size and mtime)."""
    st = path.stat()
    return _file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


def digest_of(value: Any) -> str:
    """SHA-256 of a JSON-serialisable value, independent of dict key order."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def files_fingerprint(files: list[Path], kind: str, **facts: Any) -> dict[str, Any]:
    """The fingerprint of an ordered list of files: their contents in that order (not their
    names or locations, so a copied or moved file is still the same data)."""
    digests = [file_digest(f) for f in files]
    return {"kind": kind, **facts, "files": len(files),
            "bytes": sum(f.stat().st_size for f in files), "digest": digest_of(digests)}


def folder_files(folder: Path) -> list[Path]:
    """Every regular file under `folder` except hidden ones (.git, .cache), by relative path."""
    return sorted((p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                  key=lambda p: p.relative_to(folder).as_posix())


def same(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    return a is not None and b is not None and a.get("digest") == b.get("digest")


def digests(value: Any) -> Any:
    """A fingerprint, or fingerprints nested in dicts and lists (several models by tag), reduced
    to their digests: what identity compares (the other fields, such as where a file was read,
    only help a person read it)."""
    if isinstance(value, dict):
        return value["digest"] if "digest" in value else {k: digests(v) for k, v in value.items()}
    if isinstance(value, list):
        return [digests(v) for v in value]
    return value


def short(fp: dict[str, Any] | None) -> str:
    """A fingerprint's digest in short, for messages; several models' by tag ("base 1a2b..,
    chat 3c4d..")."""
    if isinstance(fp, dict) and fp and "digest" not in fp:
        return ", ".join(f"{tag} {short(f)}" for tag, f in fp.items())
    return "unknown" if not fp or not fp.get("digest") else str(fp["digest"])[:SHORT]
