"""Learning the model from a sample of a tensor.

For every column the primary level is the (lo, hi, base) that maximises
``fixed_bits * matches - E * misses`` over the sampled words, where ``E``
prices an exception (its position or bitmap bit, flag, and stored word).
Two families are searched exactly: fixed runs ending at the top bit or just
below it, with any base (float exponents, signed integers: sliding windows
over the sorted words), and fixed runs starting at bit 0 (quantised or
padded low bits: a histogram of agreement with the per-bit majority).  The
secondary level is learned the same way on the primary's exceptions.

Word width, period and ``E`` are chosen by encoding the sample with each
candidate and keeping the smallest, so analysis cost depends on the sample
size, not on the tensor size.
"""
import functools
import math

import numpy as np
from numba import njit, prange

from . import codec
from ._bits import ONE, U64, ZERO, Kernel, ctz, low_mask
from .geometry import Geometry, periods, word_widths as fitting_widths
from .model import Model, level_tables

SAMPLE_BYTES = (1 << 14, 1 << 18)  # bytes of units sampled: at least, at most
SAMPLE_SHARE = 32             # ... and otherwise 1/32 of the tensor
SAMPLE_CHUNK_BYTES = 1 << 12  # pieces sampled from units longer than SAMPLE_BYTES[1]
MIN_PER_COLUMN = 32           # sampled words a column needs to be learned
MAX_PER_COLUMN = 4096         # sampled words a column is learned from at most
NARROW_PER_COLUMN = 512       # ... for a width narrower than the element (a cheap second opinion)
STRANDED_AGREEMENT = 0.7      # a bit this share of sampled words agree on could be fixed (the reference's lowest threshold) ...
STRANDED_MIN = 2.0            # ... and this many such bits per word outside the fixed run ask for narrower words
EXCEPTION_PRICES = (3.0, 8.0)  # bits an exception costs: measured best on real data
PLATEAU = 4                   # stop lengthening a fixed run after this many steps without gain


@njit(cache=True)
def _radix_sort(v, W):
    """``v`` (W-bit words) sorted: LSD radix sort by bytes, skipping bytes
    every word shares (numba's np.sort takes 7x longer)."""
    m = v.shape[0]
    a = v.copy()
    b = np.empty_like(a)
    cnt = np.empty(257, np.int64)
    for shift in range(0, W, 8):
        cnt[:] = 0
        sh = U64(shift)
        for i in range(m):
            cnt[np.int64((a[i] >> sh) & U64(255)) + 1] += 1
        if cnt.max() == m:
            continue
        for d in range(256):
            cnt[d + 1] += cnt[d]
        for i in range(m):
            d = np.int64((a[i] >> sh) & U64(255))
            b[cnt[d]] = a[i]
            cnt[d] += 1
        a, b = b, a
    return a


@njit(inline="always")
def _window_end(z2, i, j, m, mb, width):
    """First j' >= j (j > i) where the cyclic window from z2[i] reaches width."""
    while j < i + m and ((z2[j] - z2[i]) & mb) < width:
        j += 1
    return j


@njit(cache=True)
def _densest_windows(z, z2, b, a, bound, seed):
    """(count, first) of the densest cyclic window [z[i], z[i] + 2**a) of
    the sorted b-bit values ``z`` (twice over in ``z2``), the lowest such i
    on ties.  ``bound[i]``
    is an upper bound of i's count (its count for a + 1) and is lowered to
    it: starting from the last best window ``seed``, only windows that can
    beat the best so far are measured."""
    m = z.shape[0]
    mb = low_mask(b)
    width = ONE << U64(a)
    cnt = _window_end(z2, seed, seed + 1, m, mb, width) - seed
    bound[seed] = cnt
    first = seed
    j = 0
    for i in range(m):
        if bound[i] < cnt or (bound[i] == cnt and i >= first):
            continue
        j = _window_end(z2, i, max(j, i + 1), m, mb, width)
        c = j - i
        bound[i] = c
        if c > cnt or (c == cnt and i < first):
            cnt = c
            first = i
    return cnt, first


@njit(cache=True)
def _best_levels(v, W, prices):
    """Best (lo, hi, base) of the words ``v`` for each exception price; the
    empty level (0, 0, 0) where nothing pays."""
    m = v.shape[0]
    ne = prices.shape[0]
    best = np.zeros(ne)
    lo = np.zeros(ne, np.int64)
    hi = np.zeros(ne, np.int64)
    base = np.zeros(ne, np.uint64)
    if m == 0:
        return lo, hi, base
    full = _radix_sort(v, W)
    top = ONE << U64(W - 1)
    split = 0  # words below the top bit: the order without it is a merge
    while split < m and full[split] < top:
        split += 1
    bound = np.empty(m, np.int64)
    z2 = np.empty(2 * m, np.uint64)
    for b in (W, W - 1):
        stale = 0
        if b == W:
            z = full
        else:
            z = np.empty(m, np.uint64)
            i, j = 0, split
            for o in range(m):
                if j == m or (i < split and full[i] <= full[j] - top):
                    z[o] = full[i]
                    i += 1
                else:
                    z[o] = full[j] - top
                    j += 1
        z2[:m] = z
        z2[m:] = z
        bound[:] = m
        first = 0
        for a in range(b - 1, -1, -1):
            cnt, first = _densest_windows(z, z2, b, a, bound, first)
            hopeless = True
            for e in range(ne):
                score = (b - a) * cnt - prices[e] * (m - cnt)
                if score > best[e]:
                    best[e] = score
                    lo[e] = a
                    hi[e] = b
                    base[e] = z[first]
                    stale = 0
                if b * cnt - prices[e] * (m - cnt) > best[e]:
                    hopeless = False
            stale += 1
            if hopeless or stale > PLATEAU:
                break
    ones = np.zeros(W, np.int64)  # per bit: directly for few words, else from a histogram of each byte
    if m <= 256:
        for i in range(m):
            for bit in range(W):
                ones[bit] += np.int64((v[i] >> U64(bit)) & ONE)
    else:
        hist8 = np.zeros(256, np.int64)
        for byte in range(W // 8):
            hist8[:] = 0
            sh = U64(8 * byte)
            for i in range(m):
                hist8[np.int64((v[i] >> sh) & U64(255))] += 1
            for d in range(256):
                for k in range(8):
                    ones[8 * byte + k] += hist8[d] * ((d >> k) & 1)
    majority = ZERO
    for bit in range(W):
        if 2 * ones[bit] > m:
            majority |= ONE << U64(bit)
    hist = np.zeros(W + 1, np.int64)
    for i in range(m):
        d = v[i] ^ majority
        hist[min(ctz(d), W) if d != ZERO else W] += 1
    agree = 0
    for b in range(W, 0, -1):
        agree += hist[b]
        for e in range(ne):
            score = b * agree - prices[e] * (m - agree)
            if score > best[e]:
                best[e] = score
                lo[e] = 0
                hi[e] = b
                base[e] = majority & low_mask(b)
    return lo, hi, base


@Kernel
def _learn_columns(samples, W, prices, lo, hi, base):
    """Fill lo/hi/base ``[len(prices), 2, period]``: per price, the primary
    level and the secondary level learned on the primary's exceptions."""
    m, p = samples.shape
    free = np.zeros(1)
    for c in prange(p):
        v = samples[:, c].copy()
        a, b, bs = _best_levels(v, W, prices)
        for e in range(prices.shape[0]):
            lo[e, 0, c] = a[e]
            hi[e, 0, c] = b[e]
            base[e, 0, c] = bs[e]
            fixed = low_mask(b[e]) & ~low_mask(a[e])
            a2, b2, bs2 = _best_levels(v[((v - bs[e]) & fixed) != ZERO], W, free)
            lo[e, 1, c] = a2[0]
            hi[e, 1, c] = b2[0]
            base[e, 1, c] = bs2[0]


def learn(samples, word_bits, prices=EXCEPTION_PRICES, per_column=MAX_PER_COLUMN):
    """(lo, hi, base), each ``[len(prices), 2, period]``: one model per
    exception price for ``samples``, a ``[n, period]`` array of words (rows
    beyond ``per_column`` are thinned evenly)."""
    n, p = samples.shape
    if n > per_column:
        samples = samples[::-(-n // per_column)]
    prices = np.asarray(prices, np.float64)
    lo = np.zeros((prices.size, 2, p), np.uint8)
    hi = np.zeros((prices.size, 2, p), np.uint8)
    base = np.zeros((prices.size, 2, p), np.uint64)
    _learn_columns(samples.size * p, np.ascontiguousarray(samples, dtype=np.uint64), word_bits, prices, lo, hi, base)
    return lo, hi, base


@njit(cache=True)
def _encoded_bits(words, lo, hi, base, W, U):
    """Bits the units in ``words`` (a whole number of U-word units) encode
    to, under each model (lo, hi, base) ``[models, 2, period]``."""
    p = lo.shape[2]
    out = np.zeros(lo.shape[0], np.int64)
    for e in range(lo.shape[0]):
        t0, t1, fbits, ptot = level_tables(lo[e], hi[e], base[e], W)
        for u in range(words.shape[0] // U):
            out[e] += codec.unit_size(words, u * U, t0, t1, W, p, U, fbits, ptot)[1]
    return out


def _sample_units(data, geom):
    """(sampled bytes as a flat uint8 array, bytes per sampled piece).  A
    piece is a unit, or a chunk of one when units are longer than the most
    a sample takes (rows that do not split): chunks are a multiple of every
    period that can be learned, aligned to it inside their unit, so analysis
    costs the same whatever the unit size."""
    ub = geom.unit_words * geom.word_bits // 8
    full = data.size // ub
    if full == 0:
        padded = np.zeros(ub, np.uint8)
        padded[:data.size] = data
        return padded, ub
    budget = min(max(data.size // SAMPLE_SHARE, SAMPLE_BYTES[0]), SAMPLE_BYTES[1])
    piece = ub if ub <= SAMPLE_BYTES[1] else _chunk_bytes(geom.shape, geom.itemsize)
    per_unit = ub // piece
    count = full * per_unit
    take = max(1, min(count, budget // piece))
    if take < count:
        picks = _picks(count, take)
    elif piece == ub:
        return data[:full * ub], ub
    else:
        picks = np.arange(count)
    if piece == ub:
        return data[:full * ub].reshape(full, ub)[picks].reshape(-1), ub
    starts = (picks // per_unit) * ub + (picks % per_unit) * piece
    return data[starts[:, None] + np.arange(piece)].reshape(-1), piece


@functools.lru_cache(maxsize=256)
def _picks(count, take):
    """``take`` of ``count`` pieces, sorted, the same on every call (a
    checkpoint's tensors share a few shapes, so they share their picks)."""
    picks = np.sort(np.random.default_rng(0).choice(count, take, replace=False))
    picks.flags.writeable = False
    return picks


def _chunk_bytes(shape, itemsize):
    """Bytes of a sampled chunk of a long unit: about SAMPLE_CHUNK_BYTES, a
    multiple of every candidate period (in elements) that a sample can hold
    MIN_PER_COLUMN words of in each half."""
    learnable = [e for e in {1, shape[-1], math.prod(shape[1:])}
                 if 2 * MIN_PER_COLUMN * e * itemsize <= SAMPLE_BYTES[1]]
    step = math.lcm(*learnable) * itemsize
    return -(-SAMPLE_CHUNK_BYTES // step) * step


@functools.lru_cache(maxsize=4096)
def candidates(shape, itemsize, word_bits=None):
    """(word width, period) pairs to try, best guess first.  On real data
    the element's own width wins, with any period; half of it only when the
    low half is padding (bf16 values stored as float32): see ``_try_half``;
    narrower widths when fixed bits lie outside the one run a level can fix:
    see ``_try_narrower``."""
    fit = fitting_widths(shape, itemsize)
    if word_bits:
        fit = [word_bits] if word_bits in fit else []
    if not fit:
        raise ValueError(f"no word width fits shape {shape} with {itemsize}-byte elements"
                         + (f" (asked for {word_bits})" if word_bits else ""))
    W = fit[-1]
    return tuple((W, p) for p in periods(shape, itemsize, W, _geometry(shape, itemsize, W).unit_words))


@functools.lru_cache(maxsize=4096)
def _geometry(shape, itemsize, word_bits):
    return Geometry.choose(shape, itemsize, word_bits)


@njit(cache=True)
def _stranded_bits(words, p, lo, hi, W):
    """Mean number of bits per word, outside the primary level's fixed run
    [lo, hi) of each of the ``p`` columns, that at least STRANDED_AGREEMENT
    of the sampled words of their column agree on: bits a narrower word
    (with more columns) could also fix."""
    n = words.shape[0] // p
    nbytes = W // 8
    hist = np.zeros((p, nbytes, 256), np.int64)  # per column and byte: bit counts come from these
    for i in range(n):
        for c in range(p):
            x = U64(words[i * p + c])
            for k in range(nbytes):
                hist[c, k, np.int64((x >> U64(8 * k)) & U64(255))] += 1
    ones = np.zeros((p, W), np.int64)
    for c in range(p):
        for k in range(nbytes):
            for d in range(256):
                for bit in range(8):
                    if (d >> bit) & 1:
                        ones[c, 8 * k + bit] += hist[c, k, d]
    total = 0
    for c in range(p):
        for bit in range(W):
            share = ones[c, bit] / n
            if max(share, 1.0 - share) >= STRANDED_AGREEMENT and not lo[c] <= bit < hi[c]:
                total += 1
    return total / p


def _try_narrower(shape, itemsize, best, words):
    """Every narrower width, each with one column per element part, when the
    full-width model ``best`` (W, lo, hi, base) leaves agreeing bits unfixed
    (small integers stored as float64: the exponent bits that zero and the
    other values share)."""
    W, lo, hi, _ = best
    if _stranded_bits(words, lo.shape[1], lo[0], hi[0], W) < STRANDED_MIN:
        return []
    fit = fitting_widths(shape, itemsize)
    return [(w, periods(shape, itemsize, w, _geometry(shape, itemsize, w).unit_words)[0])
            for w in reversed(fit) if w < W]


def _try_half(lo, hi, W, itemsize):
    """The half-width candidate, if the full-width model's fixed run (primary
    levels ``lo``, ``hi``) starts at bit 0 in most columns: the low bits are
    padding (bf16 stored as float32, float32 stored as float64), and
    half-width words can also fix the exponent bits above them, which one
    run per word cannot."""
    if W > 8 and 2 * np.count_nonzero((lo == 0) & (hi >= W // 8)) > lo.size:
        return [(W // 2, itemsize * 8 // (W // 2))]
    return []


def _samples(data, geom):
    """(train words, test words, words per piece) of the sampled pieces."""
    W = geom.word_bits
    sample, piece = _sample_units(data, geom)
    piece_words = piece * 8 // W
    units = sample.view(f"<u{W // 8}").reshape(-1, piece_words)
    whole = piece_words == geom.unit_words and len(units) == data.size // piece  # every full unit
    if whole or len(units) == 1:
        return units.reshape(-1), units.reshape(-1), piece_words
    return units[::2].reshape(-1), units[1::2].reshape(-1), piece_words


def analyze_bytes(data, shape, itemsize, word_bits=None):
    """Learn the best model for a tensor given as its flat uint8 bytes.

    Candidates learn from half of the sampled units and are scored on the
    other half, so a model with many columns cannot win by overfitting.  A
    tensor the sample holds whole is learned and scored on all of it: the
    score is then its exact encoded size, so the smallest candidate wins.
    Models are kept as arrays; only the winner becomes a Model.
    """
    shape = tuple(shape)
    cands = list(candidates(shape, itemsize, word_bits))
    if data.size == 0:
        return Model.empty(cands[0][0])
    best = None   # (cost, (W, lo, hi, base))
    samples = {}
    tried_half = bool(word_bits)
    tried_narrower = False
    half, narrower = [], []
    while cands:
        W, p = cands.pop(0)
        geom = _geometry(shape, itemsize, W)
        if W not in samples:
            samples[W] = _samples(data, geom)
        train, test, piece_words = samples[W]
        if piece_words % p or (p > max(1, itemsize * 8 // W) and train.size // p < MIN_PER_COLUMN):
            continue  # too few samples per column; the per-element period is always tried
        scale = geom.nunits * geom.unit_words / test.size
        narrow = (W, p) in narrower
        lo, hi, base = learn(train.reshape(-1, p), W, per_column=NARROW_PER_COLUMN if narrow else MAX_PER_COLUMN)
        bits = _encoded_bits(test, lo, hi, base, W, piece_words)
        for e in range(len(bits)):
            cost = int(bits[e]) * scale + _model_bits(p, W)
            if best is None or cost < best[0]:
                best = (cost, (W, lo[e], hi[e], base[e]))
            if not tried_half:
                half = _try_half(lo[e][0], hi[e][0], W, itemsize)
                cands = half + [c for c in cands if c not in half]
                tried_half = True
        if not tried_narrower and not word_bits:
            narrower = [c for c in _try_narrower(shape, itemsize, best[1], train) if c not in half]
            cands += narrower
            tried_narrower = True
    return Model(*best[1])


def _model_bits(period, word_bits):
    return period * 2 * (16 + word_bits)


def model_bits(model):
    """Serialized size of a model, in bits."""
    return _model_bits(model.period, model.word_bits)
