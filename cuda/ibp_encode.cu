// ibp GPU encoder: one warp encodes one unit (docs/format.md).
//
// ibp/encode.py with ibp/codec.py is the reference: for the same model these
// kernels pick the same unit kinds and write the same payload bits.
// Compiled at run time by NVRTC through CuPy (ibp/cuda_encode.py); it
// includes no headers.  Built with IBP_HOST_EMULATION it runs on the CPU
// (host_emulation.cuh), which is how tests/test_cuda_encode.py checks it
// without a GPU.
//
// One kernel, three modes (argument `mode`):
//
//   CLASSIFY  every unit's kind (one byte per unit) and encoded size in bits:
//             the packed layout's first pass, before a device prefix sum
//             turns the sizes into start bits;
//   PACKED    write every unit at its start bit (`starts`) into a zeroed
//             payload;
//   SLOTTED   classify, then write unit u into slot u (zeroing the slot
//             first: one pass, no host round trip).
//
// A warp walks its unit 32 words at a time, one word per lane: a ballot
// gives the step's exceptions, a lane prefix sum of the stored widths gives
// every lane its bit offset in the matched and the exception streams, and
// each lane ORs its bits into the payload with at most two 64-bit atomics
// (neighbouring units share the words at their boundaries).  Every payload
// word a write would touch past `payload_words` is skipped and flagged in
// the status word, so no input makes the kernel store out of bounds.
//
// The model is read from device memory (see ibp/cuda_encode.py's
// encode_table): a header {fbits, ptot}, then per column and level the
// base, fixed-bit mask, low and high residual masks, shift and width, and
// the column's offset inside an all-matching period.  A model learned on
// the device is therefore used without the host ever seeing it.

#ifdef IBP_HOST_EMULATION
#include "host_emulation.cuh"
#else
#define IBP_DEV __device__ __forceinline__
#define IBP_LD(ptr) (*(ptr))
#define IBP_ST(ptr, v) (*(ptr) = (v))
#define IBP_ATOMIC_OR64(ptr, v) atomicOr((ptr), (v))
#endif

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define IBP_ENCODE_BLOCK 256  // threads per block: 8 warps, 8 units
#define IBP_COLUMN_WORDS 14   // u64 fields per model column (ENC_* below)
#define IBP_HEADER_WORDS 2    // fbits, ptot

enum { ENC_CLASSIFY = 0, ENC_PACKED = 1, ENC_SLOTTED = 2 };
enum { KIND_RAW = 0, KIND_ALL = 1, KIND_SPARSE = 2, KIND_BITMAP = 3 };
// Fields of a column; levels l = 0, 1 at field + l.
enum { ENC_BASE = 0, ENC_FIX = 2, ENC_LOW = 4, ENC_HIGH = 6, ENC_SHIFT = 8, ENC_WIDTH = 10, ENC_OFF0 = 12 };
enum { STATUS_OVERFLOW = 1 };

struct EncodeParams {
    const void* words;    // the tensor's W-bit words
    u64 total_words;      // T
    u32 U;                // words per unit
    u64 nunits;           // N = ceil(T / U); the last unit repeats its own words
    u64 first_unit, njobs;
    u32 period;
    const u64* model;     // header, then IBP_COLUMN_WORDS per column
    u8* kinds;            // one byte per unit: written by CLASSIFY and SLOTTED, read by PACKED
    u64* sizes;           // CLASSIFY: bits per unit
    const u64* starts;    // PACKED: start bit of every unit
    u64* payload;
    u64 payload_words;    // writes stay below this word
    u64 slot_words;       // SLOTTED: uint64 words per slot
    u32 mode;
    u64* status;          // atomicOr of STATUS_* bits
};

IBP_DEV u32 bit_length(u32 x) { return x ? 32 - __clz((int)x) : 0; }

// Word j of unit u (the last unit's padding repeats its own words).
template <int W> IBP_DEV u64 unit_word(const EncodeParams& p, u64 u, u32 j) {
    u64 first = u * p.U;
    u64 used = p.total_words - first;
    u64 i = first + (used < p.U ? j % used : j);
    if constexpr (W == 8) return IBP_LD((const u8*)p.words + i);
    else if constexpr (W == 16) return IBP_LD((const u16*)p.words + i);
    else if constexpr (W == 32) return IBP_LD((const u32*)p.words + i);
    else return IBP_LD((const u64*)p.words + i);
}

// One column's two levels, held in registers.
struct Level {
    u64 base, fix, low, high;
    u32 shift, width;
};

IBP_DEV Level load_level(const EncodeParams& p, u32 c, int l) {
    const u64* col = p.model + IBP_HEADER_WORDS + (u64)c * IBP_COLUMN_WORDS;
    Level v;
    v.base = IBP_LD(col + ENC_BASE + l);
    v.fix = IBP_LD(col + ENC_FIX + l);
    v.low = IBP_LD(col + ENC_LOW + l);
    v.high = IBP_LD(col + ENC_HIGH + l);
    v.shift = (u32)IBP_LD(col + ENC_SHIFT + l);
    v.width = (u32)IBP_LD(col + ENC_WIDTH + l);
    return v;
}

IBP_DEV bool matches(u64 x, const Level& v) { return ((x - v.base) & v.fix) == 0; }

// The free bits of a matching word, packed low to high (docs/format.md 4).
IBP_DEV u64 residual(u64 x, const Level& v) {
    u64 y = x - v.base;
    u64 high = v.shift >= 64 ? 0 : (y & v.high) >> v.shift;
    return (y & v.low) | high;
}

// OR `width` (<= 64) bits of v (no bits above them) into the stream at bit pos.
IBP_DEV void deposit(const EncodeParams& p, u64 pos, u64 v, u32 width) {
    if (width == 0) return;
    u64 i = pos >> 6;
    u32 sh = (u32)(pos & 63);
    bool two = sh + width > 64;
    if (i + two >= p.payload_words) {
        atomicOr(p.status, (u64)STATUS_OVERFLOW);
        return;
    }
    if (v << sh) IBP_ATOMIC_OR64(p.payload + i, v << sh);
    if (two) IBP_ATOMIC_OR64(p.payload + i + 1, v >> (64 - sh));
}

template <typename T> IBP_DEV T warp_sum(T x) {
    for (int d = 16; d > 0; d >>= 1) x += __shfl_xor_sync(0xffffffffu, x, d);
    return x;
}

IBP_DEV u32 warp_scan(u32 lane, u32 x) {  // inclusive
    for (int d = 1; d < 32; d <<= 1) {
        u32 y = __shfl_up_sync(0xffffffffu, x, d);
        if (lane >= (u32)d) x += y;
    }
    return x;
}

// What classification learns about a unit (warp-uniform).
struct Shape {
    u32 kind;
    u64 bits;     // encoded size
    u64 k;        // exceptions
    u64 matched;  // bits of the MATCHED stream
};

// The unit's exceptions and cheapest kind, as codec.classify_unit decides.
template <int W> IBP_DEV Shape classify(const EncodeParams& p, u32 lane, u64 u, u32 fbits, u64 ptot) {
    const u32 U = p.U, P = p.period;
    u64 k = 0, w0x = 0, xbits = 0;
    u32 c = lane % P;
    const u32 step = 32 % P;
    Level one0, one1;
    if (P == 1) {
        one0 = load_level(p, 0, 0);
        one1 = load_level(p, 0, 1);
    }
    for (u32 j = lane; j < U; j += 32) {
        u64 x = unit_word<W>(p, u, j);
        Level l0 = P == 1 ? one0 : load_level(p, c, 0);
        if (!matches(x, l0)) {
            k++;
            w0x += l0.width;
            bool second = false;
            u32 w1 = W;
            if (fbits) {
                Level l1 = P == 1 ? one1 : load_level(p, c, 1);
                second = matches(x, l1);
                w1 = l1.width;
            }
            xbits += second ? w1 : (u32)W;
        }
        c += step;
        if (c >= P) c -= P;
    }
    k = warp_sum(k);
    w0x = warp_sum(w0x);
    xbits = warp_sum(xbits);
    Shape s;
    s.k = k;
    s.matched = (u64)(U / P) * ptot - w0x;
    const u32 pbits = bit_length(U - 1);
    const u64 kmax = U / (pbits > 1 ? pbits : 1);
    const u32 kbits = bit_length((u32)kmax);
    s.bits = (u64)U * W;
    s.kind = KIND_RAW;
    if (k == 0) {
        if (s.matched < s.bits) {
            s.bits = s.matched;
            s.kind = KIND_ALL;
        }
    } else {
        u64 tail = s.matched + k * fbits + xbits;
        if (k <= kmax && kbits + k * pbits + tail < s.bits) {
            s.bits = kbits + k * pbits + tail;
            s.kind = KIND_SPARSE;
        }
        if (U + tail < s.bits) {
            s.bits = U + tail;
            s.kind = KIND_BITMAP;
        }
    }
    return s;
}

// Write unit u, classified as s, from bit `start`.
template <int W>
IBP_DEV void write_unit(const EncodeParams& p, u32 lane, u64 u, const Shape& s, u64 start, u32 fbits, u64 ptot) {
    const u32 U = p.U, P = p.period;
    const u32 step = 32 % P;
    u32 c = lane % P;
    if (s.kind == KIND_RAW) {
        for (u32 j = lane; j < U; j += 32) deposit(p, start + (u64)j * W, unit_word<W>(p, u, j), W);
        return;
    }
    if (s.kind == KIND_ALL) {
        for (u32 j = lane; j < U; j += 32) {
            Level l0 = load_level(p, c, 0);
            u64 off = (u64)(j / P) * ptot + IBP_LD(p.model + IBP_HEADER_WORDS + (u64)c * IBP_COLUMN_WORDS + ENC_OFF0);
            deposit(p, start + off, residual(unit_word<W>(p, u, j), l0), l0.width);
            c += step;
            if (c >= P) c -= P;
        }
        return;
    }
    const u32 pbits = bit_length(U - 1);
    const u32 kbits = bit_length(U / (pbits > 1 ? pbits : 1));
    const bool sparse = s.kind == KIND_SPARSE;
    if (sparse && lane == 0) deposit(p, start, s.k, kbits);
    const u64 list = start + kbits;
    const u64 mstart = sparse ? list + s.k * pbits : start + U;
    const u64 fstart = mstart + s.matched;
    const u64 xstart = fstart + s.k * fbits;
    u64 mo = 0, xo = 0, rank = 0;
    const u32 below = (1u << lane) - 1;
    for (u32 j0 = 0; j0 < U; j0 += 32) {
        const u32 j = j0 + lane;
        const bool valid = j < U;
        u64 x = 0;
        bool ex = false, second = false;
        Level l0 = {}, l1 = {};
        if (valid) {
            x = unit_word<W>(p, u, j);
            l0 = load_level(p, c, 0);
            ex = !matches(x, l0);
            if (ex && fbits) {
                l1 = load_level(p, c, 1);
                second = matches(x, l1);
            }
        }
        const u32 exc = __ballot_sync(0xffffffffu, ex);
        if (!sparse && lane == 0) deposit(p, start + j0, exc, U - j0 < 32 ? U - j0 : 32);
        const u32 mw = valid && !ex ? l0.width : 0;
        const u32 xw = ex ? (second ? l1.width : (u32)W) : 0;
        const u32 mine = mw | (xw << 16);
        const u32 incl = warp_scan(lane, mine);
        const u32 total = __shfl_sync(0xffffffffu, incl, 31);
        const u32 before = incl - mine;
        if (valid && !ex) deposit(p, mstart + mo + (before & 0xffff), residual(x, l0), mw);
        if (ex) {
            const u64 e = rank + __popc(exc & below);
            if (sparse) deposit(p, list + e * pbits, j, pbits);
            if (fbits) deposit(p, fstart + e, second ? 1 : 0, 1);
            deposit(p, xstart + xo + (before >> 16), second ? residual(x, l1) : x, xw);
        }
        mo += total & 0xffff;
        xo += total >> 16;
        rank += __popc(exc);
        c += step;
        if (c >= P) c -= P;
    }
}

// Arguments, all 64-bit, in the order of ibp.cuda_encode.ENCODE_ARGS.
#define IBP_ENCODE_PARAMS                                                                                  \
    u64 words, u64 total_words, u64 U, u64 nunits, u64 first_unit, u64 njobs, u64 period, u64 model,       \
        u64 kinds, u64 sizes, u64 starts, u64 payload, u64 payload_words, u64 slot_words, u64 mode, u64 status

template <int W> __global__ void __launch_bounds__(IBP_ENCODE_BLOCK) ibp_encode(IBP_ENCODE_PARAMS) {
    EncodeParams p;
    p.words = (const void*)words;
    p.total_words = total_words;
    p.U = (u32)U;
    p.nunits = nunits;
    p.first_unit = first_unit;
    p.njobs = njobs;
    p.period = (u32)period;
    p.model = (const u64*)model;
    p.kinds = (u8*)kinds;
    p.sizes = (u64*)sizes;
    p.starts = (const u64*)starts;
    p.payload = (u64*)payload;
    p.payload_words = payload_words;
    p.slot_words = slot_words;
    p.mode = (u32)mode;
    p.status = (u64*)status;

    const u32 lane = threadIdx.x & 31;
    const u64 job = (u64)blockIdx.x * (IBP_ENCODE_BLOCK / 32) + (threadIdx.x >> 5);
    if (job >= p.njobs) return;
    const u64 u = p.first_unit + job;
    const u32 fbits = (u32)IBP_LD(p.model);
    const u64 ptot = IBP_LD(p.model + 1);

    if (p.mode == ENC_PACKED) {
        Shape s;
        s.kind = IBP_LD(p.kinds + u);
        s.bits = 0;
        s.k = 0;
        s.matched = 0;
        if (s.kind >= KIND_SPARSE) {  // the counts the header and stream offsets need
            const Shape again = classify<W>(p, lane, u, fbits, ptot);
            s.k = again.k;
            s.matched = again.matched;
        }
        write_unit<W>(p, lane, u, s, IBP_LD(p.starts + u), fbits, ptot);
        return;
    }
    const Shape s = classify<W>(p, lane, u, fbits, ptot);
    if (lane == 0) IBP_ST(p.kinds + u, (u8)s.kind);
    if (p.mode == ENC_CLASSIFY) {
        if (lane == 0) IBP_ST(p.sizes + u, s.bits);
        return;
    }
    const u64 first = u * p.slot_words;
    if (first + p.slot_words > p.payload_words) {
        if (lane == 0) atomicOr(p.status, (u64)STATUS_OVERFLOW);
        return;
    }
    for (u64 i = lane; i < p.slot_words; i += 32) IBP_ST(p.payload + first + i, 0ull);
    __syncwarp();
    write_unit<W>(p, lane, u, s, first * 64, fbits, ptot);
}

#define IBP_ENCODE_WIDTHS(X) X(8) X(16) X(32) X(64)

#ifdef IBP_INSTANTIATE_ALL  // for ahead-of-time builds (tests/test_cuda_build.py)
#define IBP_INSTANTIATE_ENCODE(W) template __global__ void ibp_encode<W>(IBP_ENCODE_PARAMS);
IBP_ENCODE_WIDTHS(IBP_INSTANTIATE_ENCODE)
#endif

#ifdef IBP_HOST_EMULATION
#define IBP_EMU_ENCODE_CASE(W_)                                                                    \
    if (W == W_) {                                                                                 \
        found = true;                                                                              \
        ok = emu::launch((unsigned)grid, IBP_ENCODE_BLOCK, [&] {                                   \
            ibp_encode<W_>(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], \
                           a[12], a[13], a[14], a[15]);                                            \
        });                                                                                        \
    }
IBP_EMULATION_BASICS
extern "C" int ibp_emu_encode_arg_count() { return 16; }
extern "C" int ibp_emu_launch_encode(int W, unsigned long long grid, const unsigned long long* a) {
    bool found = false, ok = false;
    IBP_ENCODE_WIDTHS(IBP_EMU_ENCODE_CASE)
    if (!found) {
        emu::state().error = "no encoder for W=" + std::to_string(W);
        return 2;
    }
    return ok ? 0 : 1;
}
#endif
