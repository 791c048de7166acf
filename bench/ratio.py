"""Compression ratio and single-thread CPU speed of ibp against the
reference algorithm and general-purpose codecs, on real tensors.

A dataset is a dict of tensors (a checkpoint, a feature table).  For each
codec it reports the total compressed bytes, the ratio raw/compressed,
compress and decompress speed (uncompressed MB per second, MB = 10^6 bytes,
best of ``repeats`` passes over all tensors of the dataset in sequence, one
thread; the codecs' passes take turns, so a slow spell of a shared machine
falls on every codec alike), and whether every round trip was bit-exact.

Each dataset is also written as one safetensors file and converted as a
user converts a checkpoint, file to file, in the same run: ``ibp compress``
(``checkpoints.compress_safetensors``, every tensor analysed and encoded)
and ``ibp decompress`` back to the same bytes, against each byte codec on
the whole file (read, compress, write; read, decompress, write).  Tensors
of SCALING_MIN_BYTES and more (and the KV cache stacked into one tensor)
are timed again with two threads, against one, the threads woken before
each timed pass (``_wake_threads``).

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
import tempfile
import time

import numpy as np

if __package__ in (None, ""):  # run as a script: python bench/ratio.py
    from ibp.bench import codecs as codec_lib, plot
else:
    from . import codecs as codec_lib, plot

import numba

import ibp
from ibp import checkpoints, datasets, stream

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCALING_MIN_BYTES = 64 << 20     # tensors this big are also timed on two threads ...
LONG_PASS_S = 10.0                # a pass this long is not repeated
WARM_UP = 5                      # ... after this many untimed round trips (a VM's idle core wakes slowly)
SCALING_PASSES = 15              # ... best of this many passes each: two threads on a shared VM vary more than one
                                 # (a pass takes tens of ms; with 7 the same decoder ranged 1.3-2.0x between runs)


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

def _interleaved(runs, repeats):
    """Best wall time of each of ``runs`` (name -> (fn, setup)), timed pass
    by pass in turn rather than each run's passes back to back, so that a
    slow spell of a shared machine slows every codec's pass alike instead of
    all of one codec's; a run whose pass took LONG_PASS_S is not repeated.
    Returns name -> (best time, last result)."""
    out = {name: (math.inf, None) for name in runs}
    for i in range(repeats):
        for name, (fn, setup) in runs.items():
            best, _ = out[name]
            if i and best > LONG_PASS_S:
                continue
            gc.collect()
            arg = setup()
            t = time.perf_counter()
            result = fn(arg)
            out[name] = (min(best, time.perf_counter() - t), result)
    return out


def _same(x, y):
    x, y = codec_lib.as_numpy(x), codec_lib.as_numpy(y)
    return (x.dtype == y.dtype and x.shape == y.shape
            and np.array_equal(codec_lib.raw_bytes(x), codec_lib.raw_bytes(y)))


def bench_dataset(tensors, repeats=3, log=None):
    """Results of every codec on one dataset (a dict of tensors), the
    codecs' passes interleaved (see ``_interleaved``)."""
    xs = [codec_lib.as_numpy(t) for t in tensors.values()]
    raw = sum(x.nbytes for x in xs)
    out = {"tensors": len(xs), "raw_bytes": raw, "codecs": {}}
    codecs = codec_lib.all_codecs()
    for codec in codecs:
        for x in xs:
            codec.prepare(x)
        if codec.jit:  # compile (or load from cache) the numba kernels untimed
            for x in codec.inputs(xs):
                codec.decompress(codec.compress(x))
    compressed = _interleaved({c.name: (lambda ins, c=c: [c.compress(x) for x in ins], lambda c=c: c.inputs(xs))
                               for c in codecs}, repeats)
    decompressed = _interleaved({c.name: (lambda _, c=c: [c.decompress(o) for o in compressed[c.name][1]],
                                          lambda: None) for c in codecs}, repeats)
    for codec in codecs:
        (t_c, objs), (t_d, ys) = compressed[codec.name], decompressed[codec.name]
        size = sum(codec.size(o) for o in objs)
        entry = {"bytes": size, "ratio": round(raw / size, 4) if size else None,
                 "compress_mb_s": round(raw / 1e6 / t_c, 2), "decompress_mb_s": round(raw / 1e6 / t_d, 2),
                 "compress_s": t_c, "decompress_s": t_d,
                 "exact": all(_same(x, y) for x, y in zip(xs, ys))}
        entry.update(codec.details(objs))
        out["codecs"][codec.name] = entry
        if log:
            log(f"  {codec.name:16s} ratio {entry['ratio']}  compress {entry['compress_mb_s']} MB/s  "
                f"decompress {entry['decompress_mb_s']} MB/s  exact {entry['exact']}")
    return out


def _save_safetensors(tensors, path):
    """Write a dict of numpy arrays / torch tensors as one safetensors file."""
    try:
        import torch
        from safetensors.torch import save_file
    except ImportError:
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(codec_lib.as_numpy(v)) for k, v in tensors.items()}, str(path))
        return
    save_file({k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))).contiguous()
               for k, v in tensors.items()}, str(path))


def _read(path):
    data = bytearray(os.path.getsize(path))
    with open(path, "rb", buffering=0) as f:
        f.readinto(data)
    return data


def _write(path, data):
    with open(path, "wb", buffering=0) as f:
        f.write(data)


def bench_checkpoint(tensors, workdir, repeats=3, log=None):
    """Every codec on the dataset written as one safetensors file, file to
    file: ibp as ``ibp compress`` / ``ibp decompress`` convert it, the byte
    codecs on the whole file's bytes, their passes interleaved."""
    src = Path(workdir) / "model.safetensors"
    packed = lambda codec: Path(workdir) / f"packed.{codec}"   # noqa: E731 (each codec keeps its own files
    back = lambda codec: Path(workdir) / f"back.{codec}.safetensors"   # noqa: E731  across interleaved passes)
    _save_safetensors(tensors, src)
    raw = os.path.getsize(src)
    xs = [codec_lib.as_numpy(t) for t in tensors.values()]
    main = max(xs, key=lambda x: x.nbytes).dtype
    out = {"file_bytes": raw, "tensors": len(xs), "dtype": str(main), "codecs": {}}

    def ibp_compress(_):
        with open(packed("ibp"), "wb") as f:
            checkpoints.compress_safetensors(src, f, scratch_dir=workdir)

    def ibp_decompress(_):
        with stream.Reader(packed("ibp")) as r, open(back("ibp"), "wb") as f:
            checkpoints.decompress_to_safetensors(r, f)

    runs = [("ibp", ibp_compress, ibp_decompress)]
    for c in codec_lib.file_codecs(main):
        runs.append((c.name, lambda _, c=c: _write(packed(c.name), c.compress(_read(src))),
                     lambda _, c=c: _write(back(c.name), c.decompress(bytes(_read(packed(c.name)))))))
    ibp_compress(None)   # compile (or load from cache) the numba kernels untimed
    ibp_decompress(None)
    # each pass writes a new file, as a conversion does: the last pass's is removed untimed first (truncating
    # it in the timed open cost 0.5-11 ms as its pages were freed, more than converting Cora)
    compressed = _interleaved({name: (comp, lambda name=name: packed(name).unlink(missing_ok=True))
                               for name, comp, _ in runs}, repeats)
    decompressed = _interleaved({name: (decomp, lambda name=name: back(name).unlink(missing_ok=True))
                                 for name, _, decomp in runs}, repeats)
    for name, _, _ in runs:
        t_c, t_d = compressed[name][0], decompressed[name][0]
        size = os.path.getsize(packed(name))
        exact = _read(back(name)) == _read(src)
        out["codecs"][name] = {"bytes": size, "ratio": round(raw / size, 4),
                               "compress_mb_s": round(raw / 1e6 / t_c, 2), "decompress_mb_s": round(raw / 1e6 / t_d, 2),
                               "compress_s": t_c, "decompress_s": t_d, "exact": exact}
        for path in (packed(name), back(name)):
            path.unlink(missing_ok=True)
        if log:
            e = out["codecs"][name]
            log(f"  file {name:12s} ratio {e['ratio']}  compress {e['compress_mb_s']} MB/s  "
                f"decompress {e['decompress_mb_s']} MB/s  exact {exact}")
    src.unlink(missing_ok=True)
    return out


def bench_threads(name, x, repeats=3, log=None):
    """ibp compress (analysis included) and decompress of one tensor on one
    and on two threads, best of at least SCALING_PASSES, the thread counts
    taking turns."""
    x = codec_lib.as_numpy(x)
    entry = {"bytes": x.nbytes, "shape": list(x.shape), "dtype": str(x.dtype)}
    for threads in (1, 2):
        numba.set_num_threads(threads)
        for _ in range(WARM_UP):  # the parallel kernels compiled or loaded, the threads awake, untimed
            ibp.decompress(ibp.compress(x))
        _fill_fresh(np.zeros(1, np.uint8))

    def on(threads, fn):
        def run(_):
            return fn()

        def setup():
            numba.set_num_threads(threads)
            if threads > 1:
                _wake_threads()
        return run, setup

    packed = _interleaved({t: on(t, lambda: ibp.compress(x)) for t in (1, 2)}, max(repeats, SCALING_PASSES))
    unpacked = _interleaved({t: on(t, lambda t=t: ibp.decompress(packed[t][1])) for t in (1, 2)},
                            max(repeats, SCALING_PASSES))
    flat = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    filled = _interleaved({t: on(t, lambda: _fill_fresh(flat)) for t in (1, 2)}, max(repeats, SCALING_PASSES))
    for t in (1, 2):
        entry[f"threads_{t}"] = {"compress_mb_s": round(x.nbytes / 1e6 / packed[t][0], 2),
                                 "decompress_mb_s": round(x.nbytes / 1e6 / unpacked[t][0], 2),
                                 "fill_fresh_mb_s": round(x.nbytes / 1e6 / filled[t][0], 2),
                                 "exact": _same(x, unpacked[t][1])}
    one, two = entry["threads_1"], entry["threads_2"]
    entry["speedup"] = {k: round(two[f"{k}_mb_s"] / one[f"{k}_mb_s"], 3)
                        for k in ("compress", "decompress", "fill_fresh")}
    if log:
        log(f"  {name}: two threads / one: compress {entry['speedup']['compress']}x, "
            f"decompress {entry['speedup']['decompress']}x (filling fresh memory: {entry['speedup']['fill_fresh']}x)")
    return entry


@numba.njit(parallel=True)
def _fill(src, out):
    for i in numba.prange(src.shape[0]):
        out[i] = src[i] ^ np.uint8(1)


def _fill_fresh(src):
    """A new array of ``src``'s bytes, each changed, in parallel: the
    machine's own two-thread ceiling for a kernel that writes fresh memory
    as compress and decompress do (each new page is zeroed by the kernel
    as it is first touched, which scales worse than compute on a VM)."""
    out = np.empty_like(src)
    _fill(src, out)
    return out


@numba.njit(parallel=True)
def _spin(out):
    for i in numba.prange(out.shape[0]):
        out[i] = math.sqrt(i)


def _wake_threads():
    """Run a trivial parallel kernel until it is quick.  On a VM, a core
    left idle for a fraction of a second (as by the gc.collect() before a
    timed pass: 0.2 s here) takes about 10 ms to be scheduled again; that
    is the hypervisor's, not ibp's, so it is paid before the timer starts."""
    buf = np.zeros(1 << 16)
    for _ in range(100):
        t = time.perf_counter()
        _spin(buf)
        if time.perf_counter() - t < 1e-3:
            return


def _scaling_tensors(name, tensors, min_bytes):
    """(label, tensor) of the dataset's tensors of ``min_bytes`` and more, and
    of its tensors stacked into one when they share a shape (the KV cache
    of every layer) and together are that big."""
    xs = {k: codec_lib.as_numpy(t) for k, t in tensors.items()}
    out = [(f"{name}/{k}", x) for k, x in xs.items() if x.nbytes >= min_bytes]
    shapes = {(x.shape, x.dtype) for x in xs.values()}
    if len(xs) > 1 and len(shapes) == 1 and sum(x.nbytes for x in xs.values()) >= min_bytes:
        out.append((f"{name} (all {len(xs)} stacked)", np.stack(list(xs.values()))))
    return out


def _summary(results):
    per = {}
    for name, r in results["datasets"].items():
        mine, ref = r["codecs"]["ibp"]["bytes"], r["codecs"]["reference"]["bytes"]
        per[name] = {"ibp_bytes": mine, "reference_bytes": ref,
                     "reference_over_ibp": round(ref / mine, 4) if mine else None}
    factors = [p["reference_over_ibp"] for p in per.values() if p["reference_over_ibp"]]
    geo = round(math.exp(sum(map(math.log, factors)) / len(factors)), 4) if factors else None
    files = {}
    for name, r in results.get("checkpoints", {}).items():
        mine, base = r["codecs"]["ibp"], r["codecs"].get("zstd-3")
        if base:
            files[name] = {k: round(mine[f"{k}_mb_s"] / base[f"{k}_mb_s"], 3) for k in ("compress", "decompress")}
    return {"per_dataset": per, "geomean_reference_over_ibp": geo, "checkpoint_ibp_over_zstd3": files}


def run(names=None, data=None, repeats=3, log=None, scaling_min_bytes=SCALING_MIN_BYTES):
    """Benchmark every codec on the named datasets (default: every one of
    ibp.datasets.DATASETS installed here) or on the tensors of the file
    ``data``, each also as a safetensors file, and ibp's two-thread scaling
    on tensors of ``scaling_min_bytes`` and more; returns a JSON-ready dict.
    ``log`` gets progress lines."""
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
               "settings": {"repeats": repeats, "long_pass_s": LONG_PASS_S, "threads": 1, "mb": 10 ** 6,
                            "codecs": list(codec_lib.NAMES), "missing_packages": list(codec_lib.MISSING), "blosc2_clevel": codec_lib.BLOSC2_CLEVEL},
               "datasets": {}, "checkpoints": {}, "threads": {}}
    two_threads = min(os.cpu_count() or 1, numba.config.NUMBA_NUM_THREADS) >= 2
    results["settings"]["scaling"] = {"min_bytes": scaling_min_bytes, "threads": [1, 2] if two_threads else [],
                                      "note": None if two_threads else "fewer than two cores: not measured"}
    scratch = "/dev/shm" if os.path.isdir("/dev/shm") else None  # files in memory: the codecs, not the disk
    with codec_lib.single_threaded(), tempfile.TemporaryDirectory(dir=scratch) as workdir:
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
            results["checkpoints"][name] = bench_checkpoint(tensors, workdir, repeats, log)
            if two_threads:
                for label, x in _scaling_tensors(name, tensors, scaling_min_bytes):
                    results["threads"][label] = bench_threads(label, x, repeats, log)
                numba.set_num_threads(1)
            del tensors
    results["summary"] = _summary(results)
    return results


# -- reporting ---------------------------------------------------------------

def format_table(results):
    """Markdown table (dataset x codec) and the ibp-vs-reference summary."""
    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; {m['date']}.", "",
             f"Single thread unless said; MB = 10^6 bytes, best of {results['settings']['repeats']} passes, "
             "the codecs' passes taking turns "
             f"(one where a pass takes over {results['settings'].get('long_pass_s', LONG_PASS_S):g} s).", "",
             "## Tensors (each codec on every tensor of the dataset, in memory)", "",
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
    if results.get("checkpoints"):
        lines += ["", "## Checkpoint files (each dataset as one safetensors file, file to file)", "",
                  "ibp converts it as `ibp compress` / `ibp decompress` do (every tensor analysed and encoded; "
                  "the original file comes back byte for byte); the byte codecs compress the whole file.", "",
                  "| file | codec | ratio | compress MB/s | decompress MB/s | exact |",
                  "|---|---|---:|---:|---:|:---:|"]
        for name, r in results["checkpoints"].items():
            for codec, e in r["codecs"].items():
                lines.append(f"| {name}.safetensors | {codec} | {e['ratio']:.4f} | {e['compress_mb_s']:.2f} | "
                             f"{e['decompress_mb_s']:.2f} | {'yes' if e['exact'] else 'NO'} |")
        lines.append("")
        for name, f in s.get("checkpoint_ibp_over_zstd3", {}).items():
            lines.append(f"- {name}.safetensors: ibp / zstd-3 speed: compress {f['compress']:.3f}x, "
                         f"decompress {f['decompress']:.3f}x")
    if results.get("threads"):
        lines += ["", "## Two threads against one (ibp, analysis included)", "",
                  "The last column is this machine's ceiling for the same bytes: a trivial parallel kernel "
                  "writing them to fresh memory, as compress and decompress write theirs.", "",
                  "| tensor | MB | compress 1 / 2 threads MB/s | speedup | decompress 1 / 2 threads MB/s | speedup "
                  "| fill fresh memory speedup |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for label, e in results["threads"].items():
            one, two = e["threads_1"], e["threads_2"]
            fill = e["speedup"].get("fill_fresh")   # results written before it was measured have none
            lines.append(f"| {label} | {e['bytes'] / 1e6:.1f} | {one['compress_mb_s']:.2f} / {two['compress_mb_s']:.2f} | "
                         f"{e['speedup']['compress']:.3f} | {one['decompress_mb_s']:.2f} / "
                         f"{two['decompress_mb_s']:.2f} | {e['speedup']['decompress']:.3f} | "
                         f"{'-' if fill is None else f'{fill:.3f}'} |")
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
