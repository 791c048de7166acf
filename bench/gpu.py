"""GPU decompression on real data: ibp's kernels against moving the
uncompressed bytes and against nvCOMP, all measured in one run.

For each table (MiniLM fp32 and bf16 weight rows, GloVe 6B-50d, a MiniLM KV
cache, Cora features; each tiled to at least --mb megabytes):

  bulk (whole table to the GPU, effective GB/s = uncompressed bytes / time)
    raw_h2d         pinned ``copy_`` of the uncompressed table (PCIe ceiling)
    ibp_stream      pinned ct, chunks DMA-copied and decoded, overlapped
    ibp_zero_copy   pinned ct read in place by the kernel over PCIe
    ibp_d2d_decode  ct already in GPU memory (ibp.cuda.to_device): decode rate
    ibp_slotted     the slotted layout, pinned, read in place (each unit
                    only up to its encoding's end)
    nvcomp_<algo>   compressed on the GPU; pinned host-to-device copy of the
                    compressed bytes + decode (and the ratio, decode alone)
  encode (the table on the GPU compressed there, ibp.cuda_encode)
    raw_d2h_GBps        pinned ``copy_`` of the uncompressed table to the host
    d2h_effective_GBps  uncompressed bytes / time of the GPU encode with the
                        compressed bytes landing in pinned host memory
    bit_exact           the GPU's bytes equal the CPU encoder's (same model;
                        also for the model learned on the GPU)
    ratio, learned_ratio  with the CPU's model, with the GPU-learned one
  gather (--rows random rows by a CUDA index, GB/s of rows delivered)
    uva_gather      warp-per-row kernel reading uncompressed pinned rows in
                    place (DGL / GraphBolt style)
    cpu_gather      index_select on the host into pinned memory + copy_
    ibp_gather      pinned ct, rows decoded in place (zero-copy)
    ibp_gather_d2d  ct in GPU memory
    ibp_gather_slotted  the slotted layout, pinned

Times are medians over --reps runs after warm-ups, by CUDA events (nvCOMP and
the CPU gather, which wait on the host, by the wall clock around a
synchronised run).  The two ceilings (pinned host-to-device copy, device-to-
device copy) are measured in the same run.  A tiny correctness check against
the CPU decoder runs first, and every timed output is compared once with the
original.  Each table also lists the GPU issue's bars (``targets``) with the
measured value beside each.  Results: bench/results/gpu-<device>.json, .md
and .png; ``ibp bench`` runs the same (``run``) when a GPU is present.

    python bench/gpu.py [--mb 256] [--rows 100000] [--reps 10] [--datasets glove-50d cora ...] [--data FILE] [--pack .device/pack] [--dry-run]
"""
import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time

import numpy as np
import torch

import ibp
import ibp.cuda

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TABLES = ("minilm-fp32", "minilm-bf16", "minilm-fp16", "glove-50d", "minilm-kv", "cora")
NVCOMP = ("LZ4", "Snappy", "GDeflate", "Cascaded", "Bitcomp", "ANS", "Zstd")
CAP = 0.8                        # every bandwidth bar is capped at CAP x the measured device copy rate

UVA_GATHER = r"""
extern "C" __global__ void uva_gather(const unsigned char* __restrict__ src, const long long* __restrict__ index,
                                      unsigned char* __restrict__ dst, long long rows, long long row_bytes) {
    long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const unsigned char* s = src + index[r] * row_bytes;
    unsigned char* d = dst + r * row_bytes;
    if (row_bytes % 16 == 0) {
        for (long long i = lane; i < row_bytes / 16; i += 32) ((uint4*)d)[i] = ((const uint4*)s)[i];
    } else if (row_bytes % 4 == 0) {
        for (long long i = lane; i < row_bytes / 4; i += 32) ((unsigned*)d)[i] = ((const unsigned*)s)[i];
    } else {
        for (long long i = lane; i < row_bytes; i += 32) d[i] = s[i];
    }
}
"""


# -- timing -------------------------------------------------------------------------

def event_ms(fn, reps, warmup=3):
    """Median milliseconds of ``fn()`` by CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def wall_ms(fn, reps, warmup=3):
    """Median milliseconds of a synchronised ``fn()`` by the host clock."""
    for _ in range(warmup):
        fn()
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class _StreamHandle:
    """torch's current stream in the CUDA stream protocol, for CuPy."""

    def __cuda_stream__(self):
        return 0, torch.cuda.current_stream().cuda_stream


def cupy_stream(cupy):
    if hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(_StreamHandle())
    return cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)


def gbps(nbytes, ms):
    return nbytes / ms / 1e6


def same_bytes(a, b):
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def uva_gather(pinned, index, out):
    """``out[:] = pinned[index]`` by a warp-per-row kernel reading the pinned
    host rows in place (UVA), as DGL / GraphBolt gather pinned features;
    ``index`` is a CUDA int64 tensor.  Runs on torch's current stream."""
    import cupy
    global _uva_kernel
    if _uva_kernel is None:
        _uva_kernel = cupy.RawKernel(UVA_GATHER, "uva_gather")
    rows, row_bytes = index.numel(), out[0].numel() * out.element_size() if out.shape[0] else 0
    if rows:
        with cupy_stream(cupy):
            _uva_kernel((math.ceil(rows * 32 / 256),), (256,),
                        (np.uint64(pinned.data_ptr()), np.uint64(index.data_ptr()), np.uint64(out.data_ptr()),
                         np.int64(rows), np.int64(row_bytes)))
    return out


_uva_kernel = None


# -- data -----------------------------------------------------------------------------

def pack_load(pack, name):
    """One table of a pack written by bench/device/pack, in the layout of
    ibp.datasets.load(name); each array's sha256 is checked against the
    manifest.  bf16 and fp16 are derived from fp32 by rounding to nearest
    even, as ibp.datasets derives them."""
    import hashlib
    source = {"minilm-bf16": "minilm-fp32", "minilm-fp16": "minilm-fp32"}.get(name, name)
    with open(os.path.join(pack, "..", "manifest.json")) as f:
        manifest = json.load(f)["tables"]
    if source not in manifest:
        raise KeyError(f"{name} is not in the pack {pack}")
    with np.load(os.path.join(pack, f"{source}.npz")) as z:
        data = {k: z[k] for k in z.files}
    for key, meta in manifest[source].items():
        a = data.get(key)
        if a is None or (list(a.shape), str(a.dtype)) != (meta["shape"], meta["dtype"]) or \
                hashlib.sha256(a.tobytes()).hexdigest() != meta["sha256"]:
            raise ValueError(f"pack {pack}: {source}/{key} differs from its manifest")
    if name == "minilm-bf16":
        return {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in data.items()}
    if name == "minilm-fp16":
        return {k: v.astype(np.float16) for k, v in data.items()}
    return data


def load_dataset(name, pack=None):
    """ibp.datasets.load(name) where its package is installed, else the pack's copy (None if neither)."""
    from ibp import datasets
    if name in datasets.available():
        return datasets.load(name)
    if pack is not None:
        return pack_load(pack, name)
    return None


def real_tables(names, min_bytes, log=print, pack=None):
    """name -> (2-D CPU tensor of real rows tiled to at least min_bytes, tiles)."""
    tables = {}
    for name in names:
        try:
            data = load_dataset(name, pack)
        except KeyError as e:
            data = None
            log(f"GPU: {e}")
        if data is None:
            log(f"GPU: skipping {name}: neither its package nor a pack with it is here")
            continue
        if name in ("minilm-fp32", "minilm-bf16", "minilm-fp16"):
            rows = [torch.as_tensor(v) for v in data.values() if v.ndim == 2 and v.shape[1] == 384]
            x = torch.cat(rows)
        elif name == "minilm-kv":
            # [1, heads, tokens, head_dim] -> one row per token: [tokens, heads * head_dim]
            x = torch.cat([torch.from_numpy(v[0]).transpose(0, 1).reshape(v.shape[2], -1) for v in data.values()])
        else:
            x = torch.as_tensor(next(iter(data.values())))
        tiles = max(1, math.ceil(min_bytes / (x.numel() * x.element_size())))
        tables[name] = (x.repeat(tiles, 1).contiguous(), tiles)
    return tables


# -- checks ---------------------------------------------------------------------------

def correctness_check(tables):
    """Every path on slices of every table against the CPU decoder; stops the run on a mismatch."""
    for name, (x, _) in tables.items():
        part = x[:1500].clone()
        for layout in ("packed", "slotted"):
            ct = ibp.compress(part, layout=layout)
            expect = ibp.decompress(ct)
            index = torch.randint(-part.shape[0], part.shape[0], (333,), device="cuda")
            expect_rows = ibp.decompress(ct, index=index.cpu().numpy())
            pinned, resident = ct.pin_memory(), ibp.cuda.to_device(ct)
            got = [ibp.cuda.decompress(pinned, path="stream", sync=True),
                   ibp.cuda.decompress(pinned, path="zero-copy", sync=True),
                   ibp.cuda.decompress(resident, sync=True), ibp.cuda.decompress(ct, sync=True)]
            rows = [ibp.cuda.decompress(pinned, index=index, sync=True),
                    ibp.cuda.decompress(resident, index=index, sync=True)]
            if not all(same_bytes(g.cpu(), expect) for g in got) or not all(
                    same_bytes(r.cpu(), expect_rows) for r in rows):
                raise RuntimeError(f"GPU decode differs from the CPU decoder on {name} ({layout})")


# -- measurements ---------------------------------------------------------------------

def ceilings(reps):
    """GB/s of a 1 GiB pinned host-to-device copy_ and device-to-device copy."""
    n = 1 << 30
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev, dev2 = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    h2d = event_ms(lambda: dev.copy_(host, non_blocking=True), reps)
    d2d = event_ms(lambda: dev2.copy_(dev), reps)
    return {"h2d_pinned_GBps": gbps(n, h2d), "d2d_copy_GBps": gbps(n, d2d), "d2d_read_write_GBps": gbps(2 * n, d2d)}


def bulk(x, ct, pinned, resident, slotted, reps):
    raw = x.numel() * x.element_size()
    x_pinned, x_dev = x.pin_memory(), x.cuda()
    out = torch.empty_like(x_dev)
    r = {"raw_h2d": gbps(raw, event_ms(lambda: out.copy_(x_pinned, non_blocking=True), reps))}
    runs = {"ibp_stream": lambda: ibp.cuda.decompress(pinned, out=out, path="stream"),
            "ibp_zero_copy": lambda: ibp.cuda.decompress(pinned, out=out, path="zero-copy"),
            "ibp_d2d_decode": lambda: ibp.cuda.decompress(resident, out=out),
            "ibp_slotted": lambda: ibp.cuda.decompress(slotted, out=out, path="zero-copy")}
    for key, fn in runs.items():
        out.view(torch.uint8).fill_(0xFF)
        fn()
        ibp.cuda.check()
        if not same_bytes(out, x_dev):
            raise RuntimeError(f"{key} decoded a wrong table")
        r[key] = gbps(raw, event_ms(fn, reps))
    r["ibp_d2d_decode_compressed_read_GBps"] = r["ibp_d2d_decode"] * ct.nbytes / raw
    return r, x_dev


def same_encoding(a, b):
    """Equal kinds, payload and row index (the bytes a file would hold)."""
    same = np.array_equal(a.kinds, b.kinds) and np.array_equal(a.payload, b.payload)
    if a.layout == "packed":
        same = same and a.payload_bits == b.payload_bits and a.index[:2] == b.index[:2] and all(
            np.array_equal(p, q) for p, q in zip(a.index[2:], b.index[2:]))
    return bool(same)


def encode(x, x_dev, ct, reps):
    """GPU compression of the table in GPU memory, against copying it raw."""
    raw = x.numel() * x.element_size()
    host = torch.empty(raw, dtype=torch.uint8, pin_memory=True)
    flat = x_dev.reshape(-1).view(torch.uint8)
    r = {"raw_d2h_GBps": gbps(raw, event_ms(lambda: host.copy_(flat, non_blocking=True), reps))}
    runs = {"d2h_effective_GBps": lambda: ibp.compress(x_dev, model=ct.model),
            "slotted_d2h_effective_GBps": lambda: ibp.compress(x_dev, model=ct.model, layout="slotted"),
            "device_payload_GBps": lambda: ibp.compress(x_dev, model=ct.model, payload="device"),
            "learned_d2h_effective_GBps": lambda: ibp.compress(x_dev)}
    for key, fn in runs.items():   # wall clock: the packed layout's host wait is part of the work
        r[key] = gbps(raw, wall_ms(fn, reps))
    gpu = ibp.compress(x_dev, model=ct.model)
    learned = ibp.compress(x_dev)
    slotted = ibp.compress(x_dev, model=ct.model, layout="slotted")
    r["bit_exact"] = (same_encoding(gpu, ct) and same_encoding(slotted, ibp.compress(x, model=ct.model,
                                                                                      layout="slotted"))
                      and same_encoding(learned, ibp.compress(x, model=learned.model)))
    r["ratio"] = gpu.ratio
    r["learned_ratio"] = learned.ratio
    return r


def gather(x, x_dev, pinned, resident, slotted, rows, reps):
    n = x.shape[0]
    row_bytes = x[0].numel() * x.element_size()
    index = torch.randint(0, n, (rows,), device="cuda")
    want = x_dev[index]
    out = torch.empty_like(want)
    moved = rows * row_bytes
    x_pinned = x.pin_memory()

    def uva():
        uva_gather(x_pinned, index, out)

    index_cpu, staging = index.cpu(), torch.empty_like(want, device="cpu").pin_memory()

    def cpu():
        torch.index_select(x, 0, index_cpu, out=staging)
        out.copy_(staging, non_blocking=True)

    r = {}
    for key, fn, timer in (("uva_gather", uva, event_ms), ("cpu_gather", cpu, wall_ms),
                           ("ibp_gather", lambda: ibp.cuda.decompress(pinned, index=index, out=out), event_ms),
                           ("ibp_gather_d2d", lambda: ibp.cuda.decompress(resident, index=index, out=out), event_ms),
                           ("ibp_gather_slotted", lambda: ibp.cuda.decompress(slotted, index=index, out=out),
                            event_ms)):
        out.view(torch.uint8).fill_(0xFF)
        fn()
        torch.cuda.synchronize()
        ibp.cuda.check()
        if not same_bytes(out, want):
            raise RuntimeError(f"{key} gathered wrong rows")
        r[key] = gbps(moved, timer(fn, reps))
    r["rows"], r["row_bytes"] = rows, row_bytes
    return r


def import_nvcomp():
    """nvidia.nvcomp, also when its wheel lies in a sys.path entry other than
    the one holding the other nvidia packages (a regular ``nvidia`` package
    there would hide the namespace portion)."""
    try:
        from nvidia import nvcomp
        return nvcomp
    except ImportError:
        import nvidia
        extra = [os.path.join(p, "nvidia") for p in sys.path if os.path.isdir(os.path.join(p or ".", "nvidia", "nvcomp"))]
        if not extra:
            raise
        nvidia.__path__ = list(nvidia.__path__) + [e for e in extra if e not in nvidia.__path__]
        from nvidia import nvcomp
        return nvcomp


def nvcomp_codecs(x_dev, reps):
    try:
        nvcomp = import_nvcomp()
    except ImportError as e:
        return {"error": f"nvCOMP not installed (pip install nvidia-nvcomp-cu13): {e}"}
    raw = x_dev.numel() * x_dev.element_size()
    typed = x_dev.reshape(-1).view({4: torch.int32, 2: torch.int16, 8: torch.int64}.get(x_dev.element_size(),
                                                                                          torch.uint8))
    stream = torch.cuda.current_stream().cuda_stream
    out = {"version": getattr(nvcomp, "__version__", "?")}
    for algo in NVCOMP:
        try:
            codec = nvcomp.Codec(algorithm=algo, cuda_stream=stream)
            comp = codec.encode(nvcomp.as_array(typed))
            torch.cuda.synchronize()
            comp_dev = torch.as_tensor(comp, device="cuda").reshape(-1).view(torch.uint8)
            comp_host = comp_dev.cpu().pin_memory()
            landing = torch.empty_like(comp_dev)

            def h2d_decode():
                landing.copy_(comp_host, non_blocking=True)
                return codec.decode(nvcomp.as_array(landing))

            decoded = torch.as_tensor(h2d_decode(), device="cuda")
            torch.cuda.synchronize()
            if not same_bytes(decoded, typed):
                raise RuntimeError("decoded bytes differ")
            out[algo] = {"ratio": raw / comp_dev.numel(),
                         "h2d_decode_GBps": gbps(raw, wall_ms(h2d_decode, reps)),
                         "decode_GBps": gbps(raw, wall_ms(lambda: codec.decode(comp), reps))}
        except Exception as e:  # one codec's failure must not end the run
            out[algo] = {"error": repr(e)[:300]}
    return out


# -- report ---------------------------------------------------------------------------

def device_info():
    p = torch.cuda.get_device_properties(0)
    import cupy
    return {"name": p.name, "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
            "memory_GiB": round(p.total_memory / 2**30, 1), "driver": cupy.cuda.runtime.driverGetVersion(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cupy": cupy.__version__, "ibp": ibp.__version__,
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results["tables"])
    panels = [("bulk", ["raw_h2d", "ibp_stream", "ibp_zero_copy", "nvcomp_best"], "whole table to the GPU"),
              ("gather", ["uva_gather", "cpu_gather", "ibp_gather"], "random rows to the GPU")]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    for ax, (part, keys, title) in zip(axes, panels):
        width = 0.8 / len(keys)
        for k, key in enumerate(keys):
            vals = [results["tables"][n][part].get(key, 0) or 0 for n in names]
            ax.bar(np.arange(len(names)) + k * width, vals, width, label=key)
        ax.axhline(results["ceilings"]["h2d_pinned_GBps"], color="k", ls="--", lw=1, label="pinned copy_ ceiling")
        ax.set_xticks(np.arange(len(names)) + width * (len(keys) - 1) / 2, names, rotation=15)
        ax.set_yscale("log")
        ax.set_ylabel("effective GB/s (uncompressed bytes delivered)")
        ax.set_title(f"{title} - {results['device']['name']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def capped(target, d2d_GBps):
    """A bandwidth bar no faster than CAP x the device-to-device copy rate
    (no bar may ask for more than the GPU's own memory can move)."""
    return target if d2d_GBps is None else min(target, CAP * d2d_GBps)


def targets(entry, d2d_GBps=None):
    """The GPU issue's bars for one table, each with the measured value,
    each capped at CAP x ``d2d_GBps`` (the measured device copy rate)."""
    b, g, ratio = entry["bulk"], entry["gather"], entry["ibp_ratio"]
    bulk = max(b["ibp_stream"], b["ibp_zero_copy"])
    nvcomp = entry["bulk"]["nvcomp_best"]
    out = {"bulk >= 0.9 x ratio x pinned copy": [bulk, 0.9 * ratio * b["raw_h2d"]],
           "encode d2h >= 0.9 x ratio x pinned copy": [entry["encode"]["d2h_effective_GBps"],
                                                       0.9 * ratio * entry["encode"]["raw_d2h_GBps"]],
           "gather >= 0.8 x ratio x UVA gather": [g["ibp_gather"], 0.8 * ratio * g["uva_gather"]],
           "device decode >= 500 GB/s": [b["ibp_d2d_decode"], 500.0]}
    if nvcomp is not None:
        out["bulk > best nvCOMP"] = [bulk, nvcomp]
    return {k: {"measured": round(v, 2), "target": round(capped(t, d2d_GBps), 2), "met": v >= capped(t, d2d_GBps)}
            for k, (v, t) in out.items()}


def user_table(path):
    """The largest tensor of a user's file, rows along its first axis."""
    from ibp.bench.ratio import load_file
    tensors = load_file(path)
    name, x = max(tensors.items(), key=lambda kv: np.prod(np.shape(kv[1])))
    x = torch.as_tensor(x)
    if x.ndim < 2:
        x = x.reshape(-1, 1)
    return f"{os.path.basename(path)}:{name}", x.reshape(x.shape[0], -1)


def run(names=None, data=None, repeats=10, log=None, mb=256, rows=100_000, pack=None, save=None):
    """Measure every table (``names`` among TABLES, default all installed or
    in ``pack``, or the largest tensor of the file ``data``); returns the
    results, also handed to ``save`` after each table (a run cut short
    keeps what it measured)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the GPU benchmark needs a CUDA GPU")
    log = log or (lambda line: None)
    if data is not None:
        label, x = user_table(data)
        tiles = max(1, math.ceil((mb << 20) / (x.numel() * x.element_size())))
        tables = {label: (x.repeat(tiles, 1).contiguous(), tiles)}
    else:
        tables = real_tables([n for n in (names or TABLES) if n in TABLES], mb << 20, log, pack)
    correctness_check(tables)
    log("GPU: correctness check passed")
    results = {"device": device_info(), "settings": {"mb": mb, "rows": rows, "repeats": repeats},
               "ceilings": ceilings(repeats), "tables": {}}
    for name, (x, tiles) in tables.items():
        log(f"GPU: {name} {tuple(x.shape)} {x.dtype}")
        t0 = time.perf_counter()
        ct = ibp.compress(x)
        seconds = time.perf_counter() - t0
        pinned, resident = ct.pin_memory(), ibp.cuda.to_device(ct)
        slotted = ibp.compress(x, model=ct.model, layout="slotted").pin_memory()
        entry = {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch."), "tiles": tiles,
                 "raw_bytes": x.numel() * x.element_size(), "ibp_bytes": ct.nbytes, "ibp_ratio": ct.ratio,
                 "slotted_transfer_ratio": slotted.raw_nbytes / slotted.transfer_nbytes,
                 "word_bits": ct.word_bits, "unit_words": ct.geometry.unit_words, "compress_s": seconds}
        entry["bulk"], x_dev = bulk(x, ct, pinned, resident, slotted, repeats)
        entry["encode"] = encode(x, x_dev, ct, repeats)
        entry["gather"] = gather(x, x_dev, pinned, resident, slotted, min(rows, x.shape[0]), repeats)
        entry["nvcomp"] = nvcomp_codecs(x_dev, repeats)
        best = [v["h2d_decode_GBps"] for v in entry["nvcomp"].values() if isinstance(v, dict) and "ratio" in v]
        entry["bulk"]["nvcomp_best"] = max(best) if best else None
        entry["targets"] = targets(entry, results["ceilings"]["d2d_copy_GBps"])
        results["tables"][name] = entry
        if save is not None:
            save(results)
        del x_dev, pinned, resident, slotted
        torch.cuda.empty_cache()
    return results


def format_table(results):
    """Markdown: effective GB/s per table and path, as in the JSON."""
    c = results["ceilings"]
    lines = [f"GPU: {results['device']['name']}; pinned copy_ {c['h2d_pinned_GBps']:.1f} GB/s, "
             f"device copy {c['d2d_copy_GBps']:.0f} GB/s (effective GB/s = uncompressed bytes / time)", "",
             "| table | ratio | pinned copy_ | ibp stream | ibp zero-copy | ibp on device | best nvCOMP "
             "| UVA gather | CPU gather | ibp gather | raw D2H | ibp encode D2H | bars met |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in results["tables"].items():
        b, g = e["bulk"], e["gather"]
        nv = "-" if b["nvcomp_best"] is None else f"{b['nvcomp_best']:.1f}"
        met = sum(t["met"] for t in e["targets"].values())
        lines.append(f"| {name} | {e['ibp_ratio']:.3f} | {b['raw_h2d']:.1f} | {b['ibp_stream']:.1f} "
                     f"| {b['ibp_zero_copy']:.1f} | {b['ibp_d2d_decode']:.0f} | {nv} | {g['uva_gather']:.1f} "
                     f"| {g['cpu_gather']:.1f} | {g['ibp_gather']:.1f} | {e['encode']['raw_d2h_GBps']:.1f} "
                     f"| {e['encode']['d2h_effective_GBps']:.1f}{'' if e['encode']['bit_exact'] else ' (NOT EXACT)'} "
                     f"| {met}/{len(e['targets'])} |")
    return "\n".join(lines)


def save_results(results, results_dir=RESULTS):
    """bench/results/gpu-<device>.json, .md and .png; returns the stem."""
    os.makedirs(results_dir, exist_ok=True)
    stem = os.path.join(results_dir, "gpu-" + re.sub(r"[^A-Za-z0-9._-]+", "-", results["device"]["name"]).strip("-"))
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(format_table(results) + "\n")
    if results["tables"]:
        plot(results, stem + ".png")
    return stem


def dry_run(names, pack, mb):
    """Everything but the GPU: load (and check) every table, tile it,
    round-trip a slice through the CPU codec, and learn its model with the
    GPU encoder's learner (torch ops, here on the CPU)."""
    from ibp import cuda_encode
    tables = real_tables(names, mb << 20, print, pack)
    for name, (x, tiles) in tables.items():
        part = x[:256]
        ct = ibp.compress(part)
        if not same_bytes(torch.as_tensor(ibp.decompress(ct)), part):
            raise RuntimeError(f"CPU round trip differs on {name}")
        W, P = cuda_encode.learner_geometry(tuple(part.shape), part.element_size())
        words = part.contiguous().reshape(-1).view(torch.uint8).view(
            {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}[W]).to(torch.int64)
        lo, hi, base = cuda_encode.learn(torch, words & ((1 << W) - 1 if W < 64 else -1), W, P)
        learned = ibp.Model(W, lo.numpy().astype(np.uint8), hi.numpy().astype(np.uint8), base.numpy().view(np.uint64))
        if not same_bytes(torch.as_tensor(ibp.decompress(ibp.compress(part, model=learned))), part):
            raise RuntimeError(f"CPU round trip with the GPU-learned model differs on {name}")
        print(f"GPU dry run: {name} {tuple(x.shape)} {x.dtype} x{tiles}, slice ratio {ct.ratio:.3f}, "
              f"with the GPU-learned model {ibp.compress(part, model=learned).ratio:.3f}")
    return tables


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="tile each table to at least this many MB")
    parser.add_argument("--rows", type=int, default=100_000, help="rows per gather")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--datasets", nargs="*", default=list(TABLES), choices=TABLES)
    parser.add_argument("--data", help="benchmark the largest tensor of this file instead")
    parser.add_argument("--pack", help="tables missing here come from this pack (bench/device/pack)")
    parser.add_argument("--dry-run", action="store_true", help="load and check the tables, no GPU")
    parser.add_argument("--results", default=RESULTS, help="folder for gpu-<device>.json, .md and .png")
    args = parser.parse_args(argv)
    if args.dry_run:
        dry_run(args.datasets, args.pack, args.mb)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU")
    save = lambda results: save_results(results, args.results)  # noqa: E731
    results = run(args.datasets, args.data, args.reps, print, args.mb, args.rows, args.pack, save)
    stem = save(results)
    print(format_table(results))
    print(f"wrote {stem}.json, .md and .png")


if __name__ == "__main__":
    main()
