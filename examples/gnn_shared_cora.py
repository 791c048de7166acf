"""Several ranks train one GraphSAGE on Cora (DDP, gloo, CPU), all sampling
mini-batches from one CompressedFeatureStore in shared memory.

The parent compresses the features once and calls ``share_memory_()``;
``mp.spawn`` hands every rank a handle to that memory, not a copy, so the
host holds one compressed table however many ranks read it.

    python examples/gnn_shared_cora.py [--ranks 2] [--epochs 2]
"""
import argparse
import os
import sys
import tempfile
import zlib

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gnn_cora import GraphSAGE, compressed_cora, train_split  # noqa: E402

import ibp  # noqa: E402
from ibp.integrations.gnn import neighbor_loader  # noqa: E402


def rank_main(rank, world, init_file, store, graphs, nodes, classes, epochs, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ct = store.compressed(group_name=None, attr_name="x")
        torch.manual_seed(0)                      # the same initial weights on every rank
        model = torch.nn.parallel.DistributedDataParallel(GraphSAGE(ct.shape[1], 64, classes))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        per_rank = nodes.numel() // world         # equal step counts: DDP reduces every step
        mine = nodes[rank::world][:per_rank]
        torch.manual_seed(1 + rank)               # each rank samples its own mini-batches
        loader = neighbor_loader((store, graphs), [10, 10], input_nodes=mine, batch_size=32, shuffle=True)
        losses = []
        for _ in range(epochs):
            for batch in loader:
                optimizer.zero_grad()
                out = model(batch.x, batch.edge_index)[:batch.batch_size]
                loss = F.cross_entropy(out, batch.y[:batch.batch_size])
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
        # a checksum, small enough for the pipe while the parent waits in join
        results.put((rank, ct.is_shared(), losses, zlib.crc32(weights)))
    finally:
        dist.destroy_process_group()
    # Leave without tearing down: freeing the DDP model's gloo group joins
    # gloo's loop thread while holding the GIL that thread may be waiting
    # for, and a rank then hangs at exit (seen with torch 2.13).  The
    # result is already in the pipe.
    sys.stdout.flush()
    os._exit(0)


def main(ranks=2, epochs=2):
    store, graphs = compressed_cora(device="cpu")
    for attr in ("x", "y"):
        store.compressed(group_name=None, attr_name=attr).share_memory_()
    ct = store.compressed(group_name=None, attr_name="x")
    labels = ibp.decompress(store.compressed(group_name=None, attr_name="y"))
    nodes, classes = train_split(labels), int(labels.max()) + 1
    print(f"features {ct.shape}: {ct.nbytes / 2**10:.0f} KiB compressed ({ct.ratio:.1f}x), "
          f"in shared memory, read by {ranks} ranks")
    results = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(rank_main, args=(ranks, os.path.join(tmp, "init"), store, graphs, nodes, classes, epochs, results),
                 nprocs=ranks, join=True)
    got = sorted(results.get() for _ in range(ranks))
    for rank, shared, losses, _ in got:
        print(f"rank {rank}: table shared {shared}, loss per step", " ".join(f"{v:.3f}" for v in losses))
    same = all(got[0][3] == w for *_, w in got)
    print("identical parameters on every rank:", same)
    if not (same and all(shared for _, shared, _, _ in got)):
        raise SystemExit("ranks disagree or did not share the table")
    return got


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    main(args.ranks, args.epochs)
