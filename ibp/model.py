"""The learned model: per column, which bits are invariant and what they hold.

A model has ``period`` columns; word ``j`` of a unit belongs to column
``j % period``.  Each column has two *levels* (primary, secondary).  A level
``(lo, hi, base)`` says: the word ``x`` matches when bits ``[lo, hi)`` of
``(x - base) mod 2**W`` are all zero, and then only the other ``W - (hi -
lo)`` bits are stored.  With the low bits of ``base`` clear this is the
classic IBP mask/value test; a base with low bits set turns the fixed bits
into a *range* test, which captures float exponents that straddle a power of
two and small signed integers around zero.  ``lo == hi`` is an empty level:
every word matches and is stored whole.

Words that miss the primary level are exceptions; an exception that matches
the secondary level is stored with its secondary residual, else raw.

A model may also *rotate* every word right by ``rotate`` bits before the
levels see it (decoding rotates back): values that share bits on both sides
of the bits where they differ (0, 2 and 6 share bit 0 and the bits above 2)
then share one run at the top, which a level can fix.  Or it may *gather*
the bits under a mask to the top (4, 13 and 37 share bits in three places):
see ``ibp.rotation``.  A model does one or the other, or neither.
"""
from __future__ import annotations

import numbers
from functools import cached_property

import numpy as np
from numba import njit

from ._bits import low_mask
from .errors import FormatError

WORD_BITS = (8, 16, 32, 64)


# LOW_MASK[n]: the n lowest bits set, n = 0..64.
LOW_MASK = np.array([(1 << n) - 1 for n in range(65)], dtype=np.uint64)


LEVEL_PROBLEMS = {1: "model level needs 0 <= lo <= hi <= word bits",
                  2: "model base has bits at or above hi",
                  3: "an empty model level must be (0, 0, 0)"}


@njit(cache=True)
def _level_problem(lo, hi, base, W):
    """The first LEVEL_PROBLEMS key that some level (lo, hi, base) has, or 0
    (one compiled pass: numpy took tens of microseconds per model)."""
    for problem in range(1, 4):
        for lv in range(lo.shape[0]):
            for c in range(lo.shape[1]):
                a, b, v = np.int64(lo[lv, c]), np.int64(hi[lv, c]), base[lv, c]
                if problem == 1 and (a > b or b > W):
                    return 1
                if problem == 2 and b < 64 and v >> np.uint64(b) != 0:
                    return 2
                if problem == 3 and a == b and (a != 0 or v != 0):
                    return 3
    return 0


@njit(cache=True)
def level_tables(lo, hi, base, W):
    """``Model.tables`` of the levels (lo, hi, base) ``[2, period]``: per
    column base, fixed mask, low and high residual masks, the two halves of
    the fixed run's length (shifts stay below 64), residual width and mask."""
    p = lo.shape[1]
    t = np.zeros((2, p, 8), np.uint64)
    ptot = 0
    fbits = 0
    for lv in range(2):
        for c in range(p):
            a, b = np.int64(lo[lv, c]), np.int64(hi[lv, c])
            shift = b - a
            width = W - shift
            t[lv, c, 0] = base[lv, c]
            t[lv, c, 1] = low_mask(b) & ~low_mask(a)
            t[lv, c, 2] = low_mask(a)
            t[lv, c, 3] = low_mask(W) & ~low_mask(b)
            t[lv, c, 4] = shift >> 1
            t[lv, c, 5] = shift - (shift >> 1)
            t[lv, c, 6] = width
            t[lv, c, 7] = low_mask(width)
            if lv == 0:
                ptot += width
            elif b > a:
                fbits = 1
    return t[0].copy(), t[1].copy(), fbits, ptot


class Model:
    """Per-column invariant-bit model for words of ``word_bits`` bits."""

    _rotate = 0   # models pickled before rotations have none
    _gather = 0   # ... and before gathers

    def __init__(self, word_bits: int, lo: np.ndarray, hi: np.ndarray, base: np.ndarray, rotate: int = 0,
                 gather: int = 0):
        self.word_bits = int(word_bits)
        self.lo = np.ascontiguousarray(lo, dtype=np.uint8)
        self.hi = np.ascontiguousarray(hi, dtype=np.uint8)
        self.base = np.ascontiguousarray(base, dtype=np.uint64)
        for name, value in (("rotate", rotate), ("gather", gather)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise FormatError(f"{name} must be an integer, got {value!r}")
        self._rotate = int(rotate)
        self._gather = int(gather)
        for a in (self.lo, self.hi, self.base):
            a.flags.writeable = False
        self._validate()

    @classmethod
    def _learned(cls, word_bits: int, lo: np.ndarray, hi: np.ndarray, base: np.ndarray, rotate: int = 0,
                 tables: tuple | None = None, gather: int = 0) -> Model:
        """A model from ibp's own learner: valid by construction, so not
        checked again (checking costs as much as compressing a small
        tensor), with its ``tables`` when the learner made them."""
        model = cls.__new__(cls)
        model.word_bits = int(word_bits)
        model.lo, model.hi, model.base = lo, hi, base
        model._rotate = rotate
        model._gather = gather
        for a in (lo, hi, base):
            a.setflags(write=False)
        if tables is not None:
            t0, t1, fbits, ptot = tables
            model.__dict__["tables"] = (t0, t1, int(fbits), int(ptot))
        return model

    @classmethod
    def _checked(cls, word_bits: int, lo: np.ndarray, hi: np.ndarray, base: np.ndarray, rotate: int,
                 gather: int = 0) -> Model:
        """A model from a file's sections (arrays of the right types that no
        one else holds: the reader's copies), checked as ``Model()`` checks."""
        model = cls._learned(word_bits, lo, hi, base, rotate, gather=gather)
        model._validate()
        return model

    def _validate(self):
        W = self.word_bits
        if W not in WORD_BITS:
            raise FormatError(f"word width {W} is not one of {WORD_BITS}")
        if not 0 <= self.rotate < W:
            raise FormatError(f"rotate must be an integer in [0, {W - 1}], got {self.rotate!r}")
        if not 0 <= self.gather < 1 << W:
            raise FormatError(f"gather must be a {W}-bit mask, got {self.gather!r}")
        if self.rotate and self.gather:
            raise FormatError("a model rotates its words or gathers their bits, not both")
        if self.lo.ndim != 2 or self.lo.shape[0] != 2 or self.lo.shape[1] < 1:
            raise FormatError(f"model arrays must have shape (2, period >= 1), got {self.lo.shape}")
        if self.hi.shape != self.lo.shape or self.base.shape != self.lo.shape:
            raise FormatError("model arrays disagree in shape")
        problem = _level_problem(self.lo, self.hi, self.base, W)
        if problem:
            raise FormatError(LEVEL_PROBLEMS[problem])

    @property
    def rotate(self) -> int:
        """Bits every word is rotated right by before the levels see it
        (ibp.rotation); 0 for most models."""
        return self._rotate

    @property
    def gather(self) -> int:
        """The bits every word has moved to the top, in order, before the
        levels see it (ibp.rotation); 0 for most models."""
        return self._gather

    @property
    def transforms_words(self) -> bool:
        """Whether the levels see words rotated or gathered (which the GPU
        kernels do not do: see ibp.cuda)."""
        return bool(self._rotate or self._gather)

    @property
    def period(self) -> int:
        return self.lo.shape[1]

    @cached_property
    def widths(self) -> np.ndarray:
        """int64 [2, period]: bits stored per word at each level."""
        return self.word_bits - (self.hi.astype(np.int64) - self.lo.astype(np.int64))

    @cached_property
    def has_secondary(self) -> bool:
        return bool(np.any(self.hi[1] > self.lo[1]))

    @cached_property
    def tables(self) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(t0, t1, fbits, ptot): per-level uint64 tables ``[period, 8]`` for
        the numba kernels (fields in ibp.codec), whether exceptions carry a
        secondary flag bit, and the primary widths summed over a period."""
        t0, t1, fbits, ptot = level_tables(self.lo, self.hi, self.base, self.word_bits)
        return t0, t1, int(fbits), int(ptot)

    @property
    def invariant_bits(self) -> np.ndarray:
        """Primary fixed bits per column (int array)."""
        return self.hi[0].astype(np.int64) - self.lo[0].astype(np.int64)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Model) and self.word_bits == other.word_bits and self.rotate == other.rotate
                and self.gather == other.gather and np.array_equal(self.lo, other.lo) and np.array_equal(self.hi, other.hi)
                and np.array_equal(self.base, other.base))

    def __repr__(self) -> str:
        rotate = f", rotate={self.rotate}" if self.rotate else f", gather={self.gather:#x}" if self.gather else ""
        return (f"ibp.Model(word_bits={self.word_bits}, period={self.period}{rotate}, "
                f"invariant bits/column={self.invariant_bits.mean():.2f})")

    @classmethod
    def empty(cls, word_bits: int, period: int = 1) -> Model:
        """A model that fixes nothing: every unit is stored raw."""
        z = np.zeros((2, period), np.uint8)
        return cls(word_bits, z, z, np.zeros((2, period), np.uint64))
