// 2D selective scan (2DMamba), CUDA. Maths: shared/DESIGN.md and csrc/scan2d/NOTES.md.
//
// Layout: u, delta, z, dout: (B, D, H, W) of T (float, half, bfloat16); A: (D, N) fp32;
// Bm, Cm: (B, G, N, H, W) fp32 (the Python side upcasts them: they are N/D the size of u).
//
// Work unit: one warp = one channel on one 32x32 tile, looping over the N states; a block holds
// WPB warps = WPB channels of one group on the same tile, so each B_n / C_n tile is staged in
// shared memory once per block and read by all its warps.
// Tiles meet through carries: hh at the tile's left edge per (row, n), h at its top edge per
// (column, n). The default (wavefront) layout hands them from tile to tile inside one pass; the
// three-pass fallback finds them by "aggregate" passes plus a short scan across tiles (carry_scan).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace scan2d {

constexpr int TS = 32;          // tile side, rows and columns (= warp size)
constexpr int LD = TS + 1;      // padded shared-memory row: row- and column-wise walks are conflict-free
constexpr int TILE = TS * LD;   // floats in one shared tile
constexpr int WPB = 4;          // warps (channels) per block in the backward passes
constexpr int WPBF = 8;         // warps (channels) per block in the forward-style tile passes
constexpr int NBUF = 4;         // states in flight (cp.async ring) in the tile passes
constexpr int SCAL = 72;        // per warp and state: 32 row carries, 32 column carries, A (padded)
constexpr float LOG2E = 1.4426950408889634f;
constexpr unsigned CARRY_PENDING = 0x7fbadbadu;  // a NaN payload arithmetic never makes (wavefront hand-over)

struct Params {
  int Bsz, D, N, H, W, G, Dg;   // Dg = channels per group
  int TR, TC;                   // tile rows, tile columns
  int CPG;                      // channel chunks (of WPB) per group: forward-style launches
  int K, RPC;                   // final backward: chunks per group, rounds (of WPB channels) per chunk
  bool softplus;
  const void *u, *delta, *z, *dout;
  const float *A, *Bm, *Cm, *Dv, *dbias;
  const int *sizes;             // (B, 2) int32 or null
  float *rowc, *rows;           // forward row carries [BD][N][TC][H], row sums of delta [BD][TC][H]
  float *colc, *cols;           // forward column carries [BD][N][TR][W], column sums [BD][TR][W]
  float *rrowc, *rcolc;         // reverse (adjoint) carries, same layouts
  float *rrows, *rcols;         // sums of delta for the reverse scans
  void *out;
  void *du, *ddelta, *dz;
  float *dBp, *dCp;             // partials [K][B][G][N][H][W]
  float *dAp;                   // [B*TR*TC][D][N]
  float *dDp, *dbp;             // [B*TR*TC][D]
  int* flags;                   // wavefront passes: [0] the block counter that hands out tiles in order
};

#ifdef __CUDACC__  // device helpers; binding.cpp (host compiler) sees only Params and the launchers
__device__ __forceinline__ float tof(float x) { return x; }
__device__ __forceinline__ float tof(__half x) { return __half2float(x); }
__device__ __forceinline__ float tof(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T fromf(float x);
template <> __device__ __forceinline__ float fromf<float>(float x) { return x; }
template <> __device__ __forceinline__ __half fromf<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 fromf<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Read-only global load (ld.global.nc): it may be reordered freely around our shared-memory stores.
template <typename T>
__device__ __forceinline__ float ldf(const T* p) { return tof(__ldg(p)); }

// Rows of a tile are loaded RCH at a time into registers before any of them is stored, so the global
// loads of a chunk are in flight together instead of one row's latency after another.
constexpr int RCH = 8;

// Same threshold as torch.nn.functional.softplus (beta=1, threshold=20).
__device__ __forceinline__ float softplus_f(float v) { return v <= 20.f ? log1pf(expf(v)) : v; }
__device__ __forceinline__ float sigmoid_f(float v) { return 1.f / (1.f + expf(-v)); }

// The real extent of sample b: cells outside it are padding (inputs read as 0 there).
__device__ __forceinline__ void sample_extent(const Params& p, int b, int& hb, int& wb) {
  hb = p.H;
  wb = p.W;
  if (p.sizes) {
    hb = max(0, min(p.sizes[2 * b], p.H));
    wb = max(0, min(p.sizes[2 * b + 1], p.W));
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  // xor butterfly: a fixed pattern, so the result is the same on every run
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// 2^x on the special-function unit (one MUFU.EX2; relative error ~2^-22, far inside fp32 tolerances).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Asynchronous copies global -> shared (sm_80+), so the next state's B/C tiles load while this one computes.
__device__ __forceinline__ void cp_async4(float* dst, const float* src, bool pred) {
  unsigned s = (unsigned)__cvta_generic_to_shared(dst);
  int bytes = pred ? 4 : 0;  // 0 source bytes: the destination is zero-filled
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Block-wide asynchronous staging of 32x32 tiles of B or C (fp32), zero outside the sample.
// NW warps: warp w copies rows w, w+NW, ...; lane = column, so each row is one coalesced request.
// The thread's offset into a plane and which of its rows lie inside the sample are worked out once per block:
// per state only the plane changes. Done per copy (v8), that address maths and its range checks were ~12
// integer instructions a copy inside the state loop (SASS), more than the copy itself.
template <int NW>
struct TileCopy {
  int off = 0;      // (i0 + warp) * W + j0 + lane within a plane (scan2d_bwd in binding.cpp refuses a grid
                    // whose padded plane, TR*32*W + TC*32, passes INT32_MAX: backward only)
  int step = 0;     // NW rows: NW * W
  unsigned ok = 0;  // bit m: row warp + m*NW of the tile lies inside the sample
  __device__ __forceinline__ TileCopy(int i0, int j0, int hb, int wb, int W) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    step = NW * W;
    if (j0 + lane < wb) {
      off = (i0 + warp) * W + j0 + lane;
#pragma unroll
      for (int m = 0; m < TS / NW; ++m) ok |= (i0 + warp + m * NW < hb ? 1u : 0u) << m;
    }
  }
  __device__ __forceinline__ void operator()(const float* __restrict__ plane, float* dst) const {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float* s = plane + off;
#pragma unroll
    for (int m = 0; m < TS / NW; ++m) {
      const bool in = (ok >> m) & 1u;
      cp_async4(dst + (warp + m * NW) * LD + lane, in ? s + m * step : plane, in);
    }
  }
};

// The same copy with its address maths done per call: the forward passes keep it. They run capped at 168
// registers, and there TileCopy's per-block state made ptxas rematerialise more than it saved (state loop of
// MODE 4: 786 -> 874 SASS instructions).
template <int NW>
__device__ __forceinline__ void stage_bc(const float* __restrict__ src, float* dst, int i0, int j0, int hb, int wb,
                                         int W) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool jok = j0 + lane < wb;
  const float* s0 = src + (int64_t)(i0 + warp) * W + j0 + lane;
#pragma unroll
  for (int m = 0; m < TS / NW; ++m) {
    const int r = warp + m * NW;
    const bool ok = jok && i0 + r < hb;
    cp_async4(dst + r * LD + lane, ok ? s0 + (int64_t)(m * NW) * W : src, ok);
  }
}

// Wavefront passes take their work in the order blocks start, not in blockIdx order: thread 0 draws a ticket
// from the counter in p.flags[0] and the block shares it. The tiles a block waits for drew earlier tickets, so
// they are resident or done by then (no deadlock).
__device__ __forceinline__ int wavefront_ticket(const Params& p) {
  __shared__ int ticket;
  if (threadIdx.x == 0) ticket = atomicAdd(p.flags, 1);
  __syncthreads();
  return ticket;
}

// Wavefront hand-over between blocks (single-pass forward, backward's final pass). The carry itself is the ready flag: the carry
// buffers are filled with a NaN bit pattern no arithmetic produces (GPU NaNs are canonical), the producer
// stores each carry once (a 4-byte store is single-copy atomic), and the consumer polls its own element
// until the pattern is gone. No fence and no separate flag: v8a's fence + flag per hand-over cost ~2 us a
// state on the critical path (NOTES.md).
__device__ __forceinline__ void put_carry(float* dst, float v) {
  asm volatile("st.relaxed.gpu.global.f32 [%0], %1;" ::"l"(dst), "f"(v) : "memory");
}
// Issue the load of a carry early and look at it later (settle_carry): the L2 round trip then overlaps the
// work in between instead of stalling the warp at the hand-over. Each element is written once, so an early
// read is either the pending pattern (then settle_carry polls) or the final value.
__device__ __forceinline__ unsigned peek_carry(const float* src) {
  unsigned v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(src));
  return v;
}
__device__ __forceinline__ float wait_carry(const float* src) {
  unsigned v;
  for (;;) {
    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(src) : "memory");
    if (v != CARRY_PENDING) return __uint_as_float(v);
    __nanosleep(32);
  }
}
__device__ __forceinline__ float settle_carry(const float* src, unsigned early) {
  return early != CARRY_PENDING ? __uint_as_float(early) : wait_carry(src);
}

#endif  // __CUDACC__

// Kernel launchers (defined in scan2d_fwd.cu / scan2d_bwd.cu); dtype: 0 float, 1 half, 2 bfloat16.
void launch_fwd_tiles(const Params& p, int mode, int dtype, cudaStream_t st);
void launch_carry_scan(float* loc, const float* S, const float* A, int BD, int N, int D, int T, int lines,
                       bool reverse, cudaStream_t st);
void launch_bwd_agg(const Params& p, int mode, int dtype, cudaStream_t st);
void launch_bwd_final(const Params& p, int dtype, bool wave, cudaStream_t st);
void launch_reduce(const Params& p, float* dA, float* dD, float* ddb, float* dB, float* dC, cudaStream_t st);

}  // namespace scan2d
