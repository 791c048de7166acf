"""The parallel kernels give the same bytes and values as the serial ones.

Kernels go parallel from _bits.PARALLEL_MIN_WORDS of work (megabytes); the
tests lower it so that small inputs take the parallel paths: encoding in
runs (also in runs of a unit or none, so that runs meet at every kind of
word boundary), decoding a whole tensor in chunks, gathers."""
import numba
import numpy as np
import pytest

import ibp
from ibp import _bits, encode

pytestmark = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="numba has one thread here")


def _tensors():
    rng = np.random.default_rng(7)
    weights = (rng.standard_normal((3001, 24)) * 0.02).astype(np.float32)
    yield weights                                              # exceptions, a padded last unit
    yield weights.astype(np.float16)
    yield rng.integers(0, 5, (2048, 16)).astype(np.int64)      # a few values
    yield np.where(rng.random(70001) < 0.01, 1.0, 0.0)         # 1-d, sparse
    yield rng.integers(0, 256, (513, 40), dtype=np.uint8)      # noise: raw units
    zeros = np.zeros((4096, 8), np.float32)
    zeros[::997] = 1.5
    yield zeros                                                # units of no bits at all between a few
    yield np.resize(weights, (3, 65537))                       # prime rows over the encoder's scratch: not split


def _run(x, layout, threshold, monkeypatch):
    monkeypatch.setattr(_bits, "PARALLEL_MIN_WORDS", threshold)
    ct = ibp.compress(x, layout=layout)
    rows = np.random.default_rng(1).integers(0, x.shape[0], 4000)
    return ct.to_bytes(), ibp.decompress(ct), ibp.decompress(ct, index=rows)


@pytest.mark.parametrize("layout", ["packed", "slotted"])
@pytest.mark.parametrize("runs_per_thread", [1, 2, 3000])
def test_parallel_kernels_match_serial(layout, runs_per_thread, monkeypatch):
    numba.set_num_threads(2)
    monkeypatch.setattr(encode, "RUNS_PER_THREAD", runs_per_thread)
    for x in _tensors():
        serial = _run(x, layout, 1 << 60, monkeypatch)
        parallel = _run(x, layout, 1 << 10, monkeypatch)
        assert parallel[0] == serial[0]
        assert np.array_equal(parallel[1], x) and np.array_equal(serial[1], x)
        assert np.array_equal(parallel[2], serial[2])
