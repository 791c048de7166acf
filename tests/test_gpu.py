"""The GPU decoder (ibp.cuda) against the CPU decoder, bit for bit.

Needs a CUDA GPU, torch with CUDA and CuPy; skipped cleanly otherwise.  Every
output buffer is filled with 0xFF before the run, so a word the kernels fail
to write shows up as a difference.
"""
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ibp

torch = pytest.importorskip("torch")
pytest.importorskip("cupy")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from ibp import cuda, dtypes  # noqa: E402  (after the skips: imports nothing GPU-side by itself)
from kernel_cases import compress_case, sample, tensor_cases  # noqa: E402

INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


def device_index(values, dtype=np.int64):
    """A CUDA index tensor of a numpy integer dtype."""
    return torch.from_numpy(np.asarray(values).astype(dtype)).cuda()


def host_bytes(x):
    """The bytes of a numpy array or torch tensor (any device), flat."""
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    return x.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()


def result_shape(ct, index):
    if index is None:
        return ct.shape
    return tuple(np.shape(index)) + ct.shape[1:]


def poisoned(ct, index=None):
    out = torch.empty(result_shape(ct, index), dtype=dtypes.torch_dtype(ct.dtype_name), device="cuda")
    out.reshape(-1).view(torch.uint8).fill_(0xFF)
    return out


def cpu_index(index):
    return index.cpu().numpy() if torch.is_tensor(index) else index


def assert_decodes(ct, index=None, **kw):
    """GPU decode into a poisoned buffer, waited for, equals the CPU decode."""
    out = poisoned(ct, index)
    got = cuda.decompress(ct, index=index, out=out, sync=True, **kw)
    assert got is out
    np.testing.assert_array_equal(host_bytes(out), host_bytes(ibp.decompress(ct, index=cpu_index(index))))


@pytest.fixture
def small_chunks(monkeypatch):
    """Stream in many small chunks, so the ring of device buffers wraps."""
    monkeypatch.setattr(cuda, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(cuda, "STREAM_MIN_BYTES", 0)


SHAPES = [((300, 257), np.float32, 0.05), ((5, 40000), np.float32, 0.1), ((2000,), np.int16, 0.02),
          ((40, 3, 5), np.uint8, 0.3), ((64, 33), np.float64, 0.2)]


# -- whole tensors ---------------------------------------------------------------

def test_dispatch_through_ibp_decompress():
    x = sample(np.random.default_rng(0), (100, 48), np.float32, 0.1)
    ct = ibp.compress(x)
    y = ibp.decompress(ct, device="cuda")
    assert y.is_cuda and y.dtype == torch.float32 and tuple(y.shape) == x.shape
    np.testing.assert_array_equal(y.cpu().numpy(), x)
    z = ibp.decompress(ct.pin_memory(), device=torch.device("cuda", 0), path="zero-copy", index=[3, -1])
    np.testing.assert_array_equal(z.cpu().numpy(), x[[3, -1]])
    with pytest.raises(ValueError):
        ibp.decompress(ct, device="cuda", path="zero-copy")   # not pinned


@pytest.mark.parametrize("layout", ["packed", "slotted"])
@pytest.mark.parametrize("shape,dtype,noise", SHAPES)
def test_every_path_decodes_whole_tensors(shape, dtype, noise, layout, small_chunks):
    x = sample(np.random.default_rng(1), shape, dtype, noise)
    for word_bits in [W for W in (8, 16, 32, 64) if W <= 8 * np.dtype(dtype).itemsize]:
        ct = ibp.compress(x, word_bits=word_bits, layout=layout)
        assert_decodes(ct)                        # pageable: streamed through staging
        assert_decodes(ct, path="stream")
        pinned = ct.pin_memory()
        assert_decodes(pinned, path="zero-copy")
        assert_decodes(pinned, path="stream")
        assert_decodes(cuda.to_device(ct))        # device to device
        assert_decodes(cuda.to_device(pinned))


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_staging_modes_agree(stage, monkeypatch):
    monkeypatch.setattr(cuda, "STAGE", stage)
    rng = np.random.default_rng(2)
    for shape, dtype, noise in SHAPES:
        ct = ibp.compress(sample(rng, shape, dtype, noise)).pin_memory()
        assert_decodes(ct, path="zero-copy")
        assert_decodes(ct, torch.randint(0, shape[0], (50,), device="cuda"))


@pytest.mark.parametrize("name", sorted(dtypes.ITEMSIZE))
def test_every_dtype(name):
    dtype = dtypes.torch_dtype(name)
    g = torch.Generator().manual_seed(3)
    if name == "bool":
        x = torch.rand(200, 9, generator=g) < 0.2
    else:
        raw = torch.randint(0, 256, (200, 9 * dtypes.ITEMSIZE[name]), dtype=torch.uint8, generator=g)
        raw[:, ::2] = 0x3C                        # shared bits, so units compress
        x = raw.view(dtype)
    for layout in ("packed", "slotted"):
        ct = ibp.compress(x, layout=layout)
        assert_decodes(ct)
        assert_decodes(ct.pin_memory(), torch.tensor([[5, -1], [0, 199]], device="cuda"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(tensor_cases(60, 40), st.integers(0, 2**32 - 1))
def test_random_tensors(small_chunks, case, seed):
    x, ct = compress_case(case)
    pinned = ct.pin_memory()
    assert_decodes(ct)
    assert_decodes(pinned, path="zero-copy")
    assert_decodes(pinned, path="stream")
    if x.ndim and x.shape[0]:
        g = torch.Generator(device="cuda").manual_seed(seed % 2**63)
        index = torch.randint(-x.shape[0], x.shape[0], (int(seed % 9),), device="cuda", generator=g)
        assert_decodes(pinned, index)
        assert_decodes(ct, index.cpu())
        assert_decodes(cuda.to_device(ct), index)


# -- gathers ---------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["packed", "slotted"])
@pytest.mark.parametrize("shape,dtype,noise", SHAPES)
def test_gathers(shape, dtype, noise, layout):
    rng = np.random.default_rng(4)
    ct = ibp.compress(sample(rng, shape, dtype, noise), layout=layout)
    pinned, resident = ct.pin_memory(), cuda.to_device(ct)
    n = shape[0]
    cpu = rng.integers(-n, n, (7, 3))
    for source in (pinned, resident, ct):
        for dt in INT_DTYPES:
            assert_decodes(source, device_index(cpu % n if np.iinfo(dt).min == 0 else cpu, dt))
        assert_decodes(source, cpu)               # numpy, checked on the host
        assert_decodes(source, cpu.tolist())
        assert_decodes(source, torch.from_numpy(cpu))
        assert_decodes(source, np.zeros(0, np.int64))


def test_out_of_range_host_index_raises_at_once():
    ct = ibp.compress(np.arange(40, dtype=np.float32).reshape(10, 4)).pin_memory()
    for bad in ([10], [-11], np.array([3, 2**40]), torch.tensor([0, 12])):
        with pytest.raises(IndexError):
            cuda.decompress(ct, index=bad)
    with pytest.raises(TypeError):
        cuda.decompress(ct, index=torch.tensor([True, False], device="cuda"))
    with pytest.raises(TypeError):
        cuda.decompress(ct, index=torch.tensor([1.0], device="cuda"))


@pytest.mark.parametrize("dt", INT_DTYPES)
def test_out_of_range_device_index(dt):
    """Checked in the kernel: IndexError when waited for, nothing written out of bounds."""
    x = sample(np.random.default_rng(5), (23, 70), np.float32, 0.1)
    ct = ibp.compress(x).pin_memory()
    info = np.iinfo(dt)
    good = [0, 22, 5]
    for bad in [23, int(info.max)] + ([-24, int(info.min)] if info.min < 0 else []):
        index = device_index(np.array(good + [bad] + good, dtype=dt), dt)
        guard = torch.full((len(index) + 5, 70), float("nan"), device="cuda")
        guard.view(torch.uint8).fill_(0xFF)
        out = guard[:len(index)]
        with pytest.raises(IndexError, match=f"index {bad} is out of range"):
            cuda.decompress(ct, index=index, out=out, sync=True)
        assert (guard[len(index):].view(torch.int32) == -1).all()
        rows = out.cpu().numpy()
        np.testing.assert_array_equal(rows[:3], x[good])
        np.testing.assert_array_equal(rows[4:], x[good])
        assert (rows[3].view(np.uint32) == 0xFFFFFFFF).all()


def test_device_errors_surface_later_without_sync():
    ct = ibp.compress(np.ones((8, 16), np.float32)).pin_memory()
    cuda.decompress(ct, index=torch.tensor([9], device="cuda"))
    with pytest.raises(IndexError):
        cuda.check()
    cuda.check()                                  # raised once only
    cuda.decompress(ct, index=torch.tensor([-9], device="cuda"))
    torch.cuda.synchronize()
    with pytest.raises(IndexError):
        cuda.decompress(ct)                       # the next call reports it
    assert_decodes(ct)


def test_corrupted_payload_raises_format_error():
    rng = np.random.default_rng(6)
    seen = 0
    for trial in range(40):
        ct = ibp.compress(sample(rng, (60, 100), np.float32, 0.1), layout=("packed", "slotted")[trial % 2])
        payload = ct.payload.copy()
        for bit in rng.integers(0, (payload.size - 1) * 64, 3):
            payload[bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
        bad = ct._replace(payload=payload)
        try:
            expect = ibp.decompress(bad)
        except ibp.FormatError as e:
            for source in (bad.pin_memory(), cuda.to_device(bad), bad):
                with pytest.raises(ibp.FormatError, match=re.escape(str(e))):
                    cuda.decompress(source, sync=True)
            seen += 1
        else:
            assert_decodes(bad)
            np.testing.assert_array_equal(cuda.decompress(bad, sync=True).cpu().numpy(), expect)
    assert seen


def test_bad_arguments():
    ct = ibp.compress(np.ones((8, 16), np.float32))
    with pytest.raises(ValueError):
        cuda.decompress(ct, out=torch.empty(8, 16))                      # CPU out
    with pytest.raises(ValueError):
        cuda.decompress(ct, out=torch.empty(8, 15, device="cuda"))       # shape
    with pytest.raises(ValueError):
        cuda.decompress(ct, out=torch.empty(8, 16, dtype=torch.float64, device="cuda"))
    with pytest.raises(ValueError):
        cuda.decompress(ct, out=torch.empty(16, 8, device="cuda").t())   # not contiguous
    with pytest.raises(ValueError):
        cuda.decompress(ct, path="zero-copy")                            # not pinned
    with pytest.raises(ValueError):
        cuda.decompress(ct, index=[1], path="stream")
    with pytest.raises(ValueError):
        cuda.decompress(ct, path="fast")
    with pytest.raises(ValueError):
        cuda.decompress(ct, device="cpu")
    with pytest.raises(TypeError):
        cuda.decompress(np.ones(3))
    with pytest.raises(IndexError):
        cuda.decompress(ibp.compress(np.array(3, np.float32)), index=[0])


def test_unaligned_out_buffer():
    """float16 held as 64-bit words (files may do that) into a 2-byte-aligned out."""
    from ibp.geometry import Geometry
    x = sample(np.random.default_rng(7), (30, 64), np.float16, 0.1)
    words = ibp.compress(x.view(np.uint64))
    ct = words._replace(dtype="float16", shape=x.shape, geometry=Geometry(x.shape, 2, 64, words.geometry.unit_words))
    big = torch.empty(30 * 64 + 1, dtype=torch.float16, device="cuda")
    big.view(torch.uint8).fill_(0xFF)
    out = big[1:].view(30, 64)
    assert out.data_ptr() % 8
    cuda.decompress(ct, out=out, sync=True)
    np.testing.assert_array_equal(out.cpu().numpy(), x)


def test_odd_shapes():
    odd = (np.array(2.5, np.float32), np.zeros((0, 5), np.float32), np.zeros((4, 0), np.int16), np.arange(7))
    for x in odd:
        ct = ibp.compress(x)
        assert_decodes(ct)
        assert_decodes(ct.pin_memory())
    ct = ibp.compress(np.zeros((4, 0), np.int16))
    assert_decodes(ct, torch.tensor([3, -4], device="cuda"))
    with pytest.raises(IndexError):
        cuda.decompress(ct, index=torch.tensor([4], device="cuda"), sync=True)


def test_split_rows_gather():
    x = sample(np.random.default_rng(8), (3, 70000), np.float32, 0.05)
    ct = ibp.compress(x)
    assert ct.geometry.unit_words < ct.geometry.row_words
    assert_decodes(ct.pin_memory(), torch.tensor([2, 0, -1, 1], device="cuda"))


def test_slotted_updates_are_seen():
    rng = np.random.default_rng(9)
    x = sample(rng, (50, 40), np.float32, 0.1)
    ct = ibp.compress(x, layout="slotted").pin_memory()
    assert_decodes(ct)
    ct.update_rows([3, 7], sample(rng, (2, 40), np.float32, 0.9))
    assert_decodes(ct)
    assert_decodes(ct, torch.tensor([7, 3], device="cuda"))
    resident = cuda.to_device(ct)
    resident.update_rows([1], sample(rng, (1, 40), np.float32, 0.5))
    assert_decodes(resident)


def test_two_streams_at_once(small_chunks):
    rng = np.random.default_rng(10)
    a = ibp.compress(sample(rng, (2000, 100), np.float32, 0.1)).pin_memory()
    b = ibp.compress(sample(rng, (500, 300), np.int16, 0.05), layout="slotted")
    index = torch.randint(0, 2000, (3000,), device="cuda")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    s1.wait_stream(torch.cuda.current_stream())
    s2.wait_stream(torch.cuda.current_stream())
    results = []
    for _ in range(4):
        with torch.cuda.stream(s1):
            results.append((a, None, cuda.decompress(a, path="stream")))
            results.append((a, index, cuda.decompress(a, index=index)))
        with torch.cuda.stream(s2):
            results.append((b, None, cuda.decompress(b)))
            results.append((a, index, cuda.decompress(a, index=index)))
    torch.cuda.synchronize()
    cuda.check()
    for ct, idx, y in results:
        np.testing.assert_array_equal(host_bytes(y), host_bytes(ibp.decompress(ct, index=cpu_index(idx))))


# -- real data -------------------------------------------------------------------

def _real_tensors():
    from ibp import datasets
    available = datasets.available()
    for name in ("minilm-fp32", "minilm-bf16", "minilm-kv", "glove-50d", "cora"):
        if name in available:
            for key, x in datasets.load(name).items():
                if np.prod(x.shape) > 1:
                    yield f"{name}/{key}", x


def test_real_data():
    tensors = list(_real_tensors())
    if not tensors:
        pytest.skip("no dataset packages installed")
    rng = np.random.default_rng(11)
    for name, x in tensors:
        ct = ibp.compress(x)
        pinned = ct.pin_memory()
        assert_decodes(pinned)
        assert_decodes(pinned, path="stream")
        assert_decodes(cuda.to_device(ct))
        if x.ndim >= 1 and x.shape[0] > 1:
            index = torch.from_numpy(rng.integers(0, x.shape[0], 4096)).cuda()
            assert_decodes(pinned, index)
