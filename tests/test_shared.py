"""One compressed table for every process on a host (ibp.memory): shared
memory passed as a handle, memory-mapped files read page by page."""
import copy
import gc
import io
import os
import pickle
import zlib

import numpy as np
import pytest

import ibp
from host_memory import smaps_kib

torch = pytest.importorskip("torch")
mp = pytest.importorskip("torch.multiprocessing")
from multiprocessing.reduction import ForkingPickler  # noqa: E402  (torch's reductions registered above)


def table(rows=2000, cols=48, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def forking_dumps(obj):
    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


@pytest.mark.parametrize("layout", ["packed", "slotted"])
def test_share_memory_moves_the_arrays_in_place(layout):
    x = table()
    ct = ibp.compress(x, layout=layout)
    assert not ct.is_shared()
    assert ct.share_memory_() is ct and ct.is_shared() and ct.share_memory_() is ct
    segment = ct._shared[0]
    assert segment.is_shared()
    arrays = [ct.payload, ct.kinds] + ([] if ct.index is None else list(ct.index[2:]))
    base = segment.data_ptr()
    assert all(base <= a.ctypes.data < base + segment.numel() and not a.flags.writeable for a in arrays)
    assert ibp.decompress(ct).tobytes() == x.tobytes()
    assert ibp.decompress(ct, index=[7, -1, 7]).tobytes() == x[[7, -1, 7]].tobytes()


def test_shared_tensors_refuse_updates_and_private_copies_take_them():
    x = table()
    ct = ibp.compress(x, layout="slotted").share_memory_()
    with pytest.raises(ValueError, match="shared"):
        ct.update_rows([1], x[[2]])
    private = copy.deepcopy(ct)
    assert not private.is_shared()
    private.update_rows([1], x[[2]])
    assert ibp.decompress(ct).tobytes() == x.tobytes()
    assert ibp.decompress(private, index=[1]).tobytes() == x[[2]].tobytes()


def test_torch_pickler_sends_a_handle_plain_pickle_the_bytes():
    x = table(20000, 48)
    ct = ibp.compress(x).share_memory_()
    handle = forking_dumps(ct)
    assert len(handle) < 16384 < ct.payload.nbytes
    plain = pickle.dumps(ct)
    assert len(plain) > ct.payload.nbytes
    back = pickle.loads(plain)
    assert not back.is_shared() and back.payload.ctypes.data != ct.payload.ctypes.data
    assert ibp.decompress(back).tobytes() == x.tobytes()


def test_unshared_and_mmapped_tensors_pickle_by_value(tmp_path):
    x = table()
    ibp.save(ibp.compress(x), tmp_path / "t.ibp")
    mapped = ibp.load(tmp_path / "t.ibp", mmap=True)
    for ct in (mapped, ibp.compress(x, layout="slotted")):
        back = pickle.loads(forking_dumps(ct))
        assert not back.is_shared() and back.layout == ct.layout and back.model == ct.model
        assert ibp.decompress(back).tobytes() == x.tobytes()


class SharedRows(torch.utils.data.Dataset):
    """Rows of one shared CompressedTensor, reporting whether the worker got it shared."""

    def __init__(self, ct):
        self.ct = ct

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.ct.is_shared(), torch.from_numpy(ibp.decompress(self.ct, index=[i, -i - 1]))


def test_spawned_dataloader_workers_receive_the_shared_table():
    x = table()
    ds = SharedRows(ibp.compress(x).share_memory_())
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, multiprocessing_context="spawn")
    batches = list(loader)
    assert all(bool(shared.all()) for shared, _ in batches)
    got = torch.cat([rows for _, rows in batches]).numpy()
    want = np.concatenate([x[[i, -i - 1]] for i in range(8)]).reshape(got.shape)
    assert got.tobytes() == want.tobytes()


# -- four processes, one table -----------------------------------------------------
CHUNK_ROWS = 1024


def _read_everything(rank, big, small, index, want, crc, results):
    """Gather ``index`` exactly and decode the whole table chunk by chunk
    (the control, last rank, does the same number of chunks of ``small``),
    then report private anonymous memory."""
    ct = small if rank == 4 else big
    ok = True
    if rank < 4:
        ok = ibp.decompress(ct, index=index).tobytes() == want
        total = 0
        for start in range(0, ct.nrows, CHUNK_ROWS):
            rows = np.arange(start, min(start + CHUNK_ROWS, ct.nrows))
            total = zlib.crc32(ibp.decompress(ct, index=rows), total)
        ok = ok and total == crc
    else:
        for _ in range(0, big.nrows, CHUNK_ROWS):
            ibp.decompress(ct, index=np.arange(CHUNK_ROWS) % ct.nrows)
    gc.collect()
    results.put((rank, ok, smaps_kib("Pss_Anon")))


def test_four_processes_gather_from_one_shared_table():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 2**32, (200 * 1024, 256), dtype=np.uint32)        # 200 MiB, incompressible
    big = ibp.compress(x).share_memory_()
    index = rng.integers(0, x.shape[0], 4096)
    want, crc = x[index].tobytes(), zlib.crc32(x)
    del x
    small = ibp.compress(rng.integers(0, 2**32, (CHUNK_ROWS, 256), dtype=np.uint32)).share_memory_()
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_read_everything, args=(big, small, index, want, crc, results), nprocs=5, join=True)
    got = dict((rank, (ok, pss)) for rank, ok, pss in (results.get() for _ in range(5)))
    assert all(got[rank][0] for rank in range(4)), got
    control = got[4][1]
    for rank in range(4):
        assert (got[rank][1] - control) * 1024 < 0.1 * big.payload.nbytes, (got, big.payload.nbytes)


# -- a file larger than the memory allowed -------------------------------------------
def test_mmapped_file_gathers_read_only_the_rows_asked_for(tmp_path):
    rng = np.random.default_rng(6)
    rows, cols, asked = 96 * 1024, 256, 100                               # 96 MiB of 1 KiB rows
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    index = rng.integers(0, rows, asked)
    want = x[index].tobytes()
    path = tmp_path / "big.ibp"
    ibp.save(ibp.compress(x, unit_rows=1), path)
    del x
    with open(path, "rb") as f:                                            # cold: not in the page cache
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    size = os.path.getsize(path)
    ibp.decompress(ibp.compress(table(64, cols), unit_rows=1), index=[1, 2])   # numba compiled before measuring
    ct = ibp.load(path, mmap=True, verify=False)
    gc.collect()
    before = smaps_kib("Rss")
    got = ibp.decompress(ct, index=index)
    grown = (smaps_kib("Rss") - before) * 1024
    assert got.tobytes() == want
    allowed = asked * 64 * 1024 + (2 << 20)           # a fault-around window per row read, and slack
    assert size > 5 * allowed and grown < allowed, (grown, allowed, size)


def test_gnn_shared_cora_example_trains_every_rank_on_the_one_table():
    pytest.importorskip("torch_geometric")
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "gnn_shared_cora.py")
    r = subprocess.run([sys.executable, script, "--ranks", "2", "--epochs", "1"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("table shared True") == 2 and "identical parameters on every rank: True" in r.stdout


def _gather_on_gpu(rank, ct, index, want, results):
    """Pin the received shared table where it lies and gather zero-copy on the GPU."""
    pinned = ct.pin_memory()
    rows = torch.as_tensor(index, device="cuda")
    got = ibp.decompress(pinned, index=rows, device="cuda", path="zero-copy").cpu().numpy().tobytes()
    results.put((rank, pinned is ct and pinned.is_pinned() and ct.is_shared(), got == want))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_processes_on_one_gpu_gather_from_one_pinned_shared_copy():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((50000, 96)).astype(np.float32)
    ct = ibp.compress(x, unit_rows=1).share_memory_()
    index = rng.integers(0, x.shape[0], 10000)
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_gather_on_gpu, args=(ct, index, x[index].tobytes(), results), nprocs=2, join=True)
    assert sorted(results.get() for _ in range(2)) == [(0, True, True), (1, True, True)]
