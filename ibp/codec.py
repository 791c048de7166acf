"""The CPU codec: numba kernels that encode and decode units of words.

The byte format these kernels read and write is specified in docs/format.md;
this module is its reference implementation and the ground truth for the GPU.

Every kernel takes the model as two uint64 tables built by
``Model.tables``, ``t0`` (primary level) and ``t1`` (secondary), of shape
``[period, 8]``: one row of fields per column, so a word's parameters sit in
one cache line.  Word ``j`` of a unit belongs to column ``j % period``.

Hot loops index arrays with unsigned integers: numba then skips the
negative-index wraparound test, which costs a third of a 16-bit word's time.
A model of one column (the common case: weights, embeddings) has its own
loops with the level's fields in registers.
"""
import numpy as np
from numba import njit, prange

from numba.cpython.unsafe.numbers import leading_zeros

from ._bits import (FAST_EXPAND, FAST_PEXT, ONE, U64, ZERO, Kernel, ctz, expand_lanes, flush_bits, low_mask, pdep,
                    pext, popcount, put_bits, read_bits, read_only)

RAW, ALL, SPARSE, BITMAP = 0, 1, 2, 3
# Fields of a level table row.
BASE, FIX, LOW, HIGH, SH1, SH2, WIDTH, WMASK = range(8)
# Units longer than this many words (single long rows that do not split)
# are encoded and decoded in several passes without scratch arrays, so the
# codec's memory stays a small multiple of its output.
SCRATCH_WORDS = 1 << 16
# A one-column unit with at least one exception per this many words is decoded in two
# passes (matched words, then put in place) rather than run by run; where FAST_EXPAND
# puts 512 bits in place at a time, every unit with an exception is.
DENSE_EXCEPTIONS = 16

# Status codes of decode_jobs, turned into FormatError messages by the caller.
OK, ERR_SIZE, ERR_COUNT, ERR_POSITION = 0, 1, 2, 3
ERRORS = {ERR_SIZE: "unit size does not match its encoding",
          ERR_COUNT: "exception count out of range",
          ERR_POSITION: "exception positions not strictly increasing or out of range"}


@njit(inline="always")
def bit_length(n):
    return 64 - np.int64(leading_zeros(U64(n)))


@njit(inline="always")
def unit_geometry(U):
    """(pbits, kmax, kbits) of a unit of U words: see docs/format.md."""
    pbits = bit_length(U - 1)
    kmax = U // max(pbits, 1)
    return pbits, kmax, bit_length(kmax)


@njit(inline="always")
def mask_of(width):
    """2**width - 1 for 0 <= width <= 64."""
    h = U64(width) >> ONE
    return ((ONE << h) << (U64(width) - h)) - ONE


@njit(inline="always")
def column(j, p):
    """Model column of word j (no division for a one-column model)."""
    return 0 if p == 1 else j % p


@njit(inline="always")
def matches(x, t, c):
    return ((x - t[c, BASE]) & t[c, FIX]) == ZERO


@njit(inline="always")
def residual(x, t, c):
    """The free bits of a matching word, packed low to high."""
    y = x - t[c, BASE]
    return (y & t[c, LOW]) | (((y & t[c, HIGH]) >> t[c, SH1]) >> t[c, SH2])


@njit(inline="always")
def restore(v, t, c, wmask):
    """Inverse of ``residual``."""
    low = t[c, LOW]
    y = (v & low) | (((v & ~low) << t[c, SH1]) << t[c, SH2])
    return (y + t[c, BASE]) & wmask


@njit(inline="always")
def cheapest(U, W, k, matched, fbits, excbits):
    """(kind, bits) of the smallest encoding of a unit with ``k`` exceptions,
    ``matched`` bits of primary residuals and ``excbits`` of stored
    exceptions (ties: RAW, ALL, SPARSE, BITMAP)."""
    pbits, kmax, kbits = unit_geometry(U)
    best = U * W
    kind = RAW
    if k == 0:
        if matched < best:
            best = matched
            kind = ALL
    else:
        tail = matched + k * fbits + excbits
        if k <= kmax and kbits + k * pbits + tail < best:
            best = kbits + k * pbits + tail
            kind = SPARSE
        if U + tail < best:
            best = U + tail
            kind = BITMAP
    return kind, best


@njit(inline="always")
def stored_bits(x, t1, c, W, fbits):
    """Bits an exception takes: its secondary residual, or the whole word."""
    return np.int64(t1[c, WIDTH]) if fbits != 0 and matches(x, t1, c) else np.int64(W)


@njit
def unit_size(src, off, t0, t1, W, p, U, fbits, ptot):
    """(kind, bits, k) of a unit's cheapest encoding, counted in one pass
    without scratch memory."""
    if p == 1:
        return one_column_unit_size(src, off, t0, t1, W, U, fbits, ptot)
    k = 0
    matched = np.int64((U // p) * ptot)
    excbits = 0
    c = 0
    for j in range(U):
        x = U64(src[U64(off + j)])
        if not matches(x, t0, c):
            k += 1
            matched -= np.int64(t0[c, WIDTH])
            excbits += stored_bits(x, t1, c, W, fbits)
        c += 1
        if c == p:
            c = 0
    kind, bits = cheapest(U, W, k, matched, fbits, excbits)
    return kind, bits, k


@njit(inline="always")
def one_column_unit_size(src, off, t0, t1, W, U, fbits, ptot):
    """``unit_size`` of a one-column model, inlined where units are sized
    one after another (a call per unit cost a third of a short unit's time)."""
    k, second = misses_one_column(src, off, t0, t1, U)
    excbits = k * W if fbits == 0 else second * np.int64(t1[0, WIDTH]) + (k - second) * W
    kind, bits = cheapest(U, W, k, np.int64(U * ptot) - k * np.int64(t0[0, WIDTH]), fbits, excbits)
    return kind, bits, k


@njit(inline="always")
def misses_one_column(src, off, t0, t1, U):
    """(words the primary level misses, of them those the secondary
    matches) of a one-column unit: branch-free and in the words' own
    width, so the loop vectorizes (a branch per word took 3.5x longer)."""
    word = src.dtype.type
    b0, f0 = word(t0[0, BASE]), word(t0[0, FIX])
    b1, f1 = word(t1[0, BASE]), word(t1[0, FIX])
    k = 0
    second = 0
    for j in range(U):
        x = src[U64(off + j)]
        miss = word(word(x - b0) & f0) != word(0)
        k += miss
        second += miss & (word(word(x - b1) & f1) == word(0))
    return k, second


# -- encoding --------------------------------------------------------------

@njit(inline="always")
def lanes(G, W):
    """Bit 0 of each of G lanes of W bits in a uint64."""
    rep = ONE
    for _ in range(G - 1):
        rep = (rep << U64(W)) | ONE
    return rep


@njit(inline="always")
def lane_words(src, off, t0, U, ys, keep, flag):
    """Pass one over a unit of a one-column model: each word less the base
    into ``ys``, all ones into ``keep`` where it matches the level (else
    zero) and 1 into ``flag`` where it misses.  No word depends on another
    and the arrays have the words' width, so LLVM vectorizes it: cheaper
    than testing the lanes of a uint64 with borrow-free arithmetic.  Every
    result is narrowed back to the word type: numba widens the arithmetic
    of narrow integers to 64 bits, which as 64-bit lanes took 3x longer."""
    word = ys.dtype.type
    base = word(t0[0, BASE])
    fix = word(t0[0, FIX])
    for j in range(U):
        y = word(src[U64(off + j)] - base)
        miss = word(y & fix) != word(0)
        ys[U64(j)] = y
        keep[U64(j)] = word(word(miss) - word(1))
        flag[U64(j)] = miss


@njit(inline="always")
def pack_lanes(ys, keep, ng, G, W, t0, buf, acc, nb, widx):
    """Pass two: append the residuals of the matched words of ``lane_words``
    (``ys``, ``keep`` as uint64s: ``ng`` groups of G = 64 // W words), a
    group per append: one ``pext`` gathers its kept words' free bits."""
    rep = lanes(G, W)
    LO = t0[0, LOW] * rep
    HI = t0[0, HIGH] * rep
    if FAST_PEXT:
        FREE = LO | HI
        for g in range(ng):
            kk = FREE & keep[U64(g)]
            acc, nb, widx = put_bits(buf, acc, nb, widx, pext(ys[U64(g)], kk), popcount(kk))
        return acc, nb, widx
    sh1, sh2, M, width = t0[0, SH1], t0[0, SH2], t0[0, WMASK], t0[0, WIDTH]
    for g in range(ng):
        y = ys[U64(g)]
        r = (y & LO) | (((y & HI) >> sh1) >> sh2)   # lane by lane: a lane's high bits stay in it
        kk = keep[U64(g)]
        v = ZERO
        bits = ZERO
        for lane in range(G):
            kept = ZERO - ((kk >> U64(lane * W)) & ONE)
            v |= ((r >> U64(lane * W)) & M & kept) << bits
            bits += width & kept
        acc, nb, widx = put_bits(buf, acc, nb, widx, v, bits)
    return acc, nb, widx


@njit(inline="always")
def miss_positions(m64, U, exc):
    """The positions of the non-zero bytes of the miss bytes ``m64`` (as
    uint64s; zero from byte U on) into ``exc``, then U, eight bytes per
    load; returns their number."""
    k = 0
    for i in range((U + 7) >> 3):
        w = m64[U64(i)]
        while w != ZERO:
            exc[U64(k)] = (i << 3) + (ctz(w) >> 3)
            k += 1
            w &= w - ONE
    exc[U64(k)] = U
    return k


@njit(inline="always")
def scan(src, off, t0, p, U, exc, stream):
    """One pass over a unit of a model of ``p`` > 1 columns: its exception
    positions into ``exc`` (then U), its matched residuals as a bit stream
    into ``stream``; returns (k, bits of the stream)."""
    k = 0
    acc = ZERO
    nb = ZERO
    widx = ZERO
    c = 0
    for j in range(U):
        y = U64(src[U64(off + j)]) - t0[c, BASE]
        miss = U64((y & t0[c, FIX]) != ZERO)
        exc[U64(k)] = j
        k += np.int64(miss)
        keep = miss - ONE  # all ones for a match, zero for a miss
        v = ((y & t0[c, LOW]) | (((y & t0[c, HIGH]) >> t0[c, SH1]) >> t0[c, SH2])) & keep
        acc, nb, widx = put_bits(stream, acc, nb, widx, v, t0[c, WIDTH] & keep)
        c += 1
        if c == p:
            c = 0
    flush_bits(stream, acc, nb, widx)
    exc[k] = U
    return k, np.int64(widx) * 64 + np.int64(nb)


@njit(inline="always")
def append_stream(stream, nbits, buf, acc, nb, widx):
    """Append the first ``nbits`` bits of ``stream`` to a writer."""
    i = 0
    while nbits >= 64:
        acc, nb, widx = put_bits(buf, acc, nb, widx, stream[i], U64(64))
        i += 1
        nbits -= 64
    if nbits > 0:
        acc, nb, widx = put_bits(buf, acc, nb, widx, stream[i] & mask_of(nbits), U64(nbits))
    return acc, nb, widx


@njit(inline="always")
def encode_unit(src, off, t0, t1, W, p, U, fbits, ptot, exc, flag, flag64, stream, ys, keep, buf, acc, nb, widx):
    """Append one unit in its cheapest kind to a writer (state: uint64 acc,
    nb, widx); returns (kind, bits, writer state).  ``exc``, ``flag``,
    ``stream``, ``ys`` and ``keep`` are scratch for units of up to
    SCRATCH_WORDS words (see ``scratch``; ``flag64`` views ``flag``).  A
    one-column model's unit takes two passes (``lane_words``, then
    ``pack_lanes`` straight into ``buf``); other models' residuals are
    packed into ``stream`` and copied."""
    if U > SCRATCH_WORDS:
        return encode_unit_in_passes(src, off, t0, t1, W, p, U, fbits, ptot, buf, acc, nb, widx)
    pbits, kmax, kbits = unit_geometry(U)
    if p == 1:
        lane_words(src, off, t0, U, ys, keep, flag)
        k = miss_positions(flag64, U, exc)
        sbits = (U - k) * np.int64(t0[0, WIDTH])
    else:
        k, sbits = scan(src, off, t0, p, U, exc, stream)
    excbits = 0
    for e in range(k):
        c = column(exc[e], p)
        x = U64(src[off + exc[e]])
        second = fbits != 0 and matches(x, t1, c)
        flag[e] = second
        excbits += np.int64(t1[c, WIDTH]) if second else W
    kind, bits = cheapest(U, W, k, sbits, fbits, excbits)
    Wu = U64(W)
    if kind == RAW:
        for j in range(U):
            acc, nb, widx = put_bits(buf, acc, nb, widx, U64(src[off + j]), Wu)
        return kind, bits, acc, nb, widx
    if kind == SPARSE:
        acc, nb, widx = put_bits(buf, acc, nb, widx, U64(k), U64(kbits))
        for e in range(k):
            acc, nb, widx = put_bits(buf, acc, nb, widx, U64(exc[e]), U64(pbits))
    elif kind == BITMAP:
        e = 0
        for j0 in range(0, U, 64):
            n = min(64, U - j0)
            word = ZERO
            while e < k and exc[e] < j0 + n:
                word |= ONE << U64(exc[e] - j0)
                e += 1
            acc, nb, widx = put_bits(buf, acc, nb, widx, word, U64(n))
    if p == 1 and sbits:   # (no bits at all for a level with no free bits: a sparse table's zeros)
        # the word width spelled out, so each lane loop compiles for its own constants
        y64, k64 = ys.view(np.uint64), keep.view(np.uint64)
        if W == 8:
            acc, nb, widx = pack_lanes(y64, k64, (U + 7) // 8, 8, 8, t0, buf, acc, nb, widx)
        elif W == 16:
            acc, nb, widx = pack_lanes(y64, k64, (U + 3) // 4, 4, 16, t0, buf, acc, nb, widx)
        elif W == 32:
            acc, nb, widx = pack_lanes(y64, k64, (U + 1) // 2, 2, 32, t0, buf, acc, nb, widx)
        else:
            acc, nb, widx = pack_lanes(y64, k64, U, 1, 64, t0, buf, acc, nb, widx)
    elif p > 1:
        acc, nb, widx = append_stream(stream, sbits, buf, acc, nb, widx)
    if fbits:
        acc, nb, widx = pack_flags(flag, k, buf, acc, nb, widx)
    for e in range(k):   # one put_bits, no branch: numba then keeps no reference counts in the loop
        x = U64(src[off + exc[e]])
        c = column(exc[e], p)
        whole = U64(flag[e]) - ONE   # all ones: stored whole; zero: its secondary residual
        acc, nb, widx = put_bits(buf, acc, nb, widx, (x & whole) | (residual(x, t1, c) & ~whole),
                                 (Wu & whole) | (t1[c, WIDTH] & ~whole))
    return kind, bits, acc, nb, widx


@njit(inline="always")
def pack_flags(flag, k, buf, acc, nb, widx):
    """Append the ``k`` one-bit flags ``flag[:k]`` (bytes 0 or 1), 64 per append."""
    for e0 in range(0, k, 64):
        n = min(64, k - e0)
        word = ZERO
        for i in range(n):
            word |= U64(flag[e0 + i]) << U64(i)
        acc, nb, widx = put_bits(buf, acc, nb, widx, word, U64(n))
    return acc, nb, widx


@njit
def encode_unit_in_passes(src, off, t0, t1, W, p, U, fbits, ptot, buf, acc, nb, widx):
    """``encode_unit`` for a unit too long for scratch: one pass to size it,
    then one pass per part of its encoding (slower, no extra memory)."""
    kind, bits, k = unit_size(src, off, t0, t1, W, p, U, fbits, ptot)
    Wu = U64(W)
    if kind == RAW:
        for j in range(U):
            acc, nb, widx = put_bits(buf, acc, nb, widx, U64(src[off + j]), Wu)
        return kind, bits, acc, nb, widx
    pbits, kmax, kbits = unit_geometry(U)
    if kind == SPARSE:
        acc, nb, widx = put_bits(buf, acc, nb, widx, U64(k), U64(kbits))
    for part in range(4):  # 0: positions or bitmap, 1: matched residuals, 2: flags, 3: exceptions
        if kind == ALL and part != 1:
            continue
        c = 0
        for j in range(U):
            x = U64(src[off + j])
            hit = matches(x, t0, c)
            if part == 0:
                if kind == BITMAP:
                    acc, nb, widx = put_bits(buf, acc, nb, widx, U64(not hit), ONE)
                elif not hit:
                    acc, nb, widx = put_bits(buf, acc, nb, widx, U64(j), U64(pbits))
            elif part == 1:
                if hit:
                    acc, nb, widx = put_bits(buf, acc, nb, widx, residual(x, t0, c), t0[c, WIDTH])
            elif not hit:
                second = fbits != 0 and matches(x, t1, c)
                if part == 2 and fbits:
                    acc, nb, widx = put_bits(buf, acc, nb, widx, U64(second), ONE)
                elif part == 3:
                    if second:
                        acc, nb, widx = put_bits(buf, acc, nb, widx, residual(x, t1, c), t1[c, WIDTH])
                    else:
                        acc, nb, widx = put_bits(buf, acc, nb, widx, x, Wu)
            c += 1
            if c == p:
                c = 0
    return kind, bits, acc, nb, widx


@njit(inline="always")
def scratch(U, words):
    """(exc, flag, flag64, stream, ys, keep) scratch arrays of
    ``encode_unit`` for U-word units of ``words``: ``flag`` also holds a
    miss byte per word, zero-padded to whole uint64s (``flag64`` views
    them so), ``stream`` a residual per word, ``ys`` and ``keep`` a word
    each (``lane_words``) in whole uint64s, ``keep`` zero past U so a
    last part-filled group keeps only the unit's words."""
    n = min(U, SCRATCH_WORDS)
    m = (n + 15) // 8 * 8
    flag = np.zeros(m, np.uint8)
    return (np.empty(n + 1, np.int64), flag, flag.view(np.uint64), np.empty(n + 2, np.uint64),
            np.empty(m, words.dtype), np.zeros(m, words.dtype))


@njit(inline="always")
def padded_tail(words, U, total_words):
    """The last unit completed to U words by repeating its own words (whole
    rows, so each keeps its model column and matches the model like its
    rows do, where zeros would be exceptions), or an empty array when the
    rows fill it; decoders drop the padding."""
    n = (total_words + U - 1) // U
    used = total_words - (n - 1) * U
    tail = np.empty(U if 0 < used < U else 0, words.dtype)
    for j in range(tail.shape[0]):
        tail[j] = words[(n - 1) * U + j % used]
    return tail


@njit
def encode_units(x, tail, n, first, last, t0, t1, W, p, U, fbits, ptot, work, buf, bit, kinds, sizes):
    """Encode units [first, last) of the ``n`` (the last one the padded
    ``tail`` when it is not empty) back to back into ``buf`` from bit
    ``bit`` (the bits below it in its word are kept), with ``work`` from
    ``scratch``; record each unit's kind and bit size.  The one compiled
    call around ``encode_unit``, which is inlined here only: a call per
    unit cost a quarter of a small unit's time."""
    exc, flag, flag64, stream, ys, keep = work
    widx = U64(bit) >> U64(6)
    nb = U64(bit) & U64(63)
    acc = buf[widx] & low_mask(nb) if nb else ZERO
    for u in range(first, last):
        end = u == n - 1 and tail.shape[0] > 0
        kinds[u], sizes[u], acc, nb, widx = encode_unit(tail if end else x, 0 if end else u * U, t0, t1, W, p, U,
                                                        fbits, ptot, exc, flag, flag64, stream, ys, keep, buf, acc,
                                                        nb, widx)
    flush_bits(buf, acc, nb, widx)


@njit(inline="always")
def unit_source(words, U, total_words):
    """(the whole units of ``words``, the padded last unit or empty)."""
    n = (total_words + U - 1) // U
    tail = read_only(padded_tail(words, U, total_words))
    return words[:(n - 1) * U if tail.shape[0] else total_words], tail


@Kernel
def size_units(words, U, total_words, t0, t1, W, p, fbits, ptot, count, kinds, sizes):
    """Pass one of a threaded encode: the kind and bits of units [0, count),
    counted (``unit_size``) rather than encoded, so that pass two knows
    where each run of units starts."""
    n = kinds.shape[0]
    x, tail = unit_source(words, U, total_words)
    whole = min(count, n - 1 if tail.shape[0] else n)
    nchunks = min(count, 64)
    for ch in prange(nchunks):
        for u in range(ch * count // nchunks, min((ch + 1) * count // nchunks, whole)):
            if p == 1:
                kinds[u], sizes[u], _ = one_column_unit_size(x, u * U, t0, t1, W, U, fbits, ptot)
            else:
                kinds[u], sizes[u], _ = unit_size(x, u * U, t0, t1, W, p, U, fbits, ptot)
    if whole < count:
        kinds[n - 1], sizes[n - 1], _ = unit_size(tail, 0, t0, t1, W, p, U, fbits, ptot)


@Kernel
def encode_runs(words, U, total_words, t0, t1, W, p, fbits, ptot, runs, out, kinds, sizes):
    """Pass two of a threaded encode: ``runs`` runs of units, each encoded
    straight at its final bit in ``out``, where the ``sizes`` of the units
    before it (pass one; the last run's need not be known) put it, so no
    run is copied and each thread faults in its own part of the output.
    The word where a run starts is also where the run before ends: a run
    encodes its units up to and across that word into a buffer of its
    own, and the head word is OR-ed in once every run is done.  Records
    every unit's kind and size; returns the total bits, or -1 where a run
    came out at other bits than pass one counted (a bug)."""
    n = kinds.shape[0]
    x, tail = unit_source(words, U, total_words)
    first = np.array([r * n // runs for r in range(runs + 1)], np.int64)
    bit = np.zeros(runs + 1, np.int64)
    for r in range(runs - 1):
        bit[r + 1] = bit[r] + sizes[first[r]:first[r + 1]].sum()
    head_word = np.zeros(runs, np.uint64)
    for r in range(1, runs):
        out[bit[r] >> 6] = 0   # written whole by no run
    for r in prange(runs):
        work = scratch(U, words)
        u, last, pos = first[r], first[r + 1], bit[r]
        if r:
            q, rel, v = pos >> 6, pos & 63, u
            while v < last and rel < 64:   # the units that end in or cross the shared word
                src, off = (tail, 0) if v == n - 1 and tail.shape[0] else (x, v * U)
                rel += unit_size(src, off, t0, t1, W, p, U, fbits, ptot)[1]
                v += 1
            head = np.zeros((rel + 63) // 64 + 1, np.uint64)
            encode_units(x, tail, n, u, v, t0, t1, W, p, U, fbits, ptot, work, head, pos & 63, kinds, sizes)
            nw = (rel + 63) // 64
            out[q + 1:q + nw] = head[1:nw]
            head_word[r] = head[0]
            u, pos = v, q * 64 + rel
        if u < last:
            encode_units(x, tail, n, u, last, t0, t1, W, p, U, fbits, ptot, work, out, pos, kinds, sizes)
    for r in range(1, runs):
        out[bit[r] >> 6] |= head_word[r]
    for r in range(runs - 1):
        if sizes[first[r]:first[r + 1]].sum() != bit[r + 1] - bit[r]:
            return -1
    return bit[runs - 1] + sizes[first[runs - 1]:n].sum()


@Kernel
def encode_slotted(words, U, total_words, t0, t1, W, p, fbits, ptot, slots, slot_words, buf, kinds):
    """Write unit ``i`` of ``words`` into slot ``slots[i]``; zero the slot's rest."""
    n = kinds.shape[0]
    x, tail = unit_source(words, U, total_words)
    sizes = np.empty(n, np.int64)
    nchunks = min(n, 64)
    for ch in prange(nchunks):
        work = scratch(U, words)
        for i in range(ch * n // nchunks, (ch + 1) * n // nchunks):
            w0 = slots[i] * slot_words
            encode_units(x, tail, n, i, i + 1, t0, t1, W, p, U, fbits, ptot, work, buf, w0 * 64, kinds, sizes)
            buf[w0 + (sizes[i] + 63) // 64:w0 + slot_words] = 0


# -- decoding --------------------------------------------------------------

@njit
def parse_unit(words, start, end, exact, kind, t0, t1, W, p, U, fbits, ptot, exc, flag):
    """Read a unit's structure without decoding its words.

    Returns (status, k, matched start, exceptions start, stop): the ``k``
    exception positions and flags land in ``exc``/``flag``.  The encoding
    must end exactly at ``end`` when ``exact`` (packed layout) or within it
    (slotted).  Sizes are checked before any payload bit is read, so every
    later read stays inside [start, end).
    """
    Wu = U64(W)
    pos = U64(start)
    end = U64(end)
    if kind == RAW or kind == ALL:
        exc[0] = U
        stop = pos + U64(U * W if kind == RAW else (U // p) * ptot)
        status = ERR_SIZE if stop > end or (exact and stop != end) else OK
        return status, 0, pos, stop, stop
    pbits, kmax, kbits = unit_geometry(U)
    if kind == SPARSE:
        if pos + U64(kbits) > end:
            return ERR_SIZE, 0, pos, pos, pos
        k = np.int64(read_bits(words, pos, mask_of(kbits)))
        pos += U64(kbits)
        if k > kmax:
            return ERR_COUNT, 0, pos, pos, pos
        if pos + U64(k * pbits) > end:
            return ERR_SIZE, 0, pos, pos, pos
        prev = -1
        pmask = mask_of(pbits)
        for e in range(k):
            q = np.int64(read_bits(words, pos, pmask))
            pos += U64(pbits)
            if q <= prev or q >= U:
                return ERR_POSITION, 0, pos, pos, pos
            exc[e] = q
            prev = q
    else:
        if pos + U64(U) > end:
            return ERR_SIZE, 0, pos, pos, pos
        k = 0
        for j0 in range(0, U, 64):
            n = min(64, U - j0)
            word = read_bits(words, pos, mask_of(n))
            pos += U64(n)
            while word != ZERO:
                exc[k] = j0 + ctz(word)
                k += 1
                word &= word - ONE
    exc[k] = U
    matched = U64((U // p) * ptot)
    if p == 1:
        matched -= U64(k) * t0[0, WIDTH]
    else:
        for e in range(k):
            matched -= t0[column(exc[e], p), WIDTH]
    mstart = pos
    fstart = mstart + matched
    xstart = fstart + U64(k * fbits)
    if xstart > end:
        return ERR_SIZE, 0, pos, pos, pos
    stop = xstart
    if fbits == 0:
        flag[:k] = 0
        stop += U64(k) * Wu
    elif p == 1:   # 64 flags a read; the secondary width or W each, without branches
        w1 = t1[0, WIDTH]
        for e0 in range(0, k, 64):
            f64 = read_bits(words, fstart + U64(e0), mask_of(min(64, k - e0)))
            stop += U64(popcount(f64)) * w1 + U64(min(64, k - e0) - popcount(f64)) * Wu
            for e in range(e0, min(e0 + 64, k)):
                flag[e] = np.uint8((f64 >> U64(e - e0)) & ONE)
    else:
        for e in range(k):
            f = np.uint8(read_bits(words, fstart + U64(e), ONE))
            flag[e] = f
            stop += t1[column(exc[e], p), WIDTH] if f else Wu
    status = ERR_SIZE if stop > end or (exact and stop != end) else OK
    return status, k, mstart, xstart, stop


@njit(inline="always")
def lane_constants(G, mask, low, sh1, sh2, base):
    """(W, free, H, L, B, B & L) for decoding G residuals of a one-column
    level from one 64-bit read: ``pdep`` spreads them to the free bits of
    G lanes of W bits, then B (the base in every lane) is added lane by
    lane, the top bits H apart so no carry crosses lanes."""
    W = U64(64 // G)
    rep = lanes(G, W)
    H = rep << (W - ONE)
    L = ~H
    free = ((mask & low) | (((mask & ~low) << sh1) << sh2)) * rep
    B = base * rep
    return W, free, H, L, B, B & L


@njit(inline="always")
def expand(out, o, U, k, exc, vals, xmap, tmp):
    """``vals`` (the matched words in order) to the positions of
    ``out[o:o+U]`` that are not among the k in ``exc``; exception positions
    get any value, to be written afterwards.  Where FAST_EXPAND, 512 bits
    at a time (``expand_lanes``, a mask of the block's exceptions each),
    the unit's last part-block a word at a time; else branch-free, with a
    byte per word (``xmap``) saying whether it is an exception, so no
    iteration waits on the one before."""
    if FAST_EXPAND:
        L = 512 // (8 * vals.itemsize)
        blocks = U // L
        misses = tmp[tmp.shape[0] - blocks:]   # each block's exceptions, past the matched words in tmp
        misses[:] = 0
        e = 0
        while e < k and exc[e] < blocks * L:
            misses[U64(exc[e]) // U64(L)] |= ONE << (U64(exc[e]) % U64(L))
            e += 1
        c = 0
        for b in range(blocks):
            keep = ~misses[b] & low_mask(L)
            expand_lanes(vals, c, keep, out, o + b * L)
            c += popcount(keep)
        for j in range(blocks * L, U):
            if e < k and exc[e] == j:
                e += 1
            else:
                out[U64(o + j)] = vals[c]
                c += 1
        return
    xmap[:U] = 0
    for e in range(k):
        xmap[exc[e]] = 1
    c = U64(0)
    for j in range(U64(U)):
        out[U64(o) + j] = vals[c]
        c += ONE - U64(xmap[j])


@njit(inline="always")
def decode_dense_exceptions(words, pos, G, U, k, exc, out, o, t0, tmp, xmap):
    """The matched words of a one-column unit with many exceptions: G
    residuals per read into ``tmp`` (one 64-bit store each), then put in
    place by ``expand``; returns the bit after them."""
    W, free, H, L, B, BL = lane_constants(G, t0[0, WMASK], t0[0, LOW], t0[0, SH1], t0[0, SH2], t0[0, BASE])
    width = t0[0, WIDTH]
    n = U - k
    step = width * U64(G)
    for g in range((n + G - 1) // G):
        d = pdep(read_bits(words, pos + step * U64(g), ~ZERO), free)
        tmp[U64(g)] = ((d & L) + BL) ^ ((d ^ B) & H)
    if G == 8:
        expand(out, o, U, k, exc, tmp.view(np.uint8), xmap, tmp)
    elif G == 4:
        expand(out, o, U, k, exc, tmp.view(np.uint16), xmap, tmp)
    else:
        expand(out, o, U, k, exc, tmp.view(np.uint32), xmap, tmp)
    return pos + width * U64(n)


@njit(inline="always")
def decode_group_run(words, pos, G, j0, j1, room, out, o, mask, low, sh1, sh2, base, width):
    """Words j0..j1-1 of a unit, all matching a one-column level: G
    residuals (G * W <= 64) from each 64-bit read; returns the next bit.

    Words j1..room-1 may be overwritten with anything (the caller writes
    them afterwards): a run that ends G words or more before ``room`` is
    decoded in whole groups, its last one spilling past j1, which spares
    the short tail loop whose length a branch predictor cannot guess
    (runs between exceptions have random lengths)."""
    if width == ZERO:   # every bit invariant (zeros of a sparse table): the base repeated, a vectorized fill
        for j in range(j0, j1):
            out[U64(o + j)] = base
        return pos
    j = j0
    step = width * U64(G)
    nlow = ~low
    if FAST_PEXT and G > 1:  # G words from one read: spread to their lanes, base added lane-wise
        W, free, H, L, B, BL = lane_constants(G, mask, low, sh1, sh2, base)
        spill = j1 + G <= room
        stop = j1 if spill else j1 - (G - 1)   # whole groups, the last past j1 only where there is room
        while j < stop:
            d = pdep(read_bits(words, pos, ~ZERO), free)
            x = ((d & L) + BL) ^ ((d ^ B) & H)
            for g in range(G):
                out[U64(o + j + g)] = x >> (W * U64(g))
            pos += step
            j += G
        if spill:
            return pos - width * U64(j - j1)
        if j < j1:  # the last few from one read too (what follows them is read and dropped)
            d = pdep(read_bits(words, pos, ~ZERO), free)
            x = ((d & L) + BL) ^ ((d ^ B) & H)
            for g in range(j1 - j):
                out[U64(o + j + g)] = x >> (W * U64(g))
            pos += width * U64(j1 - j)
        return pos
    while j + G <= j1:
        v = read_bits(words, pos, ~ZERO)
        for g in range(G):
            r = (v >> (width * U64(g))) & mask
            out[U64(o + j + g)] = ((r & low) | (((r & nlow) << sh1) << sh2)) + base
        pos += step
        j += G
    while j < j1:
        r = read_bits(words, pos, mask)
        out[U64(o + j)] = ((r & low) | (((r & nlow) << sh1) << sh2)) + base
        pos += width
        j += 1
    return pos


@njit(inline="always")
def decode_run_one_column(words, pos, W, j0, j1, out, o, t0):
    """Words j0..j1-1 of a unit, all matching a one-column model, read from
    bit ``pos``; returns the next bit."""
    mask, low, sh1, sh2, base, width = t0[0, WMASK], t0[0, LOW], t0[0, SH1], t0[0, SH2], t0[0, BASE], t0[0, WIDTH]
    G = 64 // W
    if G == 8:
        return decode_group_run(words, pos, 8, j0, j1, j1, out, o, mask, low, sh1, sh2, base, width)
    if G == 4:
        return decode_group_run(words, pos, 4, j0, j1, j1, out, o, mask, low, sh1, sh2, base, width)
    if G == 2:
        return decode_group_run(words, pos, 2, j0, j1, j1, out, o, mask, low, sh1, sh2, base, width)
    return decode_group_run(words, pos, 1, j0, j1, j1, out, o, mask, low, sh1, sh2, base, width)


@njit(inline="always")
def decode_matched_one_column(words, pos, W, U, k, exc, out, o, t0, tmp, xmap):
    """The matched words of a unit with a one-column model into
    ``out[o:o+U]``; returns the bit after them.  Exception positions get
    any value, to be written afterwards.  The output's type drops the bits
    above W."""
    mask, low, sh1, sh2, base, width = t0[0, WMASK], t0[0, LOW], t0[0, SH1], t0[0, SH2], t0[0, BASE], t0[0, WIDTH]
    if width == ZERO:   # every bit invariant (zeros of a sparse table): the base repeated, a vectorized fill
        for j in range(U):
            out[U64(o + j)] = base
        return pos
    if k == 0:
        return decode_run_one_column(words, pos, W, 0, U, out, o, t0)
    if FAST_PEXT and W < 64 and (DENSE_EXCEPTIONS * k >= U or (FAST_EXPAND and k > 0)):
        return decode_dense_exceptions(words, pos, 64 // W, U, k, exc, out, o, t0, tmp, xmap)
    j = 0
    if W == 8:
        for e in range(k + 1):
            pos = decode_group_run(words, pos, 8, j, exc[e], U, out, o, mask, low, sh1, sh2, base, width)
            j = exc[e] + 1
    elif W == 16:
        for e in range(k + 1):
            pos = decode_group_run(words, pos, 4, j, exc[e], U, out, o, mask, low, sh1, sh2, base, width)
            j = exc[e] + 1
    elif W == 32:
        for e in range(k + 1):
            pos = decode_group_run(words, pos, 2, j, exc[e], U, out, o, mask, low, sh1, sh2, base, width)
            j = exc[e] + 1
    else:
        for e in range(k + 1):
            pos = decode_group_run(words, pos, 1, j, exc[e], U, out, o, mask, low, sh1, sh2, base, width)
            j = exc[e] + 1
    return pos


@njit
def decode_unit(words, start, end, exact, kind, t0, t1, W, p, U, fbits, ptot, out, o, exc, flag, tmp):
    """Decode the unit at bits [start, end) into ``out[o:o+U]``, after
    ``parse_unit`` checked it; returns its status."""
    status, k, pos, xstart, _ = parse_unit(words, start, end, exact, kind, t0, t1, W, p, U, fbits, ptot,
                                           exc, flag)
    if status != OK:
        return status
    wmask = mask_of(W)
    Wu = U64(W)
    if kind == RAW:
        for j in range(U):
            out[U64(o + j)] = read_bits(words, pos, wmask)
            pos += Wu
        return OK
    if p == 1:   # without branches: exceptions split unpredictably between the two kinds
        decode_matched_one_column(words, pos, W, U, k, exc, out, o, t0, tmp, flag[U:])
        pos = xstart
        w1, m1 = t1[0, WIDTH], t1[0, WMASK]
        for e in range(k):
            f = U64(flag[e])
            second = ZERO - f
            v = read_bits(words, pos, (m1 & second) | (wmask & ~second))
            out[U64(o + exc[e])] = (restore(v, t1, 0, wmask) & second) | (v & ~second)
            pos += (w1 & second) | (Wu & ~second)
        return OK
    j = 0
    for e in range(k + 1):
        c = column(j, p)
        for i in range(j, exc[e]):
            out[U64(o + i)] = restore(read_bits(words, pos, t0[c, WMASK]), t0, c, wmask)
            pos += t0[c, WIDTH]
            c += 1
            if c == p:
                c = 0
        j = exc[e] + 1
    pos = xstart
    for e in range(k):
        if flag[e]:
            c = column(exc[e], p)
            out[o + exc[e]] = restore(read_bits(words, pos, t1[c, WMASK]), t1, c, wmask)
            pos += t1[c, WIDTH]
        else:
            out[o + exc[e]] = read_bits(words, pos, wmask)
            pos += Wu
    return OK


@njit(inline="always")
def decode_scratch(U):
    """(exc, flag, tmp) scratch of ``parse_unit`` and ``decode_unit`` for
    U-word units (empty beyond SCRATCH_WORDS: those units are read in
    passes): ``flag`` has a byte per exception then one per word (see
    ``expand``), ``tmp`` holds a unit's matched words."""
    n = U if U <= SCRATCH_WORDS else 0
    return np.empty(n + 1, np.int64), np.empty(2 * n, np.uint8), np.empty(n + 1, np.uint64)


@njit(inline="always")
def next_exception(words, kind, pstart, pbits, U, e, j0, word):
    """Position of exception ``e`` (taken in order) of a SPARSE or BITMAP
    unit whose positions or bitmap start at bit ``pstart``; ``j0`` and
    ``word`` carry the bitmap reader's state (start with -64 and 0).
    Returns (position, j0, word)."""
    if kind == SPARSE:
        return np.int64(read_bits(words, U64(pstart) + U64(e * pbits), mask_of(pbits))), j0, word
    while word == ZERO:
        j0 += 64
        word = read_bits(words, U64(pstart + j0), mask_of(min(64, U - j0)))
    return j0 + ctz(word), j0, word & (word - ONE)


@njit
def parse_unit_in_passes(words, start, end, exact, kind, t0, t1, W, p, U, fbits, ptot):
    """``parse_unit`` without scratch, for units over SCRATCH_WORDS words:
    one pass over the positions checks them and sizes the matched
    residuals, a second one reads the flags.  Returns (status, k, positions
    start, matched start, exceptions start, stop)."""
    pos = U64(start)
    end = U64(end)
    if kind == RAW or kind == ALL:
        stop = pos + U64(U * W if kind == RAW else (U // p) * ptot)
        status = ERR_SIZE if stop > end or (exact and stop != end) else OK
        return status, 0, pos, pos, stop, stop
    pbits, kmax, kbits = unit_geometry(U)
    if kind == SPARSE:
        if pos + U64(kbits) > end:
            return ERR_SIZE, 0, pos, pos, pos, pos
        k = np.int64(read_bits(words, pos, mask_of(kbits)))
        pos += U64(kbits)
        if k > kmax:
            return ERR_COUNT, 0, pos, pos, pos, pos
        if pos + U64(k * pbits) > end:
            return ERR_SIZE, 0, pos, pos, pos, pos
        mstart = pos + U64(k * pbits)
    else:
        if pos + U64(U) > end:
            return ERR_SIZE, 0, pos, pos, pos, pos
        k = 0
        for j0 in range(0, U, 64):
            k += np.int64(popcount(read_bits(words, pos + U64(j0), mask_of(min(64, U - j0)))))
        mstart = pos + U64(U)
    pstart = pos
    matched = U64((U // p) * ptot)
    prev = -1
    j0 = -64
    word = ZERO
    for e in range(k):
        q, j0, word = next_exception(words, kind, pstart, pbits, U, e, j0, word)
        if q <= prev or q >= U:
            return ERR_POSITION, 0, pos, pos, pos, pos
        prev = q
        matched -= t0[column(q, p), WIDTH]
    fstart = mstart + matched
    xstart = fstart + U64(k * fbits)
    if xstart > end:
        return ERR_SIZE, 0, pos, pos, pos, pos
    stop = xstart
    j0 = -64
    word = ZERO
    for e in range(k):
        q, j0, word = next_exception(words, kind, pstart, pbits, U, e, j0, word)
        second = fbits != 0 and read_bits(words, fstart + U64(e), ONE) != ZERO
        stop += t1[column(q, p), WIDTH] if second else U64(W)
    status = ERR_SIZE if stop > end or (exact and stop != end) else OK
    return status, k, pstart, mstart, xstart, stop


@njit
def decode_unit_in_passes(words, start, end, exact, kind, t0, t1, W, p, U, fbits, ptot, out, d, s, n):
    """Decode words [s, s + n) of a unit over SCRATCH_WORDS words into
    ``out[d:]``, after ``parse_unit_in_passes`` checked it: the positions,
    matched residuals, flags and exceptions are each read by their own
    cursor, so nothing is held per word.  Returns the unit's status."""
    status, k, pstart, pos, xpos, _ = parse_unit_in_passes(words, start, end, exact, kind, t0, t1, W, p, U,
                                                            fbits, ptot)
    if status != OK:
        return status
    wmask = mask_of(W)
    Wu = U64(W)
    if kind == RAW:
        for i in range(n):
            out[U64(d + i)] = read_bits(words, pos + U64((s + i) * W), wmask)
        return OK
    pbits = unit_geometry(U)[0]
    fstart = xpos - U64(k * fbits)
    o = d - s
    j = 0
    j0 = -64
    word = ZERO
    for e in range(k + 1):
        q = U
        if e < k:
            q, j0, word = next_exception(words, kind, pstart, pbits, U, e, j0, word)
        a, b = max(j, s), min(q, s + n)
        if p == 1:  # skip the run's residuals outside the window, decode those inside
            width = t0[0, WIDTH]
            if a < b:
                decode_run_one_column(words, pos + U64(a - j) * width, W, a, b, out, o, t0)
            pos += U64(q - j) * width
        else:
            c = column(j, p)
            for i in range(j, q):
                if a <= i < b:
                    out[U64(o + i)] = restore(read_bits(words, pos, t0[c, WMASK]), t0, c, wmask)
                pos += t0[c, WIDTH]
                c += 1
                if c == p:
                    c = 0
        if e < k:
            c = column(q, p)
            second = fbits != 0 and read_bits(words, fstart + U64(e), ONE) != ZERO
            width = t1[c, WIDTH] if second else Wu
            if s <= q < s + n:
                v = read_bits(words, xpos, mask_of(width))
                out[U64(o + q)] = restore(v, t1, c, wmask) if second else v
            xpos += width
        j = q + 1
    return OK


@Kernel
def unit_sizes(words, t0, t1, W, p, U, fbits, ptot, exact, starts, ends, kinds, sizes):
    """Encoded size in bits of every unit (-status for a malformed one)."""
    n = starts.shape[0]
    nchunks = min(n, 64)
    for ch in prange(nchunks):
        exc, flag, _ = decode_scratch(U)
        for u in range(ch * n // nchunks, (ch + 1) * n // nchunks):
            if U > SCRATCH_WORDS:
                status, _, _, _, _, stop = parse_unit_in_passes(words, starts[u], ends[u], exact, kinds[u], t0, t1,
                                                                W, p, U, fbits, ptot)
            else:
                status, _, _, _, stop = parse_unit(words, starts[u], ends[u], exact, kinds[u], t0, t1, W, p, U,
                                                   fbits, ptot, exc, flag)
            sizes[u] = np.int64(stop) - starts[u] if status == OK else -status


@Kernel
def decode_jobs(words, t0, t1, W, p, U, fbits, ptot, exact, jstart, jend, jkind, jsrc, jlen, jdst, out, status,
                nchunks):
    """Decode a list of jobs: unit at bits [jstart, jend) of kind jkind, whose
    words [jsrc, jsrc + jlen) go to ``out[jdst:]``.  Whole units decode in
    place; partial ones through a scratch unit.
    """
    nj = jstart.shape[0]
    for ch in prange(nchunks):
        scratch = np.empty(min(U, SCRATCH_WORDS), out.dtype)
        exc, flag, tmp = decode_scratch(U)
        for i in range(ch * nj // nchunks, (ch + 1) * nj // nchunks):
            if U > SCRATCH_WORDS:
                status[i] = decode_unit_in_passes(words, jstart[i], jend[i], exact, jkind[i], t0, t1, W, p, U,
                                                  fbits, ptot, out, jdst[i], jsrc[i], jlen[i])
            elif jsrc[i] == 0 and jlen[i] == U:
                status[i] = decode_unit(words, jstart[i], jend[i], exact, jkind[i], t0, t1, W, p, U, fbits,
                                        ptot, out, jdst[i], exc, flag, tmp)
            else:
                st = decode_unit(words, jstart[i], jend[i], exact, jkind[i], t0, t1, W, p, U, fbits,
                                 ptot, scratch, np.int64(0), exc, flag, tmp)
                status[i] = st
                if st == OK:
                    d = jdst[i]
                    s = jsrc[i]
                    for j in range(jlen[i]):
                        out[d + j] = scratch[s + j]


@njit(inline="always")
def unit_span(u, packed_kinds, slot_bits, block, rel_bits, block_base, rel, payload_bits, nunits):
    """(start bit, end bit, kind) of unit ``u``: its slot of ``slot_bits``
    (slotted), else from the packed row index (docs/format.md section 6)."""
    kind = np.uint8((packed_kinds[u >> 2] >> np.uint8(2 * (u & 3))) & np.uint8(3))
    if slot_bits:
        start = u * slot_bits
        return start, start + slot_bits, kind
    if rel_bits == 0:
        size = payload_bits // nunits
        return u * size, payload_bits if u == nunits - 1 else (u + 1) * size, kind
    start = np.int64(block_base[u // block]) + np.int64(rel[u])
    v = u + 1
    end = payload_bits if v >= nunits else np.int64(block_base[v // block]) + np.int64(rel[v])
    return start, end, kind


@Kernel
def decode_all(words, t0, t1, W, p, U, fbits, ptot, packed_kinds, slot_bits, block, rel_bits, block_base, rel,
               payload_bits, nunits, total_words, out, first, last, nchunks):
    """Decode units [first, last) into ``out`` from its start (the
    tensor's last unit cut to its end), in ``nchunks`` runs of units;
    returns ``8 * unit + status`` of the first malformed unit, or -1."""
    first_bad = np.full(nchunks, -1, np.int64)
    exact = slot_bits == 0
    count = last - first
    for ch in prange(nchunks):
        exc, flag, tmp = decode_scratch(U)
        scratch = np.empty(0, out.dtype)
        for u in range(first + ch * count // nchunks, first + (ch + 1) * count // nchunks):
            start, end, kind = unit_span(u, packed_kinds, slot_bits, block, rel_bits, block_base, rel,
                                         payload_bits, nunits)
            n = min(U, total_words - u * U)
            o = (u - first) * U
            if U > SCRATCH_WORDS:
                st = decode_unit_in_passes(words, start, end, exact, kind, t0, t1, W, p, U, fbits, ptot, out,
                                           o, np.int64(0), n)
            elif n == U:
                st = decode_unit(words, start, end, exact, kind, t0, t1, W, p, U, fbits, ptot, out, o, exc,
                                 flag, tmp)
            else:
                if scratch.shape[0] == 0:
                    scratch = np.empty(U, out.dtype)
                st = decode_unit(words, start, end, exact, kind, t0, t1, W, p, U, fbits, ptot, scratch,
                                 np.int64(0), exc, flag, tmp)
                if st == OK:
                    for j in range(n):
                        out[o + j] = scratch[j]
            if st != OK:
                first_bad[ch] = 8 * u + st
                break
    for ch in range(nchunks):
        if first_bad[ch] >= 0:
            return first_bad[ch]
    return -1
