"""Train GraphSAGE on Cora with node features read from an IBP-compressed store.

The feature table stays compressed (pinned, with a GPU) and every mini-batch
decodes only its sampled rows.  Compression is lossless, so with the same
seed the loss curve equals training from the raw features exactly; this
script trains both ways and checks that.

    python examples/gnn_cora.py [--epochs 5]
"""
import argparse
import os

import torch
import torch.nn.functional as F
from torch_geometric.data import Data
from torch_geometric.nn import SAGEConv

from ibp.datasets import cora_graph
from ibp.integrations.gnn import CompressedFeatureStore, graph_store, neighbor_loader

# CUDA's scatter and cuBLAS are only reproducible run to run in deterministic mode
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


class GraphSAGE(torch.nn.Module):
    def __init__(self, in_channels, hidden, out_channels):
        super().__init__()
        self.conv1 = SAGEConv(in_channels, hidden)
        self.conv2 = SAGEConv(hidden, out_channels)

    def forward(self, x, edge_index):
        x = F.dropout(self.conv1(x, edge_index).relu(), p=0.5, training=self.training)
        return self.conv2(x, edge_index)


def train_split(labels, per_class=20):
    """The first ``per_class`` nodes of every class (Planetoid's split size)."""
    order = torch.argsort(labels, stable=True)
    first = torch.searchsorted(labels[order], labels[order], side="left")
    return torch.sort(order[torch.arange(labels.numel()) - first < per_class]).values


def train(data, train_nodes, num_features, num_classes, *, epochs=5, seed=0, device="cpu"):
    """Per-step losses of GraphSAGE trained with NeighborLoader over ``data``
    (a Data, or a (feature_store, graph_store) pair).  Deterministic for a
    seed: one process, no workers, sampling from torch's seeded RNG, and
    torch's deterministic algorithms while it runs."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(data, train_nodes, num_features, num_classes, epochs, seed, device)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(data, train_nodes, num_features, num_classes, epochs, seed, device):
    torch.manual_seed(seed)
    model = GraphSAGE(num_features, 64, num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loader = neighbor_loader(data, [10, 10], input_nodes=train_nodes, batch_size=64,
                             shuffle=True, num_workers=0)
    losses = []
    model.train()
    for _ in range(epochs):
        for batch in loader:
            batch = batch.to(device)
            optimizer.zero_grad()
            out = model(batch.x, batch.edge_index)[:batch.batch_size]
            loss = F.cross_entropy(out, batch.y[:batch.batch_size])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


def cora_tensors():
    g = cora_graph()
    return (torch.from_numpy(g["features"]), torch.from_numpy(g["labels"]),
            torch.from_numpy(g["edge_index"]))


def compressed_cora(device=None):
    """Cora as (CompressedFeatureStore with x and y, graph store)."""
    x, y, edge_index = cora_tensors()
    store = CompressedFeatureStore(device=device)
    store.put_tensor(x, group_name=None, attr_name="x", index=None)
    store.put_tensor(y, group_name=None, attr_name="y", index=None)
    return store, graph_store(edge_index, x.shape[0])


def main(epochs=5):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y, edge_index = cora_tensors()
    nodes, classes = train_split(y), int(y.max()) + 1
    store, graphs = compressed_cora(device)
    ct = store.compressed(group_name=None, attr_name="x")
    print(f"features {tuple(x.shape)} float32: {ct.raw_nbytes / 2**20:.2f} MiB raw, "
          f"{ct.nbytes / 2**20:.3f} MiB compressed ({ct.ratio:.1f}x), on {device}")
    compressed = train((store, graphs), nodes, x.shape[1], classes, epochs=epochs, device=device)
    plain = train(Data(x=x, y=y, edge_index=edge_index), nodes, x.shape[1], classes, epochs=epochs, device=device)
    print("loss per step:", " ".join(f"{v:.4f}" for v in compressed))
    same = compressed == plain
    print("identical to training on the raw features:", same)
    if not same:
        raise SystemExit("loss curves differ")
    return compressed, plain


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    main(parser.parse_args().epochs)
