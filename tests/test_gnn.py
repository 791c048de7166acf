"""ibp.integrations.gnn: the compressed FeatureStore, gather, the pure-torch
neighbor sampler, and GraphSAGE training on Cora (== training on raw features)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torch_geometric")
from torch_geometric.data import Data, TensorAttr  # noqa: E402

import ibp  # noqa: E402
from ibp.datasets import cora_graph  # noqa: E402
from ibp.integrations import gnn  # noqa: E402
from ibp.integrations.gnn import (CompressedFeatureStore, TorchNeighborSampler, gather, graph_store,  # noqa: E402
                                  neighbor_loader)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def expected(t, index):
    """t[index] computed by numpy, which reads every index type the store does."""
    picked = t.numpy()[index.numpy() if torch.is_tensor(index) else index]
    return torch.from_numpy(np.array(picked))


def load_example(name):
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cora():
    g = cora_graph()
    return torch.from_numpy(g["features"]), torch.from_numpy(g["labels"]), torch.from_numpy(g["edge_index"])


@pytest.fixture(scope="module")
def store(cora):
    x, y, _ = cora
    s = CompressedFeatureStore(device="cpu")
    s.put_tensor(x, group_name=None, attr_name="x", index=None)
    s.put_tensor(y, group_name=None, attr_name="y", index=None)
    return s


# -- FeatureStore methods --------------------------------------------------------
def test_whole_tensors_round_trip(store, cora):
    x, y, _ = cora
    assert torch.equal(store.get_tensor(group_name=None, attr_name="x", index=None), x)
    assert torch.equal(store[None, "y", None], y)
    assert store.compressed(group_name=None, attr_name="x").ratio > 10  # Cora's bag of words packs well


@pytest.mark.parametrize("index", [
    torch.tensor([5, 0, 2707, 5, -1, 100]),
    torch.tensor([], dtype=torch.long),
    torch.tensor([[3, 4], [2700, 1]], dtype=torch.int32),
    np.array([9], dtype=np.uint16),  # torch_geometric itself only takes 1-element arrays
    7,
    slice(10, 50, 3),
    slice(None, None, -1),
    slice(2700, None),
])
def test_get_with_index(store, cora, index):
    x, y, _ = cora
    want_x, want_y = expected(x, index), expected(y, index)
    got = store.get_tensor(group_name=None, attr_name="x", index=index)
    assert got.shape == want_x.shape
    assert torch.equal(got, want_x)
    assert torch.equal(store.get_tensor(group_name=None, attr_name="y", index=index), want_y)
    assert store.get_tensor_size(group_name=None, attr_name="x", index=index) == want_x.shape


def test_sizes_and_attrs(store, cora):
    x, y, _ = cora
    assert store.get_tensor_size(group_name=None, attr_name="x") == x.shape
    assert store.get_tensor_size(group_name=None, attr_name="y") == y.shape
    assert store.get_tensor_size(group_name=None, attr_name="nope") is None
    attrs = store.get_all_tensor_attrs()
    assert sorted(a.attr_name for a in attrs) == ["x", "y"]
    assert all(a.group_name is None and not a.is_set("index") for a in attrs)


def test_multi_get_is_one_gather_per_tensor(store, cora, monkeypatch):
    x, y, _ = cora
    calls = []
    real = ibp.decompress
    monkeypatch.setattr(ibp, "decompress", lambda ct, **kw: calls.append(ct.shape) or real(ct, **kw))
    i1, i2, i3 = torch.tensor([1, 2, 3]), torch.tensor([[2707, 0]]), torch.tensor([4, 4])
    attrs = [TensorAttr(None, "x", i1), TensorAttr(None, "y", i3), TensorAttr(None, "x", i2),
             TensorAttr(None, "x", 42), TensorAttr(None, "x", slice(0, 3))]
    got = store.multi_get_tensor(attrs)
    for g, want in zip(got, [x[i1], y[i3], x[i2], x[42], x[:3]]):
        assert g.shape == want.shape and torch.equal(g, want)
    assert sorted(calls) == sorted([x.shape, y.shape])  # x once for four attrs, y once


def test_put_remove_and_update():
    rng = np.random.default_rng(0)
    table = torch.from_numpy(rng.standard_normal((300, 24)).astype(np.float32))
    s = CompressedFeatureStore(device="cpu", layout="slotted")
    assert s.put_tensor(table, group_name="paper", attr_name="x", index=None)
    rows, new = torch.tensor([3, 299, 3]), torch.from_numpy(rng.standard_normal((3, 24)).astype(np.float32))
    s.put_tensor(new, group_name="paper", attr_name="x", index=rows)
    want = table.clone()
    want[rows] = new
    assert torch.equal(s.get_tensor(group_name="paper", attr_name="x", index=None), want)
    assert not torch.equal(want, table)  # the caller's tensor was left alone
    assert s.remove_tensor(group_name="paper", attr_name="x", index=None)
    assert not s.remove_tensor(group_name="paper", attr_name="x", index=None)
    assert s.get_all_tensor_attrs() == []
    with pytest.raises(KeyError):
        s.get_tensor(group_name="paper", attr_name="x", index=None)


def test_put_compressed_and_numpy():
    a = np.arange(60, dtype=np.int32).reshape(20, 3)
    s = CompressedFeatureStore(device="cpu")
    s.put_tensor(a, group_name=None, attr_name="a", index=None)
    s.put_tensor(ibp.compress(a * 2), group_name=None, attr_name="b", index=None)
    assert torch.equal(s.get_tensor(group_name=None, attr_name="a", index=torch.tensor([19, 0])),
                       torch.from_numpy(a[[19, 0]]))
    assert torch.equal(s.get_tensor(group_name=None, attr_name="b", index=None), torch.from_numpy(a * 2))


def test_bad_requests(store):
    with pytest.raises(TypeError):
        store.get_tensor(group_name=None, attr_name="x", index=torch.tensor([True, False]))
    with pytest.raises(TypeError):
        store.get_tensor(group_name=None, attr_name="x", index=torch.tensor([1.0]))
    with pytest.raises(IndexError):
        store.get_tensor(group_name=None, attr_name="x", index=torch.tensor([2708]))
    with pytest.raises(ValueError, match="slotted"):
        store.put_tensor(torch.zeros(1, 1433), group_name=None, attr_name="x", index=torch.tensor([0]))
    with pytest.raises(ValueError):
        CompressedFeatureStore(device="cpu", layout="sparse")
    with pytest.raises(ValueError):
        CompressedFeatureStore(device="mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            CompressedFeatureStore(device="cuda")


def test_gather(cora):
    x, _, _ = cora
    ct = ibp.compress(x)
    idx = torch.tensor([[7, 3], [2707, 7]])
    got = gather(ct, idx)
    assert got.device.type == "cpu" and torch.equal(got, x[idx])
    assert torch.equal(gather(ct, [1, 2]), x[[1, 2]])
    assert torch.equal(gather(ibp.compress(x.numpy()), np.array([5])), x[[5]])
    with pytest.raises(TypeError):
        gather(x, idx)


# -- sampling ---------------------------------------------------------------------
def _edges(edge_index):
    return set(zip(edge_index[0].tolist(), edge_index[1].tolist()))


@pytest.mark.parametrize("replace", [False, True])
def test_torch_sampler_samples_real_neighbors(store, cora, replace):
    x, y, edge_index = cora
    graphs = graph_store(edge_index, x.shape[0])
    torch.manual_seed(0)
    loader = neighbor_loader((store, graphs), [4, 3], input_nodes=torch.arange(0, 2708, 7), batch_size=50,
                             replace=replace)
    assert isinstance(loader.node_sampler, TorchNeighborSampler) or gnn.pyg_typing.WITH_PYG_LIB \
        or gnn.pyg_typing.WITH_TORCH_SPARSE
    batch = next(iter(loader))
    src, dst = batch.n_id[batch.edge_index[0]], batch.n_id[batch.edge_index[1]]
    assert _edges(torch.stack([src, dst])) <= _edges(edge_index)
    assert torch.equal(edge_index[:, batch.e_id], torch.stack([src, dst]))
    assert torch.equal(batch.x, x[batch.n_id]) and torch.equal(batch.y, y[batch.n_id])
    assert batch.n_id.unique().numel() == batch.n_id.numel()
    fanout = torch.bincount(batch.edge_index[1], minlength=batch.num_nodes)
    hop1 = slice(0, batch.batch_size)
    degree = torch.bincount(edge_index[1], minlength=x.shape[0])[batch.n_id]
    if replace:
        assert torch.equal(fanout[hop1], torch.where(degree[hop1] > 0, 4, 0))
    else:
        assert torch.equal(fanout[hop1], degree[hop1].clamp(max=4))
        assert batch.e_id.unique().numel() == batch.e_id.numel()
    assert int(fanout[batch.batch_size:].max()) <= 3


def test_torch_sampler_is_seeded(cora):
    x, _, edge_index = cora
    data = Data(x=x, edge_index=edge_index)

    def first_batch(seed):
        torch.manual_seed(seed)
        return next(iter(neighbor_loader(data, [5, 5], batch_size=64, shuffle=True))).n_id

    assert torch.equal(first_batch(3), first_batch(3))
    assert not torch.equal(first_batch(3), first_batch(4))


def test_torch_sampler_refuses_what_it_cannot_do(cora):
    x, _, edge_index = cora
    with pytest.raises(ValueError, match="pyg-lib"):
        TorchNeighborSampler(Data(x=x, edge_index=edge_index), [2], disjoint=True)


# -- training ---------------------------------------------------------------------
def test_graphsage_on_compressed_store_matches_raw_features(capsys):
    example = load_example("gnn_cora")
    compressed, plain = example.main(epochs=2)
    assert len(compressed) == 2 * 3  # 140 training nodes in batches of 64
    assert compressed == plain
    assert compressed[-1] < compressed[0]
    assert "identical to training on the raw features: True" in capsys.readouterr().out


# -- GPU --------------------------------------------------------------------------
@pytest.mark.gpu
@requires_cuda
def test_cuda_store_gathers_on_device(cora):
    x, y, _ = cora
    s = CompressedFeatureStore(device="cuda")
    s.put_tensor(x, group_name=None, attr_name="x", index=None)
    s.put_tensor(y, group_name=None, attr_name="y", index=None)
    assert s.compressed(group_name=None, attr_name="x").is_pinned()
    idx = torch.tensor([5, 0, 2707, 5, -1])
    got = s.get_tensor(group_name=None, attr_name="x", index=idx)
    assert got.device.type == "cuda" and torch.equal(got.cpu(), x[idx])
    a, b = s.multi_get_tensor([TensorAttr(None, "x", idx), TensorAttr(None, "x", idx.cuda()[:2])])
    assert torch.equal(a.cpu(), x[idx]) and torch.equal(b.cpu(), x[idx[:2]])
    assert torch.equal(s.get_tensor(group_name=None, attr_name="y", index=None).cpu(), y)


@pytest.mark.gpu
@requires_cuda
def test_gather_follows_the_index_device(cora):
    x, _, _ = cora
    ct = ibp.compress(x).pin_memory()
    idx = torch.randint(0, x.shape[0], (1000,))
    got = gather(ct, idx.cuda())
    assert got.device.type == "cuda" and torch.equal(got.cpu(), x[idx])
    assert gather(ct, idx).device.type == "cpu"


@pytest.mark.gpu
@requires_cuda
def test_graphsage_on_gpu_matches_raw_features():
    example = load_example("gnn_cora")
    compressed, plain = example.main(epochs=2)
    assert compressed == plain
