"""Rotated words: a model's one transform of the words before its levels.

A level fixes one run of bits.  Small integers such as 0, 2 and 6 (or -9,
-5 and -1) agree on their low bits and on their high bits but differ in
between, so one run fixes only one side.  Rotating every word right by the
length of the low run that agrees moves those bits to the top, next to the
high ones: one run then fixes both (``Model.rotate``; file format version 3).
Encoding rotates a copy of the words right; decoding rotates its output back
left, in place, after the kernels: the codec itself never sees a rotation.
"""
import numpy as np

from ._bits import frozen

CHUNK_WORDS = 1 << 18   # words rotated at a time: the temporaries stay small and in cache


def _rotate(src, dst, right):
    """``dst`` = the W-bit words ``src`` rotated by ``right`` bits to the
    right (``dst`` may be ``src``), a chunk at a time."""
    W = 8 * src.dtype.itemsize
    r, back = src.dtype.type(right), src.dtype.type(W - right)
    for i in range(0, src.size, CHUNK_WORDS):
        s, d = src[i:i + CHUNK_WORDS], dst[i:i + CHUNK_WORDS]
        high = s << back
        np.right_shift(s, r, out=d)
        d |= high


def _uint(words):
    return words.view(f"<u{words.dtype.itemsize}")


def rotated(words, rotate):
    """A read-only copy of the W-bit ``words`` rotated right by ``rotate``
    bits (``words`` itself when ``rotate`` is 0)."""
    if not rotate:
        return words
    w = _uint(words)
    out = np.empty_like(w)
    _rotate(w, out, rotate)
    return frozen(out)


def rotate_back(words, rotate):
    """Rotate the W-bit ``words`` left by ``rotate`` bits, in place: what
    decoding a rotated model's words leaves them as."""
    if rotate and words.size:
        w = _uint(words)
        _rotate(w, w, 8 * w.dtype.itemsize - rotate)
