"""Learning the model from a sample of a tensor.

For every column the primary level is the (lo, hi, base) that maximises
``fixed_bits * matches - E * misses`` over the sampled words, where ``E``
prices an exception (its position or bitmap bit, flag, and stored word).
Two families are searched exactly: fixed runs ending at the top bit or just
below it, with any base (float exponents, signed integers: the densest
window of each width over the sorted words), and fixed runs starting at
bit 0 (quantised or padded low bits: a histogram of agreement with the
per-bit majority).  A third model takes each column's most frequent word
as its whole primary level where that word is frequent (tables of a few
values).  The secondary level is learned the same way on the primary's
exceptions, or where the sample holds too few of them, is a wider window
around the primary's.

Word width, period and ``E`` are chosen by encoding held-out sampled units
with each candidate and keeping the smallest; between the models of one
width and period, an exception must also save EXCEPTION_TAX bits, as the
codec spends about ten matched words' time on each (on MiniLM's fp16 MLP
weights a model of three fixed bits and 15% exceptions tied in size with
one of two bits and 1.4%, and encoded 3.7x and decoded 2.6x slower).
The sample, and the words a column is learned from, grow with the tensor
up to a bound (learning costs about 20 ns a word, encoding about 1), so
analysis stays a small share of compressing a small tensor and a bounded
cost for a large one.
"""
import functools
import math
import re

import numpy as np
from numba import njit, prange

from . import codec, rotation
from ._bits import ONE, U64, WORD_DTYPES, ZERO, Kernel, ctz, frozen, low_mask, popcount
from .codec import bit_length
from .encode import _encode_serial, finish_packed
from .geometry import Geometry, periods, word_widths as fitting_widths
from .model import Model, level_tables

SAMPLE_BYTES = (1 << 13, 1 << 18)  # bytes of units sampled: at least, at most
SAMPLE_SHARE = 32             # ... and otherwise 1/32 of the tensor
SAMPLE_CHUNK_BYTES = 1 << 12  # pieces sampled from units longer than SAMPLE_BYTES[1]
SPREAD_UNITS = 8              # a one-column model's sample that would hold fewer units than this ...
SPREAD_PIECES = 64            # ... takes this many smaller pieces instead
TEST_WORDS = 1 << 14          # candidates are scored on at most about this many sampled words
MIN_PER_COLUMN = 32           # sampled words a column needs to be learned
MAX_PER_COLUMN = 4096         # sampled words a column is learned from at most ...
LEARN_SHARE = 128             # ... and otherwise one per this many of the tensor's words in the column
                              # (64 made MiniLM's small 16-bit tensors 0.1-0.2% smaller and about 7% slower to compress),
MIN_LEARN = 128               # ... but at least this many (learning costs ~20 ns a word; encoding 1)
NARROW_PER_COLUMN = 512       # ... for a width narrower than the element (a cheap second opinion)
STRANDED_AGREEMENT = 0.7      # a bit this share of sampled words agree on could be fixed (the reference's lowest threshold) ...
STRANDED_MIN = 2.5            # ... and this many such bits per word outside the fixed run ask for narrower words
                              # (two, as on 16-bit bias vectors, asked for a 25 us model that never won there)
EXCEPTION_PRICES = (3.0, 8.0)  # bits an exception costs: measured best on real data
PRICES = np.array(EXCEPTION_PRICES)
EXCEPTION_TAX = 0.5           # bits an exception must save to be kept: each costs the codec ~10x a matched word's time
PLATEAU = 4                   # stop lengthening a fixed run after this many steps without gain
MODE_SHARE = 8                # a word at least this share (1/8) of a column's is also tried as its whole primary level
FEW_VALUES = 6                # a column of at most this many distinct sampled words gets both levels searched exactly
COLUMN_AGREEMENT = 1.5        # bits per word that make a per-column period worth more samples (_columns_stand_out)
FEW_MISSES = 8                # a secondary level is learned from at least this many sampled exceptions
REUSE_SLACK = 0.005           # a checkpoint's tensor takes the last model of its role if it scores this close (Reuse) ...
REUSE_BITS = 64               # ... or this many bits close (a vector of a few hundred values)
TINY_BYTES = 64               # a tensor this small tries every narrower word width (_try_narrower)
SAMPLE_GROUP_BYTES = 256      # rows shorter than this are grouped into the units a sample takes, scored as such:
                              # shorter than the units ibp encodes (geometry.GROUP_BYTES), so a sample comes from
                              # more places (sampled as 4 KiB units, small tables of a few values per column and
                              # series came out up to 1.4x the reference)


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
def _k_fit(z2, m, mb, k, width):
    """Whether some k cyclically consecutive sorted values (``z2`` holds
    them twice over) lie in a window of ``width``: branch-free minima over
    the runs that do not wrap around and over those that do, so both loops
    vectorize."""
    word = z2.dtype.type   # in the words' own width: numba widens narrow arithmetic to 64 bits, fewer lanes
    off = U64(k - 1)
    split = m - off   # runs from i >= split wrap around
    nmb, w, one = word(mb), word(width), word(1)
    narrow = nmb
    for i in range(split):
        narrow = min(narrow, word(word(z2[i + off] - z2[i]) & nmb))
    wrapped = nmb   # their spans less one
    for i in range(split, m):
        wrapped = min(wrapped, word(word(z2[i + off] - z2[i] - one) & nmb))
    return narrow < w or wrapped < word(w - one)


@njit(inline="always")
def _first_fit(z2, m, mb, k, width):
    """The lowest i from which k cyclically consecutive sorted values lie
    in a window of ``width`` (a run that wraps around spans ``z2[i + k -
    1] - z2[i] + 2**b``, compared less one: ``2**b`` overflows 64 bits),
    m where none do: branch-free minima as in ``_k_fit``, which vectorize
    (a scan that stops at the first fit does not)."""
    word = z2.dtype.type
    off = U64(k - 1)
    split = m - off
    nmb, w, one = word(mb), word(width), word(1)
    first = m
    for i in range(split):
        first = min(first, i if word(word(z2[i + off] - z2[i]) & nmb) < w else m)
    if first < m:
        return np.int64(first)
    for i in range(split, m):
        first = min(first, i if word(word(z2[i + off] - z2[i] - one) & nmb) < word(w - one) else m)
    return np.int64(first)


@njit(inline="always")
def _densest(z2, m, b, a, least, most):
    """(count, first) of the densest cyclic window ``[z[first], z[first] +
    2**a)`` of the m sorted b-bit values in ``z2`` (twice over), the lowest
    such first on ties, given that the count lies in [least, most]: a
    binary search for the largest k whose narrowest k-value run fits."""
    mb = low_mask(b)
    width = ONE << U64(a)
    m = U64(m)
    while least < most:
        k = (least + most + 1) >> 1
        if _k_fit(z2, m, mb, k, width):
            least = k
        else:
            most = k - 1
    return least, _first_fit(z2, m, mb, least, width)


@njit(inline="always")
def _without_top_bit(full, W):
    """The sorted W-bit words ``full`` with their top bit cleared, still
    sorted: a merge of the words below the top bit and those above it."""
    m = full.shape[0]
    top = ONE << U64(W - 1)
    split = 0
    while split < m and full[split] < top:
        split += 1
    z = np.empty(m, full.dtype)
    i, j = 0, split
    for o in range(m):
        if j == m or (i < split and full[i] <= full[j] - top):
            z[o] = full[i]
            i += 1
        else:
            z[o] = full[j] - top
            j += 1
    return z


@njit(inline="always")
def _search_windows(z, b, prices, best, lo, hi, base, cap, counts):
    """The fixed runs ``[a, b)`` of the sorted b-bit values ``z``: for each
    a from b - 1 down, the densest window ``[base, base + 2**a)`` scores
    ``(b - a) * count - price * misses`` per price.  A window is measured
    only where ``cap[a]``, an upper bound of its count, lets it beat the
    best so far; measured counts land in ``counts`` (-1 elsewhere)."""
    m = z.shape[0]
    ne = prices.shape[0]
    mb = low_mask(b)
    first = 0      # the shortest cyclic window that holds every word starts after the widest gap
    span = U64(z[m - 1]) - U64(z[0])
    for i in range(m - 1):
        if z[i + 1] != z[i] and ((U64(z[i]) - U64(z[i + 1])) & mb) < span:
            span = (U64(z[i]) - U64(z[i + 1])) & mb
            first = i + 1
    top = min(bit_length(span), b)    # windows of 2**top words and wider hold them all
    if top < b:
        for e in range(ne):
            score = (b - top) * m
            if score > best[e]:
                best[e] = score
                lo[e] = top
                hi[e] = b
                base[e] = z[first]
    z2 = np.empty(2 * m, z.dtype)
    z2[:m] = z
    z2[m:] = z
    stale = 0
    up = m
    least = m    # a window holds at least half of what one twice as wide does
    for a in range(top - 1, -1, -1):
        least = (least + 1) >> 1
        c = min(up, cap[a])
        hopeless = True
        promising = False
        for e in range(ne):
            if b * c - prices[e] * (m - c) > best[e]:
                hopeless = False
            if (b - a) * c - prices[e] * (m - c) > best[e]:
                promising = True
        if hopeless or stale > PLATEAU:
            break
        if not promising:
            continue
        cnt, first = _densest(z2, m, b, a, min(least, c), c)
        least = cnt
        counts[a] = cnt
        up = cnt
        stale += 1
        for e in range(ne):
            score = (b - a) * cnt - prices[e] * (m - cnt)
            if score > best[e]:
                best[e] = score
                lo[e] = a
                hi[e] = b
                base[e] = z[first]
                stale = 0


@njit(cache=True)
def _best_levels(v, W, prices):
    """(lo, hi, base) of the best level of the words ``v`` for each
    exception price (the empty level (0, 0, 0) where nothing pays), the
    number of set words per bit, the most frequent word and its count, and
    the distinct words and their counts when there are at most FEW_VALUES
    (else empty).

    Fixed runs ending just below the top bit come first (signed values:
    the sign varies); a run that also fixes the top bit can then gain at
    most one bit per word over them, since its windows are windows of the
    shorter run too, which bounds the windows worth measuring."""
    m = v.shape[0]
    ne = prices.shape[0]
    best = np.zeros(ne)
    lo = np.zeros(ne, np.int64)
    hi = np.zeros(ne, np.int64)
    base = np.zeros(ne, np.uint64)
    ones = np.zeros(W, np.int64)
    few = np.empty(FEW_VALUES, np.uint64)
    counts = np.zeros(FEW_VALUES, np.int64)
    if m == 0:
        return lo, hi, base, ones, ZERO, 0, few[:0], counts[:0]
    full = _radix_sort(v, W)
    mode, most, run = U64(full[0]), 1, 1   # the most frequent word
    distinct = 1
    few[0] = full[0]
    counts[0] = 1
    for i in range(1, m):
        new = full[i] != full[i - 1]
        run = 1 if new else run + 1
        if run > most:
            mode, most = U64(full[i]), run
        distinct += new
        if distinct <= FEW_VALUES:
            few[distinct - 1] = full[i]
            counts[distinct - 1] += 1
    if distinct > FEW_VALUES:
        distinct = 0
    below = np.full(W + 1, -1, np.int64)    # counts of the run ending below the top bit, per a
    _search_windows(_without_top_bit(full, W), W - 1, prices, best, lo, hi, base, np.full(W + 1, m, np.int64),
                    below)
    cap = np.full(W + 1, m, np.int64)   # a window of the full run holds at most what the shorter one does
    c = m
    for a in range(W - 2, -1, -1):
        if below[a] >= 0:
            c = below[a]
        cap[a] = c
    _search_windows(full, W, prices, best, lo, hi, base, cap, np.full(W + 1, -1, np.int64))
    for bit in range(W):   # bit-major: vectorizes
        n = 0
        sh = U64(bit)
        for i in range(m):
            n += np.int64((v[i] >> sh) & ONE)
        ones[bit] = n
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
    return lo, hi, base, ones, mode, most, few[:distinct], counts[:distinct]


@njit(inline="always")
def _cover(vals, s, W):
    """(fixed bits, lo, hi, base) of the level that fixes the most bits of
    every value in the subset ``s`` (a bit mask) of the sorted ``vals``:
    the narrowest cyclic range holding them, or the longest low run they
    share."""
    mw = low_mask(W)
    first = ctz(U64(s))
    last = bit_length(s) - 1
    start, span, gap = vals[first], (vals[last] - vals[first]) & mw, (vals[first] - vals[last]) & mw
    prev = first
    low = W
    for j in range(first + 1, last + 1):
        if (s >> j) & 1:
            if vals[j] - vals[prev] > gap:   # the range starts after the widest gap
                gap = vals[j] - vals[prev]
                start, span = vals[j], (vals[prev] - vals[j]) & mw
            low = min(low, ctz(vals[j] ^ vals[first]))
            prev = j
    ranged = W - bit_length(span)
    if low > ranged:
        return low, 0, low, vals[first] & low_mask(low)
    if ranged == 0:
        return 0, 0, 0, ZERO
    return ranged, W - ranged, W, start


@njit(inline="always")
def _few_levels(vals, counts, W, m):
    """(lo, hi, base) of the primary and the secondary level of a column
    of a few distinct words, searched exactly: every split of the values
    into those the primary level takes, those the secondary takes and
    those stored whole, priced as the unit would store them (residuals,
    a flag per exception, positions at a bitmap bit a word at most)."""
    d = vals.shape[0]
    n = 1 << d
    fixed = np.zeros(n, np.int64)
    lo = np.zeros(n, np.int64)
    hi = np.zeros(n, np.int64)
    base = np.zeros(n, np.uint64)
    size = np.zeros(n, np.int64)
    for s in range(1, n):
        fixed[s], lo[s], hi[s], base[s] = _cover(vals, s, W)
        size[s] = size[s & (s - 1)] + counts[ctz(U64(s))]
    best, s1best, s2best = 1 << 62, 1, 0
    for s1 in range(1, n):
        rest = (n - 1) ^ s1
        k = m - size[s1]
        matched = size[s1] * (W - fixed[s1]) + min(m, 8 * k)
        s2 = rest
        while True:
            cost = matched + k * W if s2 == 0 else matched + k * (W + 1) - size[s2] * fixed[s2]
            if cost < best:
                best, s1best, s2best = cost, s1, s2
            if s2 == 0:
                break
            s2 = (s2 - 1) & rest
    return lo[s1best], hi[s1best], base[s1best], lo[s2best], hi[s2best], base[s2best]


@njit(inline="always")
def _margin(lo, hi, base):
    """The secondary level of a primary that fewer than FEW_MISSES sampled
    words missed (a level learned from so few fits them alone): its run
    two bits shorter from below, a window four times the primary's centred
    on it.  Words just outside the primary window that the sample did not
    hold (the newest timestamps, the farthest steps of a walk) then cost a
    flag and a residual rather than the whole word; a tensor without
    exceptions pays nothing for it."""
    if hi - lo < 2:
        return 0, 0, ZERO
    lo2 = lo + min(2, hi - lo - 1)
    centre = (ONE << U64(lo - 1)) if lo > 0 else ZERO
    return lo2, hi, (base + centre - (ONE << U64(lo2 - 1))) & low_mask(hi)


@njit(inline="always")
def _same_model(lo, hi, base, e, f):
    """Whether models e and f are the same."""
    for lv in range(2):
        for c in range(lo.shape[2]):
            if lo[e, lv, c] != lo[f, lv, c] or hi[e, lv, c] != hi[f, lv, c] or base[e, lv, c] != base[f, lv, c]:
                return False
    return True


@njit(inline="always")
def _one_run(x):
    """Whether the set bits of the non-zero ``x`` are consecutive."""
    return ((x | (x - ONE)) + ONE) & x == ZERO


@njit(inline="always")
def _most_common(masks):
    """The non-zero value most of ``masks`` hold (the lowest on ties), or 0."""
    v = np.sort(masks)
    best, count, run = ZERO, 0, 0
    for i in range(v.shape[0]):
        run = run + 1 if i and v[i] == v[i - 1] else 1
        if v[i] != ZERO and run > count:
            best, count = v[i], run
    return best


@Kernel
def _fit(words, train, test, piece_words, step, W, prices, p):
    """Learn one model per exception price, and one for low-cardinality
    columns: where a column has a few distinct values, both levels searched
    exactly over them (``_few_levels``: 0, 1 and 4 take one bit and a flag
    where one run over all three leaves three), else where one word is
    frequent, that word as the whole primary level (values that share bits
    on both sides of those where they differ: a one-run level cannot fix
    them all, two exact levels can); learned from every ``step``-th
    period of the sampled pieces of ``words`` that start at ``train``, and
    measured on those at ``test`` (as units of ``piece_words``).  Per
    column a model has the primary level and the secondary level learned
    on the primary's exceptions.  Returns the lo/hi/base ``[2, p]`` of the
    model whose test pieces encode smallest (EXCEPTION_TAX bits added a
    miss) and their bits, the most *stranded* bits per column any model
    leaves (bits outside the primary run that at least STRANDED_AGREEMENT
    of the words agree on: a narrower word, with more columns, could also
    fix them), how many columns' primary run under the first price
    starts at bit 0 and spans at least W/8 bits (low bits that are
    padding: see ``_try_half``), the rotation worth trying
    (``ibp.rotation``): the one most columns hint at (0 for none), a
    column hinting at the low run its sampled words agree on where they
    also agree on a high run or take a few values; the gather worth
    trying: the one most columns hint at, a column hinting at the bits its
    sampled words all agree on where neither they nor the others are one
    run (no level or rotation fixes them all: 4, 13 and 37); last, the
    best model's ``Model.tables``."""
    ne = prices.shape[0]
    lo = np.zeros((ne + 1, 2, p), np.uint8)   # [model, level, column]
    hi = np.zeros((ne + 1, 2, p), np.uint8)
    base = np.zeros((ne + 1, 2, p), np.uint64)
    hints = np.zeros(p, np.int64)
    gathers = np.zeros(p, np.uint64)
    rows = piece_words // p   # periods per piece
    m = (train.shape[0] * rows + step - 1) // step
    free = np.zeros(1)
    per_column = np.zeros((ne + 1, p), np.int64)
    for c in prange(p):
        v = np.empty(m, words.dtype)   # in the words' width: _best_levels' scans take more lanes
        for i in range(m):
            r = i * step
            v[i] = words[train[r // rows] + (r % rows) * p + c]
        a, b, bs, ones, mode, most, few, counts = _best_levels(v, W, prices)
        low = 0
        while low < W and (ones[low] == 0 or ones[low] == m):
            low += 1
        high = 0
        while high < W - low and (ones[W - 1 - high] == 0 or ones[W - 1 - high] == m):
            high += 1
        hints[c] = low if 0 < low < W and (high > 0 or few.shape[0] > 0) else 0
        agree = ZERO
        for bit in range(W):
            if ones[bit] == 0 or ones[bit] == m:
                agree |= ONE << U64(bit)
        differ = low_mask(W) & ~agree
        gathers[c] = agree if agree != ZERO and differ != ZERO and not _one_run(agree) and not _one_run(differ) \
            else ZERO
        for e in range(ne + 1):
            if e == ne and few.shape[0] == 0 and most * MODE_SHARE < m:   # not low-cardinality data
                lo[e, :, c], hi[e, :, c], base[e, :, c] = lo[0, :, c], hi[0, :, c], base[0, :, c]
                per_column[e, c] = per_column[0, c]
                continue
            if e == ne and few.shape[0] > 0:   # a few values: both levels searched exactly
                x, y, z, x2, y2, z2 = _few_levels(few, counts, W, m)
            else:
                if e == ne:   # the most frequent word fixed whole
                    x, y, z = 0, W, mode
                else:
                    x, y, z = a[e], b[e], bs[e]
                if 0 < e < ne and x == a[e - 1] and y == b[e - 1] and z == bs[e - 1]:   # the same exceptions
                    x2, y2, z2 = lo[e - 1, 1, c], hi[e - 1, 1, c], base[e - 1, 1, c]
                else:
                    fixed = low_mask(y) & ~low_mask(x)
                    missed = v[((v - z) & fixed) != ZERO]
                    if missed.shape[0] < FEW_MISSES:
                        x2, y2, z2 = _margin(x, y, z)
                    else:
                        a2, b2, bs2 = _best_levels(missed, W, free)[:3]
                        x2, y2, z2 = a2[0], b2[0], bs2[0]
            lo[e, 0, c], hi[e, 0, c], base[e, 0, c] = x, y, z
            lo[e, 1, c], hi[e, 1, c], base[e, 1, c] = x2, y2, z2
            k = 0
            for bit in range(W):
                share = ones[bit] / m
                if max(share, 1.0 - share) >= STRANDED_AGREEMENT and not x <= bit < y:
                    k += 1
            per_column[e, c] = k
    bits = np.full(ne + 1, -1, np.int64)
    score = np.zeros(ne + 1)   # bits, and EXCEPTION_TAX a sampled exception
    best = 0
    tables = level_tables(lo[0], hi[0], base[0], W)   # the best model's, for Model.tables
    for e in range(ne + 1):
        for f in range(e):
            if _same_model(lo, hi, base, e, f):
                bits[e], score[e] = bits[f], score[f]
                break
        if bits[e] < 0:
            t0, t1, fbits, ptot = level_tables(lo[e], hi[e], base[e], W)
            bits[e] = 0
            misses = 0
            for t in range(test.shape[0]):
                _, b, k = codec.unit_size(words, test[t], t0, t1, W, p, piece_words, fbits, ptot)
                bits[e] += b
                misses += k
            score[e] = bits[e] + EXCEPTION_TAX * misses
            if score[e] < score[best]:
                tables = (t0, t1, fbits, ptot)
        if score[e] < score[best]:
            best = e
    stranded = 0.0
    for e in range(ne + 1):
        stranded = max(stranded, per_column[e].sum() / p)
    halves = 0
    for c in range(p):
        if lo[0, 0, c] == 0 and hi[0, 0, c] >= W // 8:
            halves += 1
    votes = np.zeros(W, np.int64)   # the rotation most columns hint at, the shortest on ties
    for c in range(p):
        votes[hints[c]] += hints[c] > 0
    return lo[best], hi[best], base[best], bits[best], stranded, halves, \
        np.argmax(votes) if votes.max() > 0 else 0, _most_common(gathers), tables


def learn(sample, word_bits, period, per_column, prices=None):
    """The best of the models ``_fit`` learns from the ``sample`` of
    ``_samples`` (its train pieces thinned evenly to ``per_column`` words a
    column), measured on its test pieces: (lo, hi, base) each ``[2,
    period]``, the bits the test pieces encode to, the most stranded bits
    per column any model leaves, the columns whose low bits look like
    padding under the first price's model, the rotation and the gather
    worth trying (see ``_fit``), and the best model's ``Model.tables``."""
    words, train, test, piece_words = sample
    prices = PRICES if prices is None else np.asarray(prices, np.float64)
    step = _step(train.size * piece_words, period, per_column)
    lo, hi, base, bits, stranded, halves, rotate, gather, tables = _fit(
        train.size * piece_words // step, words, train, test, piece_words, step, word_bits, prices, period)
    return lo, hi, base, bits, stranded, halves, int(rotate), int(gather), tables


def _per_column(total_words, period, cap=MAX_PER_COLUMN):
    """Sampled words a column is learned from: see LEARN_SHARE."""
    return min(cap, max(MIN_LEARN, total_words // (LEARN_SHARE * period)))


def _step(sampled_words, period, per_column):
    """Every how many periods of the sample ``learn`` takes to learn from ``per_column`` words a column."""
    return -(-sampled_words // period // per_column)


def _samples(data, geom, least=0, one_column=False):
    """(words, train starts, test starts, words per piece): the tensor's
    bytes as W-bit words and the word offsets of the sampled pieces (at
    least ``least`` bytes of them where the tensor has them, up to
    SAMPLE_BYTES[1]), half of them to learn from and half to score on (all
    of them for both when the sample holds every unit, or one piece).  A
    piece is a unit, or a chunk of one when units are longer than the most
    a sample takes (rows that do not split): chunks are a multiple of every
    period that can be learned, aligned to it inside their unit, so
    analysis costs the same whatever the unit size.  A ``one_column``
    sample (for models of at most one column per element) is spread over
    SPREAD_PIECES smaller pieces where whole units would come from fewer
    than SPREAD_UNITS places (``_spreads``): a few long rows of their own
    values (one series per row) would teach a model that every other row
    misses.  A tensor shorter than one unit is its padded copy."""
    plan = _sample_plan(geom.shape, geom.itemsize, geom.word_bits, geom.unit_words, data.size, least, one_column)
    dtype = WORD_DTYPES[geom.word_bits]
    if plan is None:
        padded = np.zeros(geom.unit_words * dtype().itemsize, np.uint8)
        padded[:data.size] = data
        return frozen(padded.view(dtype)), ORIGIN, ORIGIN, geom.unit_words
    return (frozen(data.view(dtype)), *plan)


@functools.lru_cache(maxsize=4096)
def _sample_plan(shape, itemsize, W, U, nbytes, least, one_column):
    """``_samples``' (train starts, test starts, words per piece), or None
    for a tensor shorter than one unit: cached, as a checkpoint's tensors
    share a few shapes and a small tensor cannot afford the arithmetic."""
    wb = W // 8
    full = nbytes // (U * wb)
    if full == 0:
        return None
    budget = _budget(nbytes, least)
    if U * wb > SAMPLE_BYTES[1]:
        piece = _chunk_bytes(shape, itemsize) // wb
    elif one_column and _spreads(U * wb, nbytes):
        part = max(1, itemsize // wb)   # words per element
        piece = max(part, budget // (SPREAD_PIECES * wb) // part * part)
    else:
        piece = U
    count = full * (U // piece)
    return (*_piece_starts(count, max(1, min(count, budget // (piece * wb))), U, piece), piece)


def _budget(nbytes, least=0):
    return min(max(nbytes // SAMPLE_SHARE, SAMPLE_BYTES[0], least), SAMPLE_BYTES[1])


def _spreads(unit_bytes, nbytes):
    """Whether a one-column sample takes smaller pieces than units (see ``_samples``)."""
    budget = _budget(nbytes)
    return unit_bytes <= SAMPLE_BYTES[1] and SPREAD_UNITS * unit_bytes > budget and \
        nbytes // unit_bytes * unit_bytes > budget


ORIGIN = np.zeros(1, np.int64)
ORIGIN.flags.writeable = False


@functools.lru_cache(maxsize=256)
def _piece_starts(count, take, U, piece):
    """(train, test) word offsets of ``take`` of the ``count`` pieces of
    ``piece`` words in U-word units, picked at random but the same on every
    call (a checkpoint's tensors share a few shapes, so they share them)."""
    picks = np.arange(count) if take == count else \
        np.sort(np.random.default_rng(0).choice(count, take, replace=False))
    per_unit = U // piece
    starts = (picks // per_unit) * U + (picks % per_unit) * piece
    train, test = (starts, starts) if take in (1, count) and (take == 1 or piece == U) else (starts[::2], starts[1::2])
    if test.size * piece > TEST_WORDS:   # every few: enough to rank the candidates, at a bounded cost
        test = test[::-(-test.size * piece // TEST_WORDS)]
    train, test = np.ascontiguousarray(train), np.ascontiguousarray(test)
    for a in (train, test):
        a.flags.writeable = False
    return train, test


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
    """The units the analysis samples and scores: rows grouped to
    SAMPLE_GROUP_BYTES only."""
    return Geometry.choose(shape, itemsize, word_bits, group_bytes=SAMPLE_GROUP_BYTES)


def _try_narrower(shape, itemsize, W, stranded, nbytes):
    """Every narrower width, each with one column per element part, when the
    best full-width model leaves ``stranded`` agreeing bits per column
    unfixed (small integers stored as float64: the exponent bits that zero
    and the other values share), or the tensor is at most TINY_BYTES (its
    model is a visible share of its bytes, and narrower words can fix more
    of them: 8 float64 values of noise); else 32-bit words for 64-bit ones,
    as the reference tries both (an exception then costs half as much, and
    each half its own base: increasing int64 timestamps)."""
    return _narrower(shape, itemsize, W, stranded < STRANDED_MIN and nbytes > TINY_BYTES)


@functools.lru_cache(maxsize=4096)
def _narrower(shape, itemsize, W, few):
    """``_try_narrower``'s candidates, cached: a small tensor cannot afford the arithmetic."""
    if few and W != 64:
        return ()
    fit = [w for w in reversed(fitting_widths(shape, itemsize)) if w < W and not (few and w != 32)]
    return tuple((w, periods(shape, itemsize, w, _geometry(shape, itemsize, w).unit_words)[0]) for w in fit)


def _try_half(padded, period, W, itemsize):
    """The half-width candidate, if the full-width model's fixed run starts
    at bit 0 in most columns (``padded`` of ``period``): the low bits are
    padding (bf16 stored as float32, float32 stored as float64), and
    half-width words can also fix the exponent bits above them, which one
    run per word cannot."""
    if W > 8 and 2 * padded > period:
        return [(W // 2, itemsize * 8 // (W // 2))]
    return []


def analyze_bytes(data, shape, itemsize, word_bits=None):
    """Learn the best model for a tensor given as its flat uint8 bytes.

    Candidates learn from half of the sampled units and are scored on the
    other half, so a model with many columns cannot win by overfitting.  A
    tensor the sample holds whole is learned and scored on all of it: the
    score is then its exact encoded size, so the smallest candidate wins.
    Models are kept as arrays; only the winner becomes a Model.
    """
    shape = tuple(shape)
    plan = None if word_bits else _whole_plan(shape, itemsize, data.size)
    if plan is not None:
        model = _whole_model(data, shape, itemsize, *plan)
        if model is not None:
            return model
    cands = list(candidates(shape, itemsize, word_bits))
    if data.size == 0:
        return Model.empty(cands[0][0])
    best = None   # (cost, Model._learned's arguments, stranded bits per column)
    tried_half = bool(word_bits)
    tried_narrower = False
    half, narrower = [], []
    while cands:
        W, p = cands.pop(0)
        if best is not None and _model_bits(p, W) >= best[0]:
            continue   # its model alone takes more than the best tensor
        geom = _geometry(shape, itemsize, W)
        sample = _samples(data, geom, one_column=p <= max(1, itemsize * 8 // W))
        _, train, test, piece_words = sample
        if piece_words % p:
            continue
        if p > max(1, itemsize * 8 // W) and train.size * piece_words // p < MIN_PER_COLUMN:
            # too few sampled words per column (the per-element period is always tried): more of the tensor
            # is sampled only where the columns' words agree on more bits than as many words across columns do;
            # a sample of the whole tensor is scored on itself, so any number of rows is enough there
            if not _columns_stand_out(sample, p):
                continue
            sample = _samples(data, geom, 2 * MIN_PER_COLUMN * p * W // 8)
            _, train, test, piece_words = sample
            whole = test is train and train.size * piece_words >= geom.total_words // geom.unit_words * geom.unit_words
            if train.size * piece_words // p < MIN_PER_COLUMN and not whole:
                continue
        scale = geom.nunits * geom.unit_words / (test.size * piece_words)
        per_column = _per_column(geom.total_words, p, NARROW_PER_COLUMN if (W, p) in narrower else MAX_PER_COLUMN)
        lo, hi, base, bits, stranded, halves, rotate, gather, tables = learn(sample, W, p, per_column)
        cost, learned = _cost(bits * scale, p, W), (W, lo, hi, base, 0, tables, 0)
        for r, g in ((rotate, 0), (0, gather)):   # the words rotated or gathered, where the columns hint at it
            if r or g:
                lo, hi, base, bits, *_, tables = learn(_transformed_sample(sample, r, g), W, p, per_column)
                transformed_cost = _cost(bits * scale, p, W)
                if transformed_cost < cost:
                    cost, learned = transformed_cost, (W, lo, hi, base, r, tables, g)
        if best is None or cost < best[0]:
            best = (cost, learned, stranded)
        if not tried_half:
            half = _try_half(halves, p, W, itemsize)
            cands = half + [c for c in cands if c not in half]
            tried_half = True
        if not tried_narrower and not word_bits:
            narrower = [c for c in _try_narrower(shape, itemsize, best[1][0], best[2], data.size) if c not in half]
            cands += narrower
            tried_narrower = True
    return Model._learned(*best[1])


@functools.lru_cache(maxsize=4096)
def _whole_plan(shape, itemsize, nbytes):
    """(word bits, sample starts, words per piece, learning step, and
    whether no narrower widths are tried with few stranded bits, and with
    many) where ``analyze_bytes`` would learn one candidate, one column,
    from a sample of the whole tensor and score it on itself; else None."""
    if not TINY_BYTES < nbytes <= SAMPLE_BYTES[0]:   # a tiny tensor tries every width
        return None
    cands = candidates(shape, itemsize)
    if len(cands) != 1 or cands[0][1] != 1:
        return None
    W = cands[0][0]
    geom = _geometry(shape, itemsize, W)
    plan = _sample_plan(shape, itemsize, W, geom.unit_words, nbytes, 0, True)
    if plan is None or plan[0] is not plan[1]:   # shorter than a unit (a padded copy), or part of it sampled
        return None
    starts, _, piece = plan
    return W, starts, piece, _step(starts.size * piece, 1, _per_column(geom.total_words, 1)), \
        not _narrower(shape, itemsize, W, True), not _narrower(shape, itemsize, W, False)


@njit(cache=True)
def _whole_stands(W, stranded, halves, transformed, plain_few, plain_many):
    """Whether ``_fit``'s model of a tensor ``_whole_plan`` plans is the
    search's, which would try more candidates after it (a transform, half
    or narrower words: ``_try_half``, ``_try_narrower``) where it does not;
    ``transformed``: whether it hints at a rotation or a gather."""
    return not transformed and not (W > 8 and halves > 0) and \
        (plain_few if stranded < STRANDED_MIN else plain_many)


def _whole_model(data, shape, itemsize, W, starts, piece, step, plain_few, plain_many):
    """``analyze_bytes``' model of a tensor ``_whole_plan`` plans, learned
    straight from the kernel, or None where its result asks for more
    candidates: the steps of the general search cost more than learning a
    bias vector (a (128,) bf16 vector: 21.8 against 26.3 us to compress).
    Same model, bit for bit."""
    lo, hi, base, _, stranded, halves, rotate, gather, tables = _fit(
        starts.size * piece // step, frozen(data.view(WORD_DTYPES[W])), starts, starts, piece, step, W, PRICES, 1)
    if not _whole_stands(W, stranded, halves, bool(rotate or gather), plain_few, plain_many):
        return None
    return Model._learned(W, lo, hi, base, 0, tables, 0)


def learned_and_encoded(data, shape, itemsize):
    """(Model, Geometry, ``encode_packed``'s result) of a tensor
    ``_whole_plan`` plans, learned and encoded in one compiled call, or
    None where the model does not stand (see ``_whole_model``): most of
    what compressing a bias vector costs is calls and Python around them
    (a (128,) bf16 vector: 14.6 against 17.1 us).  Same bytes."""
    plan = _whole_plan(shape, itemsize, data.size)
    if plan is None:
        return None
    W, starts, piece, step, plain_few, plain_many = plan
    geom = Geometry.checked(shape, itemsize, W)
    buf = np.empty(geom.nunits * -(-geom.unit_words * W // 64) + 1, np.uint64)
    stands, lo, hi, base, tables, encoded = _whole_learn_encode(
        frozen(data.view(WORD_DTYPES[W])), starts, piece, step, W, PRICES, plain_few, plain_many,
        geom.unit_words, geom.total_words, buf)
    if not stands:
        return None
    return Model._learned(W, lo, hi, base, 0, tables, 0), geom, finish_packed(buf, *encoded)


_fit_serial = _fit.serial


@njit(cache=True)
def _whole_learn_encode(words, starts, piece, step, W, prices, plain_few, plain_many, U, total_words, buf):
    """``_whole_model``'s kernel then ``encode_packed``'s, in one call:
    (whether the model stands, its lo, hi, base and tables, the encoding:
    of no units where the model does not stand)."""
    lo, hi, base, _, stranded, halves, rotate, gather, tables = _fit_serial(
        words, starts, starts, piece, step, W, prices, 1)
    stands = _whole_stands(W, stranded, halves, rotate != 0 or gather != 0, plain_few, plain_many)
    t0, t1, fbits, ptot = tables
    return stands, lo, hi, base, tables, _encode_serial(words, U, total_words if stands else 0, t0, t1, W, 1, fbits,
                                                        ptot, buf)


class Reuse:
    """``analyze_bytes`` for the tensors of one checkpoint: a tensor takes
    the model its role (its name with layer numbers left out, its dtype
    width and row shape) last learned, where that model fits it as it fit
    the tensor it was learned on: its estimated size within REUSE_SLACK
    (REUSE_BITS for a tensor of a few hundred bytes, whose sample is all of
    it and varies more), and no more bits that all sampled words agree on
    left outside its fixed runs (an untrained norm of ones, weights rounded
    to fp16, zeros after noise: their own model would be far smaller).  A
    network's layers repeat the same tensors with the same statistics, and
    learning is a large share of compressing a small one."""

    def __init__(self):
        self._learned = {}   # (role, row shape, itemsize, word_bits) -> (model, bits per byte, unfixed agreeing bits)

    def role(self, tensor_name):
        """The ``analyze_bytes`` for the tensor named ``tensor_name``."""
        return functools.partial(self._analyze_bytes, re.sub(r"(?<![^.])[0-9]+(?![^.])", "#", tensor_name))

    def _analyze_bytes(self, role, data, shape, itemsize, word_bits=None):
        shape = tuple(shape)
        key = (role, shape[1:], itemsize, word_bits)
        last = self._learned.get(key)
        if last is not None and data.size:
            model, per_byte, unfixed = last
            fit = _fit_on(data, shape, itemsize, model)
            expected = per_byte * data.size
            if fit is not None and fit[1] <= unfixed and abs(fit[0] - expected) <= max(REUSE_SLACK * expected,
                                                                                       REUSE_BITS):
                return model
        model = analyze_bytes(data, shape, itemsize, word_bits)
        fit = _fit_on(data, shape, itemsize, model) if data.size else None
        if fit is not None:
            self._learned[key] = (model, fit[0] / data.size, fit[1])
        return model


def _fit_on(data, shape, itemsize, model):
    """(bits ``model`` is estimated to take on the tensor, as
    ``analyze_bytes`` scores a candidate; bits all the sampled words of a
    column agree on outside its primary run, summed over columns), or None
    where it cannot say (models of many columns, transformed words)."""
    W, p = model.word_bits, model.period
    if model.transforms_words or p > max(1, itemsize * 8 // W):
        return None
    geom = _geometry(shape, itemsize, W)
    if geom.unit_words % p:
        return None
    words, train, test, piece = _samples(data, geom, one_column=True)
    if piece % p:
        return None
    t0, t1, fbits, ptot = model.tables
    bits, unfixed = _score(words, test, piece, t0, t1, W, p, fbits, ptot)
    return _cost(bits * geom.nunits * geom.unit_words / (test.size * piece), p, W), unfixed


@njit(cache=True)
def _score(words, test, piece, t0, t1, W, p, fbits, ptot):
    """The bits the pieces at ``test`` encode to, and the bits all their
    words of a column agree on outside its primary run, summed over the
    ``p`` columns."""
    bits = 0
    full = low_mask(W)
    col_and = np.full(p, full, np.uint64)
    col_or = np.zeros(p, np.uint64)
    for t in range(test.shape[0]):
        bits += codec.unit_size(words, test[t], t0, t1, W, p, piece, fbits, ptot)[1]
        c = 0
        for j in range(piece):
            x = U64(words[test[t] + j])
            col_and[c] &= x
            col_or[c] |= x
            c = c + 1 if c + 1 < p else 0
    unfixed = 0
    for c in range(p):
        unfixed += popcount(~(col_and[c] ^ col_or[c]) & full & ~t0[c, codec.FIX])
    return bits, unfixed


def _columns_stand_out(sample, p):
    """Whether the sampled words of each of ``p`` columns agree on at least
    COLUMN_AGREEMENT more bits than as many words of as many different
    columns do (a diagonal: one word per row, the column moving on by one
    each row, so rows that are series of their own count for neither):
    columns of their own values (categories, per-column scales), which a
    per-column model fixes and one model for all columns does not.  Or
    whether the median column's values span that many fewer bits than a
    diagonal's whose columns lie far apart: the time steps down the
    columns of rows that are series, each a narrower window than the steps
    together, though their bits agree no more.  Weights measure about 0.1
    bits of agreement (at most 1.1 over a checkpoint's tensors) and at
    most 1 of span, tables of a few values per column 1.5 to 5."""
    words, train, test, piece = sample
    starts = train if test is train else frozen(np.concatenate([train, test]))   # one compiled signature
    own, across, own_span, across_span = _agreement(words, starts, piece, p)
    return own - across >= COLUMN_AGREEMENT or across_span - own_span >= COLUMN_AGREEMENT


@njit(cache=True)
def _agreement(words, starts, piece, p):
    """Mean number of bits on which the words of a column agree, and on
    which the words of a diagonal agree, over the pieces of ``piece`` words
    at ``starts`` (no copies); then the median bits of the range the
    values of a column span, and of a diagonal moving on by p / rows
    columns a row, as unsigned words, with the top bit flipped (two's
    complement about zero) or cleared (a sign bit, which a level leaves
    free), the narrowest; the median, as a few columns of their own scale
    (embeddings) do not pay for a per-column model.  A row at a time, a
    diagonal's words in two runs, in the words' own width, so every loop
    vectorizes (as uint64s, a 16-bit tensor's took 2.3x longer)."""
    W = words.itemsize * 8
    word = words.dtype.type
    full = word(low_mask(W))
    flip = word(ONE << U64(W - 1))
    col_and = np.full(p, full, words.dtype)
    col_or = np.full(p, word(0), words.dtype)
    diag_and = np.full(p, full, words.dtype)
    diag_or = np.full(p, word(0), words.dtype)
    col_lo = np.full((3, p), full, words.dtype)   # per view: unsigned, top bit flipped, top bit cleared
    col_hi = np.full((3, p), word(0), words.dtype)
    diag_lo = np.full((3, p), full, words.dtype)
    diag_hi = np.full((3, p), word(0), words.dtype)
    stride = max(1, p // max(1, starts.shape[0] * piece // p))
    row = 0
    for s in starts:
        for r0 in range(s, s + piece, p):
            x = words[r0:r0 + p]
            _and_or(x, 0, p, 0, col_and, col_or)
            _extremes(x, 0, p, 0, col_lo, col_hi, flip)
            k = row % p   # the diagonal of column c in this row: (c - row) mod p
            _and_or(x, k, p, -k, diag_and, diag_or)
            _and_or(x, 0, k, p - k, diag_and, diag_or)
            k = row * stride % p   # its span diagonal: (c - row * stride) mod p
            _extremes(x, k, p, -k, diag_lo, diag_hi, flip)
            _extremes(x, 0, k, p - k, diag_lo, diag_hi, flip)
            row += 1
    own = 0
    across = 0
    for c in range(p):
        own += popcount(~(U64(col_and[c]) ^ U64(col_or[c])) & U64(full))
        across += popcount(~(U64(diag_and[c]) ^ U64(diag_or[c])) & U64(full))
    return own / p, across / p, _median_span(col_lo, col_hi, W), _median_span(diag_lo, diag_hi, W)


@njit(inline="always")
def _and_or(x, c0, c1, shift, a, o):
    """The AND and OR of words ``x[c0:c1]`` into ``a`` and ``o`` at ``c + shift``."""
    for c in range(U64(c0), U64(c1)):
        i = c + U64(shift)
        a[i] &= x[c]
        o[i] |= x[c]


@njit(inline="always")
def _extremes(x, c0, c1, shift, lo, hi, flip):
    """The least and greatest of each view of the words ``x[c0:c1]`` (see
    ``_agreement``) into ``lo`` and ``hi`` at ``c + shift``."""
    keep = ~x.dtype.type(0)
    _extremes_of_view(x, c0, c1, shift, lo[0], hi[0], x.dtype.type(0), keep)
    _extremes_of_view(x, c0, c1, shift, lo[1], hi[1], flip, keep)
    _extremes_of_view(x, c0, c1, shift, lo[2], hi[2], x.dtype.type(0), ~flip)


@njit(inline="always")
def _extremes_of_view(x, c0, c1, shift, lo, hi, xor, mask):
    for c in range(U64(c0), U64(c1)):
        y = lo.dtype.type((x[c] ^ xor) & mask)   # numba widens the operation: narrowed, it stays in 16-bit lanes
        i = c + U64(shift)
        lo[i] = min(lo[i], y)
        hi[i] = max(hi[i], y)


@njit(inline="always")
def _median_span(lo, hi, W):
    """np.median over the columns of the bits their narrowest view's range
    spans (the bit length of its narrowest range: bit_length never
    decreases), from a count of columns per bit length."""
    p = lo.shape[1]
    narrow = hi[0] - lo[0]
    for v in range(1, 3):
        lv, hv = lo[v], hi[v]
        for c in range(p):
            narrow[c] = min(narrow[c], hv[c] - lv[c])
    counts = np.zeros(W + 1, np.int64)
    for c in range(p):
        counts[bit_length(U64(narrow[c]))] += 1
    low = high = -1   # the values at the middle two positions (one, for odd p)
    seen = 0
    for v in range(W + 1):
        seen += counts[v]
        if low < 0 and seen > (p - 1) // 2:
            low = v
        if seen > p // 2:
            high = v
            break
    return (low + high) / 2


def _transformed_sample(sample, rotate, gather):
    """``sample`` (see ``_samples``) with its pieces copied side by side,
    train then test (once where they are the same), and rotated right by
    ``rotate`` bits or gathered by ``gather``."""
    words, train, test, piece = sample
    same = test is train   # a sample scored on itself (a small tensor): its pieces copied once
    firsts = train if same else np.concatenate([train, test])
    starts = frozen(np.arange(firsts.size, dtype=np.int64) * piece)
    return rotation.transformed(words[firsts[:, None] + np.arange(piece)].reshape(-1), rotate, gather), \
        starts[:train.size], starts if same else starts[train.size:], piece


def _cost(payload_bits, period, word_bits):
    """Bits a tensor takes: its payload in whole 64-bit words (which decide
    between word widths on a tensor of a few words) and its model."""
    return math.ceil(payload_bits / 64) * 64 + _model_bits(period, word_bits)


def _model_bits(period, word_bits):
    return period * 2 * (16 + word_bits)


def model_bits(model):
    """Serialized size of a model, in bits."""
    return _model_bits(model.period, model.word_bits)
