"""Rotated and gathered words: a model's one transform of the words before
its levels.

A level fixes one run of bits.  Small integers such as 0, 2 and 6 (or -9,
-5 and -1) agree on their low bits and on their high bits but differ in
between, so one run fixes only one side.  Rotating every word right by the
length of the low run that agrees moves those bits to the top, next to the
high ones: one run then fixes both (``Model.rotate``; file format version 3).
Values whose shared bits lie in more places than that (4, 13 and 37 differ
in bits 0, 3 and 5 only) are *gathered*: the bits under a mask move to the
top in order and the others to the bottom in order, so one run fixes every
shared bit, as an arbitrary mask would (``Model.gather``; version 4).  A
rotation right by r is the gather of the low r bits.

Encoding transforms a copy of the words; decoding transforms its output
back, in place, after the kernels: the codec itself never sees either.
"""
import numpy as np

from ._bits import frozen

CHUNK_WORDS = 1 << 18   # words transformed at a time: the temporaries stay small and in cache


def _uint(words):
    return words.view(f"<u{words.dtype.itemsize}")


def _runs(mask, W):
    """(start, length) of each run of set bits of the W-bit ``mask``, low to high."""
    runs, bit = [], 0
    while bit < W:
        if mask >> bit & 1:
            start = bit
            while bit < W and mask >> bit & 1:
                bit += 1
            runs.append((start, bit - start))
        else:
            bit += 1
    return runs


def gather_moves(gather, W):
    """(source bit, bits, destination bit) of each run of bits a gather
    moves: the bits outside ``gather`` to the bottom, then those under it."""
    moves, dest = [], 0
    for mask in ((1 << W) - 1 & ~gather, gather):
        for start, length in _runs(mask, W):
            moves.append((start, length, dest))
            dest += length
    return moves


def _move(src, dst, rotate, gather, back):
    """``dst`` = the words ``src`` rotated right by ``rotate`` bits or
    gathered by ``gather`` (the gather of the low ``rotate`` bits), or that
    undone, a chunk at a time; ``dst`` may be ``src``."""
    t = src.dtype.type
    steps = [(t(a), t((1 << n) - 1), t(b))
             for a, n, b in gather_moves(gather or (1 << rotate) - 1, 8 * src.dtype.itemsize)]
    if back:
        steps = [(b, m, a) for a, m, b in steps]
    for i in range(0, src.size, CHUNK_WORDS):
        s, d = src[i:i + CHUNK_WORDS], dst[i:i + CHUNK_WORDS]
        out = np.zeros_like(s)
        for a, m, b in steps:
            out |= ((s >> a) & m) << b
        d[...] = out


def transformed(words, rotate, gather):
    """A read-only copy of the W-bit ``words`` rotated right by ``rotate``
    bits or gathered by ``gather`` (``words`` itself when both are 0)."""
    if not (rotate or gather):
        return words
    w = _uint(words)
    out = np.empty_like(w)
    _move(w, out, rotate, gather, False)
    return frozen(out)


def transform_back(words, rotate, gather):
    """Undo ``transformed`` on the W-bit ``words``, in place: what decoding
    a rotated or gathered model's words leaves them as."""
    if (rotate or gather) and words.size:
        w = _uint(words)
        _move(w, w, rotate, gather, True)
