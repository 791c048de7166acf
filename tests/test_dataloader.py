"""The DataLoader transfer hook delivers batches bit-identical to the
uncompressed ones: worker processes, nested batches, pass-through leaves."""
import collections
import pathlib
import pickle
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, default_convert

from ibp.integrations import dataloader
from ibp.integrations.dataloader import CompressedBatch, CompressingCollate, DeviceLoader

Pair = collections.namedtuple("Pair", "feat label")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class NestedDataset(Dataset):
    """Samples shaped like real ones: a dict holding a namedtuple, a tuple
    with a list, a string; features with NaN payloads, -0.0 and inf."""

    def __init__(self, n=300):
        g = torch.Generator().manual_seed(0)
        self.feat = (torch.randn(n, 160, generator=g) * 8).round() / 8
        self.feat[::7, 3] = -0.0
        self.feat[::11, 5] = float("inf")
        self.feat.view(torch.int32)[::13, 7] = 0x7FC01234  # a NaN with a payload
        self.wide = torch.randn(n, 16, generator=g, dtype=torch.float64)
        self.half = torch.randn(n, 32, generator=g).to(torch.bfloat16)

    def __len__(self):
        return len(self.feat)

    def __getitem__(self, i):
        return {"x": Pair(self.feat[i], i), "extra": (self.wide[i], [self.half[i], torch.tensor(i, dtype=torch.int32)]),
                "name": f"sample{i}"}


class Stream(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(1)
        for i in range(40):
            yield torch.randn(256, generator=g).round(), i


def same(a, b):
    """Equal structure, types, dtypes, shapes and bits."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.cpu().reshape(-1).view(torch.uint8), b.cpu().reshape(-1).view(torch.uint8)))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def packed_paths(batch):
    found = []
    dataloader._map_leaves(batch.tree, lambda path, leaf: found.append(path) if isinstance(
        leaf, dataloader._Packed) else None)
    return found


def test_workers_deliver_identical_batches():
    ds = NestedDataset()
    reference = list(DataLoader(ds, batch_size=32))  # 300 rows: the last batch is short
    collate = CompressingCollate()
    loader = DataLoader(ds, batch_size=32, num_workers=2, collate_fn=collate, persistent_workers=True,
                        pin_memory=torch.cuda.is_available())
    for _epoch in range(2):
        delivered = list(DeviceLoader(loader))
        assert len(delivered) == len(reference) == 10
        assert all(same(want, got) for want, got in zip(reference, delivered))
        assert type(delivered[0]["x"]) is Pair
    assert list(collate.models) == [("x", "feat")]
    assert pickle.loads(pickle.dumps(collate)).models == collate.models  # what the workers receive


def test_batches_shrink_and_pass_the_rest_through():
    ds = NestedDataset()
    collate = CompressingCollate(sample=next(iter(DataLoader(ds, batch_size=32))))
    batch = collate([ds[i] for i in range(32)])
    assert isinstance(batch, CompressedBatch)
    assert packed_paths(batch) == [("x", "feat")]
    assert batch.nbytes < batch.raw_nbytes
    assert batch.tree["name"] == [f"sample{i}" for i in range(32)]
    assert same(batch.decompress(), next(iter(DataLoader(ds, batch_size=32))))
    if not torch.cuda.is_available():
        assert batch.pin_memory() is batch  # nothing to pin for


@pytest.mark.parametrize("which, expected", [
    ({"extra"}, [("extra", 0), ("extra", 1, 0), ("extra", 1, 1)]),
    ({"feat", 0}, [("x", "feat"), ("extra", 0), ("extra", 1, 0)]),
    ({("extra", 1, 0), "nothing"}, [("extra", 1, 0)]),
    (lambda path, t: t.dtype == torch.bfloat16, [("extra", 1, 0)]),
])
def test_which_chooses_the_leaves(which, expected):
    ds = NestedDataset()
    samples = [ds[i] for i in range(20)]
    batch = CompressingCollate(which=which)(samples)  # unfitted in the main process: learns from this batch
    assert packed_paths(batch) == expected
    assert same(batch.decompress(), next(iter(DataLoader(ds, batch_size=20))))


def test_default_rule_respects_min_bytes():
    ds = NestedDataset()
    samples = [ds[i] for i in range(32)]
    assert packed_paths(CompressingCollate(min_bytes=1)(samples)) == [("x", "feat"), ("extra", 0), ("extra", 1, 0)]
    assert packed_paths(CompressingCollate(min_bytes=1 << 30)(samples)) == []


def test_leaf_whose_shape_changed_gets_its_own_model():
    collate = CompressingCollate(sample={"v": torch.arange(64 * 64, dtype=torch.float32).view(64, 64)})
    samples = [{"v": torch.full((48,), float(i)) / 3} for i in range(100)]
    batch = collate(samples)
    assert packed_paths(batch) == [("v",)]
    assert same(batch.decompress(), {"v": torch.stack([s["v"] for s in samples])})


def test_unfitted_collate_refuses_to_learn_in_a_worker(monkeypatch):
    monkeypatch.setattr(dataloader, "get_worker_info", lambda: object())
    with pytest.raises(RuntimeError, match="fit"):
        CompressingCollate()([torch.zeros(8)])


def test_device_loader_fits_from_an_iterable_dataset_and_unbatched_loaders():
    reference = list(DataLoader(Stream(), batch_size=8))
    collate = CompressingCollate(min_bytes=0)
    delivered = list(DeviceLoader(DataLoader(Stream(), batch_size=8, collate_fn=collate), device="cpu"))
    assert collate.fitted and list(collate.models) == [(0,)]
    assert all(same(a, b) for a, b in zip(reference, delivered)) and len(delivered) == 5
    ds = NestedDataset(10)
    collate = CompressingCollate(default_convert, min_bytes=0)
    delivered = list(DeviceLoader(DataLoader(ds, batch_size=None, collate_fn=collate), device="cpu"))
    assert ("x", "feat") in collate.models
    assert all(same(a, b) for a, b in zip(DataLoader(ds, batch_size=None), delivered)) and len(delivered) == 10


def test_device_loader_passes_plain_batches_through():
    ds = NestedDataset(40)
    reference = list(DataLoader(ds, batch_size=16))
    assert all(same(a, b) for a, b in zip(reference, DeviceLoader(DataLoader(ds, batch_size=16), device="cpu")))
    assert len(DeviceLoader(DataLoader(ds, batch_size=16))) == 3


def test_forked_workers_after_gnu_openmp_are_refused(monkeypatch):
    import numba
    from ibp import _bits
    monkeypatch.setattr(_bits, "PARALLEL_MIN_WORDS", 1)   # however small, on numba's threads
    CompressingCollate(min_bytes=0).fit(torch.zeros(64, 8))  # runs numba's parallel kernels here
    if numba.threading_layer() != "omp":
        pytest.skip("numba uses a fork-safe threading layer")
    from numba.np.ufunc import omppool
    if omppool.openmp_vendor != "GNU":
        pytest.skip("numba's OpenMP is fork-safe")
    loader = DataLoader(NestedDataset(40), batch_size=8, num_workers=2, collate_fn=CompressingCollate(),
                        multiprocessing_context="fork")
    with pytest.raises(RuntimeError, match="forkserver"):
        iter(DeviceLoader(loader))


def test_bad_arguments():
    with pytest.raises(TypeError):
        CompressingCollate(which="feat")
    with pytest.raises(TypeError):
        CompressingCollate(collate_fn=3)
    with pytest.raises(ValueError):
        DeviceLoader([], device="meta")


@pytest.mark.gpu
@needs_cuda
def test_gpu_workers_pin_and_device_decodes():
    ds = NestedDataset()
    reference = list(DataLoader(ds, batch_size=32))
    collate = CompressingCollate()
    loader = DataLoader(ds, batch_size=32, num_workers=2, collate_fn=collate, pin_memory=True)
    delivered = list(DeviceLoader(loader, device="cuda"))
    torch.cuda.synchronize()
    assert delivered[0]["x"].feat.is_cuda and delivered[0]["extra"][1][1].is_cuda
    assert all(same(want, got) for want, got in zip(reference, delivered))
    raw = next(iter(loader))
    assert isinstance(raw, CompressedBatch)
    assert raw.tree["x"].feat.ct.is_pinned() and raw.tree["extra"][0].is_pinned()


@pytest.mark.gpu
@needs_cuda
def test_gpu_loader_can_be_left_early():
    ds = NestedDataset()
    loader = DataLoader(ds, batch_size=16, collate_fn=CompressingCollate(), pin_memory=True)
    for i, batch in enumerate(DeviceLoader(loader)):
        if i == 2:
            break
    torch.cuda.synchronize()
    assert same(batch, list(DataLoader(ds, batch_size=16))[2])


@pytest.mark.slow
def test_example_runs():
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "examples" / "dataloader_transfer.py")], cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "every batch equals the uncompressed one" in done.stdout


class ByName(torch.utils.data.Dataset):
    """A map-style dataset keyed by names, as torch allows: its sampler gives the keys."""

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.rows = {f"item{i}": torch.randn(4096, generator=g) for i in range(8)}

    def __getitem__(self, key):
        return self.rows[key]

    def __len__(self):
        return len(self.rows)


def test_a_dataset_without_index_keys_asks_for_a_fitted_collate():
    # dataset[0..batch_size-1] failed with KeyError 0; the sampler is not read for keys (one may draw from
    # torch's global generator, or be an iterator used once)
    ds = ByName()
    for options in (dict(sampler=list(ds.rows)), dict(batch_sampler=[list(ds.rows)[:4], list(ds.rows)[4:]])):
        loader = DataLoader(ds, collate_fn=CompressingCollate(), **options, **({} if "batch_sampler" in options
                                                                              else dict(batch_size=4)))
        with pytest.raises(ValueError, match=r"collate.fit\(batch\)"):
            list(DeviceLoader(loader, device="cpu"))
        loader.collate_fn.fit(default_collate([ds["item0"], ds["item1"]]))
        got = list(DeviceLoader(loader, device="cpu"))
        plain = list(DataLoader(ds, **options, **({} if "batch_sampler" in options else dict(batch_size=4))))
        assert len(got) == 2 and all(same(a, b) for a, b in zip(got, plain))
