"""Compile the CPU codec's numba kernels for the given word widths, so that
they land in numba's disk cache.

tests/conftest.py runs this in two processes (half the word widths each)
before pytest-xdist's workers start: otherwise every worker compiles the
same kernels itself, and a cold CI run spends most of its time doing so.
Every kernel is reached through the public API, in each variant numba
compiles separately: serial and parallel sizes, with and without a padded
last unit, both layouts, gathers, row updates and the file format; and
with writable and read-only inputs and payloads (mapped files, bytes),
which the kernels are handed frozen so that they compile once for both
(_bits.frozen)."""
import sys

import numpy as np

import ibp
from ibp import _bits, analysis


def variants(x):
    """``x`` as a caller may hand it: writable, and read-only."""
    ro = x.copy()
    ro.flags.writeable = False
    return x, ro


def warm(word_bits):
    rng = np.random.default_rng(0)
    _bits.PARALLEL_MIN_WORDS = 1 << 12   # the parallel kernels, on small inputs (tests/test_threads.py does the same)
    for rows in (64, _bits.PARALLEL_MIN_WORDS // 4 + 64):
        for extra in (0, 3):   # 3: the last unit of 8 rows is padded
            data = rng.integers(0, 7, size=(rows + extra, 4)).astype(np.float64)
            for x in variants(data):
                for layout in ("packed", "slotted"):
                    fresh = ibp.compress(x, word_bits=word_bits, layout=layout)
                    loaded = ibp.CompressedTensor.from_bytes(fresh.to_bytes())   # read-only payload
                    for ct in (fresh, loaded):
                        assert np.array_equal(ibp.decompress(ct), x)
                        assert np.array_equal(ibp.decompress(ct, index=[1, 0]), x[[1, 0]])
                    if layout == "slotted":
                        fresh.update_rows([0], x[1:2])
    # a small tensor learned and encoded in one call (ibp.analysis.learned_and_encoded), per word width
    small = rng.standard_normal(100).astype({8: np.int8, 16: np.float16, 32: np.float32, 64: np.float64}[word_bits])
    for x in variants(small):
        assert np.array_equal(ibp.decompress(ibp.compress(x)), x)
    # the per-column agreement test of analysis (ibp.analysis._agreement), per word width
    words = _bits.frozen(rng.integers(0, 256, 1024, dtype=np.uint8).view(f"<u{word_bits // 8}"))
    analysis._agreement(words, _bits.frozen(np.array([0, 32], np.int64)), 32, 4)
    # a checkpoint's tensors trying the model of the layer before (ibp.analysis.Reuse)
    reuse = analysis.Reuse()
    for layer in range(2):
        data = rng.standard_normal((64, 4)).view(np.uint8).reshape(-1)
        reuse.role(f"layer.{layer}.weight")(_bits.frozen(data), (64, 4), 8, word_bits)


if __name__ == "__main__":
    for bits in sys.argv[1:]:
        warm(int(bits))
