"""Compile the CPU codec's numba kernels for the given word widths, so that
they land in numba's disk cache.

tests/conftest.py runs this in two processes (half the word widths each)
before pytest-xdist's workers start: otherwise every worker compiles the
same kernels itself, and a cold CI run spends most of its time doing so.
Every kernel is reached through the public API: serial and parallel sizes,
both layouts, gathers, row updates and the file format."""
import sys

import numpy as np

import ibp
from ibp import _bits


def warm(word_bits):
    rng = np.random.default_rng(0)
    for rows in (64, _bits.PARALLEL_MIN_WORDS // 8 + 64):
        x = rng.integers(0, 7, size=(rows, 64)).astype(np.float64)
        for layout in ("packed", "slotted"):
            ct = ibp.compress(x, word_bits=word_bits, layout=layout)
            ct = ibp.CompressedTensor.from_bytes(ct.to_bytes())
            assert np.array_equal(ibp.decompress(ct), x)
            assert np.array_equal(ibp.decompress(ct, index=[1, 0]), x[[1, 0]])
            if layout == "slotted":
                ct.update_rows([0], x[1:2])


if __name__ == "__main__":
    for bits in sys.argv[1:]:
        warm(int(bits))
