"""Benchmark: caching through TransformerBridge against HookedTransformer on the same model, and
against the bare Hugging Face forward truncated at the hooked layer (the limit), side by side in
one process (this machine is noisy: compare the ratios).

    python -m pipelines.bench.bridge [--tokens 40000] [--batch-size 16] [--layers 4] [--layer 1]

The model is a random Llama-architecture checkpoint (d_model 256, 4 heads with 2 key/value heads,
d_mlp 1024, vocab 8192) saved to a temporary folder with save_pretrained, loaded as
`hf:FOLDER` (the bridge: the Hugging Face model itself, eager attention) and as `FOLDER`
(HookedTransformer, converted and weight-processed). The hook is blocks.LAYER.hook_resid_post.
Rows of:
- capture: shared.models.capture on the same token batches (one forward pass, stopped after the
  hook);
- bare HF: the Hugging Face model with its layers cut after LAYER and no final norm (the least
  any tool must compute), with the default (sdpa) attention and with eager attention, which the
  bridge forces so that its attention hooks can see the pattern;
- cache-acts run end to end (`run_cache` with the model already loaded), per backend.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cache_acts.run import RunConfig, run_cache
from shared.models import HOOKED_AVAILABLE, capture, load_model
from shared.tokens import TokenSpec, iter_token_batches

VOCAB = 8192


def save_model(folder: Path, n_layers: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)


def truncated_hf(folder: Path, layer: int, attn: str) -> torch.nn.Module:
    """The Hugging Face decoder (no LM head) with its blocks cut after `layer` and no final norm:
    its output is the residual after block `layer`, blocks.LAYER.hook_resid_post."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn).eval()
    body = copy.copy(hf.model)
    body.layers = torch.nn.ModuleList(hf.model.layers[: layer + 1])
    body.norm = torch.nn.Identity()
    return body


def timed_pass(batches: list[torch.Tensor], step: Callable[[torch.Tensor], torch.Tensor]) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for tokens in batches:
            step(tokens).cpu()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=40_000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--layer", type=int, default=1, help="the hooked block")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    hook = f"blocks.{args.layer}.hook_resid_post"
    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp:
        root = Path(tmp)
        save_model(root / "llama", args.layers)
        n_seq = -(-args.tokens // args.context_size)
        ids = np.random.default_rng(0).integers(0, VOCAB, (n_seq, args.context_size))
        pq.write_table(pa.table({"ids": ids.tolist()}), root / "tokens.parquet")
        spec = TokenSpec(dataset=str(root / "tokens.parquet"), token_column="ids",
                         context_size=args.context_size, prepend_bos=False)
        batches = [tb.tokens for tb in iter_token_batches(spec, None, args.batch_size)]
        n_tokens = sum(int(b.numel()) for b in batches)

        models = {"bridge": load_model(f"hf:{root / 'llama'}")}
        if HOOKED_AVAILABLE:
            models["HookedTransformer"] = load_model(str(root / "llama"))
        steps: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            f"capture, {name}": (lambda t, lm=lm: capture(lm.model, t, [hook])[hook])
            for name, lm in models.items()}
        for attn in ("sdpa", "eager"):
            body = truncated_hf(root / "llama", args.layer, attn)
            steps[f"bare HF forward to block {args.layer} ({attn})"] = (
                lambda t, body=body: body(input_ids=t).last_hidden_state)
        # the residuals agree (HookedTransformer's are centered: compared through the bridge)
        with torch.inference_mode():
            probe = batches[0][:2]
            ours = steps["capture, bridge"](probe).reshape(2, args.context_size, -1)
            bare = steps[f"bare HF forward to block {args.layer} (eager)"](probe)
            assert torch.allclose(ours, bare, atol=1e-4), (ours - bare).abs().max()
        times: dict[str, list[float]] = {name: [] for name in steps}
        runs: dict[str, list[float]] = {f"cache-acts run, {name}": [] for name in models}
        # round 0 warms up (the first passes of each are several times slower on a CPU) and is
        # not counted; the rounds are interleaved, so drifts in machine load hit every row
        for round_ in range(args.repeats + 1):
            for name, step in steps.items():
                t = timed_pass(batches, step)
                if round_:
                    times[name].append(t)
            for name, lm in models.items():
                cfg = RunConfig(out=root / "store", tokens=spec, model="unused", hooks=[hook],
                                max_tokens=n_tokens, batch_size=args.batch_size)
                t0 = time.perf_counter()
                run_cache(cfg, overwrite=True, loaded=lm)
                if round_:
                    runs[f"cache-acts run, {name}"].append(time.perf_counter() - t0)
    best = {name: min(t) for name, t in {**times, **runs}.items()}
    limit = best[f"bare HF forward to block {args.layer} (sdpa)"]
    print(f"Llama {args.layers} layers x d_model 256, hook {hook}; {n_tokens:,} tokens, batch "
          f"{args.batch_size} x {args.context_size}, torch threads {torch.get_num_threads()}, "
          f"best of {args.repeats}")
    print(f"{'':44}{'tok/s':>10}{'vs bare sdpa':>14}")
    for name, t in best.items():
        print(f"{name:44}{n_tokens / t:10,.0f}{limit / t:14.3f}")
    if HOOKED_AVAILABLE:
        for what in ("capture", "cache-acts run"):
            ratio = best[f"{what}, HookedTransformer"] / best[f"{what}, bridge"]
            print(f"{what}: bridge / HookedTransformer throughput {ratio:.3f}")


if __name__ == "__main__":
    main()
