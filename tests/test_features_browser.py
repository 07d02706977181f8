"""The feature browser on a real `cache-acts run` store (a tiny random model with a tokenizer):
token text and logit tables against direct computations, and the generated page opened in
headless Chromium (Debian's `chromium`, installed by pipelines/setup_browser.sh) from file://
and from a local web server, its shown contexts checked against the store."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from conftest import TINY_MODEL_CONFIG, write_tiny_tokenizer

from cache_acts.run import RunConfig, run_cache
from shared.models import load_model
from shared.store import open_store
from shared.tokens import TokenSpec
from train_sae.cli import app as train_app
from train_sae.training.loading import load_dictionary

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium: run pipelines/setup_browser.sh")
HOOK = "blocks.0.hook_resid_post"


def read_jsonp(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    return json.loads("[" + text[text.index("(") + 1:text.rindex(")")] + "]")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("browser")
    tok = write_tiny_tokenizer(root / "tok")
    model = root / "model.json"
    model.write_text(json.dumps({**TINY_MODEL_CONFIG, "tokenizer_name": str(tok)}))
    g = torch.Generator().manual_seed(0)
    with (root / "docs.jsonl").open("w") as f:
        for _ in range(60):
            ids = torch.randint(4, 60, (int(torch.randint(5, 40, (1,), generator=g)),),
                                generator=g)
            f.write(json.dumps({"text": " ".join(f"t{i}" for i in ids.tolist())}) + "\n")
    spec = TokenSpec(dataset=str(root / "docs.jsonl"), context_size=24, prepend_bos=True,
                     first_position=1)
    run_cache(RunConfig(out=root / "store", tokens=spec, model=f"random:{model}", hooks=[HOOK],
                        batch_size=8, chunk_rows=256))
    app = typer.main.get_command(train_app)
    app.main(["sweep", "--store", str(root / "store"), "--out", str(root / "sweep"), "--arch",
              "topk", "--k", "4", "--width", "48", "--batch-size", "64", "--device", "cpu"],
             standalone_mode=False)
    app.main(["features", str(root / "sweep"), "--top", "8"], standalone_mode=False)
    site = root / "sweep" / "features"
    (info,) = read_jsonp(site / "data" / "site.js")
    (_, listing) = read_jsonp(site / "data" / "m0" / "list.js")
    return {"root": root, "site": site, "info": info, "list": listing, "model": model,
            "store": open_store(root / "store"), "tokenizer": load_model(f"random:{model}").tokenizer,
            "member": root / "sweep" / info["members"][0]["name"]}


def test_logit_tables_are_the_decoder_through_the_unembedding(built):
    sae, _ = load_dictionary(built["member"])
    W_U = load_model(f"random:{built['model']}").model.W_U
    effect = sae.W_dec.detach() @ W_U  # [d_sae, d_vocab]
    for latent in (0, 7, 31):
        _, _, page = read_jsonp(built["site"] / "data" / "m0" / "l" / f"{latent}.js")
        top = effect[latent].topk(10)
        bottom = effect[latent].topk(10, largest=False)
        assert [t for t, _ in page["logits"]["promoted"]] == top.indices.tolist()
        assert [t for t, _ in page["logits"]["suppressed"]] == bottom.indices.tolist()
        np.testing.assert_allclose([v for _, v in page["logits"]["promoted"]],
                                   top.values.numpy(), rtol=1e-4)


def test_token_text_comes_from_the_tokenizer(built):
    (vocab,) = read_jsonp(built["site"] / "data" / "vocab.js")
    tok = built["tokenizer"]
    assert len(vocab) > 20
    assert all(text == tok.decode([int(i)]) for i, text in vocab.items())
    assert built["info"]["text"] and built["info"]["has_context"] and built["info"]["notes"] == []


class _Page(HTMLParser):
    """The examples shown (group, store row, activation, [(token text, classes)]) and the latent
    list's rows (latent, dead?) of a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.examples: list[dict] = []
        self.rows: list[tuple[int, bool]] = []
        self.group = None
        self._token: list | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if "examples" in cls:
            self.group = a["data-group"]
        elif "ex" in cls:
            self.examples.append({"group": self.group, "row": int(a["data-row"]),
                                  "act": float(a["data-act"]), "tokens": []})
        elif "tok" in cls:
            self._token = ["", cls]
            self.examples[-1]["tokens"].append(self._token)
        elif tag == "tr" and "data-latent" in a:
            self.rows.append((int(a["data-latent"]), "dead" in cls))

    def handle_data(self, data):
        if self._token is not None:
            self._token[0] += data

    def handle_endtag(self, tag):
        if tag == "span":
            self._token = None


def dump_dom(url: str, tmp_path: Path) -> _Page:
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}",
         "--virtual-time-budget=10000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    page = _Page()
    page.feed(out.stdout)
    return page


@needs_chromium
def test_latent_page_shows_the_store_contexts_from_file_url(built, tmp_path):
    """Opened from file://, the page of the most often firing latent shows each top example as
    the decoded window of its sequence in the store, its own token marked."""
    latent = int(np.argmax(built["list"]["count"]))
    page = dump_dom(f"{(built['site'] / 'index.html').as_uri()}#m0/{latent}", tmp_path)
    top = [e for e in page.examples if e["group"] == "top"]
    assert len(top) == 8
    _, _, data = read_jsonp(built["site"] / "data" / "m0" / "l" / f"{latent}.js")
    assert [e["row"] for e in top] == [e["row"] for e in data["top"]]
    store, tok = built["store"], built["tokenizer"]
    rows = np.array([e["row"] for e in top])
    order = np.argsort(rows)
    seq = np.empty_like(rows)
    pos = np.empty_like(rows)
    seq[order] = store.array("seq_index").get_orthogonal_selection((rows[order],))
    pos[order] = store.array("position").get_orthogonal_selection((rows[order],))
    token_ids = store.array("token_ids")
    sequences = store.read_sequences(seq)
    acts = [e["act"] for e in top]
    assert acts == sorted(acts, reverse=True) and acts[0] > 0
    for ex, s_row, p in zip(top, sequences, pos, strict=True):
        marked = [i for i, (_, cls) in enumerate(ex["tokens"]) if "max" in cls]
        (c,) = marked
        start = p - c
        shown = [text for text, _ in ex["tokens"]]
        assert shown == [tok.decode([int(t)]) for t in s_row[start:start + len(shown)]]
        assert shown[c] == tok.decode([int(token_ids[ex["row"]])])
        assert len(shown) == min(p, 24) + 1 + min(6, 23 - p)  # BEFORE=24, AFTER=6, ctx 24
        if start == 0:  # position 0 (the BOS) is not cached (--first-position 1): unshaded
            assert "na" in ex["tokens"][0][1] and "na" not in ex["tokens"][c][1]
    sae, _ = load_dictionary(built["member"])
    with torch.no_grad():
        x = store.read_rows(HOOK, int(top[0]["row"]), int(top[0]["row"]) + 1)
        assert sae.encode(x.float())[0, latent].item() == pytest.approx(top[0]["act"], rel=1e-5)


@needs_chromium
def test_latent_list_over_http(built, tmp_path):
    """Served by a local web server, the list page shows every latent, dead ones marked."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(built["site"]))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        page = dump_dom(f"http://127.0.0.1:{server.server_address[1]}/index.html#m0", tmp_path)
    finally:
        server.shutdown()
    counts = built["list"]["count"]
    assert [r for r, _ in page.rows] == list(range(len(counts)))
    assert [dead for _, dead in page.rows] == [c == 0 for c in counts]


@needs_chromium
def test_latent_list_search_by_index_and_by_token(built, tmp_path):
    """The list's search (filled from the link): by a token of the top contexts, the latents
    whose top tokens hold it; by an index prefix, the latents whose index starts with it."""
    (vocab,) = read_jsonp(built["site"] / "data" / "vocab.js")
    tokens = built["list"]["tokens"]
    token = vocab[str(tokens[int(np.argmax(built["list"]["count"]))][0])]
    want = [i for i, ids in enumerate(tokens)
            if any(token.lower() in vocab[str(t)].lower() for t in ids)]
    index = built["site"] / "index.html"
    page = dump_dom(f"{index.as_uri()}#m0?q={token}", tmp_path)
    assert [r for r, _ in page.rows] == want and 0 < len(want) < len(tokens)
    page = dump_dom(f"{index.as_uri()}#m0?q=1", tmp_path)
    assert [r for r, _ in page.rows] == [i for i in range(len(tokens)) if str(i).startswith("1")
                                        or any("1" in vocab[str(t)] for t in tokens[i])]
