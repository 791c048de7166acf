"""Type aliases for the public API's hints.  torch is optional, so its types
are named as strings: type checkers resolve them, and nothing imports torch
at run time."""
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, Union

import numpy as np

if TYPE_CHECKING:
    import torch

# What compress takes and decompress gives back: a numpy array or a torch tensor.
Tensor = Union[np.ndarray, "torch.Tensor"]
# Rows to gather: an integer, a sequence of them, or an integer array or tensor of any shape.
Index = Union[int, np.integer, Sequence[int], np.ndarray, "torch.Tensor"]
Device = Union[str, "torch.device", None]
Path = Union[str, os.PathLike]


class ReadableFile(Protocol):
    """A binary file object ibp.load can read: ``open(p, "rb")``, io.BytesIO, ..."""

    def read(self, size: int = ..., /) -> bytes: ...


class WritableFile(Protocol):
    """A binary file object ibp.save can write to: ``open(p, "wb")``, io.BytesIO, ..."""

    def write(self, data: bytes, /) -> object: ...
