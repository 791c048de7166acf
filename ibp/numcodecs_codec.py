"""ibp as a numcodecs codec (``id`` "ibp"), so zarr arrays and anything else
that speaks numcodecs store chunks compressed by Invariant Bit Packing.

Each chunk becomes a self-contained ibp file (docs/format.md): its dtype and
shape travel with it, so decoding needs nothing but the bytes.  zarr's v2
format hands a compressor the chunk as an array, which is what ibp learns
its model from; zarr's v3 format gives bytes-to-bytes codecs raw bytes, so
there the codec would see uint8 and compress much worse: use v2.
"""
import numpy as np
from numcodecs.abc import Codec
from numcodecs.compat import ensure_contiguous_ndarray_like, ndarray_copy
from numcodecs.registry import register_codec

from .api import compress, decompress
from .tensor import CompressedTensor


class IBP(Codec):
    """Lossless Invariant Bit Packing of each chunk.

    word_bits: force 8, 16, 32 or 64-bit words (None: the best measured).
    """

    codec_id = "ibp"

    def __init__(self, word_bits=None):
        if word_bits is not None and word_bits not in (8, 16, 32, 64):
            raise ValueError(f"word_bits must be None, 8, 16, 32 or 64, got {word_bits!r}")
        self.word_bits = word_bits

    def encode(self, buf):
        array = np.asarray(buf)
        if array.dtype == object:
            raise TypeError("ibp compresses numeric arrays, not object arrays")
        return compress(np.ascontiguousarray(array), word_bits=self.word_bits).to_bytes()

    def decode(self, buf, out=None):
        data = ensure_contiguous_ndarray_like(buf).view(np.uint8).reshape(-1)
        array = decompress(CompressedTensor.from_bytes(bytes(data)))
        if out is None:
            return array
        return ndarray_copy(array, out)

    def get_config(self):
        return {"id": self.codec_id, "word_bits": self.word_bits}

    def __repr__(self):
        return f"IBP(word_bits={self.word_bits!r})"


register_codec(IBP)
