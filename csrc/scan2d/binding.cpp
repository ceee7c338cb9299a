// Torch binding: argument checks, buffers, and the order of the passes. The kernels are in scan2d_*.cu.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <stdexcept>
#include <string>

#include "scan2d.h"

// The binding's checks throw std::runtime_error (Python: RuntimeError with the message), and their messages are
// put together with std::string and std::to_string. Not TORCH_CHECK, C10_CUDA_KERNEL_LAUNCH_CHECK or c10::str:
// on the lent H100 machines (torch 2.11, sessions 8-9) a failed check built with any of them segfaulted the
// process, and so did a std::runtime_error whose message c10::str formatted in this extension; a
// std::runtime_error with a plain string message raised (NOTES.md: the probe). Device names come from
// Device::str(), which formats inside libc10 (as torch's own checks do, and those raise there); c10::toString
// only returns a dtype's name.
namespace scan2d_msg {
inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(int64_t v) { return std::to_string(v); }
inline std::string piece(int v) { return std::to_string(v); }
inline std::string piece(c10::ScalarType t) { return c10::toString(t); }
inline std::string piece(const c10::Device& d) { return d.str(); }
inline std::string piece(at::IntArrayRef dims) {
  std::string s = "[";
  for (size_t k = 0; k < dims.size(); ++k) s += (k ? ", " : "") + std::to_string(dims[k]);
  return s + "]";
}
template <typename... Ts>
std::string cat(const Ts&... parts) {
  std::string s;
  ((s += piece(parts)), ...);
  return s;
}
}  // namespace scan2d_msg

#define SCAN2D_CHECK(cond, ...)                                            \
  do {                                                                     \
    if (!(cond)) throw std::runtime_error(scan2d_msg::cat(__VA_ARGS__));   \
  } while (0)

#define SCAN2D_LAUNCH_CHECK()                                                                           \
  do {                                                                                                  \
    const cudaError_t launch_error = cudaGetLastError();                                                \
    if (launch_error != cudaSuccess)                                                                    \
      throw std::runtime_error(std::string("scan2d: kernel launch failed: ") + cudaGetErrorString(launch_error)); \
  } while (0)

using torch::Tensor;
using scan2d::Params;

namespace {

int dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: SCAN2D_CHECK(false, "scan2d: u must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return 0;
}

void check_like(const Tensor& t, const Tensor& u, const char* name) {
  SCAN2D_CHECK(t.is_cuda() && t.device() == u.device(), "scan2d: ", name, " must be on ", u.device());
  SCAN2D_CHECK(t.sizes() == u.sizes(), "scan2d: ", name, " must have shape ", u.sizes(), ", got ", t.sizes());
  SCAN2D_CHECK(t.scalar_type() == u.scalar_type(), "scan2d: ", name, " must have dtype ", u.scalar_type());
  SCAN2D_CHECK(t.is_contiguous(), "scan2d: ", name, " must be contiguous");
}

void check_f32(const Tensor& t, const Tensor& u, const char* name) {
  SCAN2D_CHECK(t.is_cuda() && t.device() == u.device(), "scan2d: ", name, " must be on ", u.device());
  SCAN2D_CHECK(t.scalar_type() == at::kFloat, "scan2d: ", name, " must be float32");
  SCAN2D_CHECK(t.is_contiguous(), "scan2d: ", name, " must be contiguous");
}

Params make_params(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                   const c10::optional<Tensor>& Dv, const c10::optional<Tensor>& z,
                   const c10::optional<Tensor>& dbias, bool softplus, const c10::optional<Tensor>& sizes) {
  SCAN2D_CHECK(u.is_cuda() && u.dim() == 4 && u.is_contiguous(), "scan2d: u must be a contiguous CUDA (B, D, H, W)");
  dtype_code(u);
  check_like(delta, u, "delta");
  Params p{};
  p.Bsz = u.size(0);
  p.D = u.size(1);
  p.H = u.size(2);
  p.W = u.size(3);
  check_f32(A, u, "A");
  SCAN2D_CHECK(A.dim() == 2 && A.size(0) == p.D, "scan2d: A must be (D, N)");
  p.N = A.size(1);
  SCAN2D_CHECK(p.N > 0, "scan2d: A must have at least one state (N > 0)");
  check_f32(Bm, u, "B");
  check_f32(Cm, u, "C");
  SCAN2D_CHECK(Bm.dim() == 5 && Bm.size(0) == p.Bsz && Bm.size(2) == p.N && Bm.size(3) == p.H && Bm.size(4) == p.W,
               "scan2d: B must be (B, G, N, H, W)");
  SCAN2D_CHECK(Cm.sizes() == Bm.sizes(), "scan2d: C must have B's shape");
  p.G = Bm.size(1);
  SCAN2D_CHECK(p.G >= 1 && p.D % p.G == 0, "scan2d: D must be a multiple of the number of groups");
  p.Dg = p.D / p.G;
  p.TR = (p.H + scan2d::TS - 1) / scan2d::TS;
  p.TC = (p.W + scan2d::TS - 1) / scan2d::TS;
  p.CPG = (p.Dg + scan2d::WPB - 1) / scan2d::WPB;
  p.softplus = softplus;
  p.u = u.data_ptr();
  p.delta = delta.data_ptr();
  p.A = A.data_ptr<float>();
  p.Bm = Bm.data_ptr<float>();
  p.Cm = Cm.data_ptr<float>();
  if (Dv.has_value()) {
    check_f32(*Dv, u, "D");
    SCAN2D_CHECK(Dv->numel() == p.D, "scan2d: D must have D elements");
    p.Dv = Dv->data_ptr<float>();
  }
  if (dbias.has_value()) {
    check_f32(*dbias, u, "delta_bias");
    SCAN2D_CHECK(dbias->numel() == p.D, "scan2d: delta_bias must have D elements");
    p.dbias = dbias->data_ptr<float>();
  }
  if (z.has_value()) {
    check_like(*z, u, "z");
    p.z = z->data_ptr();
  }
  if (sizes.has_value()) {
    SCAN2D_CHECK(sizes->is_cuda() && sizes->scalar_type() == at::kInt && sizes->is_contiguous() &&
                     sizes->dim() == 2 && sizes->size(0) == p.Bsz && sizes->size(1) == 2,
               "scan2d: sizes must be a contiguous int32 CUDA (B, 2)");
    p.sizes = sizes->data_ptr<int>();
  }
  return p;
}

// Carries of the forward scan into every tile: rows (aggregate pass + short scan), then columns, which
// need the row carries. A carry tensor that is already defined is kept as it is.
void forward_carries(Params& p, int dt, cudaStream_t st, const Tensor& u, Tensor& rowc, Tensor& colc) {
  auto f32 = u.options().dtype(at::kFloat);
  int64_t BD = (int64_t)p.Bsz * p.D;
  Tensor rows = torch::empty({BD, p.TC, p.H}, f32);
  Tensor cols = torch::empty({BD, p.TR, p.W}, f32);
  p.rows = rows.data_ptr<float>();
  p.cols = cols.data_ptr<float>();
  if (!rowc.defined()) {
    rowc = torch::empty({BD, p.N, p.TC, p.H}, f32);
    p.rowc = rowc.data_ptr<float>();
    scan2d::launch_fwd_tiles(p, 0, dt, st);
    SCAN2D_LAUNCH_CHECK();
    scan2d::launch_carry_scan(p.rowc, p.rows, p.A, BD, p.N, p.D, p.TC, p.H, false, st);
    SCAN2D_LAUNCH_CHECK();
  }
  p.rowc = rowc.data_ptr<float>();
  if (!colc.defined()) {
    colc = torch::empty({BD, p.N, p.TR, p.W}, f32);
    p.colc = colc.data_ptr<float>();
    scan2d::launch_fwd_tiles(p, 1, dt, st);
    SCAN2D_LAUNCH_CHECK();
    scan2d::launch_carry_scan(p.colc, p.cols, p.A, BD, p.N, p.D, p.TR, p.W, false, st);
    SCAN2D_LAUNCH_CHECK();
  }
  p.colc = colc.data_ptr<float>();
}

// A carry buffer for the wavefront hand-over: every element starts as the "pending" pattern, which the
// consuming tile polls for until its neighbour has replaced it.
Tensor pending_carries(at::IntArrayRef shape, const Tensor& u) {
  return torch::full(shape, (int64_t)scan2d::CARRY_PENDING, u.options().dtype(at::kInt)).view(at::kFloat);
}

}  // namespace

// Returns (out, row carries, column carries); keep: bit 0 keeps the row carries, bit 1 the column carries
// (undefined tensors otherwise). layout: 1 (or True) the one-pass wavefront (MODE 4); 0 (or False) the three-pass
// reference layout (aggregates, short carry scans, output), kept beside it as the fallback and for tests.
std::vector<Tensor> scan2d_fwd(Tensor u, Tensor delta, Tensor A, Tensor Bm, Tensor Cm, c10::optional<Tensor> Dv,
                               c10::optional<Tensor> z, c10::optional<Tensor> dbias, bool softplus,
                               c10::optional<Tensor> sizes, int64_t keep, int64_t layout) {
  SCAN2D_CHECK(layout == 0 || layout == 1,
               "scan2d: forward layout must be 0 (passes) or 1 (wavefront), got ", layout);
  const bool wavefront = layout == 1;
  Params p = make_params(u, delta, A, Bm, Cm, Dv, z, dbias, softplus, sizes);
  c10::cuda::CUDAGuard guard(u.device());
  cudaStream_t st = c10::cuda::getCurrentCUDAStream();
  int dt = dtype_code(u);
  Tensor out = torch::empty_like(u);
  if (u.numel() == 0) return {out, Tensor(), Tensor()};
  Tensor rowc, colc;
  p.out = out.data_ptr();
  if (wavefront) {
    int64_t BD = (int64_t)p.Bsz * p.D;
    rowc = pending_carries({BD, p.N, p.TC, p.H}, u);
    colc = pending_carries({BD, p.N, p.TR, p.W}, u);
    Tensor flags = torch::zeros({1}, u.options().dtype(at::kInt));  // the tile counter
    p.rowc = rowc.data_ptr<float>();
    p.colc = colc.data_ptr<float>();
    p.flags = flags.data_ptr<int>();
    scan2d::launch_fwd_tiles(p, 4, dt, st);
    SCAN2D_LAUNCH_CHECK();
  } else {
    forward_carries(p, dt, st, u, rowc, colc);
    scan2d::launch_fwd_tiles(p, 2, dt, st);
    SCAN2D_LAUNCH_CHECK();
  }
  return {out, (keep & 1) ? rowc : Tensor(), (keep & 2) ? colc : Tensor()};
}

// Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); dB/dC are fp32 (B, G, N, H, W), dz undefined without z.
std::vector<Tensor> scan2d_bwd(Tensor u, Tensor delta, Tensor A, Tensor Bm, Tensor Cm, c10::optional<Tensor> Dv,
                               c10::optional<Tensor> z, c10::optional<Tensor> dbias, bool softplus,
                               c10::optional<Tensor> sizes, Tensor dout, c10::optional<Tensor> rowc_saved,
                               c10::optional<Tensor> colc_saved, int64_t target_blocks, bool wavefront) {
  Params p = make_params(u, delta, A, Bm, Cm, Dv, z, dbias, softplus, sizes);
  check_like(dout, u, "dout");
  // backward's tile copies and partial sums index a plane in 32-bit ints, up to the last tile's padding
  // (a slide grid is ~10^5 cells; the forward kernels index in 64 bits)
  SCAN2D_CHECK((int64_t)p.TR * scan2d::TS * p.W + (int64_t)p.TC * scan2d::TS <= INT32_MAX, "scan2d: a grid of ",
               p.H, "x", p.W, " has too many cells for the CUDA backward (it indexes a plane in 32 bits)");
  c10::cuda::CUDAGuard guard(u.device());
  cudaStream_t st = c10::cuda::getCurrentCUDAStream();
  int dt = dtype_code(u);
  auto f32 = u.options().dtype(at::kFloat);
  int64_t BD = (int64_t)p.Bsz * p.D;
  Tensor du = torch::empty_like(u), ddelta = torch::empty_like(u);
  Tensor dz = z.has_value() ? torch::empty_like(u) : Tensor();
  if (u.numel() == 0) {
    if (z.has_value()) dz.zero_();
    return {du, ddelta, torch::zeros({p.D, p.N}, f32), torch::zeros(Bm.sizes(), f32), torch::zeros(Bm.sizes(), f32),
            torch::zeros({p.D}, f32), dz, torch::zeros({p.D}, f32)};
  }
  // every element of these is written by the reductions
  Tensor dB = torch::empty(Bm.sizes(), f32), dC = torch::empty(Bm.sizes(), f32);
  Tensor dA = torch::empty({p.D, p.N}, f32), dD = torch::empty({p.D}, f32), ddb = torch::empty({p.D}, f32);

  Tensor rowc = rowc_saved.has_value() ? *rowc_saved : Tensor();
  Tensor colc = colc_saved.has_value() ? *colc_saved : Tensor();
  for (const Tensor* c : {&rowc, &colc})
    if (c->defined()) check_f32(*c, u, "saved carries");
  forward_carries(p, dt, st, u, rowc, colc);  // recomputes whichever carries forward did not keep
  p.dout = dout.data_ptr();
  if (z.has_value()) p.dz = dz.data_ptr();
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();

  // Reverse (adjoint) carries: handed between tiles inside bwd_final (wavefront), or found beforehand by
  // two aggregate passes and short reverse scans (the reference layout).
  Tensor rrowc, rcolc, rrows, rcols, flags;
  if (wavefront) {
    rrowc = pending_carries({BD, p.N, p.TC, p.H}, u);
    rcolc = pending_carries({BD, p.N, p.TR, p.W}, u);
    flags = torch::zeros({1}, u.options().dtype(at::kInt));  // the tile counter
    p.flags = flags.data_ptr<int>();
    p.rrowc = rrowc.data_ptr<float>();
    p.rcolc = rcolc.data_ptr<float>();
  } else {
    rrowc = torch::empty({BD, p.N, p.TC, p.H}, f32);
    rrows = torch::empty({BD, p.TC, p.H}, f32);
    rcolc = torch::empty({BD, p.N, p.TR, p.W}, f32);
    rcols = torch::empty({BD, p.TR, p.W}, f32);
    p.rrowc = rrowc.data_ptr<float>();
    p.rrows = rrows.data_ptr<float>();
    p.rcolc = rcolc.data_ptr<float>();
    p.rcols = rcols.data_ptr<float>();
    scan2d::launch_bwd_agg(p, 0, dt, st);
    SCAN2D_LAUNCH_CHECK();
    scan2d::launch_carry_scan(p.rcolc, p.rcols, p.A, BD, p.N, p.D, p.TR, p.W, true, st);
    SCAN2D_LAUNCH_CHECK();
    scan2d::launch_bwd_agg(p, 1, dt, st);
    SCAN2D_LAUNCH_CHECK();
    scan2d::launch_carry_scan(p.rrowc, p.rrows, p.A, BD, p.N, p.D, p.TC, p.H, true, st);
    SCAN2D_LAUNCH_CHECK();
  }

  // Channel chunks for the dB/dC partials: enough blocks to fill the GPU, few partials to sum.
  int64_t ntiles = (int64_t)p.TR * p.TC;
  int rounds = (p.Dg + scan2d::WPB - 1) / scan2d::WPB;
  int64_t base = (int64_t)p.Bsz * p.G * ntiles;
  int K = (int)std::min<int64_t>(rounds, std::max<int64_t>(1, (target_blocks + base - 1) / base));
  p.RPC = (rounds + K - 1) / K;
  p.K = (rounds + p.RPC - 1) / p.RPC;
  Tensor dBp = torch::empty({p.K, p.Bsz, p.G, p.N, p.H, p.W}, f32);
  Tensor dCp = torch::empty({p.K, p.Bsz, p.G, p.N, p.H, p.W}, f32);
  Tensor dAp = torch::empty({p.Bsz * ntiles, p.D, p.N}, f32);
  Tensor dDp = torch::empty({p.Bsz * ntiles, p.D}, f32), dbp = torch::empty({p.Bsz * ntiles, p.D}, f32);
  p.dBp = dBp.data_ptr<float>();
  p.dCp = dCp.data_ptr<float>();
  p.dAp = dAp.data_ptr<float>();
  p.dDp = dDp.data_ptr<float>();
  p.dbp = dbp.data_ptr<float>();
  scan2d::launch_bwd_final(p, dt, wavefront, st);
  SCAN2D_LAUNCH_CHECK();
  if (z.has_value()) {  // dz needs y; recomputing it here keeps bwd_final's registers for the adjoint
    scan2d::launch_fwd_tiles(p, 3, dt, st);
    SCAN2D_LAUNCH_CHECK();
  }
  scan2d::launch_reduce(p, dA.data_ptr<float>(), dD.data_ptr<float>(), ddb.data_ptr<float>(), dB.data_ptr<float>(),
                        dC.data_ptr<float>(), st);
  SCAN2D_LAUNCH_CHECK();
  return {du, ddelta, dA, dB, dC, dD, dz, ddb};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &scan2d_fwd, "2D selective scan forward (out, row carries, column carries)");
  m.def("bwd", &scan2d_bwd, "2D selective scan backward");
}
