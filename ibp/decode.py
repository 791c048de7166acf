"""Decoding on the CPU: turn a request (whole tensor or rows by index) into
unit jobs and run the numba decoder over them."""
import time

import numba
import numpy as np

from . import codec
from ._bits import PARALLEL_MIN_WORDS
from .encode import unit_start_bits, unpack_kinds
from .errors import FormatError


def unit_spans(ct, units):
    """(start bit, end bit, kind) of the given units."""
    units = np.asarray(units, np.int64)
    kinds = unpack_kinds(ct.kinds, units)
    if ct.layout == "slotted":
        slot = ct.geometry.slot_words * 64
        starts = units * slot
        return starts, starts + slot, kinds
    n = ct.geometry.nunits
    starts = unit_start_bits(ct.index, units, ct.payload_bits, n)
    nxt = units + 1
    last = nxt >= n
    nxt[last] = 0
    ends = np.where(last, ct.payload_bits, unit_start_bits(ct.index, nxt, ct.payload_bits, n))
    return starts, ends, kinds


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


def jobs(ct, rows=None):
    """(unit, src word, length, dst word) per job, for all rows or ``rows``."""
    g = ct.geometry
    U, R = g.unit_words, g.row_words
    if rows is None:
        units = np.arange(g.nunits, dtype=np.int64)
        src = np.zeros_like(units)
        length = np.minimum(U, g.total_words - units * U)
        return units, src, length, units * U
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
    _run(ct, *jobs(ct, rows), out_bytes)


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


def _decode_jobs(ct, units, src, length, dst, out_bytes):
    starts, ends, kinds = unit_spans(ct, units)
    model = ct.model
    t0, t1, fbits, ptot = model.tables
    g = ct.geometry
    out = out_bytes.view(f"<u{g.word_bits // 8}")
    status = np.zeros(units.size, np.int8)
    work = int(length.sum())
    nchunks = min(units.size, 8 * numba.get_num_threads()) if work >= PARALLEL_MIN_WORDS else 1
    codec.decode_jobs(work, ct.payload, t0, t1, g.word_bits, model.period, g.unit_words, fbits, ptot,
                      ct.layout == "packed", starts, ends, kinds, src, length, dst, out, status, nchunks)
    return status


def unit_bits(ct):
    """Encoded size in bits of every unit (FormatError for a malformed one)."""
    g, model = ct.geometry, ct.model
    units = np.arange(g.nunits)
    starts, ends, kinds = unit_spans(ct, units)
    t0, t1, fbits, ptot = model.tables
    sizes = np.empty(units.size, np.int64)
    codec.unit_sizes(g.total_words, ct.payload, t0, t1, g.word_bits, model.period, g.unit_words, fbits, ptot,
                     ct.layout == "packed", starts, ends, kinds, sizes)
    if units.size and sizes.min() < 0:
        i = int(np.argmin(sizes))
        raise FormatError(f"unit {i}: {codec.ERRORS[int(-sizes[i])]}")
    return sizes
