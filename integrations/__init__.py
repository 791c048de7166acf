"""Integrations of ibp with the libraries that move tensors around.

* ``ibp.integrations.dataloader``: compress DataLoader batches in the
  workers and decode them on the GPU (CompressingCollate, DeviceLoader).
* ``ibp.integrations.embedding``: CompressedEmbedding and
  CompressedEmbeddingBag, drop-in for torch.nn.Embedding / EmbeddingBag.
"""
