"""Outputs and buffers ibp allocates through torch and mmap are asked for in
transparent huge pages, where first touching them is several times cheaper
(ibp/pages.py).  Whether the kernel then grants them depends on the host
(fragmentation, defrag policy), so the tests check the request: the
mapping's VmFlags carry "hg" (MADV_HUGEPAGE)."""
import re

import numpy as np
import pytest

from ibp import dtypes, pages, stream

THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def advised_bytes(address, nbytes):
    """Bytes of [address, address + nbytes) in mappings advised MADV_HUGEPAGE."""
    total = 0
    with open("/proc/self/smaps") as f:
        text = f.read()
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        lo, hi = (int(v, 16) for v in block.split(None, 1)[0].split("-"))
        flags = re.search(r"VmFlags:(.*)", block)
        if flags and "hg" in flags.group(1).split():
            total += max(0, min(hi, address + nbytes) - max(lo, address))
    return total


def thp_on_request():
    try:
        with open(THP) as f:
            mode = re.search(r"\[(\w+)\]", f.read()).group(1)
    except (OSError, AttributeError):
        return False
    return mode in ("always", "madvise") and pages._libc_madvise is not None


@pytest.mark.skipif(not thp_on_request(), reason="this system grants no transparent huge pages on request")
@pytest.mark.parametrize("make", ["torch", "scratch"])
def test_big_buffers_ask_for_huge_pages(make):
    nbytes = 16 << 20
    if make == "torch":
        pytest.importorskip("torch")
        keep, flat = dtypes.empty((nbytes // 4,), "float32", "torch")
    else:
        keep = stream.scratch(nbytes)
        flat = np.frombuffer(keep, np.uint8)
    flat[:] = 1    # the first touch
    if make == "scratch":
        assert flat.ctypes.data % pages.HUGE_PAGE == 0   # its first 2 MiB a huge page too
    whole_pages = flat.nbytes - 2 * pages.HUGE_PAGE     # the 2 MiB pages inside the buffer, at least
    assert advised_bytes(flat.ctypes.data, flat.nbytes) >= whole_pages
    assert (flat == 1).all()


def test_advise_takes_any_array():
    for a in (np.zeros(0, np.uint8), np.zeros(7, np.uint8), np.arange(5 << 20, dtype=np.uint8)[3:]):
        before = a.copy()
        pages.advise(a)
        assert np.array_equal(a, before)
