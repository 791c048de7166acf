"""Fresh memory asked for in transparent huge pages.

The first touch of fresh memory faults it in page by page, and in 4 KiB
pages that costs more than decoding into it: a new output measured 1.4 GB/s
to fill in 4 KiB pages against 6.5 GB/s in 2 MiB pages (Linux, where
transparent huge pages are granted on request, the common default).  numpy
asks for its own large arrays; torch and ``mmap`` do not, so ibp asks for
the outputs and buffers it allocates through them.

The threads of a parallel kernel fault in the pages they write themselves:
faulting a buffer in first, in one call (MADV_POPULATE_WRITE), made two
threads 0.94x one on a 69 MB tensor (a 2-vCPU VM), against 1.4x without.
"""
import ctypes
import mmap
import sys

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)


def _madvise():
    if not sys.platform.startswith("linux") or MADV_HUGEPAGE is None:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_libc_madvise = _madvise()


def advise(array):
    """Ask for huge pages over the whole 2 MiB pages inside a numpy array's
    memory, before anything touches it; a no-op where the system cannot
    (the memory then simply stays in small pages)."""
    if array.nbytes < HUGE_PAGE or _libc_madvise is None:
        return
    address, nbytes = array.ctypes.data, array.nbytes
    lo = -(-address // HUGE_PAGE) * HUGE_PAGE
    hi = (address + nbytes) // HUGE_PAGE * HUGE_PAGE
    if hi > lo:
        _libc_madvise(lo, hi - lo, MADV_HUGEPAGE)   # refused (EINVAL without THP): nothing to do
