"""GNN node features that stay IBP-compressed in host memory.

Mini-batch GNN training gathers the feature rows of every sampled subgraph
from a table too big for the GPU.  Keeping that table compressed in (pinned)
host memory moves fewer bytes over PCIe, and ``ibp.decompress(ct, index=...)``
decodes only the requested rows, in one pass, on the GPU when there is one.

* ``CompressedFeatureStore``: a torch_geometric ``FeatureStore`` for
  ``NeighborLoader(data=(feature_store, graph_store), ...)``.
* ``graph_store(edge_index, num_nodes)``: torch_geometric's in-memory graph
  store, sized so the remote-data sampler accepts it.
* ``gather(ct, index)``: the same fused gather for DGL users; the result
  lives where the index lives.
* ``TorchNeighborSampler`` / ``neighbor_loader``: uniform neighbor sampling in
  plain torch, so NeighborLoader runs where neither pyg-lib nor torch-sparse
  is installed (CI, most CPU machines).
"""
import warnings

import torch
import torch_geometric.typing as pyg_typing
from torch_geometric.data import Data, FeatureStore
from torch_geometric.loader import NeighborLoader
from torch_geometric.sampler import NeighborSampler, SamplerOutput
from torch_geometric.sampler.base import SubgraphType

import ibp
from ibp import dtypes
from ibp.tensor import CompressedTensor

__all__ = ["CompressedFeatureStore", "gather", "graph_store", "TorchNeighborSampler", "neighbor_loader"]


# -- decoding rows -------------------------------------------------------------
def _as_rows(index):
    """``index`` as an integer torch tensor (its device kept); bool masks and
    floats are refused rather than silently read as row numbers."""
    rows = index if torch.is_tensor(index) else torch.as_tensor(index)
    if rows.dtype == torch.bool or rows.is_floating_point() or rows.is_complex():
        raise TypeError(f"a row index must hold integers, not {rows.dtype}")
    return rows


def _decode(ct, rows, device):
    """Rows ``rows`` (None: all) of ``ct`` as a torch tensor on ``device``."""
    if device.type == "cuda":
        return ibp.decompress(ct, index=rows, device=device)
    if rows is not None:
        rows = rows.cpu()
    shape = ct.shape if rows is None else tuple(rows.shape) + ct.shape[1:]
    if rows is not None and len(ct.shape) == 0:
        raise IndexError("a 0-d tensor has no rows to index")
    out = torch.empty(shape, dtype=dtypes.torch_dtype(ct.dtype_name))
    return ibp.decompress(ct, index=rows, out=out)


def gather(ct, index):
    """Rows ``index`` of ``ct`` (== ``x[index]``) as a torch tensor on the
    index's device: a CPU index decodes here, a CUDA index runs the fused
    GPU gather straight from (pinned) host memory."""
    if not isinstance(ct, CompressedTensor):
        raise TypeError(f"gather takes a CompressedTensor, not {type(ct).__name__}")
    rows = _as_rows(index)
    return _decode(ct, rows, rows.device)


def _default_device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, not {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is cuda but torch sees no CUDA GPU")
    return device


# -- the feature store ---------------------------------------------------------
class CompressedFeatureStore(FeatureStore):
    """A torch_geometric FeatureStore holding every tensor IBP-compressed.

    Tensors go in as CPU torch tensors, numpy arrays or CompressedTensors and
    are stored compressed (pinned when CUDA is present).  Reads return torch
    tensors on ``device`` (default: cuda if available, else cpu), decoding only
    the rows asked for.  ``layout="slotted"`` allows partial writes
    (``put_tensor(rows, ..., index=i)``).
    """

    def __init__(self, *, device=None, layout="packed"):
        super().__init__()
        if layout not in ("packed", "slotted"):
            raise ValueError(f"layout must be 'packed' or 'slotted', got {layout!r}")
        self.device = _default_device(device)
        self.layout = layout
        self._tensors = {}

    @staticmethod
    def _key(attr):
        return (attr.group_name, attr.attr_name)

    def _lookup(self, attr):
        ct = self._tensors.get(self._key(attr))
        if ct is None:
            raise KeyError(f"no tensor stored for group {attr.group_name!r}, attr {attr.attr_name!r}")
        return ct

    @staticmethod
    def _is_whole(index):
        return index is None or (isinstance(index, slice) and index == slice(None))

    @staticmethod
    def _rows(ct, index):
        """Any FeatureStore index (None, slice, int, array, tensor) as rows."""
        if index is None:
            return torch.arange(ct.nrows)
        if isinstance(index, slice):
            return torch.arange(*index.indices(ct.nrows))
        return _as_rows(index)

    def compressed(self, *args, **kwargs):
        """The CompressedTensor stored for an attr (to read its ratio, save it...)."""
        return self._lookup(self._tensor_attr_cls.cast(*args, **kwargs))

    def _put_tensor(self, tensor, attr):
        if self._is_whole(attr.index):
            if isinstance(tensor, CompressedTensor):
                ct = tensor
            else:
                if torch.is_tensor(tensor):
                    tensor = tensor.detach().cpu()
                ct = ibp.compress(tensor, layout=self.layout, unit_rows=1)
            if torch.cuda.is_available():
                ct = ct.pin_memory()
            self._tensors[self._key(attr)] = ct
            return True
        ct = self._lookup(attr)
        if isinstance(tensor, CompressedTensor):
            raise TypeError("partial writes take plain rows, not a CompressedTensor")
        if torch.is_tensor(tensor):
            tensor = tensor.detach().cpu()
        ct.update_rows(self._rows(ct, attr.index).cpu(), tensor)
        return True

    def _get_tensor(self, attr):
        ct = self._lookup(attr)
        rows = None if self._is_whole(attr.index) else self._rows(ct, attr.index)
        return _decode(ct, rows, self.device)

    def _multi_get_tensor(self, attrs):
        """One fused gather per stored tensor: the indices of all attrs that
        read the same tensor are decoded together, then split."""
        by_key = {}
        for i, attr in enumerate(attrs):
            by_key.setdefault(self._key(attr), []).append(i)
        out = [None] * len(attrs)
        for where in by_key.values():
            ct = self._lookup(attrs[where[0]])
            if len(where) == 1:
                out[where[0]] = self._get_tensor(attrs[where[0]])
                continue
            rows = [self._rows(ct, attrs[i].index) for i in where]
            flat = torch.cat([r.reshape(-1).to(self.device, torch.int64) for r in rows])
            parts = _decode(ct, flat, self.device).split([r.numel() for r in rows])
            for i, r, part in zip(where, rows, parts):
                out[i] = part.view(tuple(r.shape) + ct.shape[1:])
        return out

    def _remove_tensor(self, attr):
        return self._tensors.pop(self._key(attr), None) is not None

    def _get_tensor_size(self, attr):
        ct = self._tensors.get(self._key(attr))
        if ct is None:
            return None
        if self._is_whole(attr.index):
            return torch.Size(ct.shape)
        return torch.Size(tuple(self._rows(ct, attr.index).shape) + ct.shape[1:])

    def get_all_tensor_attrs(self):
        return [self._tensor_attr_cls.cast(*key) for key in self._tensors]

    def __repr__(self):
        return f"{self.__class__.__name__}(device={self.device}, tensors={len(self._tensors)})"


def graph_store(edge_index, num_nodes):
    """torch_geometric's in-memory graph store (a ``Data``) holding a COO
    ``edge_index`` of a ``num_nodes``-node graph; the remote-data sampler
    needs the size, which ``Data(edge_index=...)`` alone does not record."""
    store = Data()
    store.put_edge_index(torch.as_tensor(edge_index), layout="coo", size=(int(num_nodes), int(num_nodes)))
    return store


# -- sampling without pyg-lib --------------------------------------------------
def _uniform_neighbors(colptr, row, frontier, k, replace):
    """(source node, frontier position, edge id) of up to ``k`` neighbors per
    frontier node (all of them for k < 0), drawn uniformly with torch's RNG."""
    start = colptr[frontier]
    deg = colptr[frontier + 1] - start
    positions = torch.arange(frontier.numel())
    if k >= 0 and replace:
        seg = positions.repeat_interleave(torch.where(deg > 0, k, 0))
        pick = (torch.rand(seg.numel(), dtype=torch.float64) * deg[seg]).long()
        eid = start[seg] + torch.minimum(pick, deg[seg] - 1)
        return row[eid], seg, eid
    seg = positions.repeat_interleave(deg)
    offset = torch.arange(seg.numel()) - (deg.cumsum(0) - deg).repeat_interleave(deg)
    eid = start[seg] + offset
    if k >= 0:
        # shuffle each node's edges (random keys, then a stable sort by node)
        # and keep the first k: uniform sampling without replacement
        by_key = torch.rand(seg.numel()).argsort()
        order = by_key[seg[by_key].argsort(stable=True)]
        keep = offset < deg.clamp(max=k)[seg]
        seg, eid = seg[keep], eid[order][keep]
    return row[eid], seg, eid


class TorchNeighborSampler(NeighborSampler):
    """torch_geometric's NeighborSampler with the homogeneous, directional,
    untimed case sampled in plain torch (seeded by ``torch.manual_seed``), for
    machines without pyg-lib or torch-sparse.  Samples differ from pyg-lib's
    (different random streams) but follow the same distribution."""

    def __init__(self, data, num_neighbors, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*without a 'pyg-lib' installation.*")
            super().__init__(data, num_neighbors, **kwargs)
        if (self.is_hetero or self.disjoint or self.subgraph_type != SubgraphType.directional
                or getattr(self, "sample_direction", "forward") != "forward"  # PyG >= 2.6
                or self.edge_weight is not None):
            raise ValueError("TorchNeighborSampler only samples homogeneous graphs, directional, forward, "
                             "unweighted and untimed; install pyg-lib for the rest")

    def _sample(self, seed, seed_time=None, **kwargs):
        local = torch.full((self.num_nodes,), -1, dtype=torch.long)
        local[seed] = torch.arange(seed.numel())
        frontier, frontier_local = seed, torch.arange(seed.numel())
        nodes, rows, cols, edges = [seed], [], [], []
        num_nodes, num_edges = [seed.numel()], []
        count = seed.numel()
        for k in self.num_neighbors.get_mapped_values():
            src, dst, eid = _uniform_neighbors(self.colptr, self.row, frontier, k, self.replace)
            unseen = src[local[src] < 0]
            uniq, inverse = torch.unique(unseen, return_inverse=True)
            first = torch.full((uniq.numel(),), unseen.numel(), dtype=torch.long)
            first.scatter_reduce_(0, inverse, torch.arange(unseen.numel()), reduce="amin")
            new = uniq[first.argsort()]  # in order of first appearance
            local[new] = torch.arange(count, count + new.numel())
            rows.append(local[src])
            cols.append(frontier_local[dst])
            edges.append(eid)
            nodes.append(new)
            num_nodes.append(new.numel())
            num_edges.append(eid.numel())
            frontier, frontier_local = new, torch.arange(count, count + new.numel())
            count += new.numel()
        cat = lambda parts: torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)  # noqa: E731
        return SamplerOutput(node=cat(nodes), row=cat(rows), col=cat(cols), edge=cat(edges),
                             batch=None, num_sampled_nodes=num_nodes, num_sampled_edges=num_edges)


_SAMPLER_ARGS = ("subgraph_type", "replace", "disjoint", "temporal_strategy", "time_attr", "weight_attr",
                 "is_sorted")


def neighbor_loader(data, num_neighbors, **kwargs):
    """``NeighborLoader(data, num_neighbors, **kwargs)``, sampling with
    ``TorchNeighborSampler`` when neither pyg-lib nor torch-sparse is here."""
    if "neighbor_sampler" not in kwargs and not (pyg_typing.WITH_PYG_LIB or pyg_typing.WITH_TORCH_SPARSE):
        sampler_args = {k: kwargs[k] for k in _SAMPLER_ARGS if k in kwargs}
        kwargs["neighbor_sampler"] = TorchNeighborSampler(data, num_neighbors, **sampler_args)
    return NeighborLoader(data, num_neighbors, **kwargs)
