"""Round trips of the CPU codec: every dtype, shape, bit pattern and layout."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import ibp
from ibp.codec import WIDTH

NUMPY_DTYPES = [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
                np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128]
LAYOUTS = ["packed", "slotted"]


def same_bits(a, b):
    """Bit-identical arrays (NaN payloads and -0.0 included)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    return a.tobytes() == b.tobytes()


def from_bytes_as(raw, dtype, shape):
    return np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape)


@st.composite
def tensors(draw, dtypes=NUMPY_DTYPES):
    """Arrays whose bytes mix random words, near-constant runs (which the
    model learns) and special float values, in many shapes."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9))
    n = int(np.prod(shape))
    style = draw(st.sampled_from(["random", "structured", "constant", "special"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8)
    if style == "structured":
        keep = rng.random(raw.size) < draw(st.floats(0.3, 1.0))
        raw = np.where(keep, np.resize(raw[:dtype.itemsize], raw.size), raw).astype(np.uint8)
    elif style == "constant":
        raw = np.resize(raw[:dtype.itemsize], raw.size).astype(np.uint8)
    x = from_bytes_as(raw.tobytes(), dtype, shape)
    if style == "special" and dtype.kind == "f" and n:
        flat = x.reshape(-1).copy()
        specials = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0,
                             np.finfo(dtype).tiny / 2, -np.finfo(dtype).tiny / 4], dtype=dtype)
        pick = rng.integers(0, specials.size, flat.size)
        flat[::2] = specials[pick[::2]]
        x = flat.reshape(shape)
    return x


@settings(max_examples=150, deadline=None)
@given(x=tensors(), layout=st.sampled_from(LAYOUTS))
def test_roundtrip_any_dtype_and_shape(x, layout):
    ct = ibp.compress(x, layout=layout)
    y = ibp.decompress(ct)
    assert isinstance(y, np.ndarray)
    assert same_bits(x, y)
    assert ct.shape == x.shape and ct.dtype == x.dtype


@settings(max_examples=100, deadline=None)
@given(x=tensors(), layout=st.sampled_from(LAYOUTS), data=st.data())
def test_gather_equals_fancy_indexing(x, layout, data):
    if x.ndim == 0 or x.shape[0] == 0:
        return
    n = x.shape[0]
    index = np.array(data.draw(st.lists(st.integers(-n, n - 1), max_size=20)), dtype=np.int64)
    index = index.astype(data.draw(st.sampled_from([np.int8, np.int16, np.int32, np.int64]))) if n <= 127 else index
    ct = ibp.compress(x, layout=layout)
    assert same_bits(x[index], ibp.decompress(ct, index=index))


@settings(max_examples=100, deadline=None)
@given(x=tensors([np.float32, np.int64, np.uint8, np.float16]), y_seed=st.integers(0, 2**32 - 1))
def test_model_reuse_on_other_data(x, y_seed):
    """A model learned on one tensor encodes any tensor of the same shape."""
    model = ibp.analyze(x)
    rng = np.random.default_rng(y_seed)
    y = from_bytes_as(rng.integers(0, 256, x.nbytes, dtype=np.uint8).tobytes(), x.dtype, x.shape)
    for z in (x, y):
        assert same_bits(z, ibp.decompress(ibp.compress(z, model=model)))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0), (1,), (1, 1), (1, 7), (3, 1), (7, 3),
                                   (1, 100_000), (2, 3, 0, 4), (), (4097,), (100, 1), (3, 70_001)])
def test_edge_shapes(shape, layout):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    ct = ibp.compress(x, layout=layout)
    assert same_bits(x, ibp.decompress(ct))
    if x.ndim and x.shape[0]:
        idx = rng.integers(-x.shape[0], x.shape[0], 5)
        assert same_bits(x[idx], ibp.decompress(ct, index=idx))


@pytest.mark.parametrize("word_bits", [8, 16, 32, 64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_unit_kind_decodes(word_bits, layout):
    """Blocks of eight rows, a unit each, built to need each unit kind:
    raw, all-match, sparse, bitmap."""
    rng = np.random.default_rng(word_bits)
    dtype = np.dtype(f"u{word_bits // 8}")
    rows, width = 64, 200
    x = np.full((rows, width), 5, dtype)
    x[8:16] = rng.integers(0, np.iinfo(dtype).max, (8, width), dtype=dtype, endpoint=True)
    x[16:24, ::17] = dtype.type(np.iinfo(dtype).max)
    x[24:32, ::2] = dtype.type(np.iinfo(dtype).max - 1)
    model = ibp.analyze(x[32:], word_bits=word_bits)
    ct = ibp.compress(x, model=model, layout=layout, unit_rows=8)
    assert set(np.unique(ct.unit_kinds())) == {0, 1, 2, 3}
    assert same_bits(x, ibp.decompress(ct))
    assert same_bits(x[::-3], ibp.decompress(ct, index=np.arange(rows)[::-3]))


@pytest.mark.parametrize("word_bits", [8, 16, 32, 64])
@pytest.mark.parametrize("free_bits", [0, 2])
def test_decoding_writes_only_the_rows_asked_for(word_bits, free_bits):
    """Units with an exception at every distance from their end (the
    decoder writes a run's last group whole when the unit has room after
    it, and fills a run of a level with no free bits): whole tensors and
    gathered rows land in a caller's buffer without touching a byte around
    it, and exactly."""
    dtype = np.dtype(f"u{word_bits // 8}")
    rng = np.random.default_rng(word_bits)
    rows, width = 60, 43
    x = (4 + rng.integers(0, 1 << free_bits, (rows + 8, width))).astype(dtype)
    model = ibp.analyze(x[rows:], word_bits=word_bits)
    assert model.period == 1 and model.tables[0][0, WIDTH] == free_bits   # the bits each matched word stores
    x = x[:rows]
    r = np.arange(rows)
    x[r, width - 1 - r % 10] = dtype.type(np.iinfo(dtype).max)   # exceptions 0..9 words before each row's end
    x[r, r % 7] = dtype.type(np.iinfo(dtype).max - 1)
    for unit_rows in (1, 3, None):
        ct = ibp.compress(x, model=model, unit_rows=unit_rows)
        assert set(np.unique(ct.unit_kinds())) == {2}
        for index in (None, r[::-1], r[1::4]):
            want = x if index is None else x[index]
            guarded = np.full(want.size + 2 * 64, 0xA5, np.uint8).view(dtype) if word_bits == 8 else \
                np.full(want.size + 2 * 64, np.iinfo(dtype).max // 3, dtype)
            before = guarded.copy()
            out = guarded[64:64 + want.size].reshape(want.shape)
            ibp.decompress(ct, index=index, out=out)
            assert same_bits(want, out)
            assert same_bits(guarded[:64], before[:64]) and same_bits(guarded[-64:], before[-64:])


@pytest.mark.parametrize("word_bits", [8, 16, 32])
def test_forced_word_width(word_bits):
    x = (np.random.default_rng(0).standard_normal((50, 64)) * 0.1).astype(np.float32)
    ct = ibp.compress(x, word_bits=word_bits)
    assert ct.word_bits == word_bits
    assert same_bits(x, ibp.decompress(ct))


def test_non_contiguous_and_non_native_inputs_are_read_not_changed():
    base = np.random.default_rng(0).standard_normal((40, 30)).astype(np.float32)
    before = base.copy()
    for x in (base[::2, ::3], base.T, base.astype(">f4")):
        y = ibp.decompress(ibp.compress(x))
        assert np.array_equal(np.asarray(x, dtype=y.dtype), y)
    assert same_bits(base, before)


def test_big_strided_inputs_are_copied_by_threads_to_the_same_bytes(monkeypatch):
    """A big non-contiguous or byte-swapped input is copied in row blocks by
    several threads (dtypes.c_order_copy): each block in its place, the
    input untouched, for rows that do not split evenly too."""
    import numba
    from ibp import dtypes
    monkeypatch.setattr(dtypes, "PARALLEL_COPY_BYTES", 0)
    threads = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        base = np.random.default_rng(1).standard_normal((101, 7, 6)).astype(np.float32)
        before = base.copy()
        for x in (np.asfortranarray(base), base[::2, :, ::3], base.transpose(1, 0, 2), base.astype(">f4"),
                  base[:1].transpose(1, 0, 2)):
            flat, name, shape, _ = dtypes.as_bytes(x)
            assert flat.tobytes() == np.ascontiguousarray(x, x.dtype.newbyteorder("=")).tobytes()
            assert (name, shape, flat.flags.writeable) == ("float32", x.shape, False)
            assert same_bits(np.ascontiguousarray(x, np.float32), ibp.decompress(ibp.compress(x)))
        assert same_bits(base, before)
    finally:
        numba.set_num_threads(threads)


def test_out_buffer_is_filled_and_returned():
    x = np.random.default_rng(0).standard_normal((100, 12)).astype(np.float32)
    ct = ibp.compress(x)
    out = np.full_like(x, np.nan)
    assert ibp.decompress(ct, out=out) is out
    assert same_bits(x, out)
    idx = np.array([[3, -1], [0, 50]])
    out2 = np.empty((2, 2, 12), np.float32)
    ibp.decompress(ct, index=idx, out=out2)
    assert same_bits(x[idx], out2)


def test_ml_dtypes_roundtrip():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    for name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        dt = np.dtype(getattr(ml_dtypes, name))
        x = from_bytes_as(rng.integers(0, 256, 37 * 11 * dt.itemsize, dtype=np.uint8).tobytes(), dt, (37, 11))
        ct = ibp.compress(x)
        assert ct.dtype_name == name
        assert same_bits(x, ibp.decompress(ct))


torch = pytest.importorskip("torch")
TORCH_DTYPES = [torch.bool, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16,
                torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
                torch.uint16, torch.uint32, torch.uint64, torch.complex64]


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_in_torch_out(dtype, layout):
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 2 if dtype == torch.bool else 256, (23 * 9 * 5 * dtype.itemsize,),
                        dtype=torch.uint8, generator=g)
    x = raw.view(dtype).reshape(23, 9, 5)
    ct = ibp.compress(x, layout=layout)
    y = ibp.decompress(ct)
    assert isinstance(y, torch.Tensor) and y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y.view(torch.uint8), x.view(torch.uint8))
    idx = torch.tensor([4, -2, 0, 4])
    assert torch.equal(ibp.decompress(ct, index=idx).view(torch.uint8), x[idx].view(torch.uint8))


def test_torch_non_contiguous_and_grad_inputs():
    w = torch.randn(30, 20, requires_grad=True)
    x = w.t()[::2]
    y = ibp.decompress(ibp.compress(x))
    assert torch.equal(y, x.detach())
    assert not y.requires_grad
