"""Files on disk as ibp replaces and maps them.

A file is replaced by renaming a new one into its place (a crash leaves
the old file or the new one), keeping what writing it in place would keep.
A tensor mapped from a file reads the file's pages when it is decoded, and
the operating system ends a process that reads past the end of a file cut
shorter since (SIGBUS): decoding first checks that its bytes are still there.
"""
import mmap
import os
import stat

import numpy as np

from .errors import FormatError


def keep_mode(old, new):
    """Give ``new`` the permission bits of ``old``, if ``old`` exists: a
    private file or directory replaced stays private."""
    try:
        mode = os.stat(old).st_mode
    except FileNotFoundError:
        return
    os.chmod(new, stat.S_IMODE(mode) & 0o777)


def check_mapped_file(payload):
    """FormatError where ``payload`` views a memory map (``ibp.load(...,
    mmap=True)``, ``ibp.open``) whose file no longer holds its bytes: a file
    rewritten in place, cut shorter.  A file cut while a decode reads it
    still ends the process: replace files by renaming, as ``ibp.save`` does."""
    base = getattr(payload, "base", None)   # a GPU-resident payload has none
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.base if isinstance(base, np.ndarray) else base.obj
    if isinstance(base, mmap.mmap) and _file_size(base) < len(base):   # the file was cut: up to the payload?
        check_map(base, payload.ctypes.data + payload.nbytes - np.frombuffer(base, np.uint8, count=1).ctypes.data)


def check_map(m, end):
    """FormatError where the file of the memory map ``m`` ends before byte ``end``."""
    size = _file_size(m)
    if size < end:
        raise FormatError(f"the file this tensor is mapped from has shrunk to {size} bytes since it was "
                          f"mapped, and its bytes ran to {end} (rewritten in place): load it again")


def _file_size(m):
    """The size of the file under the memory map ``m`` now (its length for an anonymous map)."""
    try:
        return m.size()
    except OSError:   # an anonymous map (a scratch buffer): no file to cut
        return len(m)
