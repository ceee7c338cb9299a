"""`scan2d_cuda`: the 2D selective scan as our own CUDA kernel (csrc/scan2d), forward and backward.

The extension is compiled on first CUDA use with torch.utils.cpp_extension (ninja), cached under
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), for the GPU present. `build()` does the
same ahead of time (`gigamamba build-ext`). Without nvcc, `available()` is False after one warning
and `gigamamba.ops.scan2d` uses the PyTorch path.

Shapes as in `scan2d_ref`: u, delta, z r(B D H W) in float32/float16/bfloat16 (delta and z are cast to
u's dtype); A r(D N), D and delta_bias r(D) float32; B, C r(B N H W) or r(B G N H W), any float dtype
(used in float32: they are N/D the size of u); sizes i(B 2). Arithmetic is float32 throughout.
"""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from pathlib import Path

import torch

EXT_NAME = "gigamamba_scan2d"
# The kernel sources sit in the checkout's csrc/ (outside the Python package), so a regular, non-editable
# install (a cluster image) says where they are with GIGAMAMBA_CSRC.
SOURCE_DIR = Path(os.environ.get("GIGAMAMBA_CSRC") or Path(__file__).resolve().parents[2] / "csrc" / "scan2d")
SOURCES = ("binding.cpp", "scan2d_fwd.cu", "scan2d_bwd.cu")

# Backward blocks to aim for when picking the number of channel chunks K of the dB/dC partials. More chunks
# give the wavefront backward more independent blocks per tile; each costs one partial of dB and dC
# (B*N*H*W floats each). H200, 489x415 D=256 N=16 fp32 fwd+bwd: 8 -> 13.4 ms, 16 -> 12.8, 32 -> 12.3 (K = 16,
# partials 2 x 208 MB; they shrink as B*tiles grows, since K = target / (B * G * tiles)).
_TARGET_BLOCKS_PER_SM = 32

_lock = threading.Lock()
_ext = None
_failed: str | None = None
_warned = False


def cuda_home() -> str | None:
    """The CUDA toolkit folder: $CUDA_HOME/$CUDA_PATH, else the one that holds the real nvcc.

    An `nvcc` on PATH may be a wrapper script (as in /usr/local/bin): torch would then infer a folder
    without the CUDA headers and libraries, so follow the wrapper to the toolkit it runs.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(os.path.realpath(nvcc))
        candidates.append(real.parent.parent)
        try:
            text = real.read_text(errors="ignore") if real.stat().st_size < 4096 else ""
        except OSError:
            text = ""
        for word in text.split():
            if word.endswith("/bin/nvcc"):
                candidates.append(Path(word).parent.parent)
    candidates += [Path("/usr/local/cuda")]
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime_api.h").exists():
            return str(home)
    return None


def _warn_once(msg: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"gigamamba: {msg}; scan2d falls back to the PyTorch path", RuntimeWarning, stacklevel=3)


def _load(verbose: bool = False):
    """Compile (or fetch from the cache) and import the extension."""
    global _ext, _failed
    with _lock:
        if _ext is not None:
            return _ext
        home = cuda_home()
        if home is None:
            raise RuntimeError("nvcc (the CUDA compiler) was not found; set CUDA_HOME to build the scan2d kernel")
        os.environ.setdefault("CUDA_HOME", home)
        from torch.utils import cpp_extension

        cpp_extension.CUDA_HOME = home  # torch read it at import time, maybe from a wrapper nvcc
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # nothing to detect: build for Hopper
        _ext = cpp_extension.load(
            name=EXT_NAME,
            sources=[str(SOURCE_DIR / s) for s in SOURCES],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
            verbose=verbose,
        )
        return _ext


def compiler_report() -> str:
    """One line: the C++ compiler cpp_extension will use (CXX, else c++), its version, and the GCC torch was
    built with. Printed by `gigamamba build-ext`, so that a build on an unfamiliar machine shows whether it
    matches torch's. (On the lent H100 machines it does, GCC 13.3 both; the crash found there was a
    std::ostringstream in extension code, not the compiler: csrc/scan2d/NOTES.md.)"""
    import re

    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    where = shutil.which(compiler) or "not on PATH"
    try:
        ok, version = cpp_extension.get_compiler_abi_compatibility_and_version(compiler)
        ours = f"version {version}; torch's ABI check {'passed' if ok else 'FAILED'}"
    except Exception as exc:  # a compiler that cannot even report its version
        ours = f"version unknown ({type(exc).__name__})"
    built = re.search(r"^\s*-\s*GCC\s+([\d.]+)", torch.__config__.show(), re.M)
    theirs = f"GCC {built.group(1)}" if built else "an unrecorded compiler"
    return f"C++ compiler {compiler} ({where}, {ours}); torch {torch.__version__} was built with {theirs}"


def build(verbose: bool = True):
    """Build the extension ahead of time (for cluster images); returns the loaded module."""
    return _load(verbose=verbose)


def available() -> bool:
    """True when CUDA is present and the extension builds and loads (compiling it the first time)."""
    global _failed
    if not torch.cuda.is_available():
        return False
    if _ext is not None:
        return True
    if _failed is not None:
        return False
    try:
        _load()
        return True
    except Exception as exc:  # no nvcc, a compiler error, a missing ninja: all mean "use the fallback"
        _failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}"
        _warn_once(f"the CUDA scan2d extension is unavailable ({_failed})")
        return False


# "wavefront": tiles hand carries to their neighbours inside one pass: the forward (right and down) and the
# backward's final pass (up and left) (csrc/scan2d/NOTES.md, v8). "passes": the layout with aggregate passes and
# short carry scans that it replaced, kept as the reference it is tested against.
CARRIES = os.environ.get("GIGAMAMBA_SCAN2D_CARRIES", "wavefront")
_LAYOUTS = {"passes": 0, "wavefront": 1}


def _layout() -> int:
    if CARRIES not in _LAYOUTS:
        raise ValueError(f"GIGAMAMBA_SCAN2D_CARRIES (scan2d_cuda.CARRIES) must be one of {sorted(_LAYOUTS)}, "
                         f"got {CARRIES!r}")
    return _LAYOUTS[CARRIES]


def _keep_mask(u, n_state) -> int:
    """Which forward carries backward may reuse: saved tensors stay within u's bytes (column carries
    first, as they cost the longer recompute). Bit 0: row carries, bit 1: column carries."""
    n_batch, n_ch, H, W = u.shape
    per_state = 4 * n_batch * n_ch * n_state
    col = per_state * W * -(-H // 32)
    row = per_state * H * -(-W // 32)
    budget = u.numel() * u.element_size()
    if col > budget:
        return 0
    return 2 | (1 if col + row <= budget else 0)


def _prepare(u, delta, A, B, C, D, z, delta_bias, sizes):
    dtype = u.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"scan2d_cuda: u must be float32, float16 or bfloat16, got {dtype}")
    n_batch, n_ch, H, W = u.shape
    u = u.contiguous()
    delta = delta.to(dtype).contiguous()
    z = z.to(dtype).contiguous() if z is not None else None
    A = A.float().contiguous()
    B5 = (B.unsqueeze(1) if B.dim() == 4 else B).float().contiguous()
    C5 = (C.unsqueeze(1) if C.dim() == 4 else C).float().contiguous()
    D = D.float().contiguous() if D is not None else None
    delta_bias = delta_bias.float().contiguous() if delta_bias is not None else None
    if sizes is not None:
        sizes = sizes.to(device=u.device, dtype=torch.int32).contiguous()
    return u, delta, A, B5, C5, D, z, delta_bias, sizes


class Scan2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, sizes):
        ext = _load()
        uu, dd, AA, B5, C5, DD, zz, db, sz = _prepare(u, delta, A, B, C, D, z, delta_bias, sizes)
        layout = _layout()
        out, rowc, colc = ext.fwd(uu, dd, AA, B5, C5, DD, zz, db, bool(delta_softplus), sz, _keep_mask(uu, AA.shape[1]),
                                  layout)
        ctx.wavefront = layout != 0  # backward uses the forward's layout, even if CARRIES changes in between
        ctx.delta_softplus = bool(delta_softplus)
        ctx.meta = (u.dtype, delta.dtype, B.dim(), B.dtype, C.dtype, z.dtype if z is not None else None)
        ctx.has = (D is not None, z is not None, delta_bias is not None)
        ctx.save_for_backward(uu, dd, AA, B5, C5, DD, zz, db, sz, rowc, colc)
        return out

    @staticmethod
    def backward(ctx, dout):
        uu, dd, AA, B5, C5, DD, zz, db, sz, rowc, colc = ctx.saved_tensors
        ext = _load()
        target = _TARGET_BLOCKS_PER_SM * torch.cuda.get_device_properties(uu.device).multi_processor_count
        du, ddelta, dA, dB, dC, dD, dz, ddb = ext.bwd(
            uu, dd, AA, B5, C5, DD, zz, db, ctx.delta_softplus, sz, dout.to(uu.dtype).contiguous(), rowc, colc, target,
            ctx.wavefront,
        )
        u_dtype, delta_dtype, b_dim, b_dtype, c_dtype, z_dtype = ctx.meta
        has_D, has_z, has_bias = ctx.has
        if b_dim == 4:
            dB, dC = dB.squeeze(1), dC.squeeze(1)
        return (
            du,
            ddelta.to(delta_dtype),
            dA,
            dB.to(b_dtype),
            dC.to(c_dtype),
            dD if has_D else None,
            dz.to(z_dtype) if has_z else None,
            ddb if has_bias else None,
            None,
            None,
        )


def scan2d_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, sizes=None):
    """The 2D selective scan on the GPU; autograd-differentiable, deterministic gradients."""
    return Scan2dFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, sizes)


__all__ = ["available", "build", "scan2d_cuda", "cuda_home", "Scan2dFn"]
