"""ibp never moves more bytes than the reference algorithm (bench/reference.py,
the better of its int32 and int64 words) on structured tensors of every
class and dtype, and on the real tables the repository has.

Both sides count the bytes needed to decode (``CompressedTensor.nbytes``:
model, unit kinds, row index, payload; the reference's rows, row flags, mask
and value), not the file's JSON header, which a tiny tensor would be all of.
From MIN_BYTES of raw data up: below it ibp's fixed framing (a model, a
kinds byte, the payload's spare word: 20-40 bytes) can outweigh what a
tensor of a few words saves.  The reference keeps a tensor whose rows are
not whole 32-bit words raw with no framing at all: there ibp's units must
never grow past their raw size.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import ibp
import ibp.datasets
from ibp.bench import reference as R

DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16",
          "uint8", "bool", "complex64")
KINDS = ("small_ints", "normal", "sparse", "low_cardinality", "two_close", "noise")
MIN_BYTES = 64


def _per_column_small_ints(rng, rows, cols):
    """Pixel-intensity-like table: integers 0..16 with per-column weights, about half zeros."""
    p = rng.dirichlet(np.full(17, 0.3), size=cols)
    p[:, 0] += 1.0
    p /= p.sum(axis=1, keepdims=True)
    return np.stack([rng.choice(17, rows, p=p[j]) for j in range(cols)], axis=1)


def _values(kind, rng, shape):
    rows, cols = shape[0], int(np.prod(shape[1:]))
    if kind == "small_ints":
        v = _per_column_small_ints(rng, rows, cols)
    elif kind == "normal":  # trained weights, K/V: per-column scales
        v = rng.standard_normal((rows, cols)) * rng.uniform(0.01, 2.0, cols)
    elif kind == "sparse":
        v = np.where(rng.random((rows, cols)) < 0.05, rng.integers(1, 9, (rows, cols)), 0)
    elif kind == "low_cardinality":
        v = rng.choice(rng.standard_normal(int(rng.integers(2, 6))) * 4, (rows, cols))
    elif kind == "two_close":  # two values that share their top and bottom bits (the reference's best case)
        v = np.where(rng.random((rows, cols)) < rng.uniform(0.2, 0.8), 5.19, 5.73) * rng.choice([1, 64, 1e-3])
    else:  # noise
        v = rng.standard_normal((rows, cols)) * 1e6
    return v.reshape(shape)


def _tensor(kind, dtype, seed, shape):
    rng = np.random.default_rng(seed)
    v = _values(kind, rng, shape)
    if dtype == "bfloat16":
        torch = pytest.importorskip("torch")
        return torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16)
    if dtype == "bool":
        return v != 0
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.round(v), info.min, info.max).astype(dtype)
    return v.astype(dtype)


def _assert_not_larger(x):
    ct = ibp.compress(x)
    ref = R.compress(x)
    if ref.word_bits is None:
        # rows that are not whole 32-bit words: the reference keeps the raw bytes, unframed; ibp
        # frames them (model, kinds, index, spare word), and its units never grow past raw
        g = ct.geometry
        assert ct.payload_bits <= g.nunits * g.unit_words * g.word_bits
    else:
        assert ct.nbytes <= ref.nbytes, (ct.model, ct.nbytes, ref.nbytes, ref.candidates)
    back = ibp.decompress(ct)
    if isinstance(x, np.ndarray):
        assert back.tobytes() == x.tobytes()


shapes = st.one_of(
    st.tuples(st.integers(64, 300), st.sampled_from([8, 16, 50, 64])),  # tables, rows of weights
    st.tuples(st.integers(1, 12), st.integers(1, 40)),  # small tables, odd widths
    st.tuples(st.integers(8, 3000)),  # vectors: biases, norms
    st.tuples(st.integers(2, 6), st.integers(8, 40), st.sampled_from([16, 64])),  # K/V blocks
)


def _raw_bytes(x):
    return int(np.prod(tuple(x.shape))) * x.element_size() if hasattr(x, "element_size") else x.nbytes


# derandomized: the same examples on every run, so CI does not fail on what one run happens to draw
# (tables drawn outside it have tests of their own below)
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 32 - 1), shape=shapes)
def test_never_larger_than_the_reference(kind, dtype, seed, shape):
    x = _tensor(kind, dtype, seed, shape)
    assume(_raw_bytes(x) >= MIN_BYTES)
    _assert_not_larger(x)


@pytest.mark.parametrize("dtype", ["uint8", "int16"])
@pytest.mark.parametrize("values", [(0, 1, 4), (0, 1, 5), (0, 3, 16, 17)])
def test_a_few_integer_values(values, dtype):
    # a few values a single fixed run fits badly: both levels are searched exactly over them
    x = np.random.default_rng(2).choice(np.array(values, dtype), (64, 64))
    _assert_not_larger(x)


@pytest.mark.parametrize("values", [(0, 2, 6), (-9, -5, -1), (0, 4, 8, 12), (1, 3, 7, 5), (-4, 0, 4)])
@pytest.mark.parametrize("dtype", ["uint8", "int16", "int32", "int64"])
def test_values_differing_in_middle_bits(values, dtype):
    # shared bits on both sides of the bits that differ (0, 2, 6: bit 0 and bits 3 up): one run fixes
    # them all only once the words are rotated (ibp.rotation); it once came out 1.22x the reference
    if dtype == "uint8" and min(values) < 0:
        return
    x = np.random.default_rng(3).choice(np.array(values, dtype), (64, 64))
    _assert_not_larger(x)


@pytest.mark.parametrize("seed", range(24))
def test_small_tables_of_a_few_values_per_column(seed):
    """Each column its own 2 to 4 categories, in tables too short for the
    default sample to hold 32 words of every column: the per-column model
    is learned from more of the table where columns stand out (it once came
    out up to 1.3x the reference)."""
    rng = np.random.default_rng(seed)
    rows, cols = int(rng.integers(20, 300)), (33, 64)[seed % 2]
    x = np.stack([rng.choice(rng.choice(256, int(rng.integers(2, 5)), replace=False), rows) for _ in range(cols)], 1)
    _assert_not_larger(x.astype(("int32", "float32", "float64", "int16")[seed % 4]))


@pytest.mark.parametrize("seed", range(20))
def test_a_tensor_of_a_few_words_takes_its_smallest_width(seed):
    """Eight float64 values of noise: every word width is tried, and scored
    by the payload in whole 64-bit words with the model, which is what
    decides at this size (the 64-bit model came out 1 byte over the
    reference in 278 of 300 such tables; the smallest width, in 78)."""
    x = np.random.default_rng(seed).standard_normal((8, 1)) * 1e6
    assert ibp.compress(x).nbytes == min(ibp.compress(x, word_bits=W).nbytes for W in (8, 16, 32, 64))


def test_columns_of_their_own_middle_bits():
    rng = np.random.default_rng(4)
    x = np.stack([rng.choice(np.array(v, np.int32), 80) for v in [(0, 2, 6), (16, 18, 22), (1, 5, 9), (0, 2, 6)] * 8], 1)
    _assert_not_larger(x)


def test_values_sharing_scattered_bits():
    """4, 13 and 37 share bits 1, 2, 4, 6 and 7, not one run even
    cyclically: the model gathers them to the top (ibp.rotation), which
    fixes them as the reference's arbitrary mask does."""
    x = np.random.default_rng(3).choice(np.array([4, 13, 37], np.uint8), (64, 64))
    assert ibp.analyze(x).gather
    _assert_not_larger(x)


@pytest.mark.parametrize("seed", range(40))
def test_a_few_random_small_integers(seed):
    """Tables of 2 to 4 random small integers in every integer width: where
    their shared bits lie is up to chance."""
    rng = np.random.default_rng(seed)
    values = rng.choice(64, int(rng.integers(2, 5)), replace=False)
    dtype = ("uint8", "int16", "int32", "int64")[seed % 4]
    _assert_not_larger(rng.choice(values.astype(dtype), (int(rng.integers(20, 200)), 16)))


def _series(rng, kind, rows, cols, step):
    """A table of ``cols`` series of ``rows`` steps: timestamps (int64
    milliseconds, increasing) or random walks (float64, each from its own
    level)."""
    if kind == "timestamps":
        return 1_700_000_000_000 + np.cumsum(rng.integers(0, step, (rows, cols)), axis=0)
    return rng.uniform(0, 1000, cols) + np.cumsum(rng.standard_normal((rows, cols)), axis=0)


@pytest.mark.parametrize("seed", range(30))
def test_time_series(seed):
    """Series down the columns or along the rows.  Rows of their own
    values, sampled whole from a few places, once taught a model that the
    other rows missed, and values just outside the sampled range cost whole
    64-bit words (up to 1.3x the reference): the one-column sample is now
    spread over the tensor, a primary level no sampled word misses gets a
    wider secondary, and 64-bit elements also try 32-bit words as the
    reference does.  Rows that are series spreading out as they go (seed
    4) fit a per-column model 12% better, which a sample of three rows
    shows only in the range of each column's values (_columns_stand_out)."""
    rng = np.random.default_rng(seed)
    kind = ("timestamps", "walks")[seed % 2]
    x = _series(rng, kind, int(rng.integers(16, 400)), int(rng.choice([8, 16, 50, 100])), (10, 1000, 100000)[seed % 3])
    _assert_not_larger(x.T.copy() if seed % 4 < 2 else x)


@pytest.mark.parametrize("kind", KINDS)
def test_every_dtype_of_each_class(kind):
    for dtype in DTYPES:
        for shape in ((7, 33), (300, 50), (3000, 16)):
            _assert_not_larger(_tensor(kind, dtype, 11, shape))


@pytest.mark.parametrize("kind", ["normal", "small_ints", "low_cardinality"])
def test_a_big_table(kind):
    _assert_not_larger(_tensor(kind, "float32", 5, (20000, 64)))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_small_integer_table(dtype):
    # the class that once came out 1.9x larger: 1797 x 64 float64 pixel intensities
    x = _per_column_small_ints(np.random.default_rng(1), 1797, 64).astype(dtype)
    ct = ibp.compress(x)
    assert ct.nbytes <= R.compress(x).nbytes
    assert ibp.decompress(ct).tobytes() == x.tobytes()


def test_fp16_keys_and_values():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((4, 8, 200, 64)) * rng.uniform(0.2, 3.0, 64)).astype(np.float16)
    _assert_not_larger(x)


def test_cora():
    _assert_not_larger(ibp.datasets.load("cora")["features"])


@pytest.mark.parametrize("name", ["minilm-fp32", "glove-50d"])
def test_installed_real_tables(name):
    if name not in ibp.datasets.available():
        pytest.skip(f"{name}'s package is not installed")
    tensors = ibp.datasets.load(name)
    picks = sorted(tensors, key=lambda k: -int(np.prod(tuple(tensors[k].shape))))[:3]
    for k in picks:
        t = tensors[k]
        _assert_not_larger(t[:2000] if t.shape[0] > 2000 else t)


# Known gaps (strict: each fails the suite once it is fixed, so the test moves up).
def test_two_value_fp16_table():
    # two close values: the reference's mask fixes the bits they share on both sides of those
    # where they differ; the learner finds one exact value per level (both fixed whole)
    x = np.where(np.random.default_rng(3).random((244, 64)) < 0.5, 5.19, 5.73).astype(np.float16)
    _assert_not_larger(x)


def test_small_table_with_a_padded_last_unit():
    # 20 rows of 16 bytes: two 10-row units, not a 16-row one and a 4-row one padded to 16
    _assert_not_larger(np.random.default_rng(4).standard_normal((20, 8)).astype(np.float16))


def test_padding_repeats_the_last_rows():
    # 20 rows in 8-row units: the last unit's 4 padding rows repeat its rows, which match the
    # model (zeros were exceptions: 723 bytes, above the reference's 708)
    x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    _assert_not_larger(x)


@pytest.mark.xfail(strict=True, reason="fixed cost of two model levels and a 64-bit payload word")
def test_one_element():
    _assert_not_larger(np.array([[3.0]]))
