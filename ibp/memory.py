"""Where a CompressedTensor's arrays live: exactly pinned host memory, shared
memory that other processes map, and how a tensor pickles.

* **Pinning** registers the payload's own pages with CUDA
  (``cudaHostRegister``), so the GPU reads it at its host address.  A copy
  goes to a page-aligned buffer of exactly the payload's size first, where
  torch's caching host allocator would round up to a power of two (up to
  twice the host RAM).  A shared payload is registered where it lies: one
  host copy, registered once in every process that pins it.
* **Sharing** moves the payload and the per-unit arrays into one torch
  shared-memory tensor.  torch.multiprocessing's pickler sends such a tensor
  as a handle (a file descriptor), so a shared CompressedTensor sent to a
  DataLoader worker, through a queue or as an ``mp.spawn`` argument maps
  the same memory in the receiver.  The plain ``pickle`` module copies it.
"""
import mmap
import sys
import warnings
import weakref

import numpy as np

from .model import Model

CUDA_HOST_REGISTER_FLAGS = 1 | 2   # cudaHostRegisterPortable | cudaHostRegisterMapped
ALIGN = 64                         # byte offset of every array in a shared segment


# -- registering host memory with CUDA ---------------------------------------
class CudaHostRegistrar:
    """cudaHostRegister / cudaHostUnregister through torch's CUDA runtime."""

    def __init__(self):
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("pin_memory needs a CUDA GPU: torch sees none")
        self._cudart = torch.cuda.cudart()

    @staticmethod
    def _check(err, what):
        code = int(getattr(err, "value", err))
        if code:
            raise RuntimeError(f"{what} failed with CUDA error {code}")

    def register(self, address, nbytes):
        self._check(self._cudart.cudaHostRegister(address, nbytes, CUDA_HOST_REGISTER_FLAGS), "cudaHostRegister")

    def unregister(self, address):
        self._check(self._cudart.cudaHostUnregister(address), "cudaHostUnregister")


def registrar():
    """The object that page-locks host memory (tests substitute a fake)."""
    return CudaHostRegistrar()


class HostRegistration:
    """Host memory page-locked and registered with CUDA while this object
    lives: ``keep`` holds the memory, and the registration ends (unregister)
    when the last owner lets go, before the memory can be unmapped."""

    def __init__(self, array, keep):
        self.address = array.ctypes.data
        self.nbytes = array.nbytes
        self.keep = keep
        owner = registrar()
        owner.register(self.address, self.nbytes)
        weakref.finalize(self, owner.unregister, self.address)


_registered = weakref.WeakValueDictionary()   # address -> HostRegistration, this process


def register(array, keep):
    """The registration of ``array``'s memory, made once per process: a second
    CompressedTensor over the same shared memory reuses it (CUDA refuses to
    register a range twice)."""
    reg = _registered.get(array.ctypes.data)
    if reg is None or reg.nbytes != array.nbytes:
        reg = HostRegistration(array, keep)
        _registered[reg.address] = reg
    return reg


def page_aligned_copy(array):
    """A writeable copy of ``array`` in its own page-aligned, private
    anonymous mapping of exactly its size (rounded up to whole pages)."""
    buf = mmap.mmap(-1, max(array.nbytes, 1), flags=mmap.MAP_PRIVATE)
    out = np.frombuffer(buf, np.uint8, count=array.nbytes).view(array.dtype)
    out[:] = array
    return out


# -- shared memory -------------------------------------------------------------
def _arrays(ct):
    """Name -> the tensor's arrays that move to shared memory (payload first,
    so it starts a page of its own and can be registered alone)."""
    out = {"payload": ct.payload, "kinds": ct.kinds}
    if ct.index is not None:
        out["index_base"], out["index_rel"] = ct.index[2], ct.index[3]
    return out


def _layout(arrays):
    """Name -> (offset, nbytes, dtype str) in a segment, and its total size."""
    spans, offset = {}, 0
    for name, a in arrays.items():
        spans[name] = (offset, a.nbytes, a.dtype.str)
        offset = -(-(offset + a.nbytes) // ALIGN) * ALIGN
    return spans, max(offset, 1)


def _views(segment, spans):
    """Read-only numpy views of a segment (a CPU uint8 torch tensor)."""
    flat = segment.numpy()
    out = {}
    for name, (offset, nbytes, dtype) in spans.items():
        view = flat[offset:offset + nbytes].view(dtype)
        view.flags.writeable = False
        out[name] = view
    return out


def _install(ct, segment, spans):
    views = _views(segment, spans)
    ct.payload, ct.kinds = views["payload"], views["kinds"]
    if ct.index is not None:
        ct.index = (ct.index[0], ct.index[1], views["index_base"], views["index_rel"])
    ct._shared = (segment, spans)


def share(ct):
    """Move ``ct``'s payload and per-unit arrays into one shared-memory torch
    tensor, in place (the model is small and pickles by value)."""
    import torch
    arrays = _arrays(ct)
    spans, total = _layout(arrays)
    segment = torch.empty(total, dtype=torch.uint8).share_memory_()
    flat = segment.numpy()
    for name, a in arrays.items():
        offset, nbytes, _ = spans[name]
        flat[offset:offset + nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    was_pinned = ct._pinned is not None
    _install(ct, segment, spans)
    ct._pinned = register(ct.payload, segment) if was_pinned else None


# -- pickling --------------------------------------------------------------------
def _fields(ct):
    m = ct.model
    index = None if ct.index is None else ct.index[:2]
    return dict(dtype=ct.dtype_name, shape=ct.shape, framework=ct.framework, geometry=ct.geometry,
                layout=ct.layout, model=(m.word_bits, m.lo, m.hi, m.base, m.rotate, m.gather),
                payload_bits=ct.payload_bits, index=index)


def reduce(ct, protocol):
    """``CompressedTensor.__reduce_ex__``: a shared tensor as its segment (a
    torch tensor, which torch.multiprocessing sends as a handle), any other
    as its arrays by value.  Protocols below 3 (torch.save uses 2) spell
    numpy's bytes as latin-1 text, half again as long, so there the arrays
    go as uint8 torch tensors when torch is loaded (torch.save writes those
    as raw storages).  Pinning, GPU state and memory maps stay behind: the
    receiver gets plain memory, or the same shared memory."""
    if ct._shared is not None:
        return rebuild_shared, (_fields(ct), *ct._shared)
    arrays = _arrays(ct)
    torch = sys.modules.get("torch")
    if protocol < 3 and torch is not None:
        with warnings.catch_warnings():   # a read-only array (a loaded file): torch.save only reads it
            warnings.simplefilter("ignore", UserWarning)
            blobs = {name: (torch.from_numpy(np.ascontiguousarray(a).reshape(-1).view(np.uint8)), a.dtype.str)
                     for name, a in arrays.items()}
        return rebuild_from_torch, (_fields(ct), blobs)
    return rebuild, (_fields(ct), arrays)


def rebuild(fields, arrays):
    from .tensor import CompressedTensor
    fields = dict(fields)
    fields["model"] = Model(*fields["model"])
    index = fields.pop("index")
    if index is not None:
        index = (*index, arrays["index_base"], arrays["index_rel"])
    return CompressedTensor(**fields, kinds=arrays["kinds"], payload=arrays["payload"], index=index)


def rebuild_from_torch(fields, blobs):
    """The receiving side of ``reduce``'s torch tensors: numpy views of them."""
    return rebuild(fields, {name: t.numpy().view(dtype) for name, (t, dtype) in blobs.items()})


def rebuild_shared(fields, segment, spans):
    """The receiving side: views over the segment, which is the sender's
    shared memory when it came through torch.multiprocessing (a private copy
    when it came through plain pickle, and then the tensor is not shared)."""
    ct = rebuild(fields, _views(segment, spans))
    if segment.is_shared():
        ct._shared = (segment, spans)
    return ct
