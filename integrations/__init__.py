"""Integrations of ibp with the libraries that move tensors around.

* ``ibp.integrations.dataloader``: compress DataLoader batches in the
  workers and decode them on the GPU (CompressingCollate, DeviceLoader).
* ``ibp.integrations.embedding``: CompressedEmbedding and
  CompressedEmbeddingBag, drop-in for torch.nn.Embedding / EmbeddingBag.
* ``ibp.integrations.gnn``: CompressedFeatureStore for torch_geometric's
  NeighborLoader, and ``gather`` for DGL-style feature fetches.
* ``ibp.integrations.llm``: ``offload`` of model weights and
  ``from_pretrained`` of a compressed model directory (it also re-exports
  the KV cache).
* ``ibp.integrations.kv_cache``: CompressedKVCache for transformers
  ``generate()``.

Each module imports only what it integrates with (torch, torch_geometric,
transformers), so importing one never requires the others.
"""
