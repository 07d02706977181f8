"""The static feature browser: `index.html`, `app.js` and `style.css` (copied from `static/`) and
data files that the page loads with <script> tags (JSONP style: each calls a function of the page
with its object), so it works from file:// (where fetch() of local files is refused) and from
any static web server alike.

    index.html app.js style.css
    data/site.js               FEATURE_DATA.site({...})   the members, the store, notes
    data/vocab.js              FEATURE_DATA.vocab({...})  token id -> text of every id shown
    data/<m>/list.js           FEATURE_DATA.list(m, {...}) per-latent columns for the list
    data/<m>/l/<i>.js          FEATURE_DATA.latent(m, i, {...}) one latent's page, loaded on demand

The list of a 16k-latent member is a few columns of numbers (~0.5 MB); each latent page is a
file of a few kB read only when it is opened.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from shared.errors import fail

STATIC = Path(__file__).parent / "static"
MARKER = ".feature-browser"  # says a folder is a site this module wrote (so it may replace it)


def check_out(out: Path) -> None:
    """Refuse an `out` that is not a site written by this module (a rerun replaces its own
    site, nothing else)."""
    if out.exists() and not (out / MARKER).exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"--out {out} exists and is not a feature browser written by `train-sae features`; "
             "choose another --out")


def prepare_out(out: Path) -> Path:
    """A fresh temporary folder next to `out` (checked by `check_out`)."""
    check_out(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Copy the page's assets in and move the finished site to `out` (replacing an older one)."""
    for name in ("index.html", "app.js", "style.css"):
        shutil.copyfile(STATIC / name, tmp / name)
    (tmp / MARKER).write_text("written by `train-sae features`\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def write_jsonp(path: Path, call: str, *args: Any) -> None:
    """`FEATURE_DATA.<call>(args...);` with the arguments as JSON (NaN/inf refused: the writers
    give null for numbers that are missing)."""
    write_raw(path, call, ", ".join(json.dumps(a, separators=(",", ":"), ensure_ascii=False,
                                               allow_nan=False) for a in args))


def write_raw(path: Path, call: str, arguments: str) -> None:
    """`FEATURE_DATA.<call>(arguments);` with `arguments` already JSON text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"FEATURE_DATA.{call}({arguments});\n", encoding="utf-8")
