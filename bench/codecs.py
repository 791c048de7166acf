"""The codecs the benchmark compares, behind one small interface.

Every codec has a ``name`` and ``compress(x) -> obj``, ``decompress(obj) ->
array`` and ``size(obj) -> bytes``; ``prepare(x)`` does untimed per-tensor
set-up (only ibp with a reused model needs it), ``jit`` says a warm-up pass
is needed before timing (numba compiles on first call), and ``details(objs)``
adds codec-specific totals to the results.  Inputs are numpy arrays or CPU
torch tensors; outputs are numpy arrays with the same bytes, dtype and shape.
Everything runs on one thread: the byte codecs are asked for one, and
``single_threaded()`` pins numba (ibp and the reference) to one.

``inputs(xs)`` gives the tensors one timed pass compresses (ZipNN
overwrites its input, so it gets fresh copies, made outside the timer).

The byte codecs' packages (zstandard, lz4, blosc2, zipnn) are optional: a codec
whose package is missing is left out of ``all_codecs()``, so the benchmark
and its tests still run on a machine without them (the GPU machine).
"""
from contextlib import contextmanager
import importlib

import numba
import numpy as np

import ibp
from ibp import dtypes

from . import reference

BLOSC2_CLEVEL = 5                 # blosc2's own default level
BLOSC2_CHUNK = 1 << 30            # blosc2 takes at most ~2 GiB per call


def as_numpy(x):
    """A numpy view of a numpy array or CPU torch tensor, so every codec sees
    the same bytes (bf16/fp8 through ml_dtypes, else as same-size uints)."""
    if isinstance(x, np.ndarray):
        return x
    data, name, shape, _ = dtypes.as_bytes(x)
    try:
        dtype = dtypes.numpy_dtype(name)
    except TypeError:
        dtype = np.dtype(f"<u{dtypes.ITEMSIZE[name]}")
    return data.view(dtype).reshape(shape)


def raw_bytes(x):
    """The C-order bytes of an array, as a flat uint8 array."""
    return np.ascontiguousarray(as_numpy(x)).reshape(-1).view(np.uint8)


@contextmanager
def single_threaded():
    """Run numba kernels on one thread inside the block."""
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)


class Codec:
    name = ""
    jit = False

    def prepare(self, x):
        pass

    def inputs(self, xs):
        return xs

    def details(self, objs):
        return {}


def installed(module):
    """Whether ``module`` can be imported here."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


class _ByteCodec(Codec):
    """A general-purpose byte compressor applied to a tensor's raw bytes;
    ``module`` is the package it needs (imported when it is made)."""
    module = ""

    def compress(self, x):
        x = as_numpy(x)
        return self._pack(raw_bytes(x)), x.dtype, x.shape

    def decompress(self, obj):
        packed, dtype, shape = obj
        return np.frombuffer(self._unpack(packed), np.uint8).view(dtype).reshape(shape)

    def size(self, obj):
        return self._size(obj[0])

    def _size(self, packed):
        return len(packed)


class Zstd(_ByteCodec):
    module = "zstandard"

    def __init__(self, level):
        import zstandard
        self.name = f"zstd-{level}"
        self._c = zstandard.ZstdCompressor(level=level, threads=0)
        self._d = zstandard.ZstdDecompressor()

    def _pack(self, data):
        return self._c.compress(data)

    def _unpack(self, packed):
        return self._d.decompress(packed)


class Lz4(_ByteCodec):
    name = "lz4"
    module = "lz4.frame"

    def __init__(self):
        import lz4.frame
        self._frame = lz4.frame

    def _pack(self, data):
        return self._frame.compress(data)

    def _unpack(self, packed):
        return self._frame.decompress(packed)


class Blosc2(_ByteCodec):
    """blosc2: bitshuffle then zstd, typesize = the element size."""
    name = "blosc2"
    module = "blosc2"

    def __init__(self):
        import blosc2
        self._blosc2 = blosc2

    def compress(self, x):
        blosc2 = self._blosc2
        x = as_numpy(x)
        params = blosc2.CParams(codec=blosc2.Codec.ZSTD, clevel=BLOSC2_CLEVEL, typesize=x.dtype.itemsize,
                                filters=[blosc2.Filter.BITSHUFFLE], filters_meta=[0], nthreads=1)
        data = raw_bytes(x)
        step = BLOSC2_CHUNK - BLOSC2_CHUNK % x.dtype.itemsize
        chunks = [blosc2.compress2(data[i:i + step], cparams=params) for i in range(0, data.size, step)]
        return chunks, x.dtype, x.shape

    def _unpack(self, chunks):
        params = self._blosc2.DParams(nthreads=1)
        return b"".join(self._blosc2.decompress2(c, dparams=params) for c in chunks)

    def _size(self, chunks):
        return sum(len(c) for c in chunks)


class ZipNN(_ByteCodec):
    """ZipNN (Hershcovitch et al.): byte grouping of floats then Huffman/zstd;
    it works in place on a bytearray, so each pass gets fresh copies."""
    name = "zipnn"
    module = "zipnn"
    DTYPES = {4: "float32", 2: "bfloat16"}

    def __init__(self):
        import zipnn
        self._zipnn = zipnn
        self._coders = {}

    def _coder(self, dtype):
        key = "float16" if dtype == np.float16 else self.DTYPES.get(dtype.itemsize, "float32")
        if key not in self._coders:
            self._coders[key] = self._zipnn.ZipNN(bytearray_dtype=key, threads=1)
        return self._coders[key]

    def inputs(self, xs):
        return [(bytearray(raw_bytes(x).tobytes()), as_numpy(x).dtype, as_numpy(x).shape) for x in xs]

    def compress(self, x):
        data, dtype, shape = x if isinstance(x, tuple) else self.inputs([x])[0]
        return self._coder(dtype).compress(data), dtype, shape

    def decompress(self, obj):
        packed, dtype, shape = obj
        out = self._coder(dtype).decompress(packed)
        return np.frombuffer(out, np.uint8).view(dtype).reshape(shape)


class Ibp(Codec):
    """ibp, learning the model from each tensor; size = the whole ibp file."""
    name = "ibp"
    jit = True

    def compress(self, x):
        return ibp.compress(as_numpy(x))

    def decompress(self, ct):
        return ibp.decompress(ct)

    def size(self, ct):
        return len(ct.to_bytes())

    def details(self, cts):
        return {"decode_bytes": sum(ct.nbytes for ct in cts)}


class IbpModelReuse(Ibp):
    """ibp with the model learned beforehand (``prepare``, untimed), as when
    a model is reused for new tensors of the same kind."""
    name = "ibp-model-reuse"

    def __init__(self):
        self._models = {}

    def prepare(self, x):
        x = as_numpy(x)
        self._models[id(x)] = (x, ibp.analyze(x))

    def compress(self, x):
        x = as_numpy(x)
        seen, model = self._models.get(id(x), (None, None))
        if seen is not x:
            raise ValueError("prepare(x) must be called on this tensor before compress(x)")
        return ibp.compress(x, model=model)


class Reference(Codec):
    """The reference algorithm (bench/reference.py), per tensor with the
    better of 32/64-bit words; size = bytes moved."""
    name = "reference"
    jit = True

    def compress(self, x):
        return reference.compress(as_numpy(x))

    def decompress(self, rt):
        return reference.decompress(rt)

    def size(self, rt):
        return rt.nbytes

    def details(self, rts):
        """Totals with every tensor on int32 words, and with int64 wherever a
        row is whole 8-byte words (int32 elsewhere); raw where neither fits."""
        def total(order):
            return sum(next((rt.candidates[w] for w in order if w in rt.candidates), rt.slots.nbytes)
                       for rt in rts)
        return {"int32_bytes": total((32,)), "int64_bytes": total((64, 32)),
                "raw_tensors": sum(rt.word_bits is None for rt in rts)}


class FileCodec:
    """A byte codec applied to a whole file's bytes, as its command-line
    tool would be (``zstd -3 model.safetensors``): ``compress(bytearray)``
    and ``decompress(bytes)`` give bytes-like objects.  ``dtype`` is the
    element type of most of the file's bytes (blosc2's type size, ZipNN's
    float type)."""

    def __init__(self, codec, dtype):
        self.codec, self.name = codec, codec.name
        self._dtype = np.dtype(dtype) if not isinstance(dtype, np.dtype) else dtype

    def compress(self, data):
        c = self.codec
        if isinstance(c, Blosc2):
            return b"".join(len(ch).to_bytes(8, "little") + ch
                            for ch in c.compress(np.frombuffer(data, np.uint8).view(
                                f"<u{self._dtype.itemsize}") if len(data) % self._dtype.itemsize == 0
                                else np.frombuffer(data, np.uint8))[0])
        if isinstance(c, ZipNN):
            return c.compress((data, self._dtype, (len(data) // self._dtype.itemsize,)))[0]
        return c._pack(data)

    def decompress(self, packed):
        c = self.codec
        if isinstance(c, Blosc2):
            chunks, pos = [], 0
            while pos < len(packed):
                n = int.from_bytes(packed[pos:pos + 8], "little")
                chunks.append(packed[pos + 8:pos + 8 + n])
                pos += 8 + n
            return c._unpack(chunks)
        if isinstance(c, ZipNN):
            return c._coder(self._dtype).decompress(packed)
        return c._unpack(packed)


def file_codecs(dtype):
    """Each installed byte codec, for whole files of mostly ``dtype``."""
    return [FileCodec(cls(*args), dtype) for cls, args in BYTE_CODECS if cls.module not in MISSING]


BYTE_CODECS = ((Zstd, (3,)), (Zstd, (19,)), (Lz4, ()), (Blosc2, ()), (ZipNN, ()))   # (class, arguments), table order
MISSING = tuple(dict.fromkeys(cls.module for cls, _ in BYTE_CODECS if not installed(cls.module)))


def all_codecs():
    """One of each codec compared, in table order; byte codecs whose package
    is missing here (``MISSING``) are left out."""
    return [Ibp(), IbpModelReuse(), Reference()] + [cls(*args) for cls, args in BYTE_CODECS
                                                    if cls.module not in MISSING]


NAMES = tuple(c.name for c in all_codecs())
