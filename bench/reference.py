"""REFERENCE baseline: the algorithm of Kamath et al.'s research artifact.

This is NOT ibp.  It re-implements, on the CPU, what the authors' code
(``AKKamath/InvariantBitPacking``: preproc, compress and decompress kernels)
does, so that "ibp beats the reference" is measured against the real thing
(see the section "The reference algorithm, exactly" of DESIGN.md):

* the tensor is a 2-D ``[rows, n]`` array of int32 or int64 words: a tensor
  with ndim >= 2 is ``reshape(-1, shape[-1])``, a 0-d or 1-d tensor is one
  row; its bytes are viewed as W-bit words (W = 32 or 64);
* per column j and bit b, ``c[j][b]`` counts the rows with that bit set;
* thresholds t = 0.70, 0.75, ..., 1.00, accumulated in float32 as the C loop
  does; mask bit b is set with value 1 if ``c > t*N`` (float32), with value 0
  if ``c < (1-t)*N`` (double), strict both ways;
* a threshold scores sum over rows of ``saved - n`` where ``saved > n``
  (``saved``: popcount of the mask over the matching words); the highest
  score wins, ties keep the lower threshold, all-zero keeps an empty mask;
* a row costs ``meta + data`` bytes with ``meta = roundup(ceil(n/8), s)``,
  ``data = roundup(n*s - floor(saved/8), s)``, s = W/8, and is stored
  compressed iff that is below ``n*s``, else raw;
* a compressed row is a participation bitmap (bit j set iff word j matched,
  LSB first inside each W-bit word, padded to whole words) then a bit stream
  filled MSB first inside each W-bit word: a matched word gives its bits
  where the mask is 0 (MSB to LSB), an unmatched word all W bits;
* layout in place: every row keeps its ``n*s`` slot; one row flag bit per
  row (1 = compressed) in an int32 array, bit ``i % 32`` of word ``i // 32``.

Bytes moved = sum of row sizes + row-flag words + mask + value.
"""
from dataclasses import dataclass
import math

import numpy as np
from numba import njit, prange

from ibp import dtypes

WORD_BITS = (32, 64)
U64 = np.uint64


def _threshold_sweep():
    """The C loop ``for (float t = 0.7; t <= 1.0; t += 0.05)``, bit for bit."""
    t, out = np.float32(0.7), []
    while t <= np.float32(1.0):
        out.append(t)
        t = np.float32(np.float64(t) + 0.05)
    return tuple(out)


THRESHOLDS = _threshold_sweep()


@dataclass
class ReferenceTensor:
    """One tensor in the reference's in-place form (or raw, when its rows
    cannot be viewed as 32- or 64-bit words)."""
    dtype_name: str
    shape: tuple
    word_bits: int | None   # None: stored raw, the reference cannot take it
    mask: np.ndarray        # [n] W-bit words
    value: np.ndarray       # [n] W-bit words
    flags: np.ndarray       # int32, one bit per row: compressed?
    slots: np.ndarray       # [rows, n] W-bit words (raw bytes when word_bits is None)
    nbytes: int             # bytes moved
    candidates: dict        # word_bits -> bytes moved, for every width that fits


# -- numba kernels -----------------------------------------------------------

@njit(inline="always")
def _low(k):
    """The k lowest bits set, 0 <= k <= 64."""
    if k >= 64:
        return ~U64(0)
    return (U64(1) << U64(k)) - U64(1)


@njit(parallel=True, cache=True)
def _count_bits(words, W):
    """c[j][b]: rows with bit b of column j set (blocks of columns in
    parallel, so memory stays O(n*W) however the tensor is shaped)."""
    rows, n = words.shape
    counts = np.zeros((n, W), np.int64)
    block = 64
    for jb in prange((n + block - 1) // block):
        end = min(n, (jb + 1) * block)
        for i in range(rows):
            for j in range(jb * block, end):
                v = U64(words[i, j])
                for b in range(W):
                    counts[j, b] += np.int64((v >> U64(b)) & U64(1))
    return counts


@njit(parallel=True, cache=True)
def _saved_bits(words, masks, values, popc):
    """saved[i, k]: mask bits of threshold k over the words of row i that match."""
    rows, n = words.shape
    K = masks.shape[0]
    saved = np.zeros((rows, K), np.int64)
    for i in prange(rows):
        for j in range(n):
            v = U64(words[i, j])
            for k in range(K):
                if (v & masks[k, j]) == values[k, j]:
                    saved[i, k] += popc[k, j]
    return saved


@njit(cache=True)
def _free_runs(mask, W):
    """Runs of mask-0 bits of every column, MSB first: (shift, length, count)."""
    n = mask.shape[0]
    shift = np.zeros((n, W // 2 + 1), np.int64)
    length = np.zeros((n, W // 2 + 1), np.int64)
    count = np.zeros(n, np.int64)
    for j in range(n):
        b = W - 1
        while b >= 0:
            if (mask[j] >> U64(b)) & U64(1):
                b -= 1
                continue
            top = b
            while b >= 0 and not ((mask[j] >> U64(b)) & U64(1)):
                b -= 1
            r = count[j]
            shift[j, r] = b + 1
            length[j, r] = top - b
            count[j] = r + 1
    return shift, length, count


@njit(inline="always")
def _put(row, pos, v, w, W):
    """OR the w-bit value v into the MSB-first stream of ``row`` at bit pos."""
    if w == 0:
        return
    k = pos // W
    a = W - pos % W
    if w <= a:
        row[k] = U64(row[k]) | (v << U64(a - w))
    else:
        rest = w - a
        row[k] = U64(row[k]) | (v >> U64(rest))
        row[k + 1] = U64(row[k + 1]) | ((v & _low(rest)) << U64(W - rest))


@njit(inline="always")
def _get(row, pos, w, W):
    """The w-bit value at bit pos of the MSB-first stream of ``row``."""
    if w == 0:
        return U64(0)
    k = pos // W
    a = W - pos % W
    if w <= a:
        return (U64(row[k]) >> U64(a - w)) & _low(w)
    rest = w - a
    return ((U64(row[k]) & _low(a)) << U64(rest)) | (U64(row[k + 1]) >> U64(W - rest))


@njit(parallel=True, cache=True)
def _encode(words, mask, value, shift, length, count, compressed, W, out):
    """Write every row into its slot of ``out`` (zeroed): raw, or bitmap + stream."""
    rows, n = words.shape
    meta_words = (n + W - 1) // W
    for i in prange(rows):
        row = out[i]
        if not compressed[i]:
            for j in range(n):
                row[j] = words[i, j]
            continue
        pos = meta_words * W
        for j in range(n):
            x = U64(words[i, j])
            if (x & mask[j]) == value[j]:
                row[j // W] = U64(row[j // W]) | (U64(1) << U64(j % W))
                v = U64(0)
                w = 0
                for r in range(count[j]):
                    L = length[j, r]
                    part = (x >> U64(shift[j, r])) & _low(L)
                    v = part if L >= 64 else (v << U64(L)) | part
                    w += L
                _put(row, pos, v, w, W)
                pos += w
            else:
                _put(row, pos, x, W, W)
                pos += W


@njit(parallel=True, cache=True)
def _decode(slots, flags, value, shift, length, count, W, out):
    """Restore every row of ``out`` from its slot."""
    rows, n = slots.shape
    meta_words = (n + W - 1) // W
    for i in prange(rows):
        row = slots[i]
        if not (U64(flags[i >> 5]) >> U64(i & 31)) & U64(1):
            for j in range(n):
                out[i, j] = row[j]
            continue
        pos = meta_words * W
        for j in range(n):
            if (U64(row[j // W]) >> U64(j % W)) & U64(1):
                w = 0
                for r in range(count[j]):
                    w += length[j, r]
                v = _get(row, pos, w, W)
                pos += w
                x = value[j]
                for r in range(count[j] - 1, -1, -1):
                    L = length[j, r]
                    x |= (v & _low(L)) << U64(shift[j, r])
                    v = U64(0) if L >= 64 else v >> U64(L)
                out[i, j] = x
            else:
                out[i, j] = _get(row, pos, W, W)
                pos += W


# -- the algorithm -----------------------------------------------------------

def _rows_view(x):
    """(dtype name, shape, [rows, row_bytes] uint8 view): the baseline's 2-D rule."""
    data, name, shape, _ = dtypes.as_bytes(x)
    if len(shape) >= 2:
        rows = math.prod(shape[:-1])
        row_bytes = shape[-1] * dtypes.ITEMSIZE[name]
    else:
        rows, row_bytes = 1, data.size
    return name, tuple(shape), data.reshape(rows, row_bytes)


def _words(byte_rows, word_bits):
    if word_bits not in WORD_BITS:
        raise ValueError(f"the reference uses 32- or 64-bit words, not {word_bits!r}")
    if byte_rows.shape[1] % (word_bits // 8):
        raise ValueError(f"rows of {byte_rows.shape[1]} bytes cannot be viewed as {word_bits}-bit words")
    return byte_rows.view(f"<u{word_bits // 8}")


def _masks(counts, nrows):
    """Mask and value of every column for every threshold: [K, n] uint64 each."""
    W = counts.shape[1]
    bit = U64(1) << np.arange(W, dtype=U64)
    c32, c64 = counts.astype(np.float32), counts.astype(np.float64)
    masks = np.empty((len(THRESHOLDS), counts.shape[0]), U64)
    values = np.empty_like(masks)
    for k, t in enumerate(THRESHOLDS):
        ones = c32 > t * np.float32(nrows)
        zeros = c64 < (1.0 - np.float64(t)) * np.float64(nrows)
        masks[k] = np.bitwise_or.reduce(np.where(ones | zeros, bit, U64(0)), axis=1)
        values[k] = np.bitwise_or.reduce(np.where(ones, bit, U64(0)), axis=1)
    return masks, values


def _popcount(a):
    return np.unpackbits(a.view(np.uint8), axis=-1).reshape(a.shape + (-1,)).sum(-1, dtype=np.int64)


def _ceil_div(a, b):
    return -(-a // b)


def _roundup(a, b):
    return _ceil_div(a, b) * b


def _plan(words):
    """(mask, value, compressed per row, bytes moved) of the best threshold."""
    rows, n = words.shape
    W = words.dtype.itemsize * 8
    s = W // 8
    mask = np.zeros(n, U64)
    value = np.zeros(n, U64)
    saved = np.zeros(rows, np.int64)
    if rows and n:
        counts = _count_bits(words, W)
        masks, values = _masks(counts, rows)
        per_row = _saved_bits(words, masks, values, _popcount(masks))
        scores = np.where(per_row > n, per_row - n, 0).sum(axis=0)
        best_score = 0
        for k, score in enumerate(scores):  # K = 7 thresholds: strict >, lower wins ties
            if score > best_score:
                best_score, mask, value, saved = score, masks[k], values[k], per_row[:, k]
    meta = _roundup(_ceil_div(n, 8), s)
    data = _roundup(n * s - saved // 8, s)
    compressed = meta + data < n * s
    sizes = np.where(compressed, meta + data, n * s)
    nbytes = int(sizes.sum()) + 4 * _ceil_div(rows, 32) + 2 * n * s
    return mask, value, compressed, nbytes


def reference_size(x, word_bits):
    """Bytes the reference moves for ``x`` with ``word_bits``-bit words
    (ValueError if its rows are not a whole number of such words)."""
    _, _, byte_rows = _rows_view(x)
    return _plan(_words(byte_rows, word_bits))[3]


def _fitting_widths(byte_rows):
    if byte_rows.size == 0:
        return ()
    return tuple(W for W in WORD_BITS if byte_rows.shape[1] % (W // 8) == 0)


def compress(x, word_bits=None):
    """Encode ``x`` the reference's way.  ``word_bits=None`` takes whichever of
    32/64 moves fewer bytes (64 only when a row is whole 8-byte words; ties:
    32); a tensor neither fits is kept raw, as the reference cannot take it."""
    name, shape, byte_rows = _rows_view(x)
    widths = _fitting_widths(byte_rows) if word_bits is None else (word_bits,)
    plans = {W: _plan(_words(byte_rows, W)) for W in widths}
    candidates = {W: p[3] for W, p in plans.items()}
    if not plans:
        empty = np.zeros(0, np.uint8)
        return ReferenceTensor(name, shape, None, empty, empty, np.zeros(0, np.int32), byte_rows.copy(),
                               byte_rows.size, candidates)
    W = min(plans, key=lambda w: (candidates[w], w))
    mask, value, compressed, nbytes = plans[W]
    words = _words(byte_rows, W)
    runs = _free_runs(mask, W)
    slots = np.zeros_like(words)
    _encode(words, mask, value, *runs, compressed, W, slots)
    flags = np.zeros(4 * _ceil_div(len(compressed), 32), np.uint8)
    packed = np.packbits(compressed, bitorder="little")
    flags[:packed.size] = packed
    word = np.dtype(f"<u{W // 8}")
    return ReferenceTensor(name, shape, W, mask.astype(word), value.astype(word), flags.view("<i4"), slots,
                           nbytes, candidates)


def decompress(rt):
    """The numpy array ``rt`` was made from, bit for bit (a dtype numpy lacks
    here, like bfloat16 without ml_dtypes, comes back as same-size uints)."""
    out = np.empty(rt.slots.shape, rt.slots.dtype)
    if rt.word_bits is None:
        out[...] = rt.slots
    else:
        mask = rt.mask.astype(U64)
        _decode(rt.slots, rt.flags.view(np.uint32), rt.value.astype(U64), *_free_runs(mask, rt.word_bits),
                rt.word_bits, out)
    try:
        dtype = dtypes.numpy_dtype(rt.dtype_name)
    except TypeError:
        dtype = np.dtype(f"<u{dtypes.ITEMSIZE[rt.dtype_name]}")
    return out.reshape(-1).view(np.uint8).view(dtype).reshape(rt.shape)
