"""The parallel kernels give the same bytes and values as the serial ones.

Kernels go parallel from _bits.PARALLEL_MIN_WORDS of work (megabytes); the
tests lower it so that small inputs take the parallel paths: encoding in
waves of runs (also waves of a few units, so that runs and waves meet at
every kind of word boundary), decoding a whole tensor in chunks, gathers."""
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


def _run(x, layout, threshold, monkeypatch):
    monkeypatch.setattr(_bits, "PARALLEL_MIN_WORDS", threshold)
    ct = ibp.compress(x, layout=layout)
    rows = np.random.default_rng(1).integers(0, x.shape[0], 4000)
    return ct.to_bytes(), ibp.decompress(ct), ibp.decompress(ct, index=rows)


@pytest.mark.parametrize("layout", ["packed", "slotted"])
@pytest.mark.parametrize("wave_run_bytes", [encode.WAVE_RUN_BYTES, 1000])
def test_parallel_kernels_match_serial(layout, wave_run_bytes, monkeypatch):
    numba.set_num_threads(2)
    monkeypatch.setattr(encode, "WAVE_RUN_BYTES", wave_run_bytes)
    for x in _tensors():
        serial = _run(x, layout, 1 << 60, monkeypatch)
        parallel = _run(x, layout, 1 << 10, monkeypatch)
        assert parallel[0] == serial[0]
        assert np.array_equal(parallel[1], x) and np.array_equal(serial[1], x)
        assert np.array_equal(parallel[2], serial[2])


@pytest.mark.parametrize("n, unit_bytes", [(0, 64), (400_000, 200), (50_000, 1536), (3, 1 << 25), (1000, 1 << 20), (7, 8)])
@pytest.mark.parametrize("threads", [2, 3, 8])
def test_encode_waves_share_units_evenly(n, unit_bytes, threads):
    """Every thread encodes about n / threads units, in runs of at most
    WAVE_RUN_BYTES (or one unit), however the units fall into waves."""
    run = encode._run_units(n, unit_bytes, threads)
    assert run * unit_bytes <= max(encode.WAVE_RUN_BYTES, unit_bytes)
    per_thread = [0] * threads
    for w0 in range(0, n, threads * run):   # as codec.encode_waves walks them
        for r in range(threads):
            a = min(w0 + r * run, n)
            per_thread[r] += min(a + run, n) - a
    waves = -(-n // (threads * run))
    assert sum(per_thread) == n
    assert max(per_thread) - min(per_thread) <= waves * threads
