// Backward: the adjoint is the same scan reversed (vertical bottom->top, then horizontal right->left):
//   g[i,j] = C dy + a[i+1,j] g[i+1,j],   q[i,j] = g[i,j] + a[i,j+1] q[i,j+1]
// A reverse carry is the already-decayed value a*g (or a*q) of the first cell past the tile's edge.
#include "scan2d.h"

namespace scan2d {

// Stage one channel's delta (after bias/softplus) and dy = dout * silu(z) into two per-warp tiles.
template <typename T>
__device__ __forceinline__ void stage_delta_dy(const Params& p, int64_t plane, int d, int i0, int j0, int hb, int wb,
                                               int lane, float* Td, float* Ty, float* Tu) {
  const T* dp = (const T*)p.delta + plane;
  const T* gp = (const T*)p.dout + plane;
  const T* zp = p.z ? (const T*)p.z + plane : nullptr;
  const T* up = (const T*)p.u + plane;
  const float bias = p.dbias ? p.dbias[d] : 0.f;
  const int j = j0 + lane;
  for (int rc = 0; rc < TS; rc += RCH) {
    float dv[RCH], gv[RCH], zv[RCH], uv[RCH];
#pragma unroll
    for (int m = 0; m < RCH; ++m) {
      const int i = i0 + rc + m;
      const bool in = i < hb && j < wb;
      const int64_t o = in ? (int64_t)i * p.W + j : 0;
      dv[m] = in ? ldf(dp + o) : 0.f;
      gv[m] = in ? ldf(gp + o) : 0.f;
      zv[m] = in && zp ? ldf(zp + o) : 0.f;
      uv[m] = in && Tu ? ldf(up + o) : 0.f;
    }
#pragma unroll
    for (int m = 0; m < RCH; ++m) {
      const int r = rc + m, i = i0 + r;
      float v = 0.f, dy = 0.f;
      if (i < hb && j < wb) {
        v = dv[m] + bias;
        if (p.softplus) v = softplus_f(v);
        dy = zp ? gv[m] * zv[m] * sigmoid_f(zv[m]) : gv[m];
      }
      Td[r * LD + lane] = v;
      Ty[r * LD + lane] = dy;
      if (Tu) Tu[r * LD + lane] = uv[m];
    }
  }
}

// MODE 0: column aggregates of the reverse vertical scan (a*g at the tile's top row, from 0 below).
// MODE 1: row aggregates of the reverse horizontal scan over the true g (needs the column carries).
template <typename T, int MODE>
__global__ void __launch_bounds__(WPB * 32) bwd_agg_kernel(Params p) {
  extern __shared__ float sm[];
  float* Cring = sm;                   // NBUF C tiles
  float* Sring = sm + NBUF * TILE;     // NBUF x WPB x (-, column carries, A)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* Td = Sring + NBUF * WPB * SCAL + warp * 4 * TILE;  // delta
  float* Ty = Td + TILE;                    // dy
  float* Ta = Ty + TILE;                    // a
  float* Tg = Ta + TILE;                    // g

  const int chunks = p.G * p.CPG, ntiles = p.TR * p.TC;
  const int gc = blockIdx.x % chunks;
  const int tile = (blockIdx.x / chunks) % ntiles;
  const int b = blockIdx.x / chunks / ntiles;
  const int g = gc / p.CPG;
  const int cig = (gc % p.CPG) * WPB + warp;
  const bool valid = cig < p.Dg;
  const int d = g * p.Dg + (valid ? cig : 0);
  const int s = tile / p.TC, t = tile % p.TC;
  const int i0 = s * TS, j0 = t * TS;
  const int H = p.H, W = p.W, N = p.N;
  int hb, wb;
  sample_extent(p, b, hb, wb);
  const int64_t bd = (int64_t)b * p.D + d;

  if (valid) {
    stage_delta_dy<T>(p, bd * H * W, d, i0, j0, hb, wb, lane, Td, Ty, nullptr);
    __syncwarp();
    if (MODE == 0 && j0 + lane < W) {
      float cs = 0.f;
      for (int r = 0; r < TS; ++r) cs += Td[r * LD + lane];
      p.rcols[(bd * p.TR + s) * W + j0 + lane] = cs;
    }
    if (MODE == 1 && i0 + lane < H) {
      float rs = 0.f;
      for (int j = 0; j < TS; ++j) rs += Td[lane * LD + j];
      p.rrows[(bd * p.TC + t) * H + i0 + lane] = rs;
    }
  }
  const int64_t HW = (int64_t)H * W;
  const float* Cbase = p.Cm + ((int64_t)b * p.G + g) * N * HW;
  const bool row_ok = valid && i0 + lane < H, col_ok = valid && j0 + lane < W;
  const int64_t rbase = (bd * N * p.TC + t) * H + i0 + lane;  // + n*TC*H
  const int64_t cbase = (bd * N * p.TR + s) * W + j0 + lane;  // + n*TR*W
  const TileCopy<WPB> copy_bc(i0, j0, hb, wb, W);
  auto issue = [&](int n) {  // a ring of NBUF states in flight, as in fwd_tile_kernel
    if (n < N) {
      const int slot = n % NBUF;
      copy_bc(Cbase + n * HW, Cring + slot * TILE);
      float* sc = Sring + (slot * WPB + warp) * SCAL;
      if (MODE == 1) cp_async4(sc + 32 + lane, p.rcolc + (col_ok ? cbase + (int64_t)n * p.TR * W : 0), col_ok);
      if (lane == 0) cp_async4(sc + 64, p.A + d * N + n, valid);
    }
    cp_async_commit();
  };
  for (int k = 0; k < NBUF - 1; ++k) issue(k);
  for (int n = 0; n < N; ++n) {
    __syncthreads();
    issue(n + NBUF - 1);
    cp_async_wait<NBUF - 1>();
    __syncthreads();
    if (!valid) continue;
    const int slot = n % NBUF;
    const float* Cs = Cring + slot * TILE;
    const float* sc = Sring + (slot * WPB + warp) * SCAL;
    const float A2 = sc[64] * LOG2E;
    float gcar = MODE == 1 ? sc[32 + lane] : 0.f;
#pragma unroll
    for (int rc = TS - 8; rc >= 0; rc -= 8) {
      float dv[8], cy[8];  // loaded ahead of the stores (see fwd_tile_kernel)
#pragma unroll
      for (int m = 7; m >= 0; --m) {
        dv[m] = Td[(rc + m) * LD + lane];
        cy[m] = Cs[(rc + m) * LD + lane] * Ty[(rc + m) * LD + lane];
      }
#pragma unroll
      for (int m = 7; m >= 0; --m) {
        const int r = rc + m;
        float a = ex2(dv[m] * A2);
        float gv = cy[m] + gcar;
        if (MODE == 1) {
          Ta[r * LD + lane] = a;
          Tg[r * LD + lane] = gv;
        }
        gcar = a * gv;
      }
    }
    if (MODE == 0) {
      if (col_ok) p.rcolc[cbase + (int64_t)n * p.TR * W] = gcar;
      continue;
    }
    __syncwarp();
    float qc = 0.f;
#pragma unroll
    for (int j = TS - 1; j >= 0; --j) {
      float q = Tg[lane * LD + j] + qc;
      qc = Ta[lane * LD + j] * q;
    }
    if (row_ok) p.rrowc[rbase + (int64_t)n * p.TC * H] = qc;
    __syncwarp();
  }
}

// The final backward pass: per tile, recompute h and hh from the forward carries, run the adjoint
// from the reverse carries, and form every gradient. dB/dC are summed over the block's channels in a
// fixed order into the partial of its channel chunk k (no atomics); dA/dD/ddelta_bias go to per-tile
// partials. A block = (b, tile, group, chunk k), its warps walk the chunk in rounds of WPB channels.
// WAVE: the reverse carries are not precomputed (no bwd_agg passes, no carry scans). Blocks take tiles in
// reverse raster order from a counter, and per (round, state) a warp waits for a*g from the tile below and
// a*q from the tile to the right, and hands its own on upwards and leftwards, as the wavefront forward does.
template <typename T, bool WAVE>
__global__ void __launch_bounds__(WPB * 32) bwd_final_kernel(Params p) {
  extern __shared__ float sm[];
  float* Bbuf = sm;             // two B tiles: state n computes while n+1 loads
  float* Cbuf = sm + 2 * TILE;  // two C tiles
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* OldC = sm + 4 * TILE;  // this round's dC / dB partials before adding (unpadded 32x32)
  float* OldB = OldC + TS * TS;
  float* TY = OldB + TS * TS;   // dy of each warp: TY + w * 5 * TILE
  float* Ty = TY + warp * 5 * TILE;
  float* Ta = Ty + TILE;   // a (delta at staging)
  float* Th = Ta + TILE;   // hh (u at staging); then the dB contribution q*delta*u
  float* Tv = Th + TILE;   // h; then g
  float* Tw = Tv + TILE;   // g * h[i-1, j]

  const int ntiles = p.TR * p.TC;
  // wavefront: dynamic block order, so the tiles below and to the right are handed out first
  const int vb = WAVE ? wavefront_ticket(p) : (int)blockIdx.x;
  const int k = vb % p.K;
  const int g = (vb / p.K) % p.G;
  const int tile = WAVE ? ntiles - 1 - (vb / p.K / p.G) % ntiles : (vb / p.K / p.G) % ntiles;
  const int b = vb / p.K / p.G / ntiles;
  const int s = tile / p.TC, t = tile % p.TC;
  const int i0 = s * TS, j0 = t * TS;
  const int H = p.H, W = p.W, N = p.N;
  int hb, wb;
  sample_extent(p, b, hb, wb);
  const int64_t HW = (int64_t)H * W;
  const float* Bbase = p.Bm + ((int64_t)b * p.G + g) * N * HW;
  const float* Cbase = p.Cm + ((int64_t)b * p.G + g) * N * HW;
  const int64_t pbase = (((int64_t)k * p.Bsz + b) * p.G + g) * N * HW;  // partial of (k, b, g)
  const TileCopy<WPB> copy_bc(i0, j0, hb, wb, W);
  // The partial cells this thread copies, adds to and writes back: (warp + WPB*m, lane) of the tile.
  // Their offsets and range checks are fixed for the block, so they are worked out here, not per state.
  constexpr int PER = TS * TS / (WPB * 32);
  const int cell0 = (i0 + warp) * W + j0 + lane;
  unsigned cells_ok = 0;
#pragma unroll
  for (int m = 0; m < PER; ++m) cells_ok |= (i0 + warp + m * WPB < H && j0 + lane < W ? 1u : 0u) << m;

  for (int rr = 0; rr < p.RPC; ++rr) {
    const int first = (k * p.RPC + rr) * WPB;  // first channel (in group) of this round
    if (first >= p.Dg) break;                  // uniform over the block
    const int nvalid = min(WPB, p.Dg - first);
    const bool valid = warp < nvalid;
    const int d = g * p.Dg + first + (valid ? warp : 0);
    const int64_t bd = (int64_t)b * p.D + d;
    const int64_t plane = bd * HW;
    const float Dd = p.Dv ? p.Dv[d] : 0.f;

    float dl[TS], ul[TS], gu[TS], gd[TS];
    float dD_acc = 0.f;
    if (valid) {
      stage_delta_dy<T>(p, plane, d, i0, j0, hb, wb, lane, Ta, Ty, Th);
      __syncwarp();
#pragma unroll
      for (int r = 0; r < TS; ++r) dD_acc = fmaf(Ty[r * LD + lane], Th[r * LD + lane], dD_acc);
#pragma unroll
      for (int j = 0; j < TS; ++j) {
        dl[j] = Ta[lane * LD + j];
        ul[j] = Th[lane * LD + j];
        gu[j] = 0.f;
        gd[j] = 0.f;
      }
      __syncwarp();
    }

    const bool row_ok = valid && i0 + lane < H, col_ok = valid && j0 + lane < W;
    const int64_t rbase = (bd * N * p.TC + t) * H + i0 + lane;  // + n*TC*H
    const int64_t cbase = (bd * N * p.TR + s) * W + j0 + lane;  // + n*TR*W
    auto issue = [&](int n) {
      copy_bc(Bbase + n * HW, Bbuf + (n & 1) * TILE);
      copy_bc(Cbase + n * HW, Cbuf + (n & 1) * TILE);
      cp_async_commit();
    };
    // per-state scalars, loaded one state ahead: A, forward carries (hh, h), reverse carries (a*g, a*q)
    float nA, nhh, nh, ng, nq;
    auto load_next = [&](int n) {
      nA = valid ? p.A[d * N + n] : 0.f;
      nhh = row_ok ? p.rowc[rbase + (int64_t)n * p.TC * H] : 0.f;
      nh = col_ok ? p.colc[cbase + (int64_t)n * p.TR * W] : 0.f;
      ng = col_ok && !WAVE ? p.rcolc[cbase + (int64_t)n * p.TR * W] : 0.f;
      nq = row_ok && !WAVE ? p.rrowc[rbase + (int64_t)n * p.TC * H] : 0.f;
    };
    issue(0);
    load_next(0);
    auto cell_ok = [&](int m) { return ((cells_ok >> m) & 1u) != 0u; };
    for (int n = 0; n < N; ++n) {
      const float An = nA, A2 = An * LOG2E;
      const float hh_in = nhh, h_in = nh;
      float gcar = ng, qc = nq;
      const int64_t rn = rbase + (int64_t)n * p.TC * H, cn = cbase + (int64_t)n * p.TR * W;
      // this round's partials so far (the block wrote them in earlier rounds; zeros in round 0), copied
      // asynchronously into shared memory; each thread reads back only the cells it copied itself
      float* dCn = p.dCp + pbase + (int64_t)n * HW;
      float* dBn = p.dBp + pbase + (int64_t)n * HW;
#pragma unroll
      for (int m = 0; m < PER; ++m) {
        const int e = threadIdx.x + m * WPB * 32;  // cell (warp + WPB*m, lane) of the tile
        const bool in = rr > 0 && cell_ok(m);
        const int o = cell0 + m * WPB * W;
        cp_async4(OldC + e, in ? dCn + o : dCn, in);
        cp_async4(OldB + e, in ? dBn + o : dBn, in);
      }
      cp_async_commit();
      __syncthreads();
      if (n + 1 < N) {
        issue(n + 1);
        load_next(n + 1);
        cp_async_wait<2>();  // B/C of state n; the old partials and state n+1 may still be in flight
      } else {
        cp_async_wait<1>();
      }
      __syncthreads();
      const float* Bs = Bbuf + (n & 1) * TILE;
      const float* Cs = Cbuf + (n & 1) * TILE;
      // Each phase reads a few steps ahead of its stores (CH at a time), so loads need not queue
      // behind stores to tiles the compiler cannot prove distinct.
      constexpr int CH = 4, CH2 = 2;
      if (valid) {
        // forward, horizontal (lane = row)
        float hh = hh_in;
#pragma unroll
        for (int jc = 0; jc < TS; jc += CH) {
          float bv[CH];
#pragma unroll
          for (int m = 0; m < CH; ++m) bv[m] = Bs[lane * LD + jc + m];
#pragma unroll
          for (int m = 0; m < CH; ++m) {
            const int j = jc + m;
            float a = ex2(dl[j] * A2);
            hh = fmaf(a, hh, dl[j] * ul[j] * bv[m]);
            Ta[lane * LD + j] = a;
            Th[lane * LD + j] = hh;
          }
        }
        __syncwarp();
        // forward, vertical (lane = column)
        float h = h_in;
#pragma unroll
        for (int rc = 0; rc < TS; rc += CH) {
          float av[CH], hv[CH];
#pragma unroll
          for (int m = 0; m < CH; ++m) {
            av[m] = Ta[(rc + m) * LD + lane];
            hv[m] = Th[(rc + m) * LD + lane];
          }
#pragma unroll
          for (int m = 0; m < CH; ++m) {
            h = fmaf(av[m], h, hv[m]);
            Tv[(rc + m) * LD + lane] = h;
          }
        }
      }
      if (n + 1 < N) cp_async_wait<1>(); else cp_async_wait<0>();  // this thread's old partials
      __syncthreads();
      // dC[n] += sum over this round's channels of dy * h, in warp order
#pragma unroll
      for (int m = 0; m < PER; ++m) {
        const int e = threadIdx.x + m * WPB * 32, sidx = (warp + m * WPB) * LD + lane;
        float acc = 0.f;
        // a fixed trip count with a uniform predicate: a loop over nvalid compiled to ~25 instructions of
        // unrolling and remainder handling per cell (SASS) around 4 multiply-adds
#pragma unroll
        for (int w = 0; w < WPB; ++w) {
          const float* base = TY + w * 5 * TILE;
          if (w < nvalid) acc = fmaf(base[sidx], base[3 * TILE + sidx], acc);
        }
        if (cell_ok(m)) dCn[cell0 + m * WPB * W] = OldC[e] + acc;
      }
      __syncthreads();
      if (valid) {
        if (WAVE && s + 1 < p.TR && col_ok) gcar = wait_carry(p.rcolc + cn);  // from the tile below
        // adjoint, vertical (lane = column, bottom -> top); g overwrites h, which row r+1 has used
#pragma unroll
        for (int rc = TS - CH; rc >= 0; rc -= CH) {
          float hp[CH], cy[CH], av[CH];
#pragma unroll
          for (int m = CH - 1; m >= 0; --m) {
            const int r = rc + m;
            hp[m] = r > 0 ? Tv[(r - 1) * LD + lane] : h_in;
            cy[m] = Cs[r * LD + lane] * Ty[r * LD + lane];
            av[m] = Ta[r * LD + lane];
          }
#pragma unroll
          for (int m = CH - 1; m >= 0; --m) {
            const int r = rc + m;
            float gv = cy[m] + gcar;
            Tw[r * LD + lane] = gv * hp[m];
            Tv[r * LD + lane] = gv;
            gcar = av[m] * gv;
          }
        }
        if (WAVE && s > 0 && col_ok) put_carry(p.rcolc + cn - W, gcar);  // into the tile above
        if (WAVE && t + 1 < p.TC && row_ok) qc = wait_carry(p.rrowc + rn);  // from the tile to the right
        __syncwarp();
        // adjoint, horizontal (lane = row, right -> left); q*delta*u overwrites hh, which column j+1 has used
        float dA_acc = 0.f;
#pragma unroll
        for (int jc = TS - CH2; jc >= 0; jc -= CH2) {
          float av[CH2], gv[CH2], hp[CH2], tw[CH2], bv[CH2];
#pragma unroll
          for (int m = CH2 - 1; m >= 0; --m) {
            const int j = jc + m;
            av[m] = Ta[lane * LD + j];
            gv[m] = Tv[lane * LD + j];
            hp[m] = j > 0 ? Th[lane * LD + j - 1] : hh_in;
            tw[m] = Tw[lane * LD + j];
            bv[m] = Bs[lane * LD + j];
          }
#pragma unroll
          for (int m = CH2 - 1; m >= 0; --m) {
            const int j = jc + m;
            float q = gv[m] + qc;
            float ea = fmaf(q, hp[m], tw[m]) * av[m];  // d(loss)/d(a) * a
            float qb = q * bv[m];
            gu[j] += qb;                                // du = delta * sum_n q B_n (+ D dy)
            gd[j] = fmaf(ea, An, gd[j]);                // ddelta = u * sum_n q B_n + sum_n ea A_n
            dA_acc = fmaf(ea, dl[j], dA_acc);
            Th[lane * LD + j] = q * dl[j] * ul[j];
            qc = av[m] * q;
          }
        }
        if (WAVE && t > 0 && row_ok) put_carry(p.rrowc + rn - H, qc);  // into the tile to the left
        dA_acc = warp_sum(dA_acc);
        if (lane == 0) p.dAp[((int64_t)(b * ntiles + tile) * p.D + d) * N + n] = dA_acc;
      }
      __syncthreads();
      // dB[n] += sum over this round's channels of q * delta * u, in warp order
#pragma unroll
      for (int m = 0; m < PER; ++m) {
        const int e = threadIdx.x + m * WPB * 32, sidx = (warp + m * WPB) * LD + lane;
        float acc = 0.f;
#pragma unroll
        for (int w = 0; w < WPB; ++w)
          if (w < nvalid) acc += TY[w * 5 * TILE + 2 * TILE + sidx];
        if (cell_ok(m)) dBn[cell0 + m * WPB * W] = OldB[e] + acc;
      }
    }
    __syncthreads();

    if (valid) {
      // transpose the row-wise accumulators through shared memory, then write coalesced
#pragma unroll
      for (int j = 0; j < TS; ++j) {
        Ta[lane * LD + j] = dl[j] * gu[j];
        Th[lane * LD + j] = fmaf(ul[j], gu[j], gd[j]);
      }
      __syncwarp();
      const T* dp = (const T*)p.delta + plane;
      const float bias = p.dbias ? p.dbias[d] : 0.f;
      float db_acc = 0.f;
      const int j = j0 + lane;
#pragma unroll
      for (int rc = 0; rc < TS; rc += RCH) {
        float dv[RCH];
#pragma unroll
        for (int m = 0; m < RCH; ++m) {
          const int i = i0 + rc + m;
          const bool in = p.softplus && i < hb && j < wb;
          dv[m] = in ? ldf(dp + (int64_t)i * W + j) : 0.f;
        }
#pragma unroll
        for (int m = 0; m < RCH; ++m) {
          const int r = rc + m, i = i0 + r;
          if (i < H && j < W) {
            const int64_t o = (int64_t)i * W + j;
            float vu = 0.f, vd = 0.f;
            if (i < hb && j < wb) {
              vu = fmaf(Dd, Ty[r * LD + lane], Ta[r * LD + lane]);
              vd = Th[r * LD + lane];
              if (p.softplus) vd *= sigmoid_f(dv[m] + bias);
              db_acc += vd;
            }
            ((T*)p.du)[plane + o] = fromf<T>(vu);
            ((T*)p.ddelta)[plane + o] = fromf<T>(vd);
          }
        }
      }
      dD_acc = warp_sum(dD_acc);
      db_acc = warp_sum(db_acc);
      if (lane == 0) {
        int64_t o = (int64_t)(b * ntiles + tile) * p.D + d;
        p.dDp[o] = dD_acc;
        p.dbp[o] = db_acc;
      }
      __syncwarp();
    }
  }
}

// Fixed-order sums of the partials: deterministic, no atomics.
__global__ void reduce_bc_kernel(const float* __restrict__ part, float* out, int K, int64_t count) {
  int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= count) return;
  float acc = 0.f;
  for (int k = 0; k < K; ++k) acc += part[(int64_t)k * count + e];
  out[e] = acc;
}

__global__ void reduce_cols_kernel(const float* __restrict__ part, float* out, int rows, int cols) {
  int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float acc = 0.f;
  for (int r = 0; r < rows; ++r) acc += part[(int64_t)r * cols + c];
  out[c] = acc;
}

template <typename T, int MODE>
static void launch_agg_t(const Params& p, cudaStream_t st) {
  size_t smem = ((NBUF + 4 * WPB) * TILE + NBUF * WPB * SCAL) * sizeof(float);
  auto kern = bwd_agg_kernel<T, MODE>;
  cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  int64_t blocks = (int64_t)p.Bsz * p.TR * p.TC * p.G * p.CPG;
  kern<<<(unsigned)blocks, WPB * 32, smem, st>>>(p);
}

void launch_bwd_agg(const Params& p, int mode, int dtype, cudaStream_t st) {
  if (mode == 0) {
    if (dtype == 0) launch_agg_t<float, 0>(p, st);
    else if (dtype == 1) launch_agg_t<__half, 0>(p, st);
    else launch_agg_t<__nv_bfloat16, 0>(p, st);
  } else {
    if (dtype == 0) launch_agg_t<float, 1>(p, st);
    else if (dtype == 1) launch_agg_t<__half, 1>(p, st);
    else launch_agg_t<__nv_bfloat16, 1>(p, st);
  }
}

template <typename T, bool WAVE>
static void launch_final_t(const Params& p, cudaStream_t st) {
  size_t smem = ((4 + 5 * WPB) * TILE + 2 * TS * TS) * sizeof(float);
  auto kern = bwd_final_kernel<T, WAVE>;
  cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  int64_t blocks = (int64_t)p.Bsz * p.TR * p.TC * p.G * p.K;
  kern<<<(unsigned)blocks, WPB * 32, smem, st>>>(p);
}

void launch_bwd_final(const Params& p, int dtype, bool wave, cudaStream_t st) {
  if (wave) {
    if (dtype == 0) launch_final_t<float, true>(p, st);
    else if (dtype == 1) launch_final_t<__half, true>(p, st);
    else launch_final_t<__nv_bfloat16, true>(p, st);
  } else {
    if (dtype == 0) launch_final_t<float, false>(p, st);
    else if (dtype == 1) launch_final_t<__half, false>(p, st);
    else launch_final_t<__nv_bfloat16, false>(p, st);
  }
}

void launch_reduce(const Params& p, float* dA, float* dD, float* ddb, float* dB, float* dC, cudaStream_t st) {
  int64_t count = (int64_t)p.Bsz * p.G * p.N * p.H * p.W;
  int threads = 256;
  unsigned nb = (unsigned)((count + threads - 1) / threads);
  reduce_bc_kernel<<<nb, threads, 0, st>>>(p.dBp, dB, p.K, count);
  reduce_bc_kernel<<<nb, threads, 0, st>>>(p.dCp, dC, p.K, count);
  int rows = p.Bsz * p.TR * p.TC;
  int cols = p.D * p.N;
  reduce_cols_kernel<<<(cols + threads - 1) / threads, threads, 0, st>>>(p.dAp, dA, rows, cols);
  reduce_cols_kernel<<<(p.D + threads - 1) / threads, threads, 0, st>>>(p.dDp, dD, rows, p.D);
  reduce_cols_kernel<<<(p.D + threads - 1) / threads, threads, 0, st>>>(p.dbp, ddb, rows, p.D);
}

}  // namespace scan2d
