"""How a tensor maps onto words and units.

Rows are the first axis (a 0-d tensor is one row of one element; a 1-d
tensor has one row per element).  The tensor's bytes, in C order, are a flat
sequence of ``W``-bit words; consecutive words form *units* of ``U`` words,
each encoded on its own.  A unit is either a whole number of rows (short rows
are grouped so per-unit overhead stays small) or an exact fraction of a row
(very long rows are split so threads and GPU warps can share the work).  The
last unit is zero-padded when the rows do not fill it.
"""
import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

GROUP_BYTES = 4096         # rows shorter than this are grouped into one unit (a unit costs the
                           # codec ~0.1-0.2 us: 768-byte bf16 rows decoded 1.05-1.25x zstd-3's speed
                           # one per unit, 1.7-2.2x grouped into 4 KiB, one thread)
PIECE_BYTES = 256          # a long row is split into pieces of at least this many bytes
FLAT_UNIT_BYTES = 4096     # 0-d and 1-d tensors are cut into units this long
SPLIT_BYTES = 1 << 16      # rows longer than this are split when they divide
MAX_UNIT_BYTES = SPLIT_BYTES  # no unit is longer, unless it is one whole row


def _row_elems(shape):
    return math.prod(shape[1:]) if len(shape) >= 1 else 1


def _nrows(shape):
    return shape[0] if len(shape) >= 1 else 1


def _split_piece(row_elems, itemsize, last):
    """Largest divisor of ``row_elems`` that fits SPLIT_BYTES, preferring
    multiples of the last dimension; ``row_elems`` itself when none does."""
    fits = [d for d in _divisors(row_elems) if d * itemsize <= SPLIT_BYTES and d * itemsize >= PIECE_BYTES]
    aligned = [d for d in fits if d % last == 0]
    for choice in (aligned, fits):
        if choice:
            return max(choice)
    return row_elems


def _divisors(n):
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def unit_elems(shape, itemsize, unit_rows=None, group_bytes=GROUP_BYTES):
    """Elements per unit for a tensor of this shape (independent of W).

    ``unit_rows`` asks for that many rows per unit instead of the grouping
    chosen here (long rows are still split): 1 lets a gather read only the
    rows it asks for, at the price of per-unit overhead on short rows.
    Rows shorter than ``group_bytes`` are grouped."""
    nrows, row = _nrows(shape), _row_elems(shape)
    if nrows == 0 or row == 0:
        return 1  # no words, no units: any unit that fits the format will do
    row_bytes = row * itemsize
    if row_bytes > SPLIT_BYTES and len(shape) >= 2:
        return _split_piece(row, itemsize, shape[-1])
    if unit_rows is not None:
        return min(nrows, unit_rows, max(1, MAX_UNIT_BYTES // row_bytes)) * row
    if len(shape) <= 1:
        return _balanced(nrows, max(1, FLAT_UNIT_BYTES // itemsize))
    if row_bytes < group_bytes:
        return _balanced(nrows, -(-group_bytes // row_bytes)) * row
    return row


def _balanced(nrows, least):
    """Rows per unit, at least ``least`` (or all rows) and below twice it:
    one that divides the rows when there is one, else as many units as
    ``least`` rows each would take with the rows spread evenly over them.
    The last unit's padding is stored, so it is then none, or less than a
    row per unit, instead of up to a whole unit (20 rows grouped by 16
    padded 12; as one unit of 20, none)."""
    if least >= nrows:
        return nrows
    for rows in range(least, min(2 * least, nrows + 1)):
        if nrows % rows == 0:
            return rows
    units = -(-nrows // least)
    return -(-nrows // units)


@dataclass(frozen=True)
class Geometry:
    """Word and unit arithmetic for one tensor at one word width (derived
    sizes are computed once: they are asked for on every call)."""
    shape: tuple
    itemsize: int
    word_bits: int
    unit_words: int

    @classmethod
    def choose(cls, shape, itemsize, word_bits, unit_rows=None, group_bytes=GROUP_BYTES):
        wb = word_bits // 8
        if math.prod(shape) == 0:  # no words: the format's only unit is one word
            return cls(tuple(shape), itemsize, word_bits, 1)
        return cls(tuple(shape), itemsize, word_bits,
                   unit_elems(shape, itemsize, unit_rows, group_bytes) * itemsize // wb)

    @staticmethod
    @lru_cache(maxsize=4096)
    def checked(shape, itemsize, word_bits, unit_rows=None):
        """``choose`` then ``check``, cached: a checkpoint's tensors share
        a few shapes, and small tensors cannot afford the arithmetic."""
        geom = Geometry.choose(shape, itemsize, word_bits, unit_rows)
        geom.check()
        return geom

    @cached_property
    def nrows(self):
        return _nrows(self.shape)

    @cached_property
    def row_words(self):
        return _row_elems(self.shape) * self.itemsize * 8 // self.word_bits

    @cached_property
    def total_words(self):
        return self.nrows * self.row_words

    @cached_property
    def nunits(self):
        return -(-self.total_words // self.unit_words)

    @cached_property
    def slot_words(self):
        """uint64 words per slot in the slotted layout."""
        return -(-self.unit_words * self.word_bits // 64)

    def check(self):
        """Raise ValueError unless the word width and unit size fit the shape
        (the reader's rules, docs/format.md section 3, so that the writer
        never makes what the reader refuses).

        Units are at most MAX_UNIT_BYTES unless one holds exactly one row
        (which older writers left whole when it did not divide): decoder
        scratch memory grows with the unit, so a file must not be able to
        ask for gigabytes of it to decode a few rows."""
        W, U, R = self.word_bits, self.unit_words, self.row_words
        row_bytes = _row_elems(self.shape) * self.itemsize
        if W not in (8, 16, 32, 64) or row_bytes % (W // 8):
            raise ValueError(f"word width {W} does not divide the {row_bytes}-byte rows")
        if U < 1 or (R > 0 and U % R and R % U):
            raise ValueError(f"unit of {U} words neither groups nor splits {R}-word rows")
        if U > max(self.total_words, 1):
            raise ValueError(f"unit of {U} words is longer than the tensor's {self.total_words} words")
        if U * W // 8 > MAX_UNIT_BYTES and U != R:
            raise ValueError(f"unit of {U * W // 8} bytes is longer than {MAX_UNIT_BYTES} and not one row")


def word_widths(shape, itemsize):
    """Word widths that fit this tensor, narrowest first."""
    row_bytes = _row_elems(shape) * itemsize
    unit_bytes = unit_elems(shape, itemsize) * itemsize
    return [W for W in (8, 16, 32, 64)
            if W <= 8 * itemsize and row_bytes % (W // 8) == 0 and unit_bytes % (W // 8) == 0]


def periods(shape, itemsize, word_bits, unit_words):
    """Candidate model periods (in words): one element, the last dimension,
    a whole row; only those that divide the unit (one word for an empty
    tensor, whose only unit is one word)."""
    per_elem = itemsize * 8 // word_bits
    elems = {1}
    if len(shape) >= 2:
        elems |= {shape[-1], _row_elems(shape)}
    return sorted(e * per_elem for e in elems if e > 0 and unit_words % (e * per_elem) == 0) or [1]
