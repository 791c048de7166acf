"""Ship DataLoader batches compressed, decode them on the GPU.

The workers compress each batch of Cora's bag-of-words features with a
model the main process learned once; DeviceLoader decodes the next batch on
a side CUDA stream while the current one trains (on the CPU when there is no
GPU).  The batches it yields are bit-identical to the uncompressed ones.

    python examples/dataloader_transfer.py
"""
import torch
from torch.utils.data import DataLoader, TensorDataset

from ibp.datasets import cora_graph
from ibp.integrations.dataloader import CompressingCollate, DeviceLoader


def main():
    cora = cora_graph()
    features = torch.from_numpy(cora["features"])
    labels = torch.from_numpy(cora["labels"]).long()
    dataset = TensorDataset(features, labels)

    # Compresses floating-point tensors of 16 KiB or more: the features, not the labels.
    collate = CompressingCollate()
    loader = DataLoader(dataset, batch_size=256, num_workers=2, collate_fn=collate,
                        pin_memory=torch.cuda.is_available(), persistent_workers=True)
    batches = DeviceLoader(loader)  # learns the model from the first batch, then starts the workers

    device = batches.device
    model = torch.nn.Linear(features.shape[1], int(labels.max()) + 1).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for epoch in range(3):
        seen = []
        for x, y in batches:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen.append(x.cpu())
        print(f"epoch {epoch}: loss {loss.item():.3f}")
    assert torch.equal(torch.cat(seen), features), "decoded batches differ from the originals"
    shipped = collate([dataset[i] for i in range(256)])  # what a worker sends for one batch
    print(f"a batch: {shipped.raw_nbytes} bytes, shipped as {shipped.nbytes} "
          f"({shipped.raw_nbytes / shipped.nbytes:.0f}x smaller)")
    print(f"decoded on {device}: every batch equals the uncompressed one")


if __name__ == "__main__":
    main()
