"""A transformers KV cache whose older tokens live IBP-compressed on the host.

``CompressedKVCache`` is a ``DynamicCache``: pass it to ``generate`` (or to a
forward with ``**cache_kwargs(model, cache)``).  Each layer keeps all but its
most recent tokens' keys and values as compressed blocks on the host and
restores them when the layer runs; outputs are bit-identical to the default
cache because the codec is lossless.

History is encoded once.  A block is stored as ``[batch, heads, tokens,
head_dim]`` with one unit row per batch entry, plus the batch rows it
currently stands for (``None``: all, in order).  A beam reorder, batch
selection or repeat-interleave only composes that index, and restoring
gathers the rows in the same decode pass; a crop drops whole blocks and
keeps the cut one's remainder as raw tail.  Each layer's keys and values
learn their model on their first block and reuse it, so encoding a later
block is a single pass; on a GPU the block is encoded there and only its
compressed bytes leave the device.
"""
import functools
import inspect

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

import ibp

__all__ = ["CompressedKVCache", "CompressedKVLayer", "cache_kwargs"]

# transformers before 5.2x: crop(max_length), a positive length keeps that
# many tokens; later: crop(tokens_to_remove), which must be <= 0.
_CROP_KEEPS_LENGTH = "tokens_to_remove" not in inspect.signature(DynamicLayer.crop).parameters


class _Block:
    """``tokens`` positions of every batch entry, compressed; ``rows`` are the
    stored batch rows the current batch entries read (None: all, in order)."""

    __slots__ = ("ct", "rows", "tokens")

    def __init__(self, ct, tokens):
        self.ct, self.rows, self.tokens = ct, None, tokens

    def restore(self, device):
        return ibp.decompress(self.ct, index=self.rows, device=device)


class _CompressedSequence:
    """One of a layer's keys or values, [batch, heads, tokens, head_dim]: the
    older tokens as compressed blocks on the host, the most recent ones as a
    plain tensor (``tail``) on the device."""

    def __init__(self):
        self.set(None)

    def set(self, tensor):
        self.blocks, self.compressed, self.tail, self.model = [], 0, tensor, None

    def __len__(self):
        if self.tail is None or self.tail.dim() < 2:
            return 0
        return self.compressed + self.tail.shape[-2]

    def full(self, device):
        if not self.blocks:
            return self.tail
        return torch.cat([b.restore(device) for b in self.blocks] + [self.tail], dim=-2)

    def append(self, new, device, block_tokens):
        """The whole sequence with ``new`` appended; the tail's full blocks
        of ``block_tokens`` are compressed (the older blocks stay as they are)."""
        tail = new if self.tail is None or self.tail.dim() < 2 else torch.cat([self.tail, new], dim=-2)
        full = torch.cat([b.restore(device) for b in self.blocks] + [tail], dim=-2) if self.blocks else tail
        n = tail.shape[-2] // block_tokens * block_tokens
        for start in range(0, n, block_tokens):
            self._compress(tail[..., start:start + block_tokens, :], device)
        self.tail = tail[..., n:, :].clone() if n else tail
        return full

    def _compress(self, block, device):
        ct = ibp.compress(block, model=self.model, unit_rows=1)
        if device.type == "cuda" and not ct.is_pinned():
            ct = ct.pin_memory()
        self.model = ct.model
        self.blocks.append(_Block(ct, block.shape[-2]))
        self.compressed += block.shape[-2]

    def select(self, rows):
        """Keep batch entries ``rows`` (a LongTensor on the tail's device)."""
        for b in self.blocks:
            b.rows = rows if b.rows is None else b.rows[rows]
        self.tail = self.tail[rows]

    def crop(self, length, device):
        """Keep the first ``length`` tokens: whole blocks stay compressed, the
        cut block's first tokens join the raw tail."""
        if length >= len(self):
            return
        if length >= self.compressed:
            self.tail = self.tail[..., :length - self.compressed, :]
            return
        kept, start = [], 0
        for b in self.blocks:
            if start + b.tokens > length:
                break
            kept.append(b)
            start += b.tokens
        cut = self.blocks[len(kept)]
        head = cut.restore(device)[..., :length - start, :] if length > start else self.tail[..., :0, :]
        self.blocks, self.compressed, self.tail = kept, start, head


class CompressedKVLayer(DynamicLayer):
    """A ``DynamicLayer`` that keeps all but the last ``block_tokens``-odd
    tokens compressed on the host.  Crop, reorder, batch select and
    repeat-interleave act on the compressed blocks without re-encoding them;
    ``keys`` / ``values`` read as the whole restored sequence, and assigning
    them replaces it."""

    def __init__(self, block_tokens=64, **kwargs):
        if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
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

    def crop(self, length):
        """Keep the first ``length`` tokens (a negative one drops that many from
        the end), as the installed transformers' ``DynamicLayer.crop``."""
        if length > 0 and not _CROP_KEEPS_LENGTH:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {length}")
        if not self.is_initialized or (length == 0 and not _CROP_KEEPS_LENGTH):
            return
        keep = length if length >= 0 else max(0, self.get_seq_length() + length)
        self._k.crop(keep, self.device)
        self._v.crop(keep, self.device)

    def _select(self, rows):
        self._k.select(rows)
        self._v.select(rows)

    def reorder_cache(self, beam_idx):
        if self.get_seq_length() > 0:
            self._select(beam_idx.to(self.device))

    def batch_select_indices(self, indices):
        if self.get_seq_length() > 0:
            self._select(torch.arange(self._k.tail.shape[0], device=self.device)[indices])

    def batch_repeat_interleave(self, repeats):
        if self.get_seq_length() > 0:
            batch = self._k.tail.shape[0]
            self._select(torch.arange(batch, device=self.device).repeat_interleave(repeats))

    def offload(self):
        """Nothing to move: the bulk already lives compressed on the host."""

    def prefetch(self):
        """Nothing to move: restoring happens in ``update``."""

    @property
    def compressed_nbytes(self):
        return sum(b.ct.nbytes for seq in (self._k, self._v) for b in seq.blocks)


class CompressedKVCache(DynamicCache):
    """A ``DynamicCache`` (pass it to ``generate`` or to a forward with
    ``**cache_kwargs(model, cache)``) whose layers keep their K/V compressed on the host in blocks
    of ``block_tokens`` tokens, and restore them (on the GPU when the cache
    lives there) each time the layer runs.  Full-attention layers only."""

    def __init__(self, *, block_tokens=64):
        if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
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
