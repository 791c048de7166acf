"""Would several models with a per-unit cluster id beat ibp's one model with
a secondary level?  An experiment, not a codec: it is why the format has no
cluster ids (docs/layouts.md).

For every 2-d tensor of a dataset, rows grouped into units of at least 256
bytes as the codec does, it learns k models Lloyd-style -- split the units
by mean magnitude, learn a model per cluster, move every unit to the model
that encodes it smallest, repeat -- and counts the encoded units, the k
models and log2(k) bits per unit, against the one model ibp learns.

    python bench/clusters.py [--datasets minilm-fp32 minilm-bf16 glove-50d] [-k 2]
"""
import argparse
import json
import math
import os

import numpy as np

import ibp
from ibp import datasets
from ibp.analysis import model_bits
from ibp.decode import unit_bits

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "clusters.json")


def as_units(x):
    """``x`` as a 2-d numpy array whose rows are the codec's units (bf16 as uint16)."""
    if not isinstance(x, np.ndarray):
        import torch
        x = x.view(torch.int16).numpy().view(np.uint16) if x.dtype == torch.bfloat16 else x.numpy()
    if x.ndim != 2:
        return None
    k = -(-256 // x[0].nbytes)
    x = x[:len(x) // k * k].reshape(len(x) // k, -1)
    return x if len(x) >= 256 and x[0].nbytes <= 65536 else None


def encoded_bits(x, model):
    """Bits of every unit of ``x`` under ``model``."""
    ct = ibp.compress(x, model=model)
    assert ct.geometry.unit_words * ct.word_bits == 8 * x[0].nbytes, "a unit must be a row"
    return unit_bits(ct)


def clustered_bits(x, k, rounds):
    """(bits with one model, best bits with k models and a cluster id per unit)."""
    one = ibp.analyze(x)
    single = encoded_bits(x, one).sum() + model_bits(one)
    key = np.abs(x.astype(np.float64)).mean(axis=1)
    cluster = np.minimum(np.argsort(np.argsort(key)) * k // len(x), k - 1)
    best = single
    for _ in range(rounds):
        if np.bincount(cluster, minlength=k).min() < 8:
            break
        models = [ibp.analyze(x[cluster == c], word_bits=one.word_bits) for c in range(k)]
        bits = np.stack([encoded_bits(x, m) for m in models])
        cluster = bits.argmin(axis=0)
        total = bits.min(axis=0).sum() + sum(model_bits(m) for m in models) + len(x) * math.log2(k)
        best = min(best, total)
    return int(single), int(best)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["minilm-fp32", "minilm-bf16", "glove-50d"])
    p.add_argument("-k", type=int, default=2, help="clusters")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    out = {"k": args.k, "rounds": args.rounds, "datasets": {}}
    for name in args.datasets:
        single = clustered = 0
        for x in datasets.load(name).values():
            units = as_units(x)
            if units is not None:
                a, b = clustered_bits(units, args.k, args.rounds)
                single, clustered = single + a, clustered + b
        out["datasets"][name] = {"one_model_bytes": single // 8, "clustered_bytes": clustered // 8,
                                 "saving_percent": round(100 * (1 - clustered / single), 3)}
        print(name, out["datasets"][name], flush=True)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
