// ibp GPU decoder: one team of lanes decodes one unit (docs/format.md).
//
// ibp/codec.py (decode_unit) is the reference; this file decodes the same
// bits and reports the same status codes.  Compiled at run time by NVRTC
// through CuPy (ibp/cuda.py); it includes no headers.  Built with
// IBP_HOST_EMULATION it runs on the CPU (host_emulation.cuh), which is how
// tests/test_cuda_build.py checks it without a GPU.
//
// A *job* is "unit u, words [src, src + len) of it, to output word dst":
// whole units for a full decode, one row (or one piece of a split row) for
// a gather.  A *team* of L lanes in each of G warps decodes one job:
//
//   RAW, ALL     every word's bit offset is known in closed form, so each
//                thread of the team takes words on its own.
//   SPARSE,      a word's offset depends on the exceptions before it.  The
//   BITMAP       team cuts the unit into G segments, one per warp.  Pass 1
//                counts each segment's exceptions and their primary widths,
//                pass 2 sums the sizes of their stored values (reading the
//                secondary flags), and the team turns both into prefix sums.
//                Pass 3 decodes: L consecutive words per step, one per lane,
//                a lane prefix sum of the widths gives each lane its bit
//                offset in the matched and the exception streams.
//
// Every size is checked before the bits it covers are read, in the order
// the CPU decoder checks them, so a corrupted unit sets the status word and
// nothing is read outside the unit's span nor written outside the output.
// Reads use 32- or 64-bit words and funnel shifts; a read at bit p touches
// words p/32 and p/32 + 1 (only when p is not aligned), which the payload's
// spare zero word keeps in bounds.

#ifdef IBP_HOST_EMULATION
#include "host_emulation.cuh"
#else
#define IBP_DEV __device__ __forceinline__
#define IBP_LD(ptr) (*(ptr))
#define IBP_ST(ptr, v) (*(ptr) = (v))
#define IBP_NAMED_BARRIER(id, n) asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory")
#define IBP_SHARED_READABLE(ptr, bytes)
#endif

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define IBP_BLOCK 256        // threads per block, every kernel shape
#define IBP_MAX_TEAMS_G 4    // teams per block when a team spans G >= 2 warps
#define IBP_REDUCTIONS 8     // team reductions per job (see decode_coded)
#define IBP_STAGE_WORDS 4096 // shared memory per block for staged units (uint64 words)

enum { ST_OK = 0, ST_SIZE = 1, ST_COUNT = 2, ST_POSITION = 3, ST_INDEX = 4 };
enum { KIND_RAW = 0, KIND_ALL = 1, KIND_SPARSE = 2, KIND_BITMAP = 3 };

template <int W> struct WordOf { typedef u32 type; };
template <> struct WordOf<64> { typedef u64 type; };

// One model column (ibp.model.Model.tables in another layout).  Level l of
// column c: residual bits below `lo` are kept in place (mask low[l]), the
// rest move up by shift = hi - lo; width = W - shift bits are stored.
template <typename Word> struct Column {
    Word base[2];
    Word low[2];
    u32 shift_width;  // bytes: shift0, width0, shift1, width1
    u32 pad;
    u64 off0;         // sum of the primary widths of the columns before c
};

struct Params {
    const u64* payload;  // bit p of the stream is bit p%64 of payload[p/64]
    u64 lim_lo, lim_hi;  // unit spans must lie in [lim_lo, lim_hi] (bits)
    const u8* kinds;
    u64 nunits;
    const u64* index_base;
    const void* index_rel;
    u32 rel_bits, log2_block;
    u64 payload_bits;
    u32 slotted;
    u64 slot_words;
    const void* columns;
    u32 period, fbits;
    u64 ptot;            // primary widths summed over one period
    u32 U, R, split, group;
    u64 total_words;
    u64 first_job, njobs;
    const void* index;   // gather: row numbers; null for a full decode
    u32 index_code;      // 1..4 int8..int64, 5..8 uint8..uint64
    u64 nrows;
    void* out;
    u64 out_words;
    u64* status;         // atomicMin of (job << 8 | status code)
    u32 stage;           // 0: read units in place, 1: stage a unit that fits when
                         // the job needs half of it or more, 2: whenever it fits
};

// ---------------------------------------------------------------- bits ----

IBP_DEV u32 bit_length(u32 x) { return 32 - __clz(x); }

IBP_DEV u32 low_bits32(u32 width) { return width >= 32 ? 0xffffffffu : ((1u << width) - 1); }

// The payload as a bit stream, held from stream word `first` on: bit p is
// bit p%64 of words[p/64 - first] (first > 0 when a unit is staged).
struct Bits {
    const u64* words;
    u64 first;

    // `width` (<= 32) bits at bit p.
    IBP_DEV u32 read32(u64 p, u32 width) const {
        if (width == 0) return 0;
        const u32* s = (const u32*)words;
        u64 i = (p >> 5) - 2 * first;
        u32 sh = (u32)(p & 31);
        u32 lo = IBP_LD(s + i);
        u32 hi = sh ? IBP_LD(s + i + 1) : 0u;
        return __funnelshift_r(lo, hi, sh) & low_bits32(width);
    }

    // `width` (<= 64) bits at bit p.
    IBP_DEV u64 read64(u64 p, u32 width) const {
        if (width == 0) return 0;
        u64 i = (p >> 6) - first;
        u32 sh = (u32)(p & 63);
        u64 v = IBP_LD(words + i) >> sh;
        if (sh) v |= IBP_LD(words + i + 1) << (64 - sh);
        return width >= 64 ? v : (v & ((1ull << width) - 1));
    }
};

template <int W>
IBP_DEV typename WordOf<W>::type read_word(const Bits& bits, u64 p, u32 width) {
    if constexpr (W == 64) return bits.read64(p, width);
    else return bits.read32(p, width);
}

// Inverse of the residual (docs/format.md section 4).
template <int W>
IBP_DEV typename WordOf<W>::type restore(typename WordOf<W>::type v, const Column<typename WordOf<W>::type>& col,
                                         int level) {
    typedef typename WordOf<W>::type Word;
    Word low = col.low[level];
    u32 shift = (col.shift_width >> (16 * level)) & 0xff;
    Word high = v & ~low;
    high = (high << (shift >> 1)) << (shift - (shift >> 1));  // shift may equal the word width
    Word y = ((v & low) | high) + col.base[level];
    if constexpr (W < 32) y &= (Word(1) << W) - 1;
    return y;
}

IBP_DEV u32 width_of(u32 shift_width, int level) { return (shift_width >> (16 * level + 8)) & 0xff; }

template <int W>
IBP_DEV void store_word(const Params& p, u64 d, typename WordOf<W>::type v) {
    if (d >= p.out_words) return;
    if constexpr (W == 8) IBP_ST((u8*)p.out + d, (u8)v);
    else if constexpr (W == 16) IBP_ST((u16*)p.out + d, (u16)v);
    else if constexpr (W == 32) IBP_ST((u32*)p.out + d, (u32)v);
    else IBP_ST((u64*)p.out + d, v);
}

// Column of word (c + bit) for c < P, bit < 32.
IBP_DEV u32 column_add(u32 c, u32 bit, u32 P) {
    c += bit;
    if (c >= P) {
        c -= P;
        if (c >= P) c %= P;
    }
    return c;
}

// ---------------------------------------------------------------- teams ---

// L lanes of each of G warps.  Sub-warp teams (L < 32) share a hardware
// warp; every collective names exactly the team's lanes.
template <int L, int G> struct Team {
    u32 lane;   // [0, L)
    u32 warp;   // [0, G)
    u32 slot;   // team number within the block
    u32 mask;   // the team-warp's lanes in its hardware warp
    u32 shift;  // hardware lane of lane 0
    IBP_DEV u32 tix() const { return warp * L + lane; }
};

template <int L, int G> IBP_DEV Team<L, G> make_team() {
    Team<L, G> t;
    u32 hw = threadIdx.x >> 5, hl = threadIdx.x & 31;
    if constexpr (G > 1) {
        t.lane = hl;
        t.warp = hw % G;
        t.slot = hw / G;
        t.mask = 0xffffffffu;
        t.shift = 0;
    } else {
        t.lane = hl % L;
        t.warp = 0;
        t.slot = hw * (32 / L) + hl / L;
        t.shift = (hl / L) * L;
        t.mask = L == 32 ? 0xffffffffu : (((1u << L) - 1) << t.shift);
    }
    return t;
}

template <int L, int G> IBP_DEV void team_sync(const Team<L, G>& t) {
    if constexpr (G == 1) __syncwarp(t.mask);
    else IBP_NAMED_BARRIER(1 + t.slot, 32 * G);
}

template <int L, typename T> IBP_DEV T lanes_sum(u32 mask, T x) {
    for (int d = L / 2; d > 0; d >>= 1) x += __shfl_xor_sync(mask, x, d, L);
    return x;
}

template <int L> IBP_DEV u32 lanes_scan(u32 mask, u32 lane, u32 x) {  // inclusive
    for (int d = 1; d < L; d <<= 1) {
        u32 y = __shfl_up_sync(mask, x, d, L);
        if (lane >= (u32)d) x += y;
    }
    return x;
}

template <int L> IBP_DEV u32 lanes_get(u32 mask, u32 x, u32 src) { return __shfl_sync(mask, x, src, L); }

template <int L> IBP_DEV u32 lanes_ballot(u32 mask, u32 shift, bool pred) {
    u32 b = __ballot_sync(mask, pred) >> shift;
    return L == 32 ? b : (b & ((1u << L) - 1));
}

struct Sums {
    u64 before;  // over the team's earlier warps
    u64 mine;    // over this warp
    u64 total;   // over the team
};

// Team-wide sum of x.  Slot k of `red` serves one reduction per job.
template <int L, int G>
IBP_DEV Sums team_sums(const Team<L, G>& t, u64 (*red)[8], int k, u64 x) {
    Sums s;
    s.mine = lanes_sum<L>(t.mask, x);
    s.before = 0;
    s.total = s.mine;
    if constexpr (G > 1) {
        if (t.lane == 0) red[k][t.warp] = s.mine;
        team_sync(t);
        s.total = 0;
        for (u32 w = 0; w < (u32)G; w++) {
            u64 v = red[k][w];
            s.total += v;
            if (w < t.warp) s.before += v;
        }
    }
    return s;
}

// ---------------------------------------------------------- exceptions ----

// Where a SPARSE or BITMAP unit lists its exceptions.
struct Exceptions {
    u32 kind;
    u64 bitmap;  // BITMAP: bit position of the bitmap
    u64 list;    // SPARSE: bit position of the position list
    u32 pbits, k;
    u32 cursor;  // SPARSE: first list entry not yet visited
};

// The exception bits of words [s0 + 32 lane, s0 + 32 lane + 32), cut at
// `limit`: bit b is set iff that word + b is an exception.  SPARSE lists
// are turned into these masks through the team-warp's L words of shared
// memory; the walk must start at the cursor's word (positions are
// validated increasing before any walk).
template <int L, int G>
IBP_DEV u32 exception_masks(Exceptions& x, const Bits& bits, const Team<L, G>& t, u32* smask, u32 s0, u32 limit) {
    u32 j = s0 + 32 * t.lane;
    if (x.kind == KIND_BITMAP) {
        if (j >= limit) return 0;
        u32 m = bits.read32(x.bitmap + j, 32);
        return limit - j < 32 ? (m & low_bits32(limit - j)) : m;
    }
    u32 bound = s0 + 32 * L < limit ? s0 + 32 * L : limit;
    smask[t.lane] = 0;
    __syncwarp(t.mask);
    for (;;) {
        u32 e = x.cursor + t.lane;
        u32 q = 0;
        bool in = false;
        if (e < x.k) {
            q = bits.read32(x.list + (u64)e * x.pbits, x.pbits);
            in = q >= s0 && q < bound;
        }
        if (in) atomicOr(&smask[(q - s0) >> 5], 1u << ((q - s0) & 31));
        u32 n = __popc(lanes_ballot<L>(t.mask, t.shift, in));
        x.cursor += n;
        if (n < (u32)L) break;
    }
    __syncwarp(t.mask);
    u32 m = smask[t.lane];
    __syncwarp(t.mask);
    return m;
}

// ---------------------------------------------------------------- units ---

// Copy stream bits [lo, hi) -- words lo/64 .. hi/64, and the word after,
// which unaligned reads may touch -- to the team's shared memory with
// coalesced 8-byte loads, so that each payload byte crosses PCIe once;
// returns the reader over the copy, or over the payload when it does not fit.
template <int L, int G>
IBP_DEV Bits staged(const Params& p, const Team<L, G>& t, u64* stage, u64 lo, u64 hi) {
    const u64 w_lo = lo >> 6, w_hi = ((hi + 63) >> 6) + 1;
    if (w_hi - w_lo > IBP_STAGE_WORDS / (IBP_BLOCK / (L * G))) return Bits{p.payload, 0};
    for (u64 i = t.tix(); i < w_hi - w_lo; i += L * G) stage[i] = IBP_LD(p.payload + w_lo + i);
    team_sync(t);
    return Bits{stage, w_lo};
}

IBP_DEV u64 unit_start(const Params& p, u64 u) {
    u64 base = IBP_LD(p.index_base + (u >> p.log2_block));
    u64 rel = p.rel_bits == 16 ? (u64)IBP_LD((const u16*)p.index_rel + u) : (u64)IBP_LD((const u32*)p.index_rel + u);
    return base + rel;
}

template <int L, int G> IBP_DEV void report(const Params& p, const Team<L, G>& t, u64 job, u32 code) {
    if (t.tix() == 0) atomicMin(p.status, (job << 8) | code);
}

// Pass 3 of a SPARSE or BITMAP unit: words [lo, hi) of the warp's segment,
// L consecutive words per step, one per lane; mo and xo are the bit offsets
// of word lo in the matched and the exception streams, rank its exception
// rank.  Each lane's offsets are a prefix sum of the lanes' widths before
// it: a shuffle scan in general; with one column (ONE: period 1, every word
// of the same widths) popcounts of the step's exception and flag bits give
// it in closed form, and the column stays in registers.
template <int W, int L, int G, bool ONE>
IBP_DEV void decode_words(const Params& p, const Team<L, G>& t, const Bits& bits, Exceptions& x, u32* smask,
                          const Column<typename WordOf<W>::type>* cols, u32 lo, u32 hi, u64 rank, u64 mo, u64 xo,
                          u64 fstart, u32 src, u64 dst) {
    typedef typename WordOf<W>::type Word;
    const u32 P = p.period, chunk = 32 * L;
    Column<Word> one;
    if constexpr (ONE) one = cols[0];
    const u32 sw1 = ONE ? IBP_LD(&cols[0].shift_width) : 0;
    u32 cw = (lo + t.lane) % P;
    const u32 step_w = L % P;
    for (u32 s0 = lo; s0 < hi; s0 += chunk) {
        u32 m = exception_masks(x, bits, t, smask, s0, hi);
        u32 flags = 0;
        if (p.fbits) {
            u32 n = __popc(m);
            u32 incl = lanes_scan<L>(t.mask, t.lane, n);
            u64 r = rank + incl - n;
            rank += lanes_get<L>(t.mask, incl, L - 1);
            flags = n ? bits.read32(fstart + r, n) : 0;
        }
        for (u32 sub = 0; sub < 32; sub++) {
            const u32 j0 = s0 + sub * L;
            if (j0 >= hi) break;
            const u32 g = (sub * L) >> 5, sb = (sub * L) & 31, bit = sb + t.lane;
            const u32 gm = lanes_get<L>(t.mask, m, g);
            const u32 gf = lanes_get<L>(t.mask, flags, g);
            const u32 j = j0 + t.lane;
            const bool valid = j < hi;
            const bool ex = valid && ((gm >> bit) & 1);
            const bool flag = ex && ((gf >> __popc(gm & low_bits32(bit))) & 1);
            const Column<Word>& col = ONE ? one : cols[cw];
            const u32 sw = ONE ? sw1 : IBP_LD(&col.shift_width);
            const u32 w0 = width_of(sw, 0), w1 = width_of(sw, 1);
            u32 before_m, before_x, total_m, total_x;
            if constexpr (ONE) {
                const u32 step_ex = (gm >> sb) & low_bits32(L);       // the step's exceptions, lane order
                const u32 step_fl = gf >> __popc(gm & low_bits32(sb));  // their flags, from the step's first
                const u32 ex_before = __popc(step_ex & low_bits32(t.lane));
                const u32 fl_before = __popc(step_fl & low_bits32(ex_before));
                const u32 ex_all = __popc(step_ex), fl_all = __popc(step_fl & low_bits32(ex_all));
                before_m = (t.lane - ex_before) * w0;
                before_x = fl_before * w1 + (ex_before - fl_before) * W;
                total_m = (L - ex_all) * w0;                        // past the last word: unused
                total_x = fl_all * w1 + (ex_all - fl_all) * W;
            } else {
                const u32 mine = (valid && !ex ? w0 : 0) | ((ex ? (flag ? w1 : (u32)W) : 0) << 16);
                const u32 incl = lanes_scan<L>(t.mask, t.lane, mine);
                const u32 total = lanes_get<L>(t.mask, incl, L - 1);
                before_m = (incl - mine) & 0xffff;
                before_x = (incl - mine) >> 16;
                total_m = total & 0xffff;
                total_x = total >> 16;
            }
            if (valid) {
                Word v;
                if (!ex) v = restore<W>(read_word<W>(bits, mo + before_m, w0), col, 0);
                else if (flag) v = restore<W>(read_word<W>(bits, xo + before_x, w1), col, 1);
                else v = read_word<W>(bits, xo + before_x, W);
                store_word<W>(p, dst + (j - src), v);
            }
            mo += total_m;
            xo += total_x;
            if constexpr (!ONE) {
                cw += step_w;
                if (cw >= P) cw -= P;
            }
        }
    }
}

// Decode words [src, src + len) of `unit` to output words [dst, dst + len);
// returns a status code (team-uniform).
template <int W, int L, int G>
IBP_DEV u32 decode_coded(const Params& p, const Team<L, G>& t, u64 unit, u32 src, u32 len, u64 dst,
                         u64 (*red)[8], u32* cursors, u32* smask, u64* stage) {
    typedef typename WordOf<W>::type Word;
    const Column<Word>* cols = (const Column<Word>*)p.columns;
    const u32 TS = L * G, tix = t.tix(), U = p.U, P = p.period;

    if (unit >= p.nunits) return ST_SIZE;
    u32 kind = (IBP_LD(p.kinds + (unit >> 2)) >> ((unit & 3) * 2)) & 3;
    u64 start, end;
    if (p.slotted) {
        start = unit * p.slot_words * 64;
        end = start + p.slot_words * 64;
    } else {
        start = unit_start(p, unit);
        end = unit + 1 < p.nunits ? unit_start(p, unit + 1) : p.payload_bits;
    }
    if (start < p.lim_lo || start > end || end > p.lim_hi) return ST_SIZE;
    const bool exact = !p.slotted;

    // Stage the unit when the job needs enough of it: a packed unit's span is
    // exact, so at once; a slotted unit only once its encoding's end is
    // known, so that the rest of its slot is never read.
    const bool stage_it = p.stage && (p.stage == 2 || 2 * len >= U);
    Bits bits = {p.payload, 0};
    if (stage_it && exact) bits = staged(p, t, stage, start, end);

    if (kind == KIND_RAW) {
        u64 stop = start + (u64)U * W;
        if (stop > end || (exact && stop != end)) return ST_SIZE;
        if (stage_it && !exact) bits = staged(p, t, stage, start, stop);
        for (u32 j = src + tix; j < src + len; j += TS)
            store_word<W>(p, dst + (j - src), read_word<W>(bits, start + (u64)j * W, W));
        return ST_OK;
    }
    if (kind == KIND_ALL) {
        u64 stop = start + (u64)(U / P) * p.ptot;
        if (stop > end || (exact && stop != end)) return ST_SIZE;
        if (stage_it && !exact) bits = staged(p, t, stage, start, stop);
        u32 j = src + tix, q = j / P, c = j % P;
        const u32 step_q = TS / P, step_c = TS % P;
        for (; j < src + len; j += TS) {
            const Column<Word>& col = cols[c];
            u32 w = width_of(IBP_LD(&col.shift_width), 0);
            Word v = read_word<W>(bits, start + (u64)q * p.ptot + IBP_LD(&col.off0), w);
            store_word<W>(p, dst + (j - src), restore<W>(v, col, 0));
            q += step_q;
            c += step_c;
            if (c >= P) {
                c -= P;
                q++;
            }
        }
        return ST_OK;
    }

    // SPARSE / BITMAP: the header.
    const u32 pbits = bit_length(U - 1);
    const u32 kmax = U / (pbits > 1 ? pbits : 1);
    const u32 kbits = bit_length(kmax);
    Exceptions x;
    x.kind = kind;
    x.bitmap = start;
    x.list = 0;
    x.pbits = pbits;
    x.k = 0;
    x.cursor = 0;
    u64 mstart;
    if (kind == KIND_SPARSE) {
        if (start + kbits > end) return ST_SIZE;
        x.k = bits.read32(start, kbits);
        if (x.k > kmax) return ST_COUNT;
        x.list = start + kbits;
        if (x.list + (u64)x.k * pbits > end) return ST_SIZE;
        mstart = x.list + (u64)x.k * pbits;
    } else {
        if (start + U > end) return ST_SIZE;
        mstart = start + U;
    }

    // Segments: warp w of the team owns words [a, b).
    const u32 seg = ((U + G - 1) / G + 32 * L - 1) / (32 * L) * (32 * L);
    const u32 a = t.warp * seg < U ? t.warp * seg : U;
    const u32 b = a + seg < U ? a + seg : U;

    if (kind == KIND_SPARSE) {
        // Positions strictly increasing and below U; for G > 1, also the
        // list entry where each segment starts.
        if constexpr (G > 1) {
            if (tix < (u32)G) cursors[tix] = 0;
            team_sync(t);
        }
        u32 bad = 0;
        for (u32 e = tix; e < x.k; e += TS) {
            u32 q = bits.read32(x.list + (u64)e * pbits, pbits);
            u32 nq = e + 1 < x.k ? bits.read32(x.list + (u64)(e + 1) * pbits, pbits) : U;
            if (q >= nq) bad = 1;
            if constexpr (G > 1) {
                for (u32 w = 1; w < (u32)G; w++) {
                    u32 aw = w * seg < U ? w * seg : U;
                    if (q < aw && aw <= nq) cursors[w] = e + 1;
                }
            }
        }
        if (team_sums(t, red, 0, bad).total) return ST_POSITION;
    }
    const u32 first_cursor = G > 1 && kind == KIND_SPARSE ? cursors[t.warp] : 0;

    // Pass 1: exceptions and their primary widths, in all and before src.
    const u32 chunk = 32 * L;
    const u32 step_chunk = chunk % P;
    u64 cnt = 0, w0s = 0, pre_cnt = 0, pre_w0 = 0;
    x.cursor = first_cursor;
    u32 cl = (a + 32 * t.lane) % P;
    for (u32 s0 = a; s0 < b; s0 += chunk) {
        u32 m = exception_masks(x, bits, t, smask, s0, b);
        u32 j = s0 + 32 * t.lane;
        while (m) {
            u32 bit = __ffs(m) - 1;
            m &= m - 1;
            u32 w = width_of(IBP_LD(&cols[column_add(cl, bit, P)].shift_width), 0);
            cnt++;
            w0s += w;
            if (j + bit < src) {
                pre_cnt++;
                pre_w0 += w;
            }
        }
        cl += step_chunk;
        if (cl >= P) cl -= P;
    }
    const Sums K = team_sums(t, red, 1, cnt);
    const Sums E0 = team_sums(t, red, 2, w0s);
    const Sums PK = team_sums(t, red, 3, pre_cnt);
    const Sums PE0 = team_sums(t, red, 4, pre_w0);
    const u64 fstart = mstart + (u64)(U / P) * p.ptot - E0.total;
    const u64 xstart = fstart + K.total * p.fbits;
    if (xstart > end) return ST_SIZE;

    // Pass 2: sizes of the exceptions' stored values.
    u64 xs = cnt * W, pre_xs = pre_cnt * W;
    if (p.fbits) {
        xs = 0;
        pre_xs = 0;
        x.cursor = first_cursor;
        u64 rank = K.before;
        cl = (a + 32 * t.lane) % P;
        for (u32 s0 = a; s0 < b; s0 += chunk) {
            u32 m = exception_masks(x, bits, t, smask, s0, b);
            u32 n = __popc(m);
            u32 incl = lanes_scan<L>(t.mask, t.lane, n);
            u64 r = rank + incl - n;
            rank += lanes_get<L>(t.mask, incl, L - 1);
            u32 flags = n ? bits.read32(fstart + r, n) : 0;
            u32 j = s0 + 32 * t.lane;
            while (m) {
                u32 bit = __ffs(m) - 1;
                m &= m - 1;
                u32 size = (flags & 1) ? width_of(IBP_LD(&cols[column_add(cl, bit, P)].shift_width), 1) : (u32)W;
                flags >>= 1;
                xs += size;
                if (j + bit < src) pre_xs += size;
            }
            cl += step_chunk;
            if (cl >= P) cl -= P;
        }
    }
    const Sums X = team_sums(t, red, 5, xs);
    const Sums PX = team_sums(t, red, 6, pre_xs);
    const u64 stop = xstart + X.total;
    if (stop > end || (exact && stop != end)) return ST_SIZE;
    if (stage_it && !exact) bits = staged(p, t, stage, start, stop);

    // Pass 3: decode this warp's part of [src, src + len).
    const u32 lo = a > src ? a : src;
    const u32 hi = b < src + len ? b : src + len;
    if (lo >= hi) return ST_OK;
    const u64 rank = K.before + PK.mine;
    const u64 mo = mstart + (u64)(lo / P) * p.ptot + IBP_LD(&cols[lo % P].off0) - (E0.before + PE0.mine);
    const u64 xo = xstart + X.before + PX.mine;
    x.cursor = (u32)rank;
    if (P == 1) decode_words<W, L, G, true>(p, t, bits, x, smask, cols, lo, hi, rank, mo, xo, fstart, src, dst);
    else decode_words<W, L, G, false>(p, t, bits, x, smask, cols, lo, hi, rank, mo, xo, fstart, src, dst);
    return ST_OK;
}

// Row number of gather item i, or false when it is out of range.
IBP_DEV bool load_row(const Params& p, u64 i, u64* row) {
    i64 s = 0;
    u64 v = 0;
    bool is_signed = p.index_code <= 4;
    switch (p.index_code) {
        case 1: s = IBP_LD((const signed char*)p.index + i); break;
        case 2: s = IBP_LD((const short*)p.index + i); break;
        case 3: s = IBP_LD((const int*)p.index + i); break;
        case 4: s = IBP_LD((const i64*)p.index + i); break;
        case 5: v = IBP_LD((const u8*)p.index + i); break;
        case 6: v = IBP_LD((const u16*)p.index + i); break;
        case 7: v = IBP_LD((const u32*)p.index + i); break;
        default: v = IBP_LD((const u64*)p.index + i); break;
    }
    if (is_signed) {
        if (s < 0) s += (i64)p.nrows;
        if (s < 0 || (u64)s >= p.nrows) return false;
        *row = (u64)s;
        return true;
    }
    if (v >= p.nrows) return false;
    *row = v;
    return true;
}

// Arguments, all 64-bit, in the order of ibp.cuda.KERNEL_ARGS.
#define IBP_KERNEL_PARAMS                                                                                      \
    u64 payload, u64 lim_lo, u64 lim_hi, u64 kinds, u64 nunits, u64 index_base, u64 index_rel, u64 rel_bits,   \
        u64 log2_block, u64 payload_bits, u64 slotted, u64 slot_words, u64 columns, u64 period, u64 fbits,     \
        u64 ptot, u64 U, u64 R, u64 split, u64 group, u64 total_words, u64 first_job, u64 njobs, u64 index,    \
        u64 index_code, u64 nrows, u64 out, u64 out_words, u64 status, u64 stage

template <int W, int L, int G> __global__ void __launch_bounds__(IBP_BLOCK) ibp_decode(IBP_KERNEL_PARAMS) {
    Params p;
    p.payload = (const u64*)payload;
    p.lim_lo = lim_lo;
    p.lim_hi = lim_hi;
    p.kinds = (const u8*)kinds;
    p.nunits = nunits;
    p.index_base = (const u64*)index_base;
    p.index_rel = (const void*)index_rel;
    p.rel_bits = (u32)rel_bits;
    p.log2_block = (u32)log2_block;
    p.payload_bits = payload_bits;
    p.slotted = (u32)slotted;
    p.slot_words = slot_words;
    p.columns = (const void*)columns;
    p.period = (u32)period;
    p.fbits = (u32)fbits;
    p.ptot = ptot;
    p.U = (u32)U;
    p.R = (u32)R;
    p.split = (u32)split;
    p.group = (u32)group;
    p.total_words = total_words;
    p.first_job = first_job;
    p.njobs = njobs;
    p.index = (const void*)index;
    p.index_code = (u32)index_code;
    p.nrows = nrows;
    p.out = (void*)out;
    p.out_words = out_words;
    p.status = (u64*)status;
    p.stage = (u32)stage;

    __shared__ u64 red[IBP_MAX_TEAMS_G][IBP_REDUCTIONS][8];
    __shared__ u32 cursors[IBP_MAX_TEAMS_G][8];
    __shared__ u32 smask[IBP_BLOCK];
    __shared__ u64 staged[IBP_STAGE_WORDS];
    IBP_SHARED_READABLE(staged, sizeof staged);

    const Team<L, G> t = make_team<L, G>();
    const u64 team = (u64)blockIdx.x * (IBP_BLOCK / (L * G)) + t.slot;
    if (team >= p.njobs) return;
    const u64 job = p.first_job + team;

    u64 unit, dst;
    u32 src, len;
    if (p.index_code == 0) {
        unit = job;
        src = 0;
        u64 left = p.total_words - unit * p.U;
        len = left < p.U ? (u32)left : p.U;
        dst = unit * p.U;
    } else {
        u64 i = job / p.split, row;
        u32 piece = (u32)(job % p.split);
        if (!load_row(p, i, &row)) {
            report(p, t, job, ST_INDEX);
            return;
        }
        if (p.R == 0) return;
        if (p.split > 1) {
            unit = row * p.split + piece;
            src = 0;
            len = p.U;
            dst = i * p.R + (u64)piece * p.U;
        } else {
            unit = row / p.group;
            src = (u32)(row % p.group) * p.R;
            len = p.R;
            dst = i * p.R;
        }
    }
    const u32 slot = G > 1 ? t.slot : 0;
    u32 code = decode_coded<W, L, G>(p, t, unit, src, len, dst, red[slot], cursors[slot],
                                     smask + (threadIdx.x - t.lane),
                                     staged + t.slot * (IBP_STAGE_WORDS / (IBP_BLOCK / (L * G))));
    if (code != ST_OK) report(p, t, job, code);
}

// Every shape ibp.cuda launches: (W, L, G).
#define IBP_SHAPES(X, W) X(W, 8, 1) X(W, 16, 1) X(W, 32, 1) X(W, 32, 2) X(W, 32, 4) X(W, 32, 8)
#define IBP_ALL_SHAPES(X) IBP_SHAPES(X, 8) IBP_SHAPES(X, 16) IBP_SHAPES(X, 32) IBP_SHAPES(X, 64)

#ifdef IBP_INSTANTIATE_ALL  // for ahead-of-time builds (tests/test_cuda_build.py)
#define IBP_INSTANTIATE(W, L, G) template __global__ void ibp_decode<W, L, G>(IBP_KERNEL_PARAMS);
IBP_ALL_SHAPES(IBP_INSTANTIATE)
#endif

#ifdef IBP_HOST_EMULATION
IBP_EMULATION_ENTRY
#endif
