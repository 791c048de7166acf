"""Element types: one name per type, shared by numpy, torch and the format.

The codec only ever sees bytes, so a type needs a name, an item size, and a
way to view arrays of it as bytes and back.  numpy gets bfloat16 and float8
from ``ml_dtypes`` when it is installed; torch is optional everywhere.
"""
import functools
import sys
import threading

import numba
import numpy as np

from . import pages
from ._bits import frozen

# name -> item size in bytes.  Names follow torch where numpy has no type.
ITEMSIZE = {
    "bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
    "int64": 8, "uint64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "complex64": 8, "complex128": 16,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
}


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def is_torch(x):
    torch = sys.modules.get("torch")   # not imported yet: x cannot be a tensor (and importing costs)
    return torch is not None and isinstance(x, torch.Tensor)


def name_of_numpy(dtype):
    """The format name of a numpy dtype, or TypeError."""
    dtype = np.dtype(dtype)
    name = _NUMPY_NAMES.get(dtype)
    if name is not None:
        return name
    name = dtype.name
    if name in ITEMSIZE and dtype.itemsize == ITEMSIZE[name] and not dtype.fields:
        if dtype.isnative:
            _NUMPY_NAMES[dtype] = name
        return name
    raise TypeError(f"ibp cannot compress numpy dtype {dtype!r}: use one of {sorted(ITEMSIZE)}")


_NUMPY_NAMES = {}   # native numpy dtype -> format name: dtype.name builds a new string each time (~0.5 us)


@functools.lru_cache(maxsize=None)
def name_of_torch(dtype):
    name = str(dtype).removeprefix("torch.")
    if name in ITEMSIZE:
        return name
    raise TypeError(f"ibp cannot compress torch dtype {dtype}: use one of {sorted(ITEMSIZE)}")


def numpy_dtype(name):
    """The numpy dtype for a name; bfloat16/float8 need ml_dtypes."""
    try:
        return np.dtype(name)
    except TypeError:
        pass
    try:
        import ml_dtypes
        return np.dtype(getattr(ml_dtypes, name))
    except (ImportError, AttributeError):
        raise TypeError(f"numpy has no {name} type here: install ml_dtypes, or use torch") from None


def torch_dtype(name):
    torch = _torch()
    if torch is None:
        raise TypeError(f"a {name} tensor needs torch to be returned as a torch tensor")
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise TypeError(f"this torch has no {name} type")
    return dt


def as_bytes(x):
    """(flat read-only uint8 view of x's C-order bytes, dtype name, shape,
    framework).

    Non-contiguous and non-native-endian inputs, and torch's lazy conjugate
    and negative views, are copied; x is never modified.  Read-only, so the
    kernels that read it take it as it is (see ``_bits.frozen``).
    """
    if is_torch(x):
        if x.device.type != "cpu":
            raise ValueError(f"compress takes CPU tensors; this one is on {x.device}")
        if x.layout is not sys.modules["torch"].strided or x.is_nested:
            raise TypeError(f"compress takes dense tensors, not {'nested' if x.is_nested else x.layout} ones: "
                            "call .to_dense() (or .to_padded_tensor()) first")
        name = name_of_torch(x.dtype)
        t = x.detach() if x.requires_grad else x
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        if not t.is_contiguous():
            t = t.contiguous()
        if t.ndim != 1:
            t = t.reshape(-1)
        data = t.view(sys.modules["torch"].uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
        return frozen(data), name, tuple(x.shape), "torch"
    if isinstance(x, np.generic):
        x = np.asarray(x)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"compress takes a numpy array or a torch tensor, not {type(x).__name__}")
    if isinstance(x, np.ma.MaskedArray):   # its values would come back, its mask would not
        raise TypeError("compress takes plain arrays: compress a masked array's .data and "
                        "np.ma.getmaskarray(x) apart")
    name = name_of_numpy(x.dtype)
    if not (x.flags.c_contiguous and x.dtype.isnative):
        x = c_order_copy(x)
    flat = np.ndarray((x.nbytes,), np.uint8, x)   # read-only where x is
    if flat.flags.writeable:
        flat.flags.writeable = False
    return flat, name, x.shape, "numpy"


# Copies of at least this many bytes are split across ibp's threads (numba's
# count): numpy lets go of the GIL while it copies, and a Fortran-order
# table (GloVe's .npy, 80 MB) copied 1.7x faster on two threads than on one.
PARALLEL_COPY_BYTES = 8 << 20


def c_order_copy(x):
    """A C-contiguous, native byte order copy of the numpy array ``x``, the
    rows split across ibp's threads when it is big: a strided copy (a
    transposed or Fortran-order array) took 40% of compressing one."""
    out = np.empty(x.shape, x.dtype.newbyteorder("="))
    threads = min(numba.get_num_threads(), x.shape[0] if x.ndim else 1)
    if threads < 2 or x.nbytes < PARALLEL_COPY_BYTES:
        np.copyto(out, x)
        return out
    bounds = [k * x.shape[0] // threads for k in range(threads + 1)]
    errors = []

    def copy(k):
        try:
            np.copyto(out[bounds[k]:bounds[k + 1]], x[bounds[k]:bounds[k + 1]])
        except BaseException as e:   # (memory errors): raised by the caller's thread
            errors.append(e)
    helpers = [threading.Thread(target=copy, args=(k,)) for k in range(1, threads)]
    for t in helpers:
        t.start()
    copy(0)
    for t in helpers:
        t.join()
    if errors:
        raise errors[0]
    return out


def empty(shape, name, framework):
    """(a new uninitialised array or tensor, its flat uint8 view)."""
    if framework == "torch":
        torch = _torch()
        if torch is not None:
            t = torch.empty(shape, dtype=torch_dtype(name))
            if not t.numel():
                return t, np.zeros(0, np.uint8)
            flat = (t if t.ndim == 1 else t.reshape(-1)).view(torch.uint8).numpy()
            pages.advise(flat)  # torch does not ask for huge pages (numpy does)
            return t, flat
    a = np.empty(shape, numpy_dtype(name))
    return a, a.reshape(-1).view(np.uint8)


def claim_torch_output(out):
    """Refuse a torch ``out`` that requires grad, and count the write to come
    as an in-place op: decompress writes behind autograd's back, so without
    the version bump a graph that saved ``out``'s old values would give wrong
    gradients silently, where torch raises for ``out.copy_(...)``."""
    if out.requires_grad:
        raise ValueError("out requires grad: autograd cannot see decompress write it (torch refuses in-place "
                         "copies into such tensors too); pass a tensor that does not require grad")
    sys.modules["torch"].autograd.graph.increment_version(out)


def output_view(out, shape, name):
    """Flat uint8 view of a caller's ``out`` buffer, after checking it fits."""
    if is_torch(out):
        if out.device.type != "cpu":
            raise ValueError(f"out is on {out.device}; pass device='cuda' to decompress there")
        got_name = str(out.dtype).removeprefix("torch.")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
        if out.is_conj() or out.is_neg():
            raise ValueError("out is a lazy conjugate or negative view, whose bytes are not its values: "
                             "pass a plain tensor (out.resolve_conj().resolve_neg() is a copy)")
        data = out.reshape(-1).view(_torch().uint8).numpy() if out.numel() else np.zeros(0, np.uint8)
    elif isinstance(out, np.ndarray):
        got_name = out.dtype.name
        if isinstance(out, np.ma.MaskedArray):   # its values would be written, its mask left as it was
            raise TypeError("out must be a plain array, not a masked array: pass out.data")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be a writeable C-contiguous array")
        if not out.dtype.isnative:
            raise ValueError(f"out has non-native byte order ({out.dtype.str}): decompress writes native-order "
                             f"values; pass an out of dtype {out.dtype.newbyteorder('=').str}")
        # a plain ndarray over the same memory: a subclass's reshape can keep two dimensions (np.matrix),
        # and the kernels index the bytes as one
        data = np.ndarray((out.nbytes,), np.uint8, out.view(np.ndarray))
    else:
        raise TypeError(f"out must be a numpy array or torch tensor, not {type(out).__name__}")
    if got_name != name or tuple(out.shape) != tuple(shape):
        raise ValueError(f"out is {got_name}{list(out.shape)}, need {name}{list(shape)}")
    if is_torch(out):   # once every check passed: an out refused is not counted as written
        claim_torch_output(out)
    return data
