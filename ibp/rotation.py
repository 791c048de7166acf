"""Rotated words: a model's one transform of the words before its levels.

A level fixes one run of bits.  Small integers such as 0, 2 and 6 (or -9,
-5 and -1) agree on their low bits and on their high bits but differ in
between, so one run fixes only one side.  Rotating every word right by the
length of the low run that agrees moves those bits to the top, next to the
high ones: one run then fixes both (``Model.rotate``; file format version 3).
Encoding rotates a copy of the words right; decoding rotates its output back
left, in place, after the kernels: the codec itself never sees a rotation.
"""
from ._bits import frozen


def _uint(words):
    return words.view(f"<u{words.dtype.itemsize}")


def rotated(words, rotate):
    """A read-only copy of the W-bit ``words`` rotated right by ``rotate``
    bits (``words`` itself when ``rotate`` is 0)."""
    if not rotate:
        return words
    w = _uint(words)
    W = w.dtype.type(8 * w.dtype.itemsize)
    r = w.dtype.type(rotate)
    out = w >> r
    out |= w << (W - r)
    return frozen(out)


def rotate_back(words, rotate):
    """Rotate the W-bit ``words`` left by ``rotate`` bits, in place: what
    decoding a rotated model's words leaves them as."""
    if not rotate or not words.size:
        return
    w = _uint(words)
    W = w.dtype.type(8 * w.dtype.itemsize)
    r = w.dtype.type(rotate)
    high = w >> (W - r)
    w <<= r
    w |= high
