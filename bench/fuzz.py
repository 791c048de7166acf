"""Structure-aware fuzzing of ibp files: mutate valid files the way a
corrupt disk or a hostile writer would, and check that reading and decoding
them only ever succeeds or raises ibp.FormatError.

Each trial takes one of a few small valid files and changes it: a header
field set to a boundary value (0, -1, 2**k +- 1, 2**62, another type), a key
dropped or added, an entry repeated or a section shared, bits flipped in a
section (with its checksum fixed, so the decoder sees them), or the file cut
or extended.  The result is loaded with and without ``verify`` and, where
the declared tensor is small enough to allocate, decoded whole and by rows.
Any other exception, a trial slower than ``--stall`` seconds or a peak RSS
above ``--max-rss-mb`` is a failure; a crash kills the process, so run it
as a subprocess (tests/test_fuzz.py does).

    python bench/fuzz.py [--trials 100000] [--seed 0]
"""
import argparse
import copy
import json
import resource
import sys
import time
import zlib

import numpy as np

import ibp
from ibp import container

DECODE_LIMIT = 1 << 24   # decode tensors whose raw size is at most this many bytes
INTERESTING = [0, 1, -1, 2, 3, 7, 8, 15, 16, 31, 32, 63, 64, 65, 255, 256, 4095, 4096, 65535, 65536,
               2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63, 2**64, None, True, "x", [], {}, 1.5]


def seed_files():
    """Small valid files that between them use every layout, kind and index."""
    rng = np.random.default_rng(0)
    mixed = np.full((96, 40), 7, np.uint16)
    mixed[::5] = rng.integers(0, 65535, (len(mixed[::5]), 40), dtype=np.uint16)
    mixed[1::7, ::9] = 60000
    floats = rng.standard_normal((33, 12)).astype(np.float32)
    flat = rng.integers(-3, 3, 5000).astype(np.int8)
    files = [ibp.compress(mixed).to_bytes(),
             ibp.compress(mixed, unit_rows=1).to_bytes(),
             ibp.compress(mixed, layout="slotted").to_bytes(),
             ibp.compress(floats, layout="slotted", unit_rows=1).to_bytes(),
             ibp.compress(rng.integers(0, 2**32, (16, 16), dtype=np.uint32)).to_bytes(),  # uniform index
             ibp.compress(flat).to_bytes(),
             ibp.compress(np.float64(2.5)).to_bytes(),
             ibp.compress(np.zeros((0, 4), np.float32)).to_bytes(),
             container.dumps({"a": ibp.compress(floats), "b": ibp.compress(mixed[:8], layout="slotted")},
                             {"k": "v"})]
    return files


def split(blob):
    """(preamble fields, header dict, binary part) of a valid file."""
    magic, version, hlen, _, reserved = container.PREAMBLE.unpack_from(blob, 0)
    start = -(-(24 + hlen) // 64) * 64
    return (magic, version, reserved), json.loads(blob[24:24 + hlen]), bytearray(blob[start:])


def join(pre, header, data, raw=None):
    """A file from its parts, the header checksum made valid."""
    magic, version, reserved = pre
    raw = json.dumps(header).encode() if raw is None else raw
    out = container.PREAMBLE.pack(magic, version, len(raw), zlib.crc32(raw), reserved) + raw
    return out + b"\0" * (-(-len(out) // 64) * 64 - len(out)) + bytes(data)


def leaves(obj, path=()):
    """Paths to every value of a JSON document."""
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, path + (i,))


def at(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def interesting(rng, old):
    if isinstance(old, int) and not isinstance(old, bool) and rng.random() < 0.5:
        return int(old) + int(rng.choice([-64, -1, 1, 64, old, -old]))
    return copy.deepcopy(INTERESTING[rng.integers(len(INTERESTING))])


def mutate(rng, blob):
    """One structure-aware change of a valid file."""
    pre, header, data = split(blob)
    entries = header["tensors"]
    what = rng.integers(9)
    if what <= 2:  # a header value
        paths = [p for p in leaves(header) if p]
        path = paths[rng.integers(len(paths))]
        at(header, path[:-1])[path[-1]] = interesting(rng, at(header, path))
    elif what == 3:  # a key dropped or added
        e = entries[rng.integers(len(entries))]
        if rng.random() < 0.5:
            e.pop(list(e)[rng.integers(len(e))])
        else:
            e[["extra", "name", "sections"][rng.integers(3)]] = 0
    elif what == 4:  # entries repeated, or sections shared
        e = entries[rng.integers(len(entries))]
        if rng.random() < 0.5:
            entries.extend(dict(copy.deepcopy(e), name=f"copy{i}") for i in range(rng.integers(1, 50)))
        else:
            keys = list(e["sections"])
            e["sections"][keys[rng.integers(len(keys))]] = list(e["sections"][keys[rng.integers(len(keys))]])
    elif what <= 7:  # bits of a section, its checksum fixed so the decoder reads them
        e = entries[rng.integers(len(entries))]
        key = list(e["sections"])[rng.integers(len(e["sections"]))]
        off, length, _ = e["sections"][key]
        if length:
            for _ in range(rng.integers(1, 4)):
                i = off + int(rng.integers(length))
                data[i] = int(rng.integers(256)) if rng.random() < 0.3 else data[i] ^ (1 << int(rng.integers(8)))
            if rng.random() < 0.8:
                e["sections"][key][2] = zlib.crc32(data[off:off + length])
    else:  # the file cut or extended, or a preamble field changed
        blob = join(pre, header, data)
        r = rng.random()
        if r < 0.4:
            return blob[:rng.integers(len(blob))]
        if r < 0.7:
            return blob + bytes(int(rng.integers(1, 200)))
        pos = int(rng.integers(24))
        return blob[:pos] + bytes([int(rng.integers(256))]) + blob[pos + 1:]
    if rng.random() < 0.05:  # a key given twice
        raw = json.dumps(header).encode()
        return join(pre, header, data, raw.replace(b'{"metadata": ', b'{"metadata": {}, "metadata": ', 1))
    return join(pre, header, data)


def exercise(ct):
    """Decode what may be allocated: the whole tensor and a few rows."""
    if ct.raw_nbytes <= DECODE_LIMIT:
        out = ibp.decompress(ct)
        assert tuple(out.shape) == ct.shape
    if ct.shape and ct.nrows and ct.raw_nbytes // ct.nrows <= DECODE_LIMIT // 4:
        rows = ibp.decompress(ct, index=[0, -1, ct.nrows // 2])
        assert tuple(rows.shape) == (3,) + ct.shape[1:]


def trial(rng, files):
    """Run one mutated file; returns None, or a description of a failure."""
    blob = mutate(rng, files[rng.integers(len(files))])
    for verify in (True, False):
        try:
            tensors = container.loads(blob, verify=verify)
        except ibp.FormatError:
            continue
        for ct in tensors.values():
            try:
                exercise(ct)
            except ibp.FormatError:
                pass
    return None


def run(trials, seed, stall=10.0, log=None):
    """Fuzz ``trials`` files from ``seed``: a report dict (failures listed)."""
    files = seed_files()
    for blob in files:  # the seeds themselves read back
        for ct in container.loads(blob).values():
            exercise(ct)
    failures, slowest = [], (0.0, None)
    t_start = time.perf_counter()
    for i in range(trials):
        rng = np.random.default_rng([seed, i])
        t0 = time.perf_counter()
        try:
            trial(rng, files)
        except Exception as e:  # noqa: BLE001 - any other exception is what we look for
            failures.append(f"trial {i}: {type(e).__name__}: {e}"[:300])
        dt = time.perf_counter() - t0
        if dt > slowest[0]:
            slowest = (dt, i)
        if dt > stall:
            failures.append(f"trial {i}: took {dt:.1f} s")
        if log and (i + 1) % 10000 == 0:
            print(f"{i + 1} trials, {len(failures)} failures", file=log, flush=True)
    return {"trials": trials, "seed": seed, "seconds": round(time.perf_counter() - t_start, 1),
            "slowest_trial": {"index": slowest[1], "seconds": round(slowest[0], 3)},
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "failures": failures}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=100000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stall", type=float, default=10.0, help="seconds after which a trial counts as a hang")
    p.add_argument("--max-rss-mb", type=int, default=2000, help="peak memory that counts as a blow-up")
    args = p.parse_args(argv)
    report = run(args.trials, args.seed, args.stall, log=sys.stderr)
    if report["peak_rss_mb"] > args.max_rss_mb:
        report["failures"].append(f"peak RSS {report['peak_rss_mb']} MB > {args.max_rss_mb} MB")
    print(json.dumps(report, indent=1))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
