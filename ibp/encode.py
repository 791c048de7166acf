"""Encoding a tensor's bytes into units: kinds, payload and row index."""
import numba
import numpy as np

from . import codec
from ._bits import PARALLEL_MIN_WORDS

MAX_BLOCK = 1 << 16


def _word_view(data, word_bits):
    return data.view(f"<u{word_bits // 8}")


def _tail(words, geom):
    """A zero-padded copy of the last unit when the rows do not fill it."""
    used = geom.total_words - (geom.nunits - 1) * geom.unit_words
    if geom.nunits == 0 or used == geom.unit_words:
        return words[:0]
    tail = np.zeros(geom.unit_words, words.dtype)
    tail[:used] = words[geom.total_words - used:]
    return tail


def column_of(geom, model):
    return np.arange(geom.unit_words, dtype=np.int64) % model.period


def classify(words, tail, geom, model):
    t0, t1, fbits, _ = model.tables
    kinds = np.empty(words.size // geom.unit_words + (tail.size > 0), np.uint8)
    sizes = np.empty(kinds.size, np.int64)
    codec.classify_units(words.size + tail.size, words, tail, t0, t1, geom.word_bits, model.period, geom.unit_words, fbits, kinds, sizes)
    return kinds, sizes


def pack_kinds(kinds):
    """Four 2-bit kinds per byte, unit 0 in the lowest bits."""
    padded = np.zeros(-(-kinds.size // 4) * 4, np.uint8)
    padded[:kinds.size] = kinds
    q = padded.reshape(-1, 4)
    return (q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)).astype(np.uint8)


def unpack_kinds(packed, units):
    units = np.asarray(units, np.int64)
    return ((packed[units >> 2] >> ((units & 3) * 2).astype(np.uint8)) & 3).astype(np.uint8)


def build_index(starts):
    """(block, rel_bits, block_base, rel) with start(u) = block_base[u // block] + rel[u],
    choosing the block size and offset width that take the fewest bytes."""
    n = starts.size
    best = None
    for rel_bits in (16, 32):
        block = 1
        while block * 2 <= min(MAX_BLOCK, max(n, 1)):
            firsts = starts[::block * 2]
            lasts = starts[np.minimum(np.arange(0, n, block * 2) + block * 2 - 1, n - 1)]
            if n and int((lasts - firsts).max()) >= 1 << rel_bits:
                break
            block *= 2
        size = -(-n // block) * 8 + n * rel_bits // 8
        if best is None or size < best[0]:
            best = (size, block, rel_bits)
    _, block, rel_bits = best
    block_base = np.ascontiguousarray(starts[::block]).astype(np.uint64)
    rel = (starts - np.repeat(block_base.astype(np.int64), block)[:n]).astype(f"<u{rel_bits // 8}")
    return block, rel_bits, block_base, rel


def encode_packed(data, geom, model):
    """(packed kinds, payload words, payload bits, index) of the packed layout."""
    words = _word_view(data, geom.word_bits)
    tail = _tail(words, geom)
    body = words[:(geom.nunits - (tail.size > 0)) * geom.unit_words]
    kinds, sizes = classify(body, tail, geom, model)
    starts = np.zeros(kinds.size + 1, np.int64)
    np.cumsum(sizes, out=starts[1:])
    total = int(starts[-1])
    nwords = -(-total // 64) + 1  # + the spare zero word
    if not kinds.size:
        return pack_kinds(kinds), np.zeros(nwords, np.uint64), total, build_index(starts[:-1])
    nchunks = min(kinds.size, 4 * numba.get_num_threads()) if geom.total_words >= PARALLEL_MIN_WORDS else 1
    chunks = np.linspace(0, kinds.size, nchunks + 1).astype(np.int64)
    spares = nwords + np.arange(nchunks)
    buf = np.zeros(nwords + nchunks, np.uint64)
    t0, t1, fbits, _ = model.tables
    codec.encode_packed(geom.total_words, body, tail, t0, t1, geom.word_bits, model.period, geom.unit_words, fbits,
                        column_of(geom, model), kinds, starts, chunks, buf, spares)
    np.bitwise_or.at(buf, starts[chunks[:-1]] >> 6, buf[spares])
    buf = buf[:nwords]
    return pack_kinds(kinds), buf, total, build_index(starts[:-1])


def encode_slots(data, geom, model, slots, buf):
    """Encode the units in ``data`` (whole units, last one may be short) into
    ``slots`` of the slotted payload ``buf``; returns their kinds."""
    words = _word_view(data, geom.word_bits)
    used = words.size % geom.unit_words
    tail = words[:0]
    if used:
        tail = np.zeros(geom.unit_words, words.dtype)
        tail[:used] = words[words.size - used:]
    body = words[:words.size - used]
    kinds, _ = classify(body, tail, geom, model)
    t0, t1, fbits, _ = model.tables
    codec.encode_slotted(words.size, body, tail, t0, t1, geom.word_bits, model.period, geom.unit_words, fbits,
                         column_of(geom, model), kinds, np.asarray(slots, np.int64), geom.slot_words, buf)
    return kinds


def encode_slotted(data, geom, model):
    buf = np.zeros(geom.nunits * geom.slot_words + 1, np.uint64)  # + the spare zero word
    kinds = encode_slots(data, geom, model, np.arange(geom.nunits), buf)
    return pack_kinds(kinds), buf
