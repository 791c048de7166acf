"""Fresh memory asked for in transparent huge pages, and faulted in before
threads write it.

The first touch of fresh memory faults it in page by page, and in 4 KiB
pages that costs more than decoding into it: a new output measured 1.4 GB/s
to fill in 4 KiB pages against 6.5 GB/s in 2 MiB pages (Linux, where
transparent huge pages are granted on request, the common default).  numpy
asks for its own large arrays; torch and ``mmap`` do not, so ibp asks for
the outputs and buffers it allocates through them.

Two threads faulting in huge pages at once measured 8x slower than one
(58 MB: 60 ms against 7 ms, a 2-vCPU VM): a buffer that a parallel kernel
fills is faulted in first, by the kernel in one call (MADV_POPULATE_WRITE,
Linux 5.14 and later; elsewhere nothing happens and the threads fault it).
"""
import ctypes
import mmap
import sys

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)   # Python 3.11's mmap lacks the name


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


def populate(array):
    """Fault in a numpy array's memory before several threads write it; a
    no-op where the system cannot."""
    if array.nbytes < HUGE_PAGE or _libc_madvise is None:
        return
    address, nbytes = array.ctypes.data, array.nbytes
    lo = address // mmap.PAGESIZE * mmap.PAGESIZE
    _libc_madvise(lo, address + nbytes - lo, MADV_POPULATE_WRITE)   # refused (EINVAL before 5.14): nothing to do
