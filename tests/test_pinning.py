"""pin_memory pins exactly the payload: a page-aligned buffer of its size,
registered with CUDA while its owner lives (ibp.memory)."""
import gc
import io
import pickle

import numpy as np
import pytest

import ibp
from host_memory import PAGE, RecordingRegistrar, smaps_kib
from ibp import memory

torch = pytest.importorskip("torch")


@pytest.fixture
def recorded(monkeypatch):
    """ibp.memory registering through RecordingRegistrar; yields its calls."""
    monkeypatch.setattr(memory, "registrar", RecordingRegistrar)
    monkeypatch.setattr(memory, "_registered", type(memory._registered)())
    RecordingRegistrar.calls.clear()
    yield RecordingRegistrar.calls
    RecordingRegistrar.calls.clear()


def table(rows=1000, cols=64, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def test_pinned_host_memory_is_the_payload_exactly(recorded):
    # 17 MiB of incompressible rows: a power-of-two allocator would take 32 MiB
    x = np.random.default_rng(1).integers(0, 2**32, (17 * 2**20 // 1024, 256), dtype=np.uint32)
    ct = ibp.compress(x, word_bits=32)
    gc.collect()
    before = smaps_kib("Anonymous")
    pinned = ct.pin_memory()
    grown = (smaps_kib("Anonymous") - before) * 1024
    assert pinned.is_pinned() and not ct.is_pinned()
    assert recorded == [("register", pinned.payload.ctypes.data, ct.payload.nbytes)]
    assert pinned.payload.ctypes.data % PAGE == 0
    assert ct.payload.nbytes <= grown <= ct.payload.nbytes + ct.kinds.nbytes + 64 * PAGE
    assert ibp.decompress(pinned).tobytes() == x.tobytes()


def test_registration_ends_with_its_owner(recorded):
    pinned = ibp.compress(table()).pin_memory()
    address = pinned.payload.ctypes.data
    assert pinned.pin_memory() is pinned and len(recorded) == 1
    del pinned
    gc.collect()
    assert recorded[-1] == ("unregister", address)


def test_pinned_copy_owns_what_it_writes(recorded):
    x = table(200, 32)
    ct = ibp.compress(x, layout="slotted")
    pinned = ct.pin_memory()
    pinned.update_rows([4], x[[7]])
    assert ibp.decompress(ct).tobytes() == x.tobytes()
    want = x.copy()
    want[4] = x[7]
    assert ibp.decompress(pinned).tobytes() == want.tobytes()
    assert pinned.is_pinned() and pinned.payload.ctypes.data == recorded[0][1]


def test_a_shared_tensor_is_registered_in_place_once(recorded):
    from multiprocessing.reduction import ForkingPickler
    import torch.multiprocessing  # noqa: F401  (registers torch's sharing reductions)
    x = table()
    ct = ibp.compress(x).share_memory_()
    address = ct.payload.ctypes.data
    assert ct.pin_memory() is ct and ct.is_pinned() and ct.is_shared()
    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(ct)
    again = pickle.loads(buf.getvalue())          # this process: the same mapping
    assert again.payload.ctypes.data == address and not again.is_pinned()
    assert again.pin_memory() is again and again._pinned is ct._pinned
    assert recorded == [("register", address, ct.payload.nbytes)]
    assert ibp.decompress(again, index=[5, -1]).tobytes() == x[[5, -1]].tobytes()


def test_sharing_a_pinned_tensor_keeps_it_pinned(recorded):
    x = table()
    pinned = ibp.compress(x).pin_memory()
    private = pinned.payload.ctypes.data
    pinned.share_memory_()
    gc.collect()
    assert pinned.is_shared() and pinned.is_pinned()
    assert recorded == [("register", private, pinned.payload.nbytes),
                        ("register", pinned.payload.ctypes.data, pinned.payload.nbytes), ("unregister", private)]
    assert ibp.decompress(pinned).tobytes() == x.tobytes()


def test_a_pickled_pinned_tensor_arrives_unpinned(recorded):
    x = table()
    back = pickle.loads(pickle.dumps(ibp.compress(x).pin_memory()))
    assert not back.is_pinned() and not back.is_shared()
    assert ibp.decompress(back).tobytes() == x.tobytes()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_pinning_without_a_gpu_says_so():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        ibp.compress(table()).pin_memory()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinning_registers_with_cuda_and_decodes_zero_copy():
    cupy = pytest.importorskip("cupy")
    x = table(5000, 96)
    ct = ibp.compress(x)
    gc.collect()
    before = smaps_kib("Anonymous")
    pinned = ct.pin_memory()
    grown = (smaps_kib("Anonymous") - before) * 1024
    assert grown <= ct.payload.nbytes + ct.kinds.nbytes + 64 * PAGE
    address = pinned.payload.ctypes.data
    assert cupy.cuda.runtime.pointerGetAttributes(address).devicePointer == address   # UVA
    index = torch.randint(0, x.shape[0], (777,), device="cuda")
    got = ibp.decompress(pinned, index=index, device="cuda", path="zero-copy")
    torch.cuda.synchronize()
    assert got.cpu().numpy().tobytes() == x[index.cpu().numpy()].tobytes()
    host = pinned.payload             # the memory outlives its registration
    del pinned, got
    torch.cuda.synchronize()
    gc.collect()
    assert cupy.cuda.runtime.pointerGetAttributes(host.ctypes.data).type == 0   # cudaMemoryTypeUnregistered
    assert ct.pin_memory().is_pinned()
