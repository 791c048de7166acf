"""Bit-stream primitives shared by the numba encoder, decoder and analysis.

A payload is an array of little-endian uint64 words; bit ``i`` of the stream is
bit ``i % 64`` of word ``i // 64`` (LSB first).  Every shift here stays below
64: LLVM treats larger shifts as poison.
"""
import os
import sys
import threading
import types as pytypes

import numba
import numpy as np
from numba import njit
from llvmlite import ir
from numba.core import cgutils, types
from numba.core.imputils import impl_ret_borrowed
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

U64 = np.uint64
ZERO = U64(0)
ONE = U64(1)
ALL_ONES = ~U64(0)
WORD_DTYPES = {W: np.dtype(f"<u{W // 8}") for W in (8, 16, 32, 64)}   # a tensor's bytes seen as W-bit words


@intrinsic
def popcount(typingctx, x):
    """``llvm.ctpop``: number of set bits."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.ctpop", [args[0].type])
        return builder.call(fn, [args[0]])

    return x(x), codegen


@intrinsic
def read_only(typingctx, array):
    """``array`` typed read-only, inside a kernel (see ``frozen``): a padded
    copy then has the type of the words it stands in for, so the functions
    given either compile once."""
    if not isinstance(array, types.Array):
        return None

    def codegen(context, builder, signature, args):
        return impl_ret_borrowed(context, builder, signature.return_type, args[0])

    return array.copy(readonly=True)(array), codegen


def _fast_bit_gather():
    """Whether this CPU has BMI2's pext/pdep at full speed: Intel since
    Haswell and AMD since Zen 3 do them in a cycle or three; AMD's Zen 1
    and 2 microcode them (hundreds of cycles), slower than shifting lanes.
    IBP_NO_PEXT=1 turns them off (to test the portable path) in kernels
    compiled from then on: give it a fresh NUMBA_CACHE_DIR, since cached
    kernels keep the choice they were compiled with."""
    if os.environ.get("IBP_NO_PEXT"):
        return False
    try:
        import llvmlite.binding as ll
        return bool(ll.get_host_cpu_features().get("bmi2")) and ll.get_host_cpu_name() not in (
            "znver1", "znver2", "bdver4", "btver2")
    except Exception:   # an llvmlite without these queries: take the portable path
        return False


FAST_PEXT = _fast_bit_gather()


def _bmi2(name):
    """A numba intrinsic for ``llvm.x86.bmi.<name>.64`` (only ever reached
    when FAST_PEXT: elsewhere it is compiled to a constant 0 so that no
    CPU without BMI2 is asked to select the instruction)."""
    def impl(typingctx, x, m):
        if not (isinstance(x, types.Integer) and isinstance(m, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            i64 = args[0].type
            if not FAST_PEXT:
                return i64(0)
            fnty = ir.FunctionType(i64, [i64, i64])
            fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.x86.bmi.{name}.64")
            return builder.call(fn, [args[0], builder.zext(args[1], i64) if args[1].type != i64 else args[1]])

        return types.uint64(types.uint64, types.uint64), codegen
    impl.__name__ = name
    return intrinsic(impl)


pext = _bmi2("pext")  # pext(x, m): the bits of x under m, packed to the bottom
pdep = _bmi2("pdep")  # pdep(x, m): the low bits of x spread to the set bits of m


def _fast_expand():
    """Whether this CPU expands a vector's words into the lanes of a mask
    in one instruction: AVX-512 VBMI2's vpexpandb/w and AVX-512F's
    vpexpandd (Intel since Ice Lake, AMD since Zen 4).  Off with
    IBP_NO_PEXT, with the rest of the fast path."""
    if not FAST_PEXT:
        return False
    try:
        import llvmlite.binding as ll
        features = ll.get_host_cpu_features()
        return all(features.get(f) for f in ("avx512f", "avx512bw", "avx512vbmi2"))
    except Exception:
        return False


FAST_EXPAND = _fast_expand()


@intrinsic
def expand_lanes(typingctx, src, at, mask, dst, to):
    """``llvm.masked.expandload`` of 512 bits: ``dst[to:to + L]`` (L =
    512 // the bits of ``src``'s words) gets the next popcount(mask) words
    of ``src`` from ``at``, in order, in the lanes whose ``mask`` bit is
    set, zero in the others (widened or cut to ``dst``'s words); reads no
    word of ``src`` past them.  Only reached where FAST_EXPAND (elsewhere
    LLVM would emulate it a lane at a time)."""
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array)
            and isinstance(src.dtype, types.Integer) and isinstance(dst.dtype, types.Integer)
            and src.dtype.bitwidth in (8, 16, 32)):
        return None
    bits = src.dtype.bitwidth
    lanes = 512 // bits
    out_vector = ir.VectorType(ir.IntType(dst.dtype.bitwidth), lanes)

    def codegen(context, builder, signature, args):
        words, start, m, out, first = args
        vector = ir.VectorType(ir.IntType(bits), lanes)
        lane_mask = ir.VectorType(ir.IntType(1), lanes)
        source = builder.gep(context.make_array(signature.args[0])(context, builder, value=words).data, [start])
        target = builder.gep(context.make_array(signature.args[3])(context, builder, value=out).data, [first])
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [source.type, lane_mask, vector]),
                                            f"llvm.masked.expandload.v{lanes}i{bits}")
        v = builder.call(fn, [source, builder.bitcast(builder.trunc(m, ir.IntType(lanes)), lane_mask),
                              ir.Constant(vector, None)])
        if dst.dtype.bitwidth > bits:   # a wider output (compiled for every width; taken for its own)
            v = builder.zext(v, out_vector)
        elif dst.dtype.bitwidth < bits:
            v = builder.trunc(v, out_vector)
        store = builder.store(v, builder.bitcast(target, out_vector.as_pointer()))
        store.align = dst.dtype.bitwidth // 8
        return context.get_dummy_value()

    return types.void(src, types.intp, types.uint64, dst, types.intp), codegen


@njit(inline="always")
def ctz(x):
    """Index of the lowest set bit of a non-zero uint64."""
    return np.int64(trailing_zeros(x))


@njit(inline="always")
def low_mask(n):
    """The ``n`` lowest bits set, for 0 <= n <= 64."""
    if n >= 64:
        return ALL_ONES
    return (ONE << U64(n)) - ONE


# The helpers below are inlined into hot loops.  They must stay free of
# branches: numba keeps an array argument's reference count alive across
# the basic blocks of an inlined helper, and the resulting NRT calls halve
# the codec's speed.

@njit(inline="always")
def read_bits(words, pos, mask):
    """The bits ``mask`` (``2**width - 1``, width <= 64) of the stream at
    uint64 bit position ``pos``.

    Callers check that the bits lie inside the stream, which always ends
    with a spare zero word: the second word is then loaded only when ``pos``
    is not word-aligned, and that load stays in bounds.
    """
    idx = pos >> U64(6)
    sh = pos & U64(63)
    lo = words[idx]
    hi = words[idx + ((sh + U64(63)) >> U64(6))]
    return ((lo >> sh) | ((hi << ONE) << (U64(63) - sh))) & mask


@njit(inline="always")
def put_bits(buf, acc, nbits, widx, value, width):
    """Append ``width`` (0..64) bits of ``value`` to a sequential writer.

    The writer state is ``(acc, nbits, widx)``, all uint64: ``nbits`` (< 64)
    pending bits in ``acc``, stored at ``buf[widx]`` after every append (a
    store is cheaper than a branch).
    """
    acc |= value << nbits
    total = nbits + width
    buf[widx] = acc
    full = total >> U64(6)
    carry = (value >> ONE) >> (U64(63) - nbits)
    return (carry if full else acc), total & U64(63), widx + full


@njit(inline="always")
def flush_bits(buf, acc, nbits, widx):
    """Store the writer's last partial word (after a carry)."""
    if nbits > ZERO:
        buf[widx] = acc


# Work (words) from which kernels run on all of numba's threads.  Below it a
# second thread costs more than it saves: on a 2-vCPU VM, two threads were
# slower than one up to about 8 MB to encode and 4 MB to decode (waking
# the threads, faulting fresh buffers in, sizing the units first), 1.35x and
# 1.8x faster at 23 MB.  Read at each call, so it can be tuned.
PARALLEL_MIN_WORDS = 1 << 21


def frozen(a):
    """A read-only view of ``a`` (``a`` itself when already read-only).

    numba compiles a kernel once per argument type, and writability is part
    of the type: arrays a kernel only reads are handed over frozen, so each
    kernel compiles once for fresh arrays and mapped files alike (compiling
    twice cost minutes on a cold cache)."""
    if not a.flags.writeable:
        return a
    view = a.view()
    view.flags.writeable = False
    return view

# GNU OpenMP kills processes forked after it ran (DataLoader workers); the
# fork-safe layers do not.  Parallel launches are serialised because some
# layers (workqueue) abort when two Python threads launch at once.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "forksafe"
_LAUNCH = threading.Lock()


class Kernel:
    """A numba kernel compiled twice, with and without threads.

    Waking numba's threads costs tens of microseconds (milliseconds on a busy
    machine), more than small calls take: a gather of a few rows or a bias
    vector runs serially, a big tensor in parallel.  Call as
    ``kernel(words_of_work, *args)``.
    """

    def __init__(self, fn):
        self.parallel = njit(parallel=True, cache=True)(fn)
        serial = pytypes.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                      fn.__defaults__, fn.__closure__)
        serial.__qualname__ = fn.__qualname__ + "_serial"  # its own numba cache file
        self.serial = njit(cache=True)(serial)
        self.__doc__ = fn.__doc__

    def __call__(self, work, *args):
        if work < PARALLEL_MIN_WORDS or numba.get_num_threads() == 1:
            if self.serial not in _loaded:
                _announce_compile(self.serial)
            return self.serial(*args)
        if self.parallel not in _loaded:
            _announce_compile(self.parallel)
        with _LAUNCH:
            return self.parallel(*args)


_announced = threading.Event()
_loaded = set()   # dispatchers seen with a compiled signature: asking numba again costs ~15 us a call


def _announce_compile(dispatcher):
    """One line on stderr before numba compiles a kernel that its disk cache
    lacks: the first use of ibp takes tens of seconds, and a silent pause
    that long looks like a hang.  Said once per process, on a terminal only
    (like progress bars), so logs and parsed error output stay as they are."""
    if dispatcher.signatures:
        _loaded.add(dispatcher)
        return
    if _announced.is_set() or not sys.stderr.isatty():
        return
    try:
        cached = bool(dispatcher._cache._cache_file._load_index())
    except (AttributeError, OSError, ValueError):   # numba's cache internals differ: stay quiet
        return
    if not cached:
        _announced.set()
        print("ibp: compiling the CPU codec with numba (once, up to a minute; later runs load it from the cache)",
              file=sys.stderr, flush=True)
