"""A store cached through TransformerBridge (`--model hf:FOLDER`, a tiny random Llama) trains
(`train-sae sweep`) and evaluates (`train-sae eval`) end to end: eval reloads the same model
through the bridge from the manifest, and its CE numbers equal the Hugging Face model's own,
with the SAE spliced in by a plain torch forward hook on the Hugging Face layer."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VOCAB
from hf_models import save_tiny_hf

from cache_acts.run import RunConfig, run_cache
from shared.errors import run_cli
from shared.store import open_store
from shared.tokens import TokenSpec, iter_token_batches
from train_sae.cli import app as train_app
from train_sae.training.saving import load_sae

CTX = 16
CACHED = 24  # sequences cached; eval reads the ones after them
HOOK = "blocks.0.hook_resid_post"  # the HookedTransformer alias of the bridge's blocks.0.hook_out


def _cli(*args: str) -> None:
    run_cli(partial(train_app, list(args)))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bridge_eval")
    folder = root / "tiny-llama"
    save_tiny_hf(folder, "llama", seed=3)
    g = torch.Generator().manual_seed(0)
    data = root / "data.jsonl"
    with data.open("w") as f:
        for _ in range(40):
            n = int(torch.randint(5, 30, (1,), generator=g))
            ids = torch.randint(4, TINY_VOCAB, (n,), generator=g).tolist()
            f.write(json.dumps({"ids": ids}) + "\n")
    spec = TokenSpec(dataset=str(data), token_column="ids", context_size=CTX, prepend_bos=False)
    store = root / "store"
    run_cache(RunConfig(out=store, tokens=spec, model=f"hf:{folder}", hooks=[HOOK],
                        max_tokens=CACHED * CTX, batch_size=8, chunk_rows=128))
    out = root / "sweep"
    _cli("sweep", "--store", str(store), "--out", str(out), "--arch", "topk", "--hook", HOOK,
         "--k", "4", "--width", "64", "--batch-size", "64", "--device", "cpu",
         "--log-every", "2")
    return {"folder": folder, "data": data, "store": store, "out": out, "spec": spec}


def test_bridge_store_trains_and_evaluates(sweep, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = open_store(sweep["store"]).manifest
    assert manifest.model == "bridge:tiny-llama" and manifest.model_info["backend"] == "bridge"
    assert manifest.model_info["source"]["path"] == str(sweep["folder"].resolve())
    capsys.readouterr()
    # no --model: eval reloads the store's model through the bridge from the manifest
    _cli("eval", str(sweep["out"]), "--n-tokens", "160", "--batch-size", "4", "--device", "cpu")
    (member,) = sorted(p.parent for p in sweep["out"].glob("*/metrics.json"))
    assert member.name in capsys.readouterr().out  # the eval table
    ev = json.loads((member / "metrics.json").read_text())["eval"]
    assert ev["model"] == "bridge:tiny-llama"
    assert ev["model_check"] == "the model the store was cached from (same content)"

    n_cached = int(open_store(sweep["store"]).array("seq_index")[:].max()) + 1
    tokenizer = AutoTokenizer.from_pretrained(sweep["folder"])  # documents joined by its EOS
    held = torch.cat([b.tokens for b in iter_token_batches(sweep["spec"], tokenizer, 100,
                                                           n_cached, 10)])
    assert held.shape == (10, CTX) and ev["start_sequence"] == n_cached
    hf = AutoModelForCausalLM.from_pretrained(sweep["folder"], attn_implementation="eager").eval()
    sae, _ = load_sae(member)
    mean = torch.tensor(open_store(sweep["store"]).manifest.stats[HOOK].mean)

    def ce_with(replace) -> float:
        """CE of the Hugging Face model with layer 0's output replaced by replace(output)."""
        def hook(module, args, output):
            if replace is None:
                return None
            if isinstance(output, tuple):
                return (replace(output[0]), *output[1:])
            return replace(output)

        handle = hf.model.layers[0].register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = hf(held).logits
        finally:
            handle.remove()
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, TINY_VOCAB),
                                     held[:, 1:].reshape(-1)))

    clean = ce_with(None)
    spliced = ce_with(lambda x: sae(x.reshape(-1, x.shape[-1])).reshape(x.shape))
    zero = ce_with(torch.zeros_like)
    mean_abl = ce_with(lambda x: mean.expand_as(x))
    assert ev["n_tokens"] == 10 * (CTX - 1)
    assert ev["ce_clean"] == pytest.approx(clean, abs=1e-5)
    assert ev["ce_sae"] == pytest.approx(spliced, abs=1e-5)
    assert ev["ce_zero_ablation"] == pytest.approx(zero, abs=1e-5)
    assert ev["ce_mean_ablation"] == pytest.approx(mean_abl, abs=1e-5)
    assert ev["loss_recovered_zero"] == pytest.approx((zero - spliced) / (zero - clean), rel=1e-4)
    assert ev["loss_recovered_mean"] == pytest.approx(
        (mean_abl - spliced) / (mean_abl - clean), rel=1e-4)
    assert ev["l0"] == pytest.approx(4.0) and 0 < ev["fvu"] < 1.5 and ev["kl"] > 0
