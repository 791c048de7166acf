// Runs ibp_decode.cu and ibp_encode.cu on the CPU, for testing without a GPU.
//
// `g++ -std=c++17 -DIBP_HOST_EMULATION -x c++ -shared -fPIC ibp_decode.cu`
// builds a library whose ibp_emu_launch() (ibp_emu_launch_encode() for
// ibp_encode.cu) runs a kernel launch block by block, each thread a fiber
// (ucontext).  Warp collectives, named barriers and atomics follow CUDA's
// rules and are stricter where CUDA leaves things undefined: a collective
// whose lanes disagree on the mask, a lane that waits on a lane that
// exited, and a barrier that never fills are reported as errors, as is
// every global load or store outside the memory regions registered with
// ibp_emu_allow().  Errors end the launch and are returned by
// ibp_emu_error(); the process never crashes.
#pragma once
#include <setjmp.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
#define IBP_DEV inline
#define IBP_LD(ptr) (*emu::checked((ptr), false))
#define IBP_ST(ptr, v) (*emu::checked((ptr), true) = (v))
#define IBP_ATOMIC_OR64(ptr, v) atomicOr((ptr), (v))
#define IBP_NAMED_BARRIER(id, n) emu::named_barrier((id), (n))
#define IBP_SHARED_READABLE(ptr, bytes) emu::allow_shared((ptr), (bytes))

namespace emu {

typedef unsigned long long u64;

struct Dim {
    unsigned x, y, z;
};

struct Region {
    const char* lo;
    const char* hi;
    bool writable;
};

struct Fiber {
    ucontext_t start;
    jmp_buf jump;
    std::vector<char> stack;
    bool started = false;
    bool done = false;
    unsigned tid = 0;
    u64 deposited = 0;  // collectives this lane has entered
    u64 finished = 0;   // collectives this lane has left
    u64 value = 0;
    unsigned mask = 0;
};

struct State {
    std::vector<Region> regions;
    std::vector<Fiber> fibers;
    jmp_buf scheduler;
    unsigned current = 0, nthreads = 0, block = 0, grid = 0;
    unsigned barrier_count[16] = {}, barrier_size[16] = {};
    u64 barrier_generation[16] = {};
    u64 progress = 0;
    bool failed = false;
    std::string error;
    std::function<void()> body;
};

inline State& state() {
    static State s;
    return s;
}

inline Fiber& me() { return state().fibers[state().current]; }

inline void yield() {
    if (!_setjmp(me().jump)) _longjmp(state().scheduler, 1);
}

// Ends the launch: records the message and never resumes this fiber.
inline void fail(const std::string& msg) {
    State& s = state();
    if (!s.failed) {
        s.failed = true;
        s.error = "block " + std::to_string(s.block) + " thread " + std::to_string(me().tid) + ": " + msg;
    }
    for (;;) yield();
}

template <typename F> void wait_until(F ready) {
    while (!ready()) yield();
    state().progress++;
}

template <typename T> T* checked(T* p, bool write) {
    const char* lo = (const char*)p;
    for (const Region& r : state().regions)
        if (lo >= r.lo && lo + sizeof(T) <= r.hi && (r.writable || !write)) return p;
    char msg[128];
    snprintf(msg, sizeof msg, "%s of %zu bytes at %p outside every allowed region", write ? "store" : "load",
             sizeof(T), (const void*)p);
    fail(msg);
    return p;
}

// Lets IBP_LD read a shared-memory array (registered once).
inline void allow_shared(const void* p, size_t n) {
    for (const Region& r : state().regions)
        if (r.lo == (const char*)p) return;
    state().regions.push_back({(const char*)p, (const char*)p + n, true});
}

// Every lane of `mask` (which must include the caller) deposits a value;
// returns once all have, with the values in all[lane].
inline void exchange(unsigned mask, u64 v, u64* all) {
    State& s = state();
    Fiber& f = me();
    unsigned lane = f.tid & 31, base = f.tid & ~31u;
    if (!((mask >> lane) & 1)) fail("collective called by a lane outside its mask");
    for (unsigned l = 0; l < 32; l++)
        if (((mask >> l) & 1) && base + l >= s.nthreads) fail("collective mask names a lane beyond the block");
    auto each = [&](auto pred) {
        for (unsigned l = 0; l < 32; l++)
            if (((mask >> l) & 1) && !pred(s.fibers[base + l])) return false;
        return true;
    };
    u64 k = f.deposited + 1;
    wait_until([&] { return each([&](const Fiber& o) { return o.finished + 1 >= k; }); });
    f.value = v;
    f.mask = mask;
    f.deposited = k;
    s.progress++;
    wait_until([&] { return each([&](const Fiber& o) { return o.deposited >= k; }); });
    for (unsigned l = 0; l < 32; l++) {
        if (!((mask >> l) & 1)) continue;
        const Fiber& o = s.fibers[base + l];
        if (o.mask != mask || o.deposited != k) fail("lanes of one collective disagree on its mask");
        all[l] = o.value;
    }
    f.finished = k;
}

inline unsigned lane_id() { return me().tid & 31; }

inline void check_source(unsigned mask, unsigned src) {
    if (!((mask >> src) & 1)) fail("shuffle reads a lane outside the mask");
}

inline void named_barrier(unsigned id, unsigned n) {
    State& s = state();
    if (id >= 16 || n == 0 || n % 32 || n > ((s.nthreads + 31) & ~31u)) fail("bad named barrier");
    if (s.barrier_count[id] == 0) s.barrier_size[id] = n;
    else if (s.barrier_size[id] != n) fail("named barrier used with two thread counts");
    u64 g = s.barrier_generation[id];
    s.progress++;
    if (++s.barrier_count[id] == n) {
        s.barrier_count[id] = 0;
        s.barrier_generation[id]++;
    } else {
        wait_until([&] { return s.barrier_generation[id] != g; });
    }
}

inline void fiber_main() {
    State& s = state();
    s.body();
    me().done = true;
    s.progress++;
    yield();
}

// Runs `body` as every thread of every block; false after an error.
inline bool launch(unsigned grid, unsigned threads, std::function<void()> body) {
    State& s = state();
    s.failed = false;
    s.error.clear();
    s.body = body;
    s.grid = grid;
    s.nthreads = threads;
    s.fibers.resize(threads);
    for (unsigned b = 0; b < grid; b++) {
        s.block = b;
        std::memset(s.barrier_count, 0, sizeof s.barrier_count);
        for (unsigned i = 0; i < threads; i++) {
            Fiber& f = s.fibers[i];
            f.stack.resize(1 << 16);
            f.started = f.done = false;
            f.tid = i;
            f.deposited = f.finished = 0;
            f.mask = 0;
            getcontext(&f.start);
            f.start.uc_stack.ss_sp = f.stack.data();
            f.start.uc_stack.ss_size = f.stack.size();
            f.start.uc_link = nullptr;
            makecontext(&f.start, fiber_main, 0);
        }
        for (;;) {
            bool alive = false;
            u64 before = s.progress;
            for (unsigned i = 0; i < threads; i++) {
                if (s.fibers[i].done) continue;
                alive = true;
                s.current = i;
                Fiber& f = s.fibers[i];
                if (!_setjmp(s.scheduler)) {
                    if (f.started) _longjmp(f.jump, 1);
                    f.started = true;
                    setcontext(&f.start);
                }
                if (s.failed) return false;
            }
            if (!alive) break;
            if (s.progress == before) {
                s.failed = true;
                s.error = "block " + std::to_string(b) + ": deadlock (a collective or barrier never completes)";
                return false;
            }
        }
    }
    return true;
}

inline Dim thread_idx() { return Dim{me().tid, 0, 0}; }
inline Dim block_idx() { return Dim{state().block, 0, 0}; }
inline Dim block_dim() { return Dim{state().nthreads, 1, 1}; }
inline Dim grid_dim() { return Dim{state().grid, 1, 1}; }

}  // namespace emu

#define threadIdx (emu::thread_idx())
#define blockIdx (emu::block_idx())
#define blockDim (emu::block_dim())
#define gridDim (emu::grid_dim())

inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned sh) {
    return (unsigned)((((unsigned long long)hi << 32) | lo) >> (sh & 31));
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
    emu::u64 all[32];
    emu::exchange(mask, 0, all);
}
inline void __syncthreads() { emu::named_barrier(0, emu::state().nthreads); }

template <typename T> T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    emu::u64 all[32];
    emu::exchange(mask, (emu::u64)v, all);
    unsigned lane = emu::lane_id();
    unsigned s = (lane & ~(unsigned)(width - 1)) + ((unsigned)src & (width - 1));
    emu::check_source(mask, s);
    return (T)all[s];
}

template <typename T> T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
    emu::u64 all[32];
    emu::exchange(mask, (emu::u64)v, all);
    unsigned lane = emu::lane_id();
    if ((lane & (width - 1)) < d) return v;
    emu::check_source(mask, lane - d);
    return (T)all[lane - d];
}

template <typename T> T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
    emu::u64 all[32];
    emu::exchange(mask, (emu::u64)v, all);
    unsigned lane = emu::lane_id(), s = lane ^ (unsigned)m;
    if (s / width > lane / width) return v;
    emu::check_source(mask, s);
    return (T)all[s];
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
    emu::u64 all[32];
    emu::exchange(mask, pred ? 1 : 0, all);
    unsigned r = 0;
    for (unsigned l = 0; l < 32; l++)
        if (((mask >> l) & 1) && all[l]) r |= 1u << l;
    return r;
}

inline unsigned long long atomicMin(unsigned long long* a, unsigned long long v) {
    unsigned long long old = *emu::checked(a, true);
    if (v < old) *a = v;
    return old;
}
// On global memory: checked like every other global access.
inline unsigned long long atomicOr(unsigned long long* a, unsigned long long v) {
    unsigned long long old = *emu::checked(a, true);
    *a = old | v;
    return old;
}
inline unsigned atomicOr(unsigned* a, unsigned v) {
    unsigned old = *a;
    *a = old | v;
    return old;
}

#define IBP_EMU_ARGS(a)                                                                                      \
    a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15],  \
        a[16], a[17], a[18], a[19], a[20], a[21], a[22], a[23], a[24], a[25], a[26], a[27], a[28], a[29]
#define IBP_EMU_ARG_COUNT 30

#define IBP_EMU_CASE(W_, L_, G_)                                                                   \
    if (W == W_ && L == L_ && G == G_) {                                                           \
        found = true;                                                                              \
        ok = emu::launch((unsigned)grid, IBP_BLOCK, [&] { ibp_decode<W_, L_, G_>(IBP_EMU_ARGS(a)); }); \
    }

// The library's C interface (ctypes): the memory regions kernels may touch, the last error.
#define IBP_EMULATION_BASICS                                                                           \
    extern "C" void ibp_emu_allow(const void* p, unsigned long long n, int writable) {                  \
        emu::state().regions.push_back({(const char*)p, (const char*)p + n, writable != 0});           \
    }                                                                                                  \
    extern "C" void ibp_emu_forbid_all() { emu::state().regions.clear(); }                             \
    extern "C" const char* ibp_emu_error() { return emu::state().error.c_str(); }

// ... and the decoder's launch.
#define IBP_EMULATION_ENTRY                                                                            \
    IBP_EMULATION_BASICS                                                                               \
    extern "C" int ibp_emu_arg_count() { return IBP_EMU_ARG_COUNT; }                                   \
    extern "C" int ibp_emu_launch(int W, int L, int G, unsigned long long grid, const unsigned long long* a) { \
        bool found = false, ok = false;                                                                \
        IBP_ALL_SHAPES(IBP_EMU_CASE)                                                                   \
        if (!found) {                                                                                  \
            emu::state().error = "no kernel shape W=" + std::to_string(W) + " L=" + std::to_string(L) + \
                                 " G=" + std::to_string(G);                                            \
            return 2;                                                                                  \
        }                                                                                              \
        return ok ? 0 : 1;                                                                             \
    }
