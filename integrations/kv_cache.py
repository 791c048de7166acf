"""A transformers KV cache whose older tokens live IBP-compressed on the host.

``CompressedKVCache`` is a ``DynamicCache``: pass it to ``generate`` (or to a
forward with ``**cache_kwargs(model, cache)``).  Each layer keeps all but its
most recent tokens' keys and values as compressed blocks on the host and
restores them when the layer runs; outputs are bit-identical to the default
cache because the codec is lossless.
"""
import functools
import inspect

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ._torch_io import compress_on_host, decode_whole

__all__ = ["CompressedKVCache", "CompressedKVLayer", "cache_kwargs"]


class _CompressedSequence:
    """One of a layer's keys or values, [batch, heads, tokens, head_dim]: the
    older tokens as compressed blocks on the host (rows = tokens), the most
    recent ones as a plain tensor on the device."""

    def __init__(self):
        self.set(None)

    def set(self, tensor):
        self.blocks, self.compressed, self.tail = [], 0, tensor

    def __len__(self):
        if self.tail is None:
            return 0
        return self.compressed + (self.tail.shape[-2] if self.tail.dim() >= 2 else 0)

    def full(self, device):
        if not self.blocks:
            return self.tail
        return torch.cat([self._restore(ct, device) for ct in self.blocks] + [self.tail], dim=-2)

    def append(self, new, device, block_tokens):
        """The whole sequence with ``new`` appended; full blocks of
        ``block_tokens`` not yet compressed are compressed and leave the device."""
        tail = [self.tail] if self.tail is not None and self.tail.shape[-2] else []
        full = torch.cat([self._restore(ct, device) for ct in self.blocks] + tail + [new], dim=-2)
        n = (full.shape[-2] - self.compressed) // block_tokens * block_tokens
        if n:
            block = full[..., self.compressed:self.compressed + n, :]
            self.blocks.append(compress_on_host(block.permute(2, 0, 1, 3), device))
            self.compressed += n
        self.tail = full if self.compressed == 0 else full[..., self.compressed:, :].clone()
        return full

    @staticmethod
    def _restore(ct, device):
        return decode_whole(ct, device).permute(1, 2, 0, 3)


class CompressedKVLayer(DynamicLayer):
    """A ``DynamicLayer`` that keeps all but the last ``block_tokens``-odd
    tokens compressed on the host.  ``keys`` / ``values`` read as the whole
    restored sequence and assigning them replaces it, so every inherited
    operation (crop, reorder, batch select, reset) stays correct."""

    def __init__(self, block_tokens=64, **kwargs):
        if not isinstance(block_tokens, int) or block_tokens < 1:
            raise ValueError(f"block_tokens must be a positive int, got {block_tokens!r}")
        self.block_tokens = block_tokens
        self._k, self._v = _CompressedSequence(), _CompressedSequence()
        super().__init__(**kwargs)

    @property
    def keys(self):
        return self._k.full(getattr(self, "device", None))

    @keys.setter
    def keys(self, value):
        self._k.set(value)

    @property
    def values(self):
        return self._v.full(getattr(self, "device", None))

    @values.setter
    def values(self, value):
        self._v.set(value)

    def lazy_initialization(self, key_states, value_states=None):
        """Before transformers 5, this is called with the keys only."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self._k.set(key_states[..., :0, :])
        self._v.set((key_states if value_states is None else value_states)[..., :0, :])
        self.is_initialized = True

    def reset(self):
        """Drop every token (the base class would zero a restored copy)."""
        self._k.set(None)
        self._v.set(None)
        self.is_initialized = False

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = self._k.append(key_states, self.device, self.block_tokens)
        values = self._v.append(value_states, self.device, self.block_tokens)
        return keys, values

    def get_seq_length(self):
        return len(self._k) if self.is_initialized else 0

    def offload(self):
        """Nothing to move: the bulk already lives compressed on the host."""

    def prefetch(self):
        """Nothing to move: restoring happens in ``update``."""

    @property
    def compressed_nbytes(self):
        return sum(ct.nbytes for seq in (self._k, self._v) for ct in seq.blocks)


class CompressedKVCache(DynamicCache):
    """A ``DynamicCache`` (pass it to ``generate`` or to a forward with
    ``**cache_kwargs(model, cache)``) whose layers keep their K/V compressed on the host in blocks
    of ``block_tokens`` tokens, and restore them (on the GPU when the cache
    lives there) each time the layer runs.  Full-attention layers only."""

    def __init__(self, *, block_tokens=64):
        if not isinstance(block_tokens, int) or block_tokens < 1:
            raise ValueError(f"block_tokens must be a positive int, got {block_tokens!r}")
        Cache.__init__(self, layer_class_to_replicate=functools.partial(CompressedKVLayer, block_tokens=block_tokens))

    @property
    def compressed_nbytes(self):
        """Host bytes held by the compressed blocks of every layer."""
        return sum(layer.compressed_nbytes for layer in self.layers)


def cache_kwargs(model, cache):
    """``{name: cache}`` for the keyword ``model`` takes its KV cache by:
    ``cache`` since transformers 5 renamed it, ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}
