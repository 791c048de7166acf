"""The public functions: compress, decompress, analyze, save, load."""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Literal

import numpy as np

from . import analysis, dtypes
from ._typing import Device, Index, Path, ReadableFile, Tensor, WritableFile
from .container import load_file, loads, map_stream, read_metadata, read_stream, save_file, write_stream
from .decode import decode_into, normalize_index
from .encode import encode_packed, encode_slotted
from .files import check_mapped_file
from .geometry import Geometry
from .model import Model
from .tensor import CompressedTensor

LAYOUTS = ("packed", "slotted")


def analyze(x: Tensor, *, word_bits: int | None = None) -> Model:
    """Learn the model (word width, period, per-column invariant bits) of ``x``
    from a sample of its rows.  Reuse it with ``compress(y, model=m)`` for
    tensors from the same distribution."""
    word_bits = check_word_bits(word_bits)
    data, name, shape, _ = dtypes.as_bytes(x)
    return analysis.analyze_bytes(data, shape, dtypes.ITEMSIZE[name], word_bits)


def compress(x: Tensor, *, model: Model | None = None, word_bits: int | None = None,
             layout: Literal["packed", "slotted"] = "packed", unit_rows: int | None = None,
             payload: Literal["pinned", "device"] | None = None) -> CompressedTensor:
    """Compress a numpy array or torch tensor of any dtype and shape (a CUDA
    tensor on its GPU: see ibp.cuda_encode; same bytes for the same model).

    Rows are the first axis: a 2-d+ tensor has ``shape[0]`` rows, a 1-d
    tensor one row per element, a 0-d tensor a single row.  Non-contiguous
    inputs are read through a contiguous copy; ``x`` itself is never changed.
    Big-endian numpy arrays are stored by value: they decompress to the same
    values in native byte order (``ct.dtype`` is the native dtype).

    model:     a Model from ``analyze``; learned from ``x`` when None.
    word_bits: force 8, 16, 32 or 64-bit words (default: the best measured).
    layout:    "packed" (rows back to back: smallest) or "slotted" (each
               unit keeps a raw-size slot: rows can be rewritten in place
               with ``CompressedTensor.update_rows``).
    unit_rows: rows per unit (default: rows under 4 KiB are grouped,
               which is smallest and fastest).  1 makes every row its own
               unit, so a gather reads only the rows it asks for: the
               choice for tables that are mostly read by index
               (embeddings, feature stores).
    payload:   CUDA tensors only: "pinned" (default: the payload lands in
               pinned host memory) or "device" (it stays in GPU memory).
    """
    if dtypes.is_torch(x) and x.device.type == "cuda":
        word_bits = _check_options(word_bits, layout, unit_rows)
        from . import cuda_encode
        return cuda_encode.compress(x, model=model, word_bits=word_bits, layout=layout, unit_rows=unit_rows,
                                    payload="pinned" if payload is None else payload)
    if payload is not None:
        _check_options(word_bits, layout, unit_rows)
        raise ValueError("payload= chooses where a CUDA tensor's payload goes; this tensor is not on a GPU")
    return compress_bytes(*dtypes.as_bytes(x), model=model, word_bits=word_bits, layout=layout, unit_rows=unit_rows)


def check_word_bits(word_bits):
    """``word_bits`` as a plain int (or None), after checking it is 8, 16, 32
    or 64: 16.0 equals 16, but would reach the compiled kernels, and the
    caches keyed by it, as a float."""
    if word_bits is None:
        return None
    if isinstance(word_bits, bool) or not isinstance(word_bits, numbers.Integral):
        raise TypeError(f"word_bits must be an integer (8, 16, 32 or 64) or None, not {type(word_bits).__name__}")
    if word_bits not in (8, 16, 32, 64):
        raise ValueError(f"word_bits must be 8, 16, 32 or 64, got {word_bits!r}")
    return int(word_bits)


def _check_options(word_bits, layout, unit_rows):
    """The checked ``word_bits`` (see ``check_word_bits``), after checking the other options."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if unit_rows is not None and (isinstance(unit_rows, bool) or not isinstance(unit_rows, int) or unit_rows < 1):
        raise ValueError(f"unit_rows must be None or a positive integer, got {unit_rows!r}")
    return check_word_bits(word_bits)


def compress_bytes(data, name, shape, framework, *, model=None, word_bits=None, layout="packed", unit_rows=None,
                   learn=analysis.analyze_bytes):
    """``compress`` of a tensor given as its flat read-only uint8 C-order
    bytes (``dtypes.as_bytes``), its dtype name, shape and framework: what a
    checkpoint reader has in hand, with no tensor object built around it.
    ``learn(data, shape, itemsize, word_bits)`` learns the model when none
    is given (a checkpoint's: ``analysis.Reuse.role``)."""
    word_bits = _check_options(word_bits, layout, unit_rows)
    itemsize = dtypes.ITEMSIZE.get(name)
    if itemsize is None:
        raise TypeError(f"ibp cannot compress dtype {name!r}: use one of {sorted(dtypes.ITEMSIZE)}")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1 and data.flags.c_contiguous
            and data.size == math.prod(shape) * itemsize):
        raise ValueError(f"data must be the {math.prod(shape) * itemsize} bytes of a {name} tensor of shape "
                         f"{tuple(shape)} as a flat contiguous uint8 array")
    if model is None and learn is analysis.analyze_bytes and word_bits is None and layout == "packed" \
            and unit_rows is None:
        whole = analysis.learned_and_encoded(data, tuple(shape), itemsize)   # a bias vector: one compiled call
        if whole is not None:
            model, geom, (kinds, payload, bits, index) = whole
            return CompressedTensor(dtype=name, shape=shape, framework=framework, geometry=geom, layout=layout,
                                    model=model, kinds=kinds, payload=payload, payload_bits=bits, index=index)
    if model is None:
        model = learn(data, shape, itemsize, word_bits)
    elif not isinstance(model, Model):
        raise TypeError(f"model must be an ibp.Model, not {type(model).__name__}")
    elif word_bits is not None and word_bits != model.word_bits:
        raise ValueError(f"word_bits={word_bits} contradicts the model's {model.word_bits}-bit words")
    geom = Geometry.checked(shape, itemsize, model.word_bits, unit_rows)
    if geom.unit_words % model.period:
        raise ValueError(f"the model's period {model.period} does not divide this tensor's "
                         f"{geom.unit_words}-word units")
    common = dict(dtype=name, shape=shape, framework=framework, geometry=geom, layout=layout, model=model)
    if layout == "packed":
        kinds, payload, bits, index = encode_packed(data, geom, model)
        return CompressedTensor(kinds=kinds, payload=payload, payload_bits=bits, index=index, **common)
    kinds, payload = encode_slotted(data, geom, model)
    return CompressedTensor(kinds=kinds, payload=payload, **common)


def decompress(ct: CompressedTensor, *, index: Index | None = None, out: Tensor | None = None,
               device: Device = None, path: Literal["auto", "zero-copy", "stream"] = "auto") -> Tensor:
    """Restore a CompressedTensor, bit for bit, as the kind of object that
    went in (numpy array or torch tensor).

    index:  rows to gather (any integer dtype, any shape; negative counts
            from the end), decoded in the same pass: the result equals
            ``x[index]``.  Out-of-range rows raise IndexError.
    out:    a caller's buffer of the result's dtype and shape to write into.
    device: None or a CPU device ("cpu", "cpu:0", torch.device("cpu"))
            decodes here; "cuda" (or a CUDA device) decodes on
            the GPU, on torch's current stream, and returns a CUDA tensor.
    path:   on the GPU, "auto" or force "zero-copy" / "stream" (see ibp.cuda).
    """
    if not isinstance(ct, CompressedTensor):
        raise TypeError(f"decompress takes a CompressedTensor, not {type(ct).__name__}")
    kind = "cuda" if isinstance(device, int) and not isinstance(device, bool) else \
        "cpu" if device is None else str(device).partition(":")[0]   # an int is a CUDA device, as torch says
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be None, a CPU or a CUDA device, not {device!r}")
    if kind == "cuda":
        from . import cuda
        return cuda.decompress(ct, index=index, out=out, device=device, path=path)
    check_mapped_file(ct.payload)
    if path != "auto":
        raise ValueError(f"path={path!r} chooses between GPU paths; decoding on the CPU takes path='auto'")
    rows, shape = None, ct.shape
    if index is not None:
        if len(ct.shape) == 0:
            raise IndexError("a 0-d tensor has no rows to index")
        rows, ishape = normalize_index(index, ct.nrows)
        shape = tuple(ishape) + ct.shape[1:]
    if out is None:
        result, out_bytes = dtypes.empty(shape, ct.dtype_name, ct.framework)
    else:
        result, out_bytes = out, dtypes.output_view(out, shape, ct.dtype_name)
    decode_into(ct, out_bytes, rows)
    return result


def compress_tensors(tensors: Mapping[str, Tensor | CompressedTensor]) -> dict[str, CompressedTensor]:
    """Compress a checkpoint's tensors, in order (compressed ones are kept):
    a tensor learns its model only where its role's model from an earlier
    layer does not fit it (``analysis.Reuse``); a CUDA tensor always
    learns its own (``ibp.cuda_encode``)."""
    reuse = analysis.Reuse()
    out = {}
    for k, v in tensors.items():
        if isinstance(v, CompressedTensor):
            out[k] = v
        elif dtypes.is_torch(v) and v.device.type == "cuda":
            out[k] = compress(v)
        else:
            out[k] = compress_bytes(*dtypes.as_bytes(v), learn=reuse.role(str(k)))
    return out


def save(obj: CompressedTensor | Mapping[str, Tensor | CompressedTensor], path: Path | WritableFile, *,
         metadata: Mapping[str, str] | None = None) -> None:
    """Write one CompressedTensor, or a mapping of names to tensors (numpy,
    torch or already compressed: a whole checkpoint), to an ibp file.

    ``path`` is a file name (written to a temporary name, then renamed, so
    a crash leaves the old file or the new one) or a binary file object
    (anything with ``write``), written at its position."""
    if isinstance(obj, CompressedTensor):
        tensors = {None: obj}
    elif isinstance(obj, Mapping):
        for k in obj:
            if not isinstance(k, str) or not k:
                raise TypeError(f"checkpoint names must be non-empty strings, got {k!r}")
        tensors = compress_tensors(obj)
    else:
        raise TypeError(f"save takes a CompressedTensor or a mapping, not {type(obj).__name__}")
    if metadata is not None and not (isinstance(metadata, Mapping) and
                                     all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise TypeError("metadata must map strings to strings")
    if _is_path(path):
        save_file(path, tensors, metadata)
    elif callable(getattr(path, "write", None)):
        write_stream(path, tensors, metadata)
    else:
        raise TypeError(f"save writes to a path or a binary file object (with write()), not {type(path).__name__}")


def load(path: Path | ReadableFile, *, mmap: bool = False,
         verify: bool = True) -> CompressedTensor | dict[str, CompressedTensor]:
    """Read an ibp file: a CompressedTensor if it holds a single unnamed
    tensor, else a dict of name -> CompressedTensor.

    ``path`` is a file name or a binary file object (anything with
    ``read``), read from its position to the end of the ibp file there (so
    several saved one after another load one after another).  ``mmap=True``
    maps the file instead of reading it (a path or a file opened with
    ``open()``; anything else is a ValueError); ``verify`` checks every
    section's CRC and, for the slotted layout, every unit's encoding
    (reading the whole file, every page of a memory map, once here)."""
    if _is_path(path):
        tensors = load_file(path, mmap_mode=mmap, verify=verify)
    elif callable(getattr(path, "read", None)):
        tensors = loads(map_stream(path) if mmap else read_stream(path), verify=verify)
    else:
        raise TypeError(f"load reads a path or a binary file object (with read()), not {type(path).__name__}")
    if list(tensors) == [None]:
        return tensors[None]
    return tensors


def load_metadata(path: Path) -> dict[str, str]:
    """The string-to-string metadata saved with an ibp file (``save(...,
    metadata=...)``), reading only the file's header."""
    return read_metadata(path)


def _is_path(path):
    return isinstance(path, (str, bytes, os.PathLike))
