"""ibp as a zarr v3 array-to-bytes codec (name "ibp").

zarr's v3 format passes bytes-to-bytes codecs raw bytes, from which ibp
could learn nothing about the elements; as the array-to-bytes codec (the
place of v3's "bytes" codec) it sees each chunk as the array it is.  A
chunk becomes the same self-contained ibp file the numcodecs codec writes
(ibp/numcodecs_codec.py), so its dtype and shape travel with it and are
checked against the array's on the way back.

    zarr.create_array(store, shape=..., dtype=..., serializer=ibp.zarr_codec.IBPCodec())

zarr finds the codec by its name through the ``zarr.codecs`` entry point, so
arrays written with it open without importing ibp first.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from zarr.abc.codec import ArrayBytesCodec
from zarr.core.common import parse_named_configuration
from zarr.registry import register_codec

from .errors import FormatError
from .numcodecs_codec import IBP

NAME = "ibp"


@dataclass(frozen=True)
class IBPCodec(ArrayBytesCodec):
    """Lossless Invariant Bit Packing of each chunk.

    word_bits: force 8, 16, 32 or 64-bit words (None: the best measured).
    """

    word_bits: int | None = None

    def __post_init__(self):
        IBP(self.word_bits)   # the same checks of word_bits

    @classmethod
    def from_dict(cls, data):
        _, configuration = parse_named_configuration(data, NAME, require_configuration=False)
        return cls(**(configuration or {}))

    def to_dict(self):
        if self.word_bits is None:
            return {"name": NAME}
        return {"name": NAME, "configuration": {"word_bits": self.word_bits}}

    def _encode_sync(self, chunk_array, chunk_spec):
        data = IBP(self.word_bits).encode(chunk_array.as_numpy_array())
        return chunk_spec.prototype.buffer.from_bytes(data)

    def _decode_sync(self, chunk_bytes, chunk_spec):
        array = IBP(self.word_bits).decode(chunk_bytes.as_numpy_array())
        want = chunk_spec.dtype.to_native_dtype()
        if array.shape != tuple(chunk_spec.shape) or array.dtype.newbyteorder("=") != want.newbyteorder("="):
            raise FormatError(f"an ibp chunk holds {array.dtype} {list(array.shape)}, the array's chunks are "
                              f"{want} {list(chunk_spec.shape)}")
        return chunk_spec.prototype.nd_buffer.from_numpy_array(array.astype(want, copy=False))

    async def _encode_single(self, chunk_array, chunk_spec):
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    async def _decode_single(self, chunk_bytes, chunk_spec):
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)

    def compute_encoded_size(self, input_byte_length, chunk_spec):
        raise NotImplementedError("ibp chunks vary in size")


register_codec(NAME, IBPCodec)
