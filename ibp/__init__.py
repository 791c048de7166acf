"""ibp: lossless Invariant Bit Packing of tensors for fast CPU->GPU transfer."""
from . import _source_tree

_source_tree.install()

from .api import analyze, compress, decompress, load, load_metadata, save
from .errors import FormatError
from .lazy import LazyFile, TensorInfo, open
from .model import Model
from .tensor import CompressedTensor

__version__ = "0.1.0"
__all__ = ["analyze", "compress", "decompress", "load", "load_metadata", "open", "save", "CompressedTensor",
           "FormatError", "LazyFile", "Model", "TensorInfo"]
