"""Encoding a tensor's bytes into units: kinds, payload and row index."""
import numba
import numpy as np
from numba import njit

from . import _bits, codec, rotation
from ._bits import WORD_DTYPES, frozen

MAX_BLOCK = 1 << 16
# The index of units that all have the same size: no bytes at all.
UNIFORM_INDEX = (1, 0, frozen(np.zeros(0, np.uint64)), frozen(np.zeros(0, np.uint16)))


def _words(data, model):
    """The bytes as the model's words, rotated or gathered as it asks (ibp.rotation)."""
    return rotation.transformed(frozen(data.view(WORD_DTYPES[model.word_bits])), model.rotate, model.gather)


def pack_kinds(kinds):
    """Four 2-bit kinds per byte, unit 0 in the lowest bits."""
    padded = np.zeros(-(-kinds.size // 4) * 4, np.uint8)
    padded[:kinds.size] = kinds
    q = padded.reshape(-1, 4)
    return (q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)).astype(np.uint8)


def unpack_kinds(packed, units):
    units = np.asarray(units, np.int64)
    return ((packed[units >> 2] >> ((units & 3) * 2).astype(np.uint8)) & 3).astype(np.uint8)


@njit(cache=True)
def _largest_block(starts, limit):
    """Largest power-of-two block (<= MAX_BLOCK) whose units all start less
    than ``limit`` bits after their block's first unit."""
    n = starts.shape[0]
    block = 1
    while block * 2 <= min(MAX_BLOCK, n):
        b = block * 2
        for first in range(0, n, b):
            if starts[min(first + b, n) - 1] - starts[first] >= limit:
                return block
        block = b
    return block


def build_index(starts, total):
    """The row index of units starting at bits ``starts`` in a ``total``-bit
    payload: the uniform index (no bytes at all) when every unit has the same
    size, as raw or all-matching data does, else ``blocked_index``."""
    n = starts.size
    if n and total % n == 0 and np.array_equal(starts, np.arange(n, dtype=np.int64) * (total // n)):
        return UNIFORM_INDEX
    return blocked_index(starts)



def unit_start_bits(index, units, payload_bits, nunits):
    """Start bit of each of ``units`` (int64 array) under a packed row index."""
    block, rel_bits, block_base, rel = index
    if rel_bits == 0:
        return units * (payload_bits // nunits)
    return block_base[units // block].astype(np.int64) + rel[units]


def blocked_index(starts):
    """(block, rel_bits, block_base, rel) with start(u) = block_base[u // block] + rel[u],
    choosing the block size and offset width that take the fewest bytes."""
    block, rel_bits, block_base, rel = _blocked_index(np.ascontiguousarray(starts, np.int64))
    return block, rel_bits, block_base, rel.astype(np.uint16) if rel_bits == 16 else rel


@njit(cache=True)
def _blocked_index(starts):
    """``blocked_index`` in one compiled pass (offsets as uint32)."""
    n = starts.shape[0]
    best, block, rel_bits = -1, 1, 16
    for bits in (16, 32):
        b = _largest_block(starts, 1 << bits)
        size = -(-n // b) * 8 + n * bits // 8
        if best < 0 or size < best:
            best, block, rel_bits = size, b, bits
    block_base = np.empty(-(-n // block), np.uint64)
    rel = np.empty(n, np.uint32)
    for u in range(n):
        if u % block == 0:
            block_base[u // block] = starts[u]
        rel[u] = starts[u] - np.int64(block_base[u // block])
    return block, rel_bits, block_base, rel


@njit(cache=True)
def _layout(kinds, sizes):
    """(packed kinds, unit start bits, total bits, whether every unit has
    the same size) from each unit's kind and size: one compiled pass, as
    the numpy steps cost more than encoding a small tensor."""
    n = kinds.shape[0]
    packed = np.zeros((n + 3) // 4, np.uint8)
    starts = np.empty(n, np.int64)
    pos = 0
    for u in range(n):
        packed[u >> 2] |= np.uint8(kinds[u] << (2 * (u & 3)))
        starts[u] = pos
        pos += sizes[u]
    uniform = n > 0
    for u in range(1, n):
        uniform &= sizes[u] == sizes[0]
    return packed, starts, pos, uniform


# Runs of units per thread in a threaded encode (``codec.encode_runs``):
# one, so that pass one leaves a whole thread's share unsized.  More would
# not even out threads whose units cost more: numba hands each thread one
# stretch of the runs.
RUNS_PER_THREAD = 1


def encode_packed(data, geom, model):
    """(packed kinds, payload words, payload bits, index) of the packed layout.

    One thread encodes the units back to back in one compiled call.
    Several first size the units of every run but the last
    (``codec.size_units``), then encode each run at its final bits
    (``codec.encode_runs``): no run is copied.  Encoding runs into scratch
    and copying them after the runs before made two threads 1.0-1.3x one."""
    n, U, W = geom.nunits, geom.unit_words, geom.word_bits
    t0, t1, fbits, ptot = model.tables
    words = _words(data, model)
    threads = 1 if geom.total_words < _bits.PARALLEL_MIN_WORDS else numba.get_num_threads()   # as Kernel decides
    if threads == 1:
        buf = np.empty(n * -(-U * W // 64) + 1, np.uint64)   # every word up to the last bit is written
        return finish_packed(buf, *_encode_serial(words, U, geom.total_words, t0, t1, W, model.period, fbits, ptot,
                                                  buf))
    runs = threads * RUNS_PER_THREAD
    sized = (runs - 1) * n // runs   # the units before the last run
    kinds, sizes = np.empty(n, np.uint8), np.empty(n, np.int64)
    args = (words, U, geom.total_words, t0, t1, W, model.period, fbits, ptot)
    codec.size_units(geom.total_words, *args, sized, kinds, sizes)
    bound = int(sizes[:sized].sum()) + (n - sized) * U * W   # the last run raw at most
    buf = np.empty(-(-bound // 64) + 1, np.uint64)
    total = codec.encode_runs(geom.total_words, *args, runs, buf, kinds, sizes)
    if total < 0:
        raise RuntimeError("ibp: units encoded to other sizes than counted (a bug: please report it)")
    packed, starts, total, uniform = _layout(kinds, sizes)
    block, rel_bits, block_base, rel = _blocked_index(starts)
    return finish_packed(buf, packed, total, uniform, block, rel_bits, block_base, rel)


def finish_packed(buf, packed, total, uniform, block, rel_bits, block_base, rel):
    """``encode_packed``'s result from ``buf`` encoded up to bit ``total``
    and the laid out kinds and index (``_encode_serial``'s)."""
    buf.resize(-(-total // 64) + 1, refcheck=False)   # + the spare zero word
    buf[-1] = 0
    index = UNIFORM_INDEX if uniform else \
        (block, rel_bits, frozen(block_base), frozen(rel.astype(np.uint16) if rel_bits == 16 else rel))
    packed.flags.writeable = buf.flags.writeable = False   # a packed tensor is never written: read as it is
    return packed, buf, total, index


@njit(cache=True)
def _encode_serial(words, U, total_words, t0, t1, W, p, fbits, ptot, buf):
    """Every unit encoded back to back into ``buf``, and the kinds and row
    index laid out: (packed kinds, payload bits, whether the index is
    uniform, and the blocked index's block, offset width, bases and
    offsets as uint32).  One call: a small tensor cannot afford several."""
    n = (total_words + U - 1) // U
    kinds = np.empty(n, np.uint8)
    sizes = np.empty(n, np.int64)
    if n:
        x, tail = codec.unit_source(words, U, total_words)
        zero = np.int64(0)   # not the literal 0: encode_units then compiles once for every caller
        codec.encode_units(x, tail, n, zero, n, t0, t1, W, p, U, fbits, ptot, codec.scratch(U, words), buf, zero,
                           kinds, sizes)
    packed, starts, total, uniform = _layout(kinds, sizes)
    block, rel_bits, block_base, rel = _blocked_index(starts)
    return packed, total, uniform, block, rel_bits, block_base, rel


def encode_slots(data, geom, model, slots, buf):
    """Encode the units in ``data`` (whole units, last one may be short) into
    ``slots`` of the slotted payload ``buf``; returns their kinds."""
    words = _words(data, model)
    kinds = np.empty(len(slots), np.uint8)
    t0, t1, fbits, ptot = model.tables
    codec.encode_slotted(words.size, words, geom.unit_words, words.size, t0, t1, geom.word_bits, model.period, fbits,
                         ptot, np.asarray(slots, np.int64), geom.slot_words, buf, kinds)
    return kinds


def encode_slotted(data, geom, model):
    buf = np.zeros(geom.nunits * geom.slot_words + 1, np.uint64)  # + the spare zero word
    kinds = encode_slots(data, geom, model, np.arange(geom.nunits), buf)
    return pack_kinds(kinds), buf
