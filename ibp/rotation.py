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
import functools

import numpy as np
from numba import njit

from ._bits import frozen

CHUNK_WORDS = 1 << 12   # words moved at a time: the scratch chunk stays in cache


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


@functools.lru_cache(maxsize=1024)
def _steps(rotate, gather, W, back):
    """The runs a gather (the gather of the low ``rotate`` bits) moves, as
    uint64 arrays of source bit, run mask and destination bit, swapped to
    undo it: worked out once per model, not per call."""
    moves = gather_moves(gather or (1 << rotate) - 1, W)
    src, mask, dst = (np.array(col, np.uint64) for col in
                      zip(*[(a, (1 << n) - 1, b) for a, n, b in moves]))
    if back:
        src, dst = dst, src
    return frozen(src), frozen(mask), frozen(dst)


@njit(cache=True)
def _move(src, dst, froms, masks, tos, chunk):
    """``dst`` = the words ``src`` with run ``k`` (``masks[k]`` at bit
    ``froms[k]``) moved to bit ``tos[k]``: a run at a time over ``chunk``
    words (a loop that vectorizes), through a scratch chunk so ``dst`` may
    be ``src``."""
    word = dst.dtype.type   # arithmetic kept in the words' width: numba widens it to 64 bits, fewer lanes
    n = src.shape[0]
    tmp = np.empty(min(n, chunk), dst.dtype)
    for first in range(0, n, chunk):
        m = min(chunk, n - first)
        s = src[first:first + m]
        t = tmp[:m]
        t[:] = 0
        for k in range(froms.shape[0]):
            a, mask, b = word(froms[k]), word(masks[k]), word(tos[k])
            for i in range(m):
                t[i] = word(t[i] | word(word(word(s[i] >> a) & mask) << b))
        dst[first:first + m] = t


def transformed(words, rotate, gather):
    """A read-only copy of the W-bit ``words`` rotated right by ``rotate``
    bits or gathered by ``gather`` (``words`` itself when both are 0)."""
    if not (rotate or gather):
        return words
    w = _uint(words)
    out = np.empty(w.shape, w.dtype)
    _move(frozen(w.reshape(-1)), out.reshape(-1), *_steps(rotate, gather, 8 * w.itemsize, False), CHUNK_WORDS)
    return frozen(out)


def transform_back(words, rotate, gather):
    """Undo ``transformed`` on the W-bit ``words``, in place: what decoding
    a rotated or gathered model's words leaves them as."""
    if (rotate or gather) and words.size:
        w = _uint(words)
        if not w.flags.writeable:
            raise ValueError("transform_back undoes the transform in place: the words must be writeable")
        contiguous = w.flags.c_contiguous
        flat = w.reshape(-1) if contiguous else w.flatten()   # a view, else a copy written back
        _move(frozen(flat), flat, *_steps(rotate, gather, 8 * w.itemsize, True), CHUNK_WORDS)
        if not contiguous:
            w[...] = flat.reshape(w.shape)
