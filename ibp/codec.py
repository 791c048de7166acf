"""The CPU codec: numba kernels that encode and decode units of words.

The byte format these kernels read and write is specified in docs/format.md;
this module is its reference implementation and the ground truth for the GPU.

Every kernel takes the model as two uint64 tables built by
``Model.tables``, ``t0`` (primary level) and ``t1`` (secondary), of shape
``[period, 8]``: one row of fields per column, so a word's parameters sit in
one cache line.
"""
import numpy as np
from numba import njit, prange

from ._bits import ONE, U64, ZERO, Kernel, ctz, flush_bits, put_bits, read_bits

RAW, ALL, SPARSE, BITMAP = 0, 1, 2, 3
# Fields of a level table row.
BASE, FIX, LOW, HIGH, SH1, SH2, WIDTH, WMASK = range(8)

# Status codes of decode_jobs, turned into FormatError messages by the caller.
OK, ERR_SIZE, ERR_COUNT, ERR_POSITION = 0, 1, 2, 3
ERRORS = {ERR_SIZE: "unit size does not match its encoding",
          ERR_COUNT: "exception count out of range",
          ERR_POSITION: "exception positions not strictly increasing or out of range"}


@njit(inline="always")
def bit_length(n):
    r = 0
    while n > 0:
        n >>= 1
        r += 1
    return r


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
def classify_unit(src, off, t0, t1, W, p, U, fbits, ptot, exc, flag):
    """Find a unit's exceptions (positions into ``exc``, secondary matches
    into ``flag``) and pick its cheapest kind: returns (kind, bits, k).

    The scan over the words stores every position and advances ``k`` only on
    a miss: no branch to mispredict on real data's scattered exceptions."""
    pbits, kmax, kbits = unit_geometry(U)
    k = 0
    if p == 1:
        base, fix = t0[0, BASE], t0[0, FIX]
        for j in range(U):
            exc[k] = j
            k += np.int64(((U64(src[off + j]) - base) & fix) != ZERO)
    else:
        c = 0
        for j in range(U):
            exc[k] = j
            k += np.int64(not matches(U64(src[off + j]), t0, c))
            c += 1
            if c == p:
                c = 0
    exc[k] = U
    matched = np.int64((U // p) * ptot)
    excbits = 0
    for e in range(k):
        c = exc[e] % p
        second = fbits != 0 and matches(U64(src[off + exc[e]]), t1, c)
        flag[e] = second
        matched -= np.int64(t0[c, WIDTH])
        excbits += np.int64(t1[c, WIDTH]) if second else W
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
    return kind, best, k


@Kernel
def classify_units(x, t0, t1, W, p, U, fbits, ptot, sizes, nchunks):
    """Bit size of every unit of ``x`` (a whole number of units)."""
    n = sizes.shape[0]
    for ch in prange(nchunks):
        exc = np.empty(U + 1, np.int64)
        flag = np.empty(U, np.uint8)
        for u in range(ch * n // nchunks, (ch + 1) * n // nchunks):
            sizes[u] = classify_unit(x, u * U, t0, t1, W, p, U, fbits, ptot, exc, flag)[1]


@njit(inline="always")
def encode_run(src, off, j0, j1, t, p, colof, buf, acc, nb, widx):
    """Append the residuals of words j0..j1-1 of a unit, all matching level
    ``t``; returns the writer state.  One column keeps its parameters in
    registers (see decode_run)."""
    if p == 1:
        base, low, high, sh1, sh2, width = t[0, BASE], t[0, LOW], t[0, HIGH], t[0, SH1], t[0, SH2], t[0, WIDTH]
        j = j0
        group = min(4, 64 // max(np.int64(width), 1))  # residuals per append
        if group > 1:
            wg = width * U64(group)
            while j + group <= j1:
                v = ZERO
                for g in range(group):
                    y = U64(src[off + j + g]) - base
                    v |= ((y & low) | (((y & high) >> sh1) >> sh2)) << (width * U64(g))
                acc, nb, widx = put_bits(buf, acc, nb, widx, v, wg)
                j += group
        for j in range(j, j1):
            y = U64(src[off + j]) - base
            v = (y & low) | (((y & high) >> sh1) >> sh2)
            acc, nb, widx = put_bits(buf, acc, nb, widx, v, width)
        return acc, nb, widx
    c = colof[j0] if j0 < j1 else 0
    for j in range(j0, j1):
        v = residual(U64(src[off + j]), t, c)
        acc, nb, widx = put_bits(buf, acc, nb, widx, v, t[c, WIDTH])
        c += 1
        if c == p:
            c = 0
    return acc, nb, widx


@njit
def encode_unit(src, off, kind, k, t0, t1, W, p, U, fbits, colof, exc, flag,
                buf, acc, nb, widx):
    """Append one unit, whose ``k`` exceptions ``classify_unit`` found, to a
    writer (state: uint64 acc, nb, widx); returns the new state."""
    Wu = U64(W)
    if kind == RAW:
        for j in range(U):
            acc, nb, widx = put_bits(buf, acc, nb, widx, U64(src[off + j]), Wu)
        return acc, nb, widx
    if kind == ALL:
        return encode_run(src, off, 0, U, t0, p, colof, buf, acc, nb, widx)
    pbits, kmax, kbits = unit_geometry(U)
    if kind == SPARSE:
        acc, nb, widx = put_bits(buf, acc, nb, widx, U64(k), U64(kbits))
        for e in range(k):
            acc, nb, widx = put_bits(buf, acc, nb, widx, U64(exc[e]), U64(pbits))
    else:
        e = 0
        for j0 in range(0, U, 64):
            n = min(64, U - j0)
            word = ZERO
            while e < k and exc[e] < j0 + n:
                word |= ONE << U64(exc[e] - j0)
                e += 1
            acc, nb, widx = put_bits(buf, acc, nb, widx, word, U64(n))
    j = 0
    for e in range(k + 1):
        acc, nb, widx = encode_run(src, off, j, exc[e], t0, p, colof, buf, acc, nb, widx)
        j = exc[e] + 1
    if fbits:
        for e in range(k):
            acc, nb, widx = put_bits(buf, acc, nb, widx, U64(flag[e]), ONE)
    for e in range(k):
        x = U64(src[off + exc[e]])
        if flag[e]:
            c = colof[exc[e]]
            acc, nb, widx = put_bits(buf, acc, nb, widx, residual(x, t1, c), t1[c, WIDTH])
        else:
            acc, nb, widx = put_bits(buf, acc, nb, widx, x, Wu)
    return acc, nb, widx


@njit(inline="always")
def encode_next(x, tail, u, n, t0, t1, W, p, U, fbits, ptot, colof, exc, flag, buf, acc, nb, widx):
    """Classify unit ``u`` (the zero-padded ``tail`` when it is the last and
    ``tail`` is not empty) and append it; returns (kind, size, writer)."""
    if u == n - 1 and tail.shape[0] > 0:
        kind, size, k = classify_unit(tail, 0, t0, t1, W, p, U, fbits, ptot, exc, flag)
        acc, nb, widx = encode_unit(tail, 0, kind, k, t0, t1, W, p, U, fbits, colof, exc, flag, buf, acc, nb, widx)
    else:
        kind, size, k = classify_unit(x, u * U, t0, t1, W, p, U, fbits, ptot, exc, flag)
        acc, nb, widx = encode_unit(x, u * U, kind, k, t0, t1, W, p, U, fbits, colof, exc, flag,
                                    buf, acc, nb, widx)
    return kind, size, acc, nb, widx


@Kernel
def encode_chunks(x, tail, t0, t1, W, p, U, fbits, ptot, colof, chunks, first_word, buf, kinds, sizes):
    """Encode the units of chunk ``ch`` back to back from word
    ``first_word[ch]`` of ``buf``, a region big enough for them raw; record
    each unit's kind and bit size.  ``compact`` then closes the gaps."""
    n = kinds.shape[0]
    for ch in prange(chunks.shape[0] - 1):
        exc = np.empty(U + 1, np.int64)
        flag = np.empty(U, np.uint8)
        acc = ZERO
        nb = ZERO
        widx = U64(first_word[ch])
        for u in range(chunks[ch], chunks[ch + 1]):
            kinds[u], sizes[u], acc, nb, widx = encode_next(x, tail, u, n, t0, t1, W, p, U, fbits, ptot, colof,
                                                            exc, flag, buf, acc, nb, widx)
        flush_bits(buf, acc, nb, widx)


@njit(cache=True)
def compact(buf, first_word, chunk_bits):
    """Slide each chunk's bits down to follow the previous chunk's, in order
    (a chunk only moves towards the start, so nothing unread is overwritten)."""
    pos = 0
    for ch in range(first_word.shape[0]):
        src = first_word[ch]
        nw = (chunk_bits[ch] + 63) >> 6
        d = pos >> 6
        sh = U64(pos & 63)
        if d * 64 + (pos & 63) != src * 64:
            carry = buf[d] & ((ONE << sh) - ONE)
            for i in range(nw):
                w = buf[src + i]
                buf[d + i] = carry | (w << sh)
                carry = ((w >> ONE) >> (U64(63) - sh)) if sh else ZERO
            buf[d + nw] = carry
        pos += chunk_bits[ch]
    return pos


@Kernel
def encode_slotted(x, tail, t0, t1, W, p, U, fbits, ptot, colof, slots, slot_words, buf, kinds):
    """Write unit ``i`` of ``x`` into slot ``slots[i]``; zero the slot's rest."""
    n = kinds.shape[0]
    for i in prange(n):
        exc = np.empty(U + 1, np.int64)
        flag = np.empty(U, np.uint8)
        w0 = U64(slots[i] * slot_words)
        kinds[i], _, acc, nb, widx = encode_next(x, tail, i, n, t0, t1, W, p, U, fbits, ptot, colof, exc, flag,
                                                 buf, ZERO, ZERO, w0)
        flush_bits(buf, acc, nb, widx)
        if nb > ZERO:
            widx += ONE
        while widx < w0 + U64(slot_words):
            buf[widx] = ZERO
            widx += ONE


@njit
def parse_unit(words, start, end, exact, kind, t0, t1, W, p, U, fbits, ptot, colof, exc, flag):
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
    for e in range(k):
        matched -= t0[colof[exc[e]], WIDTH]
    mstart = pos
    fstart = mstart + matched
    xstart = fstart + U64(k * fbits)
    if xstart > end:
        return ERR_SIZE, 0, pos, pos, pos
    stop = xstart
    for e in range(k):
        f = np.uint8(read_bits(words, fstart + U64(e), ONE)) if fbits else np.uint8(0)
        flag[e] = f
        stop += t1[colof[exc[e]], WIDTH] if f else Wu
    status = ERR_SIZE if stop > end or (exact and stop != end) else OK
    return status, k, mstart, xstart, stop


@njit(inline="always")
def decode_run(words, pos, t, p, colof, j0, j1, out, o, wmask):
    """Decode words j0..j1-1 of a unit, all matching level ``t``, from bit
    ``pos``; returns the next bit position.  With one column its parameters
    stay in registers (numba cannot prove the output does not alias them)."""
    if p == 1:
        mask, low, sh1, sh2, base, width = t[0, WMASK], t[0, LOW], t[0, SH1], t[0, SH2], t[0, BASE], t[0, WIDTH]
        for j in range(j0, j1):
            v = read_bits(words, pos, mask)
            out[o + j] = (((v & low) | (((v & ~low) << sh1) << sh2)) + base) & wmask
            pos += width
        return pos
    c = colof[j0] if j0 < j1 else 0
    for j in range(j0, j1):
        out[o + j] = restore(read_bits(words, pos, t[c, WMASK]), t, c, wmask)
        pos += t[c, WIDTH]
        c += 1
        if c == p:
            c = 0
    return pos


@njit
def decode_unit(words, start, end, exact, kind, t0, t1, W, p, U, fbits, ptot, colof,
                out, o, exc, flag):
    """Decode the unit at bits [start, end) into ``out[o:o+U]``, after
    ``parse_unit`` checked it; returns its status."""
    status, k, pos, xstart, _ = parse_unit(words, start, end, exact, kind, t0, t1, W, p, U, fbits, ptot,
                                           colof, exc, flag)
    if status != OK:
        return status
    wmask = mask_of(W)
    Wu = U64(W)
    if kind == RAW:
        for j in range(U):
            out[o + j] = read_bits(words, pos, wmask)
            pos += Wu
        return OK
    j = 0
    for e in range(k + 1):
        pos = decode_run(words, pos, t0, p, colof, j, exc[e], out, o, wmask)
        j = exc[e] + 1
    pos = xstart
    for e in range(k):
        if flag[e]:
            c = colof[exc[e]]
            out[o + exc[e]] = restore(read_bits(words, pos, t1[c, WMASK]), t1, c, wmask)
            pos += t1[c, WIDTH]
        else:
            out[o + exc[e]] = read_bits(words, pos, wmask)
            pos += Wu
    return OK


@Kernel
def unit_sizes(words, t0, t1, W, p, U, fbits, ptot, colof, exact, starts, ends, kinds, sizes):
    """Encoded size in bits of every unit (-status for a malformed one)."""
    n = starts.shape[0]
    for u in prange(n):
        exc = np.empty(U + 1, np.int64)
        flag = np.empty(U, np.uint8)
        status, _, _, _, stop = parse_unit(words, starts[u], ends[u], exact, kinds[u], t0, t1, W, p, U, fbits,
                                           ptot, colof, exc, flag)
        sizes[u] = np.int64(stop) - starts[u] if status == OK else -status


@Kernel
def decode_jobs(words, t0, t1, W, p, U, fbits, ptot, colof, exact,
                jstart, jend, jkind, jsrc, jlen, jdst, out, status, nchunks):
    """Decode a list of jobs: unit at bits [jstart, jend) of kind jkind, whose
    words [jsrc, jsrc + jlen) go to ``out[jdst:]``.  Whole units decode in
    place; partial ones through a scratch unit.
    """
    nj = jstart.shape[0]
    for ch in prange(nchunks):
        scratch = np.empty(U, out.dtype)
        exc = np.empty(U + 1, np.int64)
        flag = np.empty(U, np.uint8)
        for i in range(ch * nj // nchunks, (ch + 1) * nj // nchunks):
            if jsrc[i] == 0 and jlen[i] == U:
                status[i] = decode_unit(words, jstart[i], jend[i], exact, jkind[i], t0, t1, W, p, U, fbits,
                                        ptot, colof, out, jdst[i], exc, flag)
            else:
                st = decode_unit(words, jstart[i], jend[i], exact, jkind[i], t0, t1, W, p, U, fbits,
                                 ptot, colof, scratch, 0, exc, flag)
                status[i] = st
                if st == OK:
                    d = jdst[i]
                    s = jsrc[i]
                    for j in range(jlen[i]):
                        out[d + j] = scratch[s + j]
