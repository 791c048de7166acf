"""Compression ratio and single-thread CPU speed of ibp against the
reference algorithm and general-purpose codecs, on real tensors.

A dataset is a dict of tensors (a checkpoint, a feature table).  For each
codec it reports the total compressed bytes, the ratio raw/compressed,
compress and decompress speed (uncompressed MB per second, MB = 10^6 bytes,
best of ``repeats`` passes over all tensors of the dataset in sequence, one
thread), and whether every round trip was bit-exact.

    python -m ibp.bench.ratio [--datasets cora glove-50d] [--data FILE] [--out DIR]
"""
import argparse
from datetime import datetime, timezone
import gc
import importlib.metadata
import json
import math
import os
from pathlib import Path
import platform
import sys
import time

import numpy as np

if __package__ in (None, ""):  # run as a script: python bench/ratio.py
    from ibp.bench import codecs as codec_lib, plot
else:
    from . import codecs as codec_lib, plot

import ibp
from ibp import datasets

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# -- inputs ------------------------------------------------------------------

def load_file(path):
    """The tensors of a user's .npy / .npz / .safetensors / .pt file, by name."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        tensors = {path.stem: np.load(path, allow_pickle=False)}
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            tensors = {k: z[k] for k in z.files}
    elif suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors
        tensors = load_safetensors(str(path))
    elif suffix in (".pt", ".pth"):
        import torch
        tensors = _tensors_in(torch.load(path, map_location="cpu", weights_only=True), path.stem)
    else:
        raise ValueError(f"{path}: expected a .npy, .npz, .safetensors or .pt file")
    if not tensors:
        raise ValueError(f"{path} holds no tensors")
    return tensors


def _tensors_in(obj, name):
    """Tensors of a torch.load result (a tensor or nested dicts/lists), by dotted name."""
    if isinstance(obj, np.ndarray) or type(obj).__name__ == "Tensor":
        return {name: obj}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {}
    out = {}
    for k, v in items:
        out.update(_tensors_in(v, f"{name}.{k}"))
    return out


def machine():
    """What ran the benchmark, so the numbers can be read later."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {"python": platform.python_version(), "ibp": ibp.__version__}
    for module in ("numpy", "numba", "torch", "zstandard", "lz4", "blosc2", "zipnn"):
        try:
            versions[module] = importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:
            versions[module] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "versions": versions,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# -- measuring ---------------------------------------------------------------

def _best_time(fn, repeats, setup=lambda: None):
    """(fastest wall time of ``fn(setup())``, its last result); ``setup``
    runs outside the timer."""
    best, result = math.inf, None
    for _ in range(repeats):
        result = None
        arg = setup()
        gc.collect()
        t = time.perf_counter()
        result = fn(arg)
        best = min(best, time.perf_counter() - t)
    return best, result


def _same(x, y):
    x, y = codec_lib.as_numpy(x), codec_lib.as_numpy(y)
    return (x.dtype == y.dtype and x.shape == y.shape
            and np.array_equal(codec_lib.raw_bytes(x), codec_lib.raw_bytes(y)))


def bench_dataset(tensors, repeats=3, log=None):
    """Results of every codec on one dataset (a dict of tensors)."""
    xs = [codec_lib.as_numpy(t) for t in tensors.values()]
    raw = sum(x.nbytes for x in xs)
    out = {"tensors": len(xs), "raw_bytes": raw, "codecs": {}}
    for codec in codec_lib.all_codecs():
        for x in xs:
            codec.prepare(x)
        if codec.jit:  # compile (or load from cache) the numba kernels untimed
            for x in codec.inputs(xs):
                codec.decompress(codec.compress(x))
        t_c, objs = _best_time(lambda ins: [codec.compress(x) for x in ins], repeats, lambda: codec.inputs(xs))
        t_d, ys = _best_time(lambda _: [codec.decompress(o) for o in objs], repeats)
        size = sum(codec.size(o) for o in objs)
        entry = {"bytes": size, "ratio": round(raw / size, 4) if size else None,
                 "compress_mb_s": round(raw / 1e6 / t_c, 2), "decompress_mb_s": round(raw / 1e6 / t_d, 2),
                 "compress_s": t_c, "decompress_s": t_d,
                 "exact": all(_same(x, y) for x, y in zip(xs, ys))}
        entry.update(codec.details(objs))
        out["codecs"][codec.name] = entry
        del objs, ys
        if log:
            log(f"  {codec.name:16s} ratio {entry['ratio']}  compress {entry['compress_mb_s']} MB/s  "
                f"decompress {entry['decompress_mb_s']} MB/s  exact {entry['exact']}")
    return out


def _summary(results):
    per = {}
    for name, r in results["datasets"].items():
        mine, ref = r["codecs"]["ibp"]["bytes"], r["codecs"]["reference"]["bytes"]
        per[name] = {"ibp_bytes": mine, "reference_bytes": ref,
                     "reference_over_ibp": round(ref / mine, 4) if mine else None}
    factors = [p["reference_over_ibp"] for p in per.values() if p["reference_over_ibp"]]
    geo = round(math.exp(sum(map(math.log, factors)) / len(factors)), 4) if factors else None
    return {"per_dataset": per, "geomean_reference_over_ibp": geo}


def run(names=None, data=None, repeats=3, log=None):
    """Benchmark every codec on the named datasets (default: every one of
    ibp.datasets.DATASETS installed here) or on the tensors of the file
    ``data``; returns a JSON-ready dict.  ``log`` gets progress lines."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if data is not None:
        if names is not None:
            raise ValueError("pass either dataset names or a data file, not both")
        sources = {Path(data).name: lambda: load_file(data)}
    else:
        if names is None:
            names = datasets.available()
        sources = {name: (lambda name=name: datasets.load(name)) for name in names}
    results = {"machine": machine(),
               "settings": {"repeats": repeats, "threads": 1, "mb": 10 ** 6, "codecs": list(codec_lib.NAMES),
                            "missing_packages": list(codec_lib.MISSING), "blosc2_clevel": codec_lib.BLOSC2_CLEVEL},
               "datasets": {}}
    with codec_lib.single_threaded():
        for name, load in sources.items():
            try:
                tensors = load()
            except ImportError as e:
                if log:
                    log(f"{name}: skipped ({e})")
                continue
            if log:
                mb = sum(codec_lib.as_numpy(t).nbytes for t in tensors.values()) / 1e6
                log(f"{name}: {len(tensors)} tensors, {mb:.1f} MB")
            results["datasets"][name] = bench_dataset(tensors, repeats, log)
            del tensors
    results["summary"] = _summary(results)
    return results


# -- reporting ---------------------------------------------------------------

def format_table(results):
    """Markdown table (dataset x codec) and the ibp-vs-reference summary."""
    m = results["machine"]
    lines = [f"Single thread on {m['cpu']} ({m['cores']} cores), {m['date']}; MB = 10^6 bytes, "
             f"best of {results['settings']['repeats']}.", "",
             "| dataset | codec | ratio | compress MB/s | decompress MB/s | exact |",
             "|---|---|---:|---:|---:|:---:|"]
    for name, r in results["datasets"].items():
        for codec, e in r["codecs"].items():
            ratio = "-" if e["ratio"] is None else f"{e['ratio']:.4f}"
            lines.append(f"| {name} | {codec} | {ratio} | {e['compress_mb_s']:.2f} | "
                         f"{e['decompress_mb_s']:.2f} | {'yes' if e['exact'] else 'NO'} |")
    lines.append("")
    s = results["summary"]
    for name, p in s["per_dataset"].items():
        factor = "-" if p["reference_over_ibp"] is None else f"{p['reference_over_ibp']:.4f}"
        lines.append(f"- {name}: ibp {p['ibp_bytes']:,} B vs reference {p['reference_bytes']:,} B "
                     f"(reference/ibp = {factor})")
    geo = s["geomean_reference_over_ibp"]
    lines.append(f"- geometric mean of reference/ibp bytes over {len(s['per_dataset'])} datasets: "
                 f"{'-' if geo is None else f'{geo:.4f}'}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m ibp.bench.ratio", description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", choices=datasets.DATASETS, help="default: all installed")
    p.add_argument("--data", help="benchmark this .npy/.npz/.safetensors/.pt file instead")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"output folder (default {RESULTS_DIR})")
    args = p.parse_args(argv)
    results = run(args.datasets, args.data, args.repeats, log=lambda s: print(s, file=sys.stderr, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    paths = [args.out / f"ratio.{ext}" for ext in ("json", "md", "png")]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    paths[1].write_text(table + "\n")
    plot.plot_ratio_speed(results, paths[2])
    print(table)
    print("\nwrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
