"""CompressedTensor: the one object every part of ibp passes around."""
from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Literal

import numpy as np

from . import dtypes
from ._typing import Index, Tensor
from .decode import decode_units, normalize_index, unit_bits
from .encode import encode_slots, unpack_kinds

if TYPE_CHECKING:
    import torch

    from .geometry import Geometry
    from .model import Model

# One update_rows at a time, over all tensors: an update reads units before
# it rewrites them, so two concurrent ones could each undo the other's.
_UPDATE_LOCK = threading.Lock()


def framework_dtype(name: str, framework: str) -> np.dtype | torch.dtype | str:
    """The dtype called ``name`` as ``framework`` spells it (torch.dtype or
    np.dtype), or as numpy does without torch, or the name itself when
    neither has it (bfloat16 without torch or ml_dtypes)."""
    if framework == "torch":
        try:
            return dtypes.torch_dtype(name)
        except TypeError:
            pass
    try:
        return dtypes.numpy_dtype(name)
    except TypeError:
        return name


class CompressedTensor:
    """A tensor in IBP form: model, per-unit kinds, row index and payload.

    Build one with ``ibp.compress`` or ``CompressedTensor.from_bytes``; turn
    it back with ``ibp.decompress``.  Arrays it did not allocate (a loaded
    file, a memory map) are read-only, and ``update_rows`` copies them before
    writing, so nothing a caller handed in is ever modified.
    """

    def __init__(self, *, dtype: str, shape: tuple[int, ...], framework: Literal["numpy", "torch"],
                 geometry: Geometry, layout: Literal["packed", "slotted"], model: Model, kinds: np.ndarray,
                 payload: np.ndarray, payload_bits: int | None = None,
                 index: tuple[int, int, np.ndarray, np.ndarray] | None = None):
        self.dtype_name = dtype
        self._shape = tuple(map(int, shape))
        self.framework = framework
        self.geometry = geometry
        self.layout = layout
        self.model = model
        self.kinds = kinds
        self.payload = payload
        self.payload_bits = payload_bits
        self.index = index
        self._pinned = None          # ibp.memory.HostRegistration while the payload is page-locked
        self._shared = None          # (segment, spans) while the arrays are in shared memory (ibp.memory)
        self._writes = 0             # odd while update_rows writes: readers retry (see decode._run)
        self._gpu_last_use = None    # ibp.cuda.GpuUses: the GPU's last reads of the host arrays

    # -- what it is ---------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype | torch.dtype | str:
        """The element type as the framework it came from spells it."""
        return framework_dtype(self.dtype_name, self.framework)

    @property
    def ndim(self) -> int:
        return len(self._shape)

    def __len__(self) -> int:
        """Rows, as for a numpy array (TypeError for a 0-d tensor)."""
        if not self._shape:
            raise TypeError("len() of a 0-d CompressedTensor")
        return self._shape[0]

    def __array__(self, dtype: object = None, copy: bool | None = None) -> np.ndarray:
        """Refuse: numpy would make a 0-d object array of this tensor."""
        raise TypeError("a CompressedTensor is not an array: call ibp.decompress(ct) to get one")

    def __bool__(self) -> bool:
        """Always true, like any object: ``len`` would make a tensor of no
        rows false and a 0-d one an error in ``if ct`` or ``ct or ...``."""
        return True

    @property
    def nrows(self) -> int:
        return self.geometry.nrows

    @property
    def word_bits(self) -> int:
        return self.geometry.word_bits

    @property
    def raw_nbytes(self) -> int:
        return math.prod(self._shape) * dtypes.ITEMSIZE[self.dtype_name]

    @property
    def nbytes(self) -> int:
        """Bytes needed to decode: payload, row index, kinds and model."""
        index = 0 if self.index is None else self.index[2].nbytes + self.index[3].nbytes
        m = self.model
        return int(self.payload.nbytes + self.kinds.nbytes + index
                   + m.lo.nbytes + m.hi.nbytes + m.base.size * m.word_bits // 8)

    @property
    def ratio(self) -> float:
        return self.raw_nbytes / self.nbytes

    @property
    def transfer_nbytes(self) -> int:
        """Bytes a full GPU decode reads: ``nbytes`` for the packed layout; for
        the slotted one only each unit's encoded prefix, not its whole slot."""
        if self.layout == "packed":
            return self.nbytes
        return int(((unit_bits(self) + 7) // 8).sum()) + self.nbytes - self.payload.nbytes

    def unit_kinds(self) -> np.ndarray:
        """Kind of every unit (0 raw, 1 all-match, 2 sparse, 3 bitmap)."""
        return unpack_kinds(self.kinds, np.arange(self.geometry.nunits))

    def __repr__(self) -> str:
        return (f"CompressedTensor(shape={self._shape}, dtype={self.dtype_name}, layout={self.layout}, "
                f"word_bits={self.word_bits}, ratio={self.ratio:.3f})")

    # -- bytes --------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """This tensor as a self-contained ibp file (docs/format.md)."""
        from .container import dumps
        return dumps({None: self})

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, *, verify: bool = True) -> CompressedTensor:
        """Parse bytes made by ``to_bytes``; FormatError if they are not valid."""
        from .container import loads
        tensors = loads(data, verify=verify)
        if len(tensors) != 1:
            from .errors import FormatError
            raise FormatError(f"expected one tensor, found {len(tensors)}")
        return next(iter(tensors.values()))

    # -- memory -------------------------------------------------------------
    def pin_memory(self) -> CompressedTensor:
        """A copy whose payload is page-locked and registered with CUDA,
        exactly its bytes (needs torch and a GPU), so a GPU reads it in
        place; its kinds are copied too, so it owns all it may write.  A
        shared tensor is registered where it lies, in this process, and
        returned itself, as is one already pinned."""
        from . import memory
        if self._pinned is not None:
            return self
        if self._shared is not None:
            self._pinned = memory.register(self.payload, self._shared[0])
            return self
        payload = memory.page_aligned_copy(self.payload)
        ct = self._replace(payload=payload, kinds=self.kinds.copy())
        ct._pinned = memory.register(payload, payload)
        return ct

    def is_pinned(self) -> bool:
        """Whether ``payload``'s own memory is page-locked and registered."""
        return self._pinned is not None

    def share_memory_(self) -> CompressedTensor:
        """Move the payload and per-unit arrays into shared memory, in place
        (torch's semantics; needs torch): torch.multiprocessing, DataLoader
        workers and ``mp.spawn`` then pass this tensor as a handle, and the
        receiver maps the same memory.  Shared tensors refuse update_rows."""
        if self._shared is None:
            from . import memory
            memory.share(self)
        return self

    def is_shared(self) -> bool:
        return self._shared is not None

    def __reduce_ex__(self, protocol):
        from . import memory
        return memory.reduce(self, protocol)

    def _replace(self, **changes):
        """A tensor like this one but for ``changes``.  Arrays update_rows may
        write in place (writeable kinds and payload) are copied unless given,
        so an update of either tensor never reaches the other."""
        fields = dict(dtype=self.dtype_name, shape=self._shape, framework=self.framework,
                      geometry=self.geometry, layout=self.layout, model=self.model, kinds=self.kinds,
                      payload=self.payload, payload_bits=self.payload_bits, index=self.index)
        for key in ("kinds", "payload"):
            if key not in changes and fields[key].flags.writeable:
                fields[key] = fields[key].copy()
        fields.update(changes)
        return CompressedTensor(**fields)

    def _wait_for_gpu(self):
        """Block until the GPU's last read of this tensor's host arrays is done,
        so update_rows never rewrites memory a kernel is still reading."""
        if self._gpu_last_use is not None:
            self._gpu_last_use.synchronize()

    # -- in-place updates (slotted layout) ----------------------------------
    def update_rows(self, index: Index, values: Tensor) -> None:
        """Overwrite rows ``index`` with ``values`` (slotted layout only).

        Each affected unit is re-encoded into its own slot with the existing
        model.  Repeated indices take the last value, as numpy assignment does.
        Safe while other threads decode this tensor on the CPU: each reader
        sees every row either as it was or as it is after the update, never
        a mix (a reader that overlaps an update decodes again).  Waits for
        the GPU to finish reading the tensor before it writes.  CUDA values
        are encoded on their GPU (ibp.cuda_encode): only the encoded slots
        cross to the host.
        """
        if self.layout != "slotted":
            raise ValueError("update_rows needs the slotted layout: compress(..., layout='slotted')")
        if self._shared is not None:
            raise ValueError("update_rows refuses a shared tensor (other processes read it without a lock); "
                             "update a private copy, copy.deepcopy(ct), and share that")
        if len(self._shape) == 0:
            raise IndexError("a 0-d tensor has no rows to update")
        rows, _ = normalize_index(index, self.nrows)
        on_gpu = dtypes.is_torch(values) and values.device.type == "cuda"
        if on_gpu and self.model.transforms_words:   # the GPU encoder does not (ibp.rotation): encode here
            values, on_gpu = values.cpu(), False
        if on_gpu:
            data, name, shape = None, dtypes.name_of_torch(values.dtype), tuple(values.shape)
        else:
            data, name, shape, _ = dtypes.as_bytes(values)
        want = (rows.size,) + self._shape[1:]
        if name != self.dtype_name or tuple(shape) != want:
            raise ValueError(f"values are {name}{list(shape)}, need {self.dtype_name}{list(want)}")
        g = self.geometry
        W, U, R = g.word_bits, g.unit_words, g.row_words
        if rows.size == 0 or R == 0:
            return
        with _UPDATE_LOCK:
            self._wait_for_gpu()
            if on_gpu:
                from . import cuda_encode
                self._rewrite_units(*cuda_encode.encode_rows(self, rows, values))
            else:
                self._update_units(rows, data, W, U, R)

    def _update_units(self, rows, data, W, U, R):
        g = self.geometry
        new = data.view(f"<u{W // 8}").reshape(rows.size, R)
        if U >= R:
            per = U // R
            units, where = np.unique(rows // per, return_inverse=True)
            if per > 1:
                block = self._decode_units(units).reshape(units.size, per, R)
                block[where, rows % per] = new
            else:
                block = np.empty((units.size, R), new.dtype)
                block[where] = new
        else:
            split = R // U
            last = np.unique(rows[::-1], return_index=True)[1]
            keep = rows.size - 1 - last
            units = (rows[keep][:, None] * split + np.arange(split)).reshape(-1)
            block = new[keep]
        self._rewrite_units(units, lambda payload: encode_slots(np.ascontiguousarray(block).reshape(-1).view(np.uint8),
                                                                g, self.model, units, payload))

    def _rewrite_units(self, units, write):
        """Run ``write(payload)``, which rewrites the slots of ``units`` and
        returns their kinds, as one update readers can detect."""
        if not self.payload.flags.writeable:
            self.payload = self.payload.copy()
        if not self.kinds.flags.writeable:
            self.kinds = self.kinds.copy()
        self._writes += 1
        try:
            kinds = write(self.payload)
            shift = ((units & 3) * 2).astype(np.uint8)
            np.bitwise_and.at(self.kinds, units >> 2, ~(np.uint8(3) << shift))
            np.bitwise_or.at(self.kinds, units >> 2, kinds << shift)
        finally:
            self._writes += 1

    def _decode_units(self, units):
        g = self.geometry
        out = np.empty(units.size * g.unit_words * g.word_bits // 8, np.uint8)
        decode_units(self, units, out)
        return out.view(f"<u{g.word_bits // 8}")
