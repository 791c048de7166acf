"""``ibp.open``: an ibp file's tensors one at a time, without loading the
rest, in the manner of safetensors' ``safe_open``.

Opening maps the file and reads only its preamble and header, which it
checks as ``ibp.load`` does (every entry, every section's bounds, no two
sections overlapping, the file's length).  A tensor's sections are read,
CRC-checked and validated by the container's own code the first time that
tensor is touched, so the other tensors' bytes are never read, and a
corrupted tensor raises FormatError when it is used, not before.  The zero
padding between a tensor's sections is checked with them (as
``stream.Reader`` checks it); the padding between tensors belongs to
neither and is not read.
"""
from __future__ import annotations

import io
import mmap
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import container
from ._typing import Device, Index, Path, Tensor
from .api import decompress
from .files import check_map
from .tensor import CompressedTensor, framework_dtype

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor, known without reading it."""
    name: str | None
    dtype_name: str            # the format's name: "float32", "bfloat16", ...
    shape: tuple[int, ...]
    framework: str             # "numpy" or "torch": what get_tensor returns
    layout: str                # "packed" or "slotted"
    word_bits: int
    nbytes: int                # bytes of its sections in the file: what reading it costs

    @property
    def dtype(self) -> np.dtype | torch.dtype | str:
        """The element type as its framework spells it (as CompressedTensor.dtype)."""
        return framework_dtype(self.dtype_name, self.framework)


class LazyFile:
    """An open ibp file (see ``ibp.open``).  Use it as a context manager, or
    call ``close``; tensors already returned stay valid after it closes."""

    def __init__(self, path: Path, *, verify: bool = True):
        if not isinstance(path, (str, bytes, os.PathLike)):
            raise TypeError(f"ibp.open takes a path, not {type(path).__name__} (ibp.load reads file objects)")
        self.path = os.fsdecode(path)
        self._verify = verify
        with io.open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        try:
            self._metadata, self._start, plans, _ = container._plan_file(self._map)
        except BaseException:
            self.close()
            raise
        self._plans = {fields["name"]: (fields, geom, spans) for fields, geom, spans in plans}
        self._tensors = {}
        self._models = {}   # model sections' bytes -> the Model every tensor that has them shares

    def keys(self) -> list[str | None]:
        """The tensors' names in file order (``[None]`` for a file holding
        one unnamed tensor, as ``ibp.save(ct, path)`` writes)."""
        self._check_open()
        return list(self._plans)

    def metadata(self) -> dict[str, str]:
        """The string-to-string metadata saved with the file."""
        self._check_open()
        return dict(self._metadata)

    def info(self, name: str | None) -> TensorInfo:
        """Shape, dtype, layout and size of tensor ``name``, from the header."""
        fields, geom, spans = self._plan(name)
        return TensorInfo(name=fields["name"], dtype_name=fields["dtype"], shape=fields["shape"],
                          framework=fields["framework"], layout=fields["layout"], word_bits=geom.word_bits,
                          nbytes=sum(length for _, length, _ in spans.values()))

    def get_compressed(self, name: str | None) -> CompressedTensor:
        """Tensor ``name`` as a CompressedTensor whose payload is a view of
        the memory map (its model, kinds and row index are copied): read and
        validated on the first call, as ``ibp.load(path, mmap=True,
        verify=...)`` would, and kept for the next ones."""
        ct = self._tensors.get(name)
        if ct is None:
            fields, geom, spans = self._plan(name)
            (first, end), gaps = container.section_gaps(fields, spans)
            if isinstance(self._map, mmap.mmap):
                check_map(self._map, self._start + end)   # the file rewritten since it was opened
            container._check_zeros(memoryview(self._map)[self._start + first:self._start + end], gaps)
            ct = container._build_entry(self._map, self._start, fields, geom, spans, self._verify, True, self._models)
            self._tensors[name] = ct
        return ct

    def get_tensor(self, name: str | None, *, device: Device = None) -> Tensor:
        """Tensor ``name`` decoded, as the numpy array or torch tensor that was saved."""
        return decompress(self.get_compressed(name), device=device)

    def get_rows(self, name: str | None, index: Index | slice, *, device: Device = None) -> Tensor:
        """Rows ``index`` (integers of any shape, or a slice) of tensor
        ``name``, as ``ibp.decompress(ct, index=index)``: equal to
        ``x[index]``.  With ``verify=False`` only the row index and the units
        holding those rows are read."""
        ct = self.get_compressed(name)
        if isinstance(index, slice):
            if not ct.shape:
                raise IndexError("a 0-d tensor has no rows to slice")
            index = np.arange(*index.indices(ct.nrows))
        return decompress(ct, index=index, device=device)

    def close(self) -> None:
        """Let go of the file.  The map itself goes when the last tensor from
        ``get_compressed`` that views it does."""
        m, self._map = self._map, None
        self._tensors, self._models = {}, {}
        if isinstance(m, mmap.mmap):
            try:
                m.close()
            except BufferError:
                pass

    def __reduce__(self):
        """Pickled as its path: the receiver (a DataLoader worker, a spawned
        process) opens the file again and checks its header itself."""
        self._check_open()
        return _reopen, (os.path.abspath(self.path), self._verify)   # a worker may run elsewhere

    @property
    def closed(self) -> bool:
        return self._map is None

    def __enter__(self) -> LazyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._plans)} tensor{'s' * (len(self._plans) != 1)}"
        return f"<ibp.open {self.path!r}: {state}>"

    def _check_open(self):
        if self._map is None:
            raise ValueError(f"{self.path} is closed")

    def _plan(self, name):
        self._check_open()
        if name not in self._plans:
            names = list(self._plans)[:5]
            raise KeyError(f"{self.path} has no tensor {name!r} (it holds {len(self._plans)}: "
                           f"{', '.join(map(repr, names))}{', ...' if len(self._plans) > 5 else ''})")
        return self._plans[name]


def _reopen(path, verify):
    return LazyFile(path, verify=verify)


def open(path: Path, *, verify: bool = True) -> LazyFile:
    """Open an ibp file for reading one tensor, or rows of it, at a time.

    ::

        with ibp.open("ckpt.ibp") as f:
            for name in f.keys():
                print(name, f.info(name).shape)
            emb = f.get_tensor("emb")
            rows = f.get_rows("emb", [7, 42])

    Only the header is read here; each tensor is read and checked (CRCs
    too when ``verify``) the first time it is used.  ``verify=False`` skips
    the CRCs, so ``get_rows`` reads only the rows' units (each unit decoded
    is still checked: no file can make ibp read out of bounds)."""
    return LazyFile(path, verify=verify)

