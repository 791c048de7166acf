"""Decoding on the CPU: turn a request (whole tensor or rows by index) into
unit jobs and run the numba decoder over them."""
import time

import numba
import numpy as np
from numba import njit

from . import _bits, codec, rotation
from ._bits import WORD_DTYPES, frozen
from .errors import FormatError

NO_BASE, NO_REL = frozen(np.zeros(0, np.uint64)), frozen(np.zeros(0, np.uint16))  # a slotted tensor's (absent) row index


@njit(cache=True)
def _spans(units, packed_kinds, slot_bits, block, rel_bits, block_base, rel, payload_bits, nunits):
    """(start bit, end bit, kind) of each of ``units``: slots of
    ``slot_bits`` (slotted), else the packed row index (docs/format.md).
    One compiled pass: the numpy steps cost more than decoding a small
    tensor."""
    n = units.shape[0]
    starts = np.empty(n, np.int64)
    ends = np.empty(n, np.int64)
    kinds = np.empty(n, np.uint8)
    size = payload_bits // nunits if nunits else 0
    for i in range(n):
        u = units[i]
        kinds[i] = (packed_kinds[u >> 2] >> np.uint8(2 * (u & 3))) & np.uint8(3)
        if slot_bits:
            starts[i] = u * slot_bits
            ends[i] = starts[i] + slot_bits
        elif rel_bits == 0:
            starts[i] = u * size
            ends[i] = payload_bits if u == nunits - 1 else starts[i] + size
        else:
            starts[i] = np.int64(block_base[u // block]) + np.int64(rel[u])
            v = u + 1
            ends[i] = payload_bits if v >= nunits else np.int64(block_base[v // block]) + np.int64(rel[v])
    return starts, ends, kinds


def unit_spans(ct, units):
    """(start bit, end bit, kind) of the given units."""
    units = np.asarray(units, np.int64)
    if ct.layout == "slotted":
        return _spans(units, frozen(ct.kinds), ct.geometry.slot_words * 64, 1, 0, NO_BASE, NO_REL, 0,
                      ct.geometry.nunits)
    block, rel_bits, block_base, rel = ct.index
    return _spans(units, frozen(ct.kinds), 0, block, rel_bits, frozen(block_base), frozen(rel), ct.payload_bits,
                  ct.geometry.nunits)


def normalize_index(index, nrows):
    """Row numbers as int64 (negative ones counted from the end), or IndexError."""
    idx = np.asarray(index)
    if idx.size == 0 and idx.dtype == np.float64:  # [] is an empty integer index, as in numpy
        idx = idx.astype(np.int64)
    if idx.dtype == np.bool_ or not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"index must hold integers, not {idx.dtype}")
    if idx.dtype == np.uint64 and idx.size and idx.max() > np.iinfo(np.int64).max:
        raise IndexError(f"index out of range for {nrows} rows")
    flat = idx.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < -nrows or flat.max() >= nrows):
        bad = flat[(flat < -nrows) | (flat >= nrows)][0]
        raise IndexError(f"index {bad} is out of range for {nrows} rows")
    return np.where(flat < 0, flat + nrows, flat), idx.shape


def jobs(ct, rows):
    """(unit, src word, length, dst word) per job that gathers ``rows``
    (a whole tensor is decoded unit by unit instead: ``decode_span``)."""
    g = ct.geometry
    U, R = g.unit_words, g.row_words
    slot = np.arange(rows.size, dtype=np.int64)
    if U >= R:
        per = U // R
        return rows // per, (rows % per) * R, np.full_like(rows, R), slot * R
    split = R // U
    units = (rows[:, None] * split + np.arange(split)).reshape(-1)
    dst = (slot[:, None] * R + np.arange(split) * U).reshape(-1)
    return units, np.zeros_like(units), np.full_like(units, U), dst


def decode_into(ct, out_bytes, rows=None):
    """Decode all rows, or ``rows`` in order, into the flat byte buffer."""
    if ct.geometry.row_words == 0:
        return
    if rows is not None:
        _run(ct, *jobs(ct, rows), out_bytes)
        return
    decode_span(ct, 0, ct.geometry.nunits, out_bytes)


def spans(ct, max_bytes):
    """(first unit, end unit, bytes) of consecutive unit ranges that cover
    the tensor, each decoding to at most ``max_bytes`` (or one unit)."""
    g = ct.geometry
    wb = g.word_bits // 8
    per = max(1, max_bytes // (g.unit_words * wb))
    for first in range(0, g.nunits if g.row_words else 0, per):
        last = min(first + per, g.nunits)
        yield first, last, (min(last * g.unit_words, g.total_words) - first * g.unit_words) * wb


def decode_span(ct, first, last, out_bytes):
    """Decode units [first, last) into the flat byte buffer: the tensor's
    bytes from unit ``first`` on, up to its end (see ``spans``)."""
    while True:   # as _run: again if update_rows wrote the tensor meanwhile
        seen = ct._writes
        if seen % 2:
            time.sleep(0)
            continue
        bad = _decode_all(ct, first, last, out_bytes)
        if ct._writes == seen:
            break
    if bad >= 0:
        raise FormatError(f"unit {bad >> 3}: {codec.ERRORS[bad & 7]}")
    if ct.model.transforms_words:
        rotation.transform_back(out_bytes.view(WORD_DTYPES[ct.geometry.word_bits]), ct.model.rotate, ct.model.gather)


def _decode_all(ct, first, last, out_bytes):
    g, model = ct.geometry, ct.model
    t0, t1, fbits, ptot = model.tables
    if ct.layout == "slotted":
        slot_bits, (block, rel_bits, block_base, rel), payload_bits = g.slot_words * 64, (1, 0, NO_BASE, NO_REL), 0
    else:
        slot_bits, (block, rel_bits, block_base, rel), payload_bits = 0, ct.index, ct.payload_bits
    work = (last - first) * g.unit_words
    nchunks = min(last - first, 8 * numba.get_num_threads()) if work >= _bits.PARALLEL_MIN_WORDS else 1
    return codec.decode_all(work, frozen(ct.payload), t0, t1, g.word_bits, model.period, g.unit_words, fbits, ptot,
                            frozen(ct.kinds), slot_bits, block, rel_bits, frozen(block_base), frozen(rel),
                            payload_bits, g.nunits, g.total_words, out_bytes.view(WORD_DTYPES[g.word_bits]),
                            first, last, nchunks)


def decode_units(ct, units, out_bytes):
    """Decode whole units (padding included) back to back into the buffer."""
    U = ct.geometry.unit_words
    units = np.asarray(units, np.int64)
    _run(ct, units, np.zeros_like(units), np.full_like(units, U), np.arange(units.size) * U, out_bytes)


def _run(ct, units, src, length, dst, out_bytes):
    """Decode jobs, again if ``update_rows`` wrote the tensor meanwhile (its
    write counter is odd while it writes), so every row comes out either as
    it was before an update or as it is after it."""
    if units.size == 0:
        return
    while True:
        seen = ct._writes
        if seen % 2:
            time.sleep(0)  # let the writer finish
            continue
        status = _decode_jobs(ct, units, src, length, dst, out_bytes)
        if ct._writes == seen:
            break
    if status.any():
        i = int(np.flatnonzero(status)[0])
        raise FormatError(f"unit {units[i]}: {codec.ERRORS[int(status[i])]}")
    if ct.model.transforms_words:
        rotation.transform_back(out_bytes.view(WORD_DTYPES[ct.geometry.word_bits]), ct.model.rotate, ct.model.gather)


def _decode_jobs(ct, units, src, length, dst, out_bytes):
    starts, ends, kinds = unit_spans(ct, units)
    model = ct.model
    t0, t1, fbits, ptot = model.tables
    g = ct.geometry
    out = out_bytes.view(WORD_DTYPES[g.word_bits])
    status = np.zeros(units.size, np.int8)
    work = int(length.sum())
    nchunks = min(units.size, 8 * numba.get_num_threads()) if work >= _bits.PARALLEL_MIN_WORDS else 1
    codec.decode_jobs(work, frozen(ct.payload), t0, t1, g.word_bits, model.period, g.unit_words, fbits, ptot,
                      ct.layout == "packed", starts, ends, kinds, src, length, dst, out, status, nchunks)
    return status


def unit_bits(ct):
    """Encoded size in bits of every unit (FormatError for a malformed one)."""
    g, model = ct.geometry, ct.model
    units = np.arange(g.nunits)
    starts, ends, kinds = unit_spans(ct, units)
    t0, t1, fbits, ptot = model.tables
    sizes = np.empty(units.size, np.int64)
    codec.unit_sizes(g.total_words, frozen(ct.payload), t0, t1, g.word_bits, model.period, g.unit_words, fbits, ptot,
                     ct.layout == "packed", starts, ends, kinds, sizes)
    if units.size and sizes.min() < 0:
        i = int(np.argmin(sizes))
        raise FormatError(f"unit {i}: {codec.ERRORS[int(-sizes[i])]}")
    return sizes
