// Forward tile passes and the short carry scan. See scan2d.h for the layout and work unit.
#include <stdexcept>

#include "scan2d.h"

namespace scan2d {

// MODE 0: row aggregates (hh at the tile's last column, scanned from 0; row sums of delta).
// MODE 1: column aggregates (hh with its true row carry, then h from 0 to the tile's last row).
// MODE 2: the output, with both carries.
// MODE 3: as MODE 2, but writes dz = dout * y * silu'(z) (backward; y is needed only there).
// MODE 4: the single-pass wavefront forward: as MODE 2, but the carries are not read from earlier passes.
//   Blocks take tiles in raster order from an atomic counter, so the left and upper neighbours of a tile
//   were handed out before it (no deadlock). Per state n, a warp waits for its left neighbour's row carry,
//   scans the rows and hands its own row carry on to the right, then waits for the column carry from above,
//   scans the columns and hands on downwards. Handing over per state pipelines a row of tiles: the right
//   neighbour starts state n while this tile runs state n's columns and state n+1. The carries it writes
//   are the tile-edge carries backward needs (rowc/colc, as the multi-pass path leaves them).
// Warps (channels) per block: 8 for the aggregate passes; the output passes keep y[32] in registers too,
// so they run 4 warps at up to 168 registers (3 blocks/SM) rather than 8 capped at 128 (which spills).
__host__ __device__ constexpr int fwd_warps(int mode) { return mode >= 2 ? 4 : WPBF; }

template <typename T, int MODE>
__global__ void __launch_bounds__(fwd_warps(MODE) * 32, MODE >= 2 ? 3 : 2) fwd_tile_kernel(Params p) {
  constexpr int NW = fwd_warps(MODE);
  constexpr bool WAVE = MODE == 4, DZ = MODE == 3;
  extern __shared__ float sm[];
  float* Bring = sm;                     // NBUF B tiles
  float* Cring = Bring + NBUF * TILE;    // NBUF C tiles (MODE >= 2)
  float* Sring = Cring + NBUF * TILE;    // NBUF x NW x (row carries, column carries, A)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* T0 = Sring + NBUF * NW * SCAL + warp * 2 * TILE;  // delta staging, then a = exp(delta A)
  float* T1 = T0 + TILE;                        // u staging, then hh

  // Block (or ticket) vb: sample b, tile (s, t), group g and a chunk of NW channels, chunks fastest; warp `warp`
  // takes the chunk's channel of that index, d, valid when the group has one.
  // wavefront: dynamic block order, so a tile's dependencies are always handed out first
  const int vb = WAVE ? wavefront_ticket(p) : (int)blockIdx.x;
  const int cpg = (p.Dg + NW - 1) / NW;
  const int chunks = p.G * cpg, ntiles = p.TR * p.TC;
  const int gc = vb % chunks;
  const int tile = (vb / chunks) % ntiles;
  const int b = vb / chunks / ntiles;
  const int g = gc / cpg;
  const int cig = (gc % cpg) * NW + warp;
  const bool valid = cig < p.Dg;
  const int d = g * p.Dg + (valid ? cig : 0);
  const int s = tile / p.TC, t = tile % p.TC;
  const int i0 = s * TS, j0 = t * TS;
  const int H = p.H, W = p.W, N = p.N;
  int hb, wb;
  sample_extent(p, b, hb, wb);
  const int64_t bd = (int64_t)b * p.D + d;
  const int64_t plane = bd * H * W;
  const T* up = (const T*)p.u + plane;
  const T* dp = (const T*)p.delta + plane;
  const float bias = p.dbias ? p.dbias[d] : 0.f;

  float dl[TS], dul[TS];
  float cs = 0.f;
  if (valid) {
    const int j = j0 + lane;
    for (int rc = 0; rc < TS; rc += RCH) {
      float dv[RCH], uv[RCH];
#pragma unroll
      for (int m = 0; m < RCH; ++m) {
        const int i = i0 + rc + m;
        const bool in = i < hb && j < wb;
        const int64_t o = in ? (int64_t)i * W + j : 0;
        dv[m] = in ? ldf(dp + o) : 0.f;
        uv[m] = in ? ldf(up + o) : 0.f;
      }
#pragma unroll
      for (int m = 0; m < RCH; ++m) {
        const int i = i0 + rc + m;
        float v = 0.f;
        if (i < hb && j < wb) {
          v = dv[m] + bias;
          if (p.softplus) v = softplus_f(v);
        }
        T0[(rc + m) * LD + lane] = v;
        T1[(rc + m) * LD + lane] = uv[m];
        cs += v;
      }
    }
    __syncwarp();
#pragma unroll
    for (int j = 0; j < TS; ++j) {
      dl[j] = T0[lane * LD + j];
      dul[j] = dl[j] * T1[lane * LD + j];
    }
    __syncwarp();
    if (MODE == 0 && i0 + lane < H) {
      float rs = 0.f;
#pragma unroll
      for (int j = 0; j < TS; ++j) rs += dl[j];
      p.rows[(bd * p.TC + t) * H + i0 + lane] = rs;
    }
    if (MODE == 1 && j0 + lane < W) p.cols[(bd * p.TR + s) * W + j0 + lane] = cs;
  }

  float y[TS];
#pragma unroll
  for (int r = 0; r < TS; ++r) y[r] = 0.f;

  const int64_t HW = (int64_t)H * W;
  const float* Bbase = p.Bm + ((int64_t)b * p.G + g) * N * HW;
  const float* Cbase = p.Cm + ((int64_t)b * p.G + g) * N * HW;
  const bool row_ok = valid && i0 + lane < H, col_ok = valid && j0 + lane < W;
  // index of state n's carries: row carry at rbase + n*TC*H, column carry at cbase + n*TR*W
  const int64_t rbase = (bd * N * p.TC + t) * H + i0 + lane;
  const int64_t cbase = (bd * N * p.TR + s) * W + j0 + lane;
  // Ring of NBUF states in flight: B/C tiles, and per warp its row/column carries and A (cp.async),
  // so a state's loads are issued NBUF-1 states before it is computed.
  auto issue = [&](int n) {
    if (n < N) {
      const int slot = n % NBUF;
      stage_bc<NW>(Bbase + n * HW, Bring + slot * TILE, i0, j0, hb, wb, W);
      if (MODE >= 2) stage_bc<NW>(Cbase + n * HW, Cring + slot * TILE, i0, j0, hb, wb, W);
      float* sc = Sring + (slot * NW + warp) * SCAL;
      if (MODE != 0 && !WAVE) cp_async4(sc + lane, p.rowc + (row_ok ? rbase + (int64_t)n * p.TC * H : 0), row_ok);
      if (MODE >= 2 && !WAVE) cp_async4(sc + 32 + lane, p.colc + (col_ok ? cbase + (int64_t)n * p.TR * W : 0), col_ok);
      if (lane == 0) cp_async4(sc + 64, p.A + d * N + n, valid);
    }
    cp_async_commit();  // possibly empty: keeps one group per state
  };
  for (int k = 0; k < NBUF - 1; ++k) issue(k);
  // wavefront: the row carry of the next state is read one state early (settled at its use)
  unsigned rpk = WAVE && valid && t > 0 && row_ok ? peek_carry(p.rowc + rbase) : 0u;
  for (int n = 0; n < N; ++n) {
    __syncthreads();  // everyone is done with the slot of state n-1, which state n+NBUF-1 reuses
    issue(n + NBUF - 1);
    cp_async_wait<NBUF - 1>();
    __syncthreads();
    if (!valid) continue;
    const int slot = n % NBUF;
    const float* Bs = Bring + slot * TILE;
    const float* Cs = Cring + slot * TILE;
    const float* sc = Sring + (slot * NW + warp) * SCAL;
    const float A2 = sc[64] * LOG2E;
    float hh = MODE != 0 && !WAVE ? sc[lane] : 0.f, h = MODE >= 2 && !WAVE ? sc[32 + lane] : 0.f;
    const int64_t rn = rbase + (int64_t)n * p.TC * H, cn = cbase + (int64_t)n * p.TR * W;
    unsigned cpk = 0u;
    if (WAVE) {
      if (t > 0) {
        if (row_ok) {
          hh = settle_carry(p.rowc + rn, rpk);  // from the left neighbour
          if (n + 1 < N) rpk = peek_carry(p.rowc + rn + (int64_t)p.TC * H);
        }
      } else if (row_ok) {
        p.rowc[rn] = 0.f;  // nothing enters the first tile column; kept for backward like the others
      }
      if (s > 0 && col_ok) cpk = peek_carry(p.colc + cn);  // used after the row pass
    }
    // horizontal: lane = row
    // B is read 8 columns ahead of the stores: the loads need not wait behind stores that might alias
#pragma unroll
    for (int jc = 0; jc < TS; jc += 8) {
      float bv[8];
#pragma unroll
      for (int m = 0; m < 8; ++m) bv[m] = Bs[lane * LD + jc + m];
#pragma unroll
      for (int m = 0; m < 8; ++m) {
        const int j = jc + m;
        float a = ex2(dl[j] * A2);
        hh = fmaf(a, hh, dul[j] * bv[m]);
        if (MODE != 0) {
          T0[lane * LD + j] = a;
          T1[lane * LD + j] = hh;
        }
      }
    }
    if (MODE == 0) {
      if (row_ok) p.rowc[rbase + (int64_t)n * p.TC * H] = hh;
      continue;
    }
    if (WAVE) {
      if (t + 1 < p.TC && row_ok) put_carry(p.rowc + rn + H, hh);  // into the tile to the right
      if (s > 0) {
        if (col_ok) h = settle_carry(p.colc + cn, cpk);  // from the upper neighbour
      } else if (col_ok) {
        p.colc[cn] = 0.f;
      }
    }
    __syncwarp();
    // vertical: lane = column
#pragma unroll
    for (int r = 0; r < TS; ++r) {
      h = fmaf(T0[r * LD + lane], h, T1[r * LD + lane]);
      if (MODE >= 2) y[r] = fmaf(Cs[r * LD + lane], h, y[r]);
    }
    if (MODE == 1 && col_ok) p.colc[cbase + (int64_t)n * p.TR * W] = h;
    if (WAVE && s + 1 < p.TR && col_ok) put_carry(p.colc + cn + W, h);  // into the tile below
    __syncwarp();
  }

  if (MODE >= 2 && valid) {
    const T* zp = p.z ? (const T*)p.z + plane : nullptr;
    const T* gp = DZ ? (const T*)p.dout + plane : nullptr;
    T* op = (T*)(DZ ? p.dz : p.out) + plane;
    const float Dd = p.Dv ? p.Dv[d] : 0.f;
    const int j = j0 + lane;
#pragma unroll
    for (int rc = 0; rc < TS; rc += RCH) {
      float uv[RCH], zv[RCH], gv[RCH];
#pragma unroll
      for (int m = 0; m < RCH; ++m) {
        const int i = i0 + rc + m;
        const bool in = i < hb && j < wb;
        const int64_t o = in ? (int64_t)i * W + j : 0;
        uv[m] = in ? ldf(up + o) : 0.f;
        zv[m] = in && zp ? ldf(zp + o) : 0.f;
        gv[m] = in && DZ ? ldf(gp + o) : 0.f;
      }
#pragma unroll
      for (int m = 0; m < RCH; ++m) {
        const int r = rc + m, i = i0 + r;
        if (i < H && j < W) {
          float v = 0.f;
          if (i < hb && j < wb) {
            float yv = y[r] + Dd * uv[m];
            if (!DZ) {
              v = zp ? yv * zv[m] * sigmoid_f(zv[m]) : yv;
            } else {
              float sz = sigmoid_f(zv[m]);
              v = gv[m] * yv * sz * (1.f + zv[m] * (1.f - sz));
            }
          }
          op[(int64_t)i * W + j] = fromf<T>(v);
        }
      }
    }
  }
}

// One thread per (b, d, n, line): walks the tiles of its line, turning each tile's aggregate into the
// carry that enters it. The transfer across a tile is exp(A * sum of delta over the tile's line).
__global__ void carry_scan_kernel(float* loc, const float* __restrict__ S, const float* __restrict__ A, int BD, int N,
                                  int D, int T, int lines, bool reverse) {
  int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  int64_t total = (int64_t)BD * N * lines;
  if (idx >= total) return;
  int line = idx % lines;
  int64_t bdn = idx / lines;
  int n = bdn % N;
  int64_t bd = bdn / N;
  int d = bd % D;
  float A2 = A[d * N + n] * LOG2E;
  float* L = loc + bdn * T * lines + line;
  const float* Sp = S + bd * T * lines + line;
  float c = 0.f;
  for (int k0 = 0; k0 < T; k0 += 8) {
    // 8 tiles' aggregates loaded at once: the loads do not wait on the stores of earlier tiles
    float l[8], S8[8];
#pragma unroll
    for (int m = 0; m < 8; ++m) {
      int k = k0 + m, tt = reverse ? T - 1 - k : k;
      l[m] = k < T ? L[(int64_t)tt * lines] : 0.f;
      S8[m] = k < T ? Sp[(int64_t)tt * lines] : 0.f;
    }
#pragma unroll
    for (int m = 0; m < 8; ++m) {
      int k = k0 + m, tt = reverse ? T - 1 - k : k;
      if (k < T) {
        L[(int64_t)tt * lines] = c;
        c = fmaf(ex2(A2 * S8[m]), c, l[m]);
      }
    }
  }
}

template <typename T, int MODE>
static void launch_mode(const Params& p, cudaStream_t st) {
  constexpr int NW = fwd_warps(MODE);
  size_t smem = ((2 * NBUF + 2 * NW) * TILE + NBUF * NW * SCAL) * sizeof(float);
  auto kern = fwd_tile_kernel<T, MODE>;
  cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  int64_t blocks = (int64_t)p.Bsz * p.TR * p.TC * p.G * ((p.Dg + NW - 1) / NW);
  kern<<<(unsigned)blocks, NW * 32, smem, st>>>(p);
}

template <typename T>
static void launch_t(const Params& p, int mode, cudaStream_t st) {
  if (mode == 0) launch_mode<T, 0>(p, st);
  else if (mode == 1) launch_mode<T, 1>(p, st);
  else if (mode == 2) launch_mode<T, 2>(p, st);
  else if (mode == 3) launch_mode<T, 3>(p, st);
  else launch_mode<T, 4>(p, st);
}

void launch_fwd_tiles(const Params& p, int mode, int dtype, cudaStream_t st) {
  if (dtype == 0) launch_t<float>(p, mode, st);
  else if (dtype == 1) launch_t<__half>(p, mode, st);
  else launch_t<__nv_bfloat16>(p, mode, st);
}

void launch_carry_scan(float* loc, const float* S, const float* A, int BD, int N, int D, int T, int lines,
                       bool reverse, cudaStream_t st) {
  int64_t total = (int64_t)BD * N * lines;
  int threads = 256;
  carry_scan_kernel<<<(unsigned)((total + threads - 1) / threads), threads, 0, st>>>(loc, S, A, BD, N, D, T, lines,
                                                                                   reverse);
}

}  // namespace scan2d
