// Wavefront forward with register-blocked tiles (NOTES.md, "v10 candidate"; opt-in: CARRIES "blocked").
//
// MODE 4 gives each lane a whole row of the tile for the horizontal scan and a whole column for the vertical
// one, so every (cell, state) goes through shared memory to turn rows into columns (26 KB of shared-memory
// traffic per warp and state: the bound of that design), and each lane's scan is one 32-step serial chain.
// Here each lane owns a block of BH rows x BW columns (BX lanes across a tile, BY down) for the whole pass:
//   horizontal: a local scan of each of its rows from 0 gives the segment's end; segment ends are composed
//     across the BX lanes of a row group (a warp scan of (product of A-bar, value) pairs over shuffles), and the
//     block's rows are then scanned again from their true carries;
//   vertical: the same down the columns, over the BY lanes of a column group;
//   y accumulates in registers, as in MODE 4.
// Only B and C pass through shared memory (read as float4 rows of the lane's block). Each lane runs BH (then
// BW) independent chains, not one of 32. The carries handed between tiles are MODE 4's (rowc/colc), so
// backward is unchanged.
#include "scan2d.h"

namespace scan2d {

constexpr int BX = 8, BY = 4;                // lanes across and down a tile
constexpr int BW = TS / BX, BH = TS / BY;    // a lane's block: BH rows x BW columns (8 x 4)
constexpr int NWB = 4;                       // warps (channels) per block
constexpr unsigned FULL = 0xffffffffu;
static_assert(BX * BY == 32 && BW == 4, "a lane reads its block's rows of B and C as one float4");

template <typename T>
__global__ void __launch_bounds__(NWB * 32, 2) fwd_blocked_kernel(Params p) {
  extern __shared__ __align__(16) float smb[];
  float* Bring = smb;                    // NBUF B tiles, TS x TS: unpadded, read only by rows (float4)
  float* Cring = Bring + NBUF * TS * TS;  // NBUF C tiles
  float* Aring = Cring + NBUF * TS * TS;  // NBUF x NWB: A[d, n] of each warp's channel
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int lx = lane % BX, ly = lane / BX;

  // tiles in raster order from the counter, as MODE 4: a tile's left and upper neighbours started before it
  const FwdTile job = fwd_tile_of<NWB>(p, wavefront_ticket(p), warp);
  const int b = job.b, g = job.g, d = job.d, s = job.s, t = job.t, i0 = job.i0, j0 = job.j0;
  const bool valid = job.valid;
  const int H = p.H, W = p.W, N = p.N;
  int hb, wb;
  sample_extent(p, b, hb, wb);
  const int64_t bd = (int64_t)b * p.D + d;
  const int64_t plane = bd * H * W;
  const int rb = ly * BH, cb = lx * BW;  // the block's first row and column within the tile
  const int r0 = i0 + rb, c0 = j0 + cb;  // ... within the grid

  // delta (after bias and softplus) and delta*u of the block; their sums along the block's rows and columns
  // give the decay across a segment, exp(A * sum of delta), with one exponential per segment
  float dl[BH][BW], dul[BH][BW], y[BH][BW];
  float srow[BH], scol[BW];
  {
    const T* up = (const T*)p.u + plane;
    const T* dp = (const T*)p.delta + plane;
    const float bias = p.dbias ? p.dbias[d] : 0.f;
#pragma unroll
    for (int r = 0; r < BH; ++r) {
      float dv[BW], uv[BW];
#pragma unroll
      for (int c = 0; c < BW; ++c) {
        const int i = r0 + r, j = c0 + c;
        const bool in = valid && i < hb && j < wb;
        const int64_t o = in ? (int64_t)i * W + j : 0;
        dv[c] = in ? ldf(dp + o) : 0.f;
        uv[c] = in ? ldf(up + o) : 0.f;
      }
#pragma unroll
      for (int c = 0; c < BW; ++c) {
        const int i = r0 + r, j = c0 + c;
        float v = 0.f;
        if (valid && i < hb && j < wb) {
          v = dv[c] + bias;
          if (p.softplus) v = softplus_f(v);
        }
        dl[r][c] = v;
        dul[r][c] = v * uv[c];
        y[r][c] = 0.f;
      }
    }
#pragma unroll
    for (int r = 0; r < BH; ++r) srow[r] = dl[r][0] + dl[r][1] + dl[r][2] + dl[r][3];
#pragma unroll
    for (int c = 0; c < BW; ++c) {
      float acc = 0.f;
#pragma unroll
      for (int r = 0; r < BH; ++r) acc += dl[r][c];
      scol[c] = acc;
    }
  }

  const int64_t HW = (int64_t)H * W;
  const float* Bbase = p.Bm + ((int64_t)b * p.G + g) * N * HW;
  const float* Cbase = p.Cm + ((int64_t)b * p.G + g) * N * HW;
  // Lane k's carries of state n: row i0+k's at rowc[(bd*N + n)*TC*H + t*H + i0+k] (slot t: into this tile;
  // slot t+1, H further, into the right neighbour), column j0+k's likewise. The pointers step by one state's
  // stride per state (one 64-bit add, not the index maths of every access).
  const bool row_ok = i0 + lane < H, col_ok = j0 + lane < W;
  float* rcp = p.rowc + (bd * N * p.TC + t) * H + i0 + lane;
  float* ccp = p.colc + (bd * N * p.TR + s) * W + j0 + lane;
  const int64_t rstep = (int64_t)p.TC * H, cstep = (int64_t)p.TR * W;
  auto issue = [&](int n) {
    if (n < N) {
      const int slot = n % NBUF;
      stage_bc<NWB, TS>(Bbase + n * HW, Bring + slot * TS * TS, i0, j0, hb, wb, W);
      stage_bc<NWB, TS>(Cbase + n * HW, Cring + slot * TS * TS, i0, j0, hb, wb, W);
      if (lane == 0) cp_async4(Aring + slot * NWB + warp, p.A + d * N + n, valid);
    }
    cp_async_commit();  // possibly empty: keeps one group per state
  };
  for (int k = 0; k < NBUF - 1; ++k) issue(k);

  for (int n = 0; n < N; ++n) {
    __syncthreads();  // everyone is done with the slot of state n-1, which state n+NBUF-1 reuses
    issue(n + NBUF - 1);
    cp_async_wait<NBUF - 1>();
    __syncthreads();
    if (!valid) continue;
    const int slot = n % NBUF;
    const float* Bs = Bring + slot * TS * TS;
    const float* Cs = Cring + slot * TS * TS;
    const float A2 = Aring[slot * NWB + warp] * LOG2E;
    float* const rc = rcp + n * rstep;  // lane k's row carry into this tile for state n
    float* const cc = ccp + n * cstep;

    // The carries entering the tile, read early and settled after the local scans, one row and one column
    // per lane as in MODE 4 (lane k: row i0 + k, column j0 + k), then passed to the lanes at the tile's edges
    // by shuffles: per-row polling and 64-bit addressing in the edge lanes cost ~40% of the state loop (SASS).
    const unsigned rpk = t > 0 && row_ok ? peek_carry(rc) : 0u;
    const unsigned cpk = s > 0 && col_ok ? peek_carry(cc) : 0u;

    // horizontal, local: A-bar, x = delta*u*B, and each row of the block scanned from 0
    float a[BH][BW], x[BH][BW], e[BH];
#pragma unroll
    for (int r = 0; r < BH; ++r) {
      const float4 bv = *reinterpret_cast<const float4*>(Bs + (rb + r) * TS + cb);
      const float bb[BW] = {bv.x, bv.y, bv.z, bv.w};
      float v = 0.f;
#pragma unroll
      for (int c = 0; c < BW; ++c) {
        a[r][c] = ex2(dl[r][c] * A2);
        x[r][c] = dul[r][c] * bb[c];
        v = c == 0 ? x[r][0] : fmaf(a[r][c], v, x[r][c]);  // from 0: the first cell is its own x
      }
      e[r] = v;
    }
    // compose the segments across the BX lanes of each row group: (P, e) with P the decay across the segment
    float rcar = 0.f;  // lane k: the carry into row i0 + k
    if (row_ok) {
      if (t > 0) rcar = settle_carry(rc, rpk);  // from the left neighbour
      else *rc = 0.f;  // nothing enters the first tile column; kept for backward like the others
    }
    float hin[BH], P[BH];
#pragma unroll
    for (int r = 0; r < BH; ++r) {
      const float cr = __shfl_sync(FULL, rcar, rb + r);  // row rb + r's carry, for the lanes at the left edge
      hin[r] = lx == 0 ? cr : 0.f;
      P[r] = ex2(srow[r] * A2);
      // the true end of the first segment (only there: an overflowing P times a zero carry would be NaN)
      if (lx == 0) e[r] = fmaf(P[r], hin[r], e[r]);
    }
#pragma unroll
    for (int off = 1; off < BX; off <<= 1) {
#pragma unroll
      for (int r = 0; r < BH; ++r) {
        const float Pu = __shfl_up_sync(FULL, P[r], off, BX);
        const float eu = __shfl_up_sync(FULL, e[r], off, BX);
        if (lx >= off) {
          e[r] = fmaf(P[r], eu, e[r]);
          P[r] *= Pu;
        }
      }
    }
    // e[r]: the true hh at this lane's last column. The carry into the lane is its left neighbour's.
#pragma unroll
    for (int r = 0; r < BH; ++r) {
      const float left = __shfl_up_sync(FULL, e[r], 1, BX);
      float hh = lx == 0 ? hin[r] : left;
#pragma unroll
      for (int c = 0; c < BW; ++c) {
        hh = fmaf(a[r][c], hh, x[r][c]);
        x[r][c] = hh;  // x now holds hh
      }
    }
    {  // the tile's last column (lanes lx == BX-1) into the tile to the right: lane k hands on row k
      float out = 0.f;
#pragma unroll
      for (int r = 0; r < BH; ++r) {
        const float v = __shfl_sync(FULL, x[r][BW - 1], (lane / BH) * BX + BX - 1);
        if (lane % BH == r) out = v;
      }
      if (t + 1 < p.TC && row_ok) put_carry(rc + H, out);
    }

    // vertical, local: each column of the block scanned from 0 over hh
    float ccar = 0.f;  // lane k: the carry into column j0 + k
    if (col_ok) {
      if (s > 0) ccar = settle_carry(cc, cpk);  // from the upper neighbour
      else *cc = 0.f;
    }
    float f[BW], Q[BW], hcin[BW];
#pragma unroll
    for (int c = 0; c < BW; ++c) {
      float v = x[0][c];
#pragma unroll
      for (int r = 1; r < BH; ++r) v = fmaf(a[r][c], v, x[r][c]);
      const float cv = __shfl_sync(FULL, ccar, cb + c);  // column cb + c's carry, for the lanes at the top edge
      hcin[c] = ly == 0 ? cv : 0.f;
      Q[c] = ex2(scol[c] * A2);
      f[c] = ly == 0 ? fmaf(Q[c], hcin[c], v) : v;  // the true end of the top segment
    }
    // compose across the BY lanes of each column group (lanes BX apart)
#pragma unroll
    for (int off = 1; off < BY; off <<= 1) {
#pragma unroll
      for (int c = 0; c < BW; ++c) {
        const float Qu = __shfl_up_sync(FULL, Q[c], off * BX);
        const float fu = __shfl_up_sync(FULL, f[c], off * BX);
        if (ly >= off) {
          f[c] = fmaf(Q[c], fu, f[c]);
          Q[c] *= Qu;
        }
      }
    }
    float h[BW];
#pragma unroll
    for (int c = 0; c < BW; ++c) {
      const float up = __shfl_up_sync(FULL, f[c], BX);
      h[c] = ly == 0 ? hcin[c] : up;
    }
    // the block's columns again from their true carries, and y += C h
#pragma unroll
    for (int r = 0; r < BH; ++r) {
      const float4 c4 = *reinterpret_cast<const float4*>(Cs + (rb + r) * TS + cb);
      const float cm[BW] = {c4.x, c4.y, c4.z, c4.w};
#pragma unroll
      for (int c = 0; c < BW; ++c) {
        h[c] = fmaf(a[r][c], h[c], x[r][c]);
        y[r][c] = fmaf(cm[c], h[c], y[r][c]);
      }
    }
    {  // the tile's last row (lanes ly == BY-1) into the tile below: lane k hands on column k
      float out = 0.f;
#pragma unroll
      for (int c = 0; c < BW; ++c) {
        const float v = __shfl_sync(FULL, h[c], (BY - 1) * BX + lane / BW);
        if (lane % BW == c) out = v;
      }
      if (s + 1 < p.TR && col_ok) put_carry(cc + W, out);
    }
  }

  if (valid) {
    const T* up = (const T*)p.u + plane;
    const T* zp = p.z ? (const T*)p.z + plane : nullptr;
    T* op = (T*)p.out + plane;
    const float Dd = p.Dv ? p.Dv[d] : 0.f;
#pragma unroll
    for (int r = 0; r < BH; ++r) {
      float uv[BW], zv[BW];
#pragma unroll
      for (int c = 0; c < BW; ++c) {
        const int i = r0 + r, j = c0 + c;
        const bool in = i < hb && j < wb;
        const int64_t o = in ? (int64_t)i * W + j : 0;
        uv[c] = in ? ldf(up + o) : 0.f;
        zv[c] = in && zp ? ldf(zp + o) : 0.f;
      }
#pragma unroll
      for (int c = 0; c < BW; ++c) {
        const int i = r0 + r, j = c0 + c;
        if (i < H && j < W) {
          float v = 0.f;
          if (i < hb && j < wb) {
            const float yv = y[r][c] + Dd * uv[c];
            v = zp ? yv * zv[c] * sigmoid_f(zv[c]) : yv;
          }
          op[(int64_t)i * W + j] = fromf<T>(v);
        }
      }
    }
  }
}

template <typename T>
static void launch_blocked_t(const Params& p, cudaStream_t st) {
  size_t smem = (2 * NBUF * TS * TS + NBUF * NWB) * sizeof(float);
  auto kern = fwd_blocked_kernel<T>;
  cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  int64_t blocks = (int64_t)p.Bsz * p.TR * p.TC * p.G * ((p.Dg + NWB - 1) / NWB);
  kern<<<(unsigned)blocks, NWB * 32, smem, st>>>(p);
}

void launch_fwd_blocked(const Params& p, int dtype, cudaStream_t st) {
  if (dtype == 0) launch_blocked_t<float>(p, st);
  else if (dtype == 1) launch_blocked_t<__half>(p, st);
  else launch_blocked_t<__nv_bfloat16>(p, st);
}

}  // namespace scan2d
