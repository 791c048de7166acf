"""A compressed GloVe table as a drop-in torch.nn.EmbeddingBag.

The 400000 x 50 table stays compressed in host memory (pinned when there is
a GPU); each lookup decodes only the rows it needs, then torch's own
embedding_bag does the arithmetic, so the results equal the uncompressed
module's bit for bit.  Rows can be rewritten in place.

    python examples/embedding_bag.py
"""
import torch
from torch import nn

from ibp.datasets import load
from ibp.integrations.embedding import CompressedEmbeddingBag


def main():
    glove = torch.from_numpy(load("glove-50d")["glove.6B.50d"])
    plain = nn.EmbeddingBag.from_pretrained(glove, mode="mean", padding_idx=0)
    table = CompressedEmbeddingBag.from_module(plain)
    print(table)

    # 4096 "sentences" of 24 word ids each, padded with id 0; lookups run where the ids are.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = torch.randint(1, glove.shape[0], (4096, 24), generator=torch.Generator().manual_seed(0))
    ids[:, 20:] = 0
    ids = ids.to(device)
    sentences = table(ids)
    assert torch.equal(sentences, plain.to(device)(ids))
    print(f"{tuple(sentences.shape)} sentence vectors on {device}, equal to nn.EmbeddingBag's")

    # Rewrite two rows in place; later lookups see them.
    table.update_rows([1, 2], torch.zeros(2, glove.shape[1]))
    print("rows 1 and 2 after update_rows:", table(torch.tensor([[1, 2]], device=device)).abs().sum().item())


if __name__ == "__main__":
    main()
