"""The integrations end to end on a GPU, in one run: GNN feature fetch per
mini-batch and offloaded LLM forwards (bench/e2e_gnn_llm.py), EmbeddingBag
lookups (bench/e2e_embedding.py), greedy generation with the compressed KV
cache (bench/e2e_kv_cache.py), each against the uncompressed way people do
it today, measured in the same process.  Results: bench/results/e2e.json.

    python bench/e2e.py [--tiles 64] [--reps 20] [--pack .device/pack]      (says why and stops without a GPU)
"""
import argparse
import json
import os
import sys

import torch

from ibp.bench import e2e_embedding, e2e_gnn_llm, e2e_kv_cache

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "e2e.json")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=64, help="copies of Cora in the GNN feature table")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--pack", help="tables missing here come from this pack (bench/device/pack)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("e2e: no CUDA GPU here; these benchmarks measure host-to-GPU transfers")
        return 1
    pack = ["--pack", args.pack] if args.pack else []
    gnn_llm = e2e_gnn_llm.main(["--tiles", str(args.tiles), "--reps", str(args.reps), "--out", os.devnull, *pack])
    try:
        embedding_bag = e2e_embedding.run(torch.device("cuda"), args.pack)
    except Exception as e:  # keep the GNN and LLM figures
        embedding_bag = {"error": f"{type(e).__name__}: {e}"}
    try:
        kv_cache = e2e_kv_cache.kv_cache(torch.device("cuda"), args.pack)
    except Exception as e:
        kv_cache = {"error": f"{type(e).__name__}: {e}"}
    result = dict(gnn_llm, benchmark="e2e", embedding_bag=embedding_bag, kv_cache=kv_cache)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
