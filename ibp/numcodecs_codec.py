"""ibp as a numcodecs codec (``id`` "ibp"), so zarr arrays and anything else
that speaks numcodecs store chunks compressed by Invariant Bit Packing.

Each chunk becomes a self-contained ibp file (docs/format.md): its dtype and
shape travel with it, so decoding needs nothing but the bytes.  zarr's v2
format hands a compressor the chunk as an array, which is what ibp learns
its model from; for zarr's v3 format, whose compressors see raw bytes, ibp
is the array-to-bytes codec instead (ibp/zarr_codec.py).

numcodecs reads a decoded chunk as bytes in memory order and views them as
the chunk's dtype, and may hand the codec any buffer (bytes, bytearray,
array.array).  ibp stores values (rows are the first axis, native byte
order), so a Fortran-ordered chunk is compressed as its C-ordered
transpose, a big-endian one by value, and a chunk of a dtype ibp has not
(datetime64, fixed-width strings) as its bytes, one row of them per
element; the file's metadata says so, and decoding gives back the very
bytes that went in.
"""
import json
import math

import numpy as np
from numcodecs.abc import Codec
from numcodecs.compat import ensure_contiguous_ndarray_like, ensure_ndarray_like, ndarray_copy
from numcodecs.registry import register_codec

from . import container, dtypes
from .api import check_word_bits, compress, decompress
from .errors import FormatError
from .tensor import CompressedTensor

LAYOUT_KEY = "ibp.numcodecs"   # metadata, when needed: {"order": "F", "dtype": ">f4", "view": {dtype, shape}}


class IBP(Codec):
    """Lossless Invariant Bit Packing of each chunk.

    word_bits: force 8, 16, 32 or 64-bit words (None: the best measured).
    """

    codec_id = "ibp"

    def __init__(self, word_bits=None):
        self.word_bits = check_word_bits(word_bits)

    def encode(self, buf):
        array = buf if isinstance(buf, np.ndarray) else ensure_contiguous_ndarray_like(buf)
        if array.dtype.hasobject:
            raise TypeError("ibp compresses numeric arrays, not object arrays")
        layout = {}
        if array.ndim > 1 and array.flags.f_contiguous and not array.flags.c_contiguous:
            array, layout["order"] = array.T, "F"     # the transpose's rows are the bytes in memory order
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)   # (ascontiguousarray would make a 0-d chunk 1-d)
        try:
            dtypes.name_of_numpy(array.dtype)
        except TypeError:   # a dtype ibp has not: its bytes, element by element
            layout["view"] = {"dtype": np.lib.format.dtype_to_descr(array.dtype), "shape": list(array.shape)}
            array = array.reshape(-1).view(np.uint8).reshape(-1, array.dtype.itemsize)
        if not array.dtype.isnative:
            layout["dtype"] = array.dtype.str
        ct = compress(array, word_bits=self.word_bits)
        return container.dumps({None: ct}, {LAYOUT_KEY: json.dumps(layout)} if layout else None)

    def decode(self, buf, out=None):
        data = bytes(ensure_contiguous_ndarray_like(buf).view(np.uint8).reshape(-1))
        if out is not None and ensure_ndarray_like(out).dtype.hasobject:
            raise TypeError("ibp cannot decode into an object array")
        ct = CompressedTensor.from_bytes(data)
        array = _restore_layout(decompress(ct), container.header_metadata(data).get(LAYOUT_KEY))
        if out is None:
            return array
        return ndarray_copy(array, out)

    def get_config(self):
        return {"id": self.codec_id, "word_bits": self.word_bits}

    def __repr__(self):
        return f"IBP(word_bits={self.word_bits!r})"


def _restore_layout(array, text):
    """The decoded values in the dtype, byte order and memory order the chunk had."""
    if text is None:
        return array
    try:
        layout = json.loads(text)
        if not isinstance(layout, dict) or set(layout) - {"order", "dtype", "view"} \
                or layout.get("order", "F") != "F":
            raise ValueError
        if "dtype" in layout:
            dtype = np.dtype(layout["dtype"])
            if dtype.newbyteorder("=") != array.dtype:
                raise ValueError
            array = array.astype(dtype)
        if "view" in layout:
            dtype, shape = np.lib.format.descr_to_dtype(_descr(layout["view"]["dtype"])), tuple(layout["view"]["shape"])
            if dtype.hasobject or array.shape != (math.prod(shape), dtype.itemsize) or array.dtype != np.uint8:
                raise ValueError
            array = array.reshape(-1).view(dtype).reshape(shape)
    except (ValueError, TypeError, KeyError, AttributeError):
        raise FormatError(f"the chunk's {LAYOUT_KEY} metadata is not a layout of its {array.dtype} "
                          f"{list(array.shape)} values: {text!r}") from None
    return array.T if "order" in layout else array


def _descr(value):
    """A dtype description (``np.lib.format.dtype_to_descr``) from its JSON
    form, which spells its tuples (titled names, shapes) as lists."""
    if isinstance(value, str):
        return value
    return [(tuple(name) if isinstance(name, list) else name, _descr(fmt), *map(tuple, shape))
            for name, fmt, *shape in value]


register_codec(IBP)
