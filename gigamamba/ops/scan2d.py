"""`scan2d`: the 2D selective scan, dispatched to the CUDA kernel or the vectorised PyTorch path.

`scan2d_torch` is the PyTorch path: the CPU default and the fallback wherever the CUDA
extension is not built. It runs each 1D recurrence h[k] = a[k]·h[k-1] + x[k] as a log-depth
(Hillis–Steele) scan, so it costs log2(W) + log2(H) tensor ops instead of one per cell, and
its gradients come from autograd, so they are the oracle's up to rounding.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gigamamba.ops.scan2d_ref import effective_delta, expand_groups

# Above this many hidden-state elements per channel chunk, the autograd graph of the PyTorch
# path is recomputed in backward (checkpointed) instead of stored: the (B, D, N, H, W) state
# times ~2·log2(L) saved tensors would not fit in memory at slide scale.
_CHUNK_ELEMENTS = 1 << 26


def linear_scan(a: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """h[k] = a[k]·h[k-1] + x[k] along `dim`, h[-1] = 0, in ceil(log2 L) steps."""
    a, x = a.movedim(dim, -1), x.movedim(dim, -1)
    length = x.shape[-1]
    offset = 1
    while offset < length:
        # After this step, (a[k], x[k]) composes the 2·offset terms ending at k.
        x = x + a * F.pad(x[..., :-offset], (offset, 0))
        if 2 * offset < length:
            a = a * F.pad(a[..., :-offset], (offset, 0))
        offset *= 2
    return x.movedim(-1, dim)


def grid_mask(sizes: torch.Tensor, H: int, W: int, device) -> torch.Tensor:
    """(B, H, W) bool: True on each sample's real, top-left aligned (H_b, W_b) cells."""
    sizes = sizes.to(device)
    rows = torch.arange(H, device=device).view(1, H, 1) < sizes[:, 0].view(-1, 1, 1)
    cols = torch.arange(W, device=device).view(1, 1, W) < sizes[:, 1].view(-1, 1, 1)
    return rows & cols


def _scan_states(u, delta, A, Bd, Cd, valid):
    """Σ_n C·h for a chunk of channels. u, delta: (B, d, H, W); Bd, Cd: (B, d, N, H, W); A: (d, N)."""
    a = torch.exp(delta.unsqueeze(2) * A.view(1, *A.shape, 1, 1))
    x = delta.unsqueeze(2) * Bd * u.unsqueeze(2)
    if valid is not None:
        # Padding cells inject nothing, so no alignment or scan direction can leak them.
        x = x * valid.unsqueeze(1).unsqueeze(1)
    hh = linear_scan(a, x, dim=-1)       # horizontal, along each row
    h = linear_scan(a, hh, dim=-2)       # vertical, over the horizontal result
    return (Cd * h).sum(2)


def scan2d_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, sizes=None):
    """Vectorised PyTorch 2D selective scan; same signature and semantics as `scan2d_ref`."""
    n_batch, n_ch, H, W = u.shape
    n_state = A.shape[-1]
    compute = torch.promote_types(u.dtype, torch.float32)
    uc = u.to(compute)
    dc = effective_delta(delta.to(compute), delta_bias, delta_softplus)
    valid = grid_mask(sizes, H, W, u.device).to(compute) if sizes is not None else None

    per_channel = max(1, n_batch * n_state * H * W)
    step = max(1, min(n_ch, _CHUNK_ELEMENTS // per_channel))
    groups = 1 if B.dim() == 4 else B.shape[1]
    need_ckpt = torch.is_grad_enabled() and step < n_ch
    ys = []
    for c0 in range(0, n_ch, step):
        c1 = min(n_ch, c0 + step)
        Bd = _channel_slice(B, n_ch, groups, c0, c1).to(compute)
        Cd = _channel_slice(C, n_ch, groups, c0, c1).to(compute)
        args = (uc[:, c0:c1], dc[:, c0:c1], A[c0:c1].to(compute), Bd, Cd, valid)
        ys.append(checkpoint(_scan_states, *args, use_reentrant=False) if need_ckpt else _scan_states(*args))
    y = torch.cat(ys, dim=1) if len(ys) > 1 else ys[0]
    if D is not None:
        y = y + D.to(compute).view(1, -1, 1, 1) * uc
    if z is not None:
        y = y * F.silu(z.to(compute))
    if valid is not None:
        y = y * valid.unsqueeze(1)
    return y.to(u.dtype)


def _channel_slice(BC, n_ch, groups, c0, c1):
    """Per-channel B or C for channels [c0, c1), broadcasting instead of copying when G == 1."""
    if BC.dim() == 4:
        return BC.unsqueeze(1)
    per_group = n_ch // groups
    if n_ch % groups:
        raise ValueError(f"D={n_ch} channels do not split into G={groups} groups of B/C")
    idx = torch.arange(c0, c1, device=BC.device) // per_group
    return BC.index_select(1, idx)


def _validate(u, delta, A, B, C, D, z, delta_bias, sizes):
    if u.dim() != 4:
        raise ValueError(f"scan2d: u must be (B, D, H, W), got shape {tuple(u.shape)}")
    n_batch, n_ch, H, W = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"scan2d: delta shape {tuple(delta.shape)} != u shape {tuple(u.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"scan2d: z shape {tuple(z.shape)} != u shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != n_ch:
        raise ValueError(f"scan2d: A must be (D={n_ch}, N), got {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.dim() not in (4, 5) or t.shape[0] != n_batch or t.shape[-3:] != (A.shape[1], H, W):
            raise ValueError(f"scan2d: {name} must be (B, N, H, W) or (B, G, N, H, W) with N={A.shape[1]}, "
                             f"H={H}, W={W}; got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (n_ch,):
            raise ValueError(f"scan2d: {name} must be (D={n_ch},), got {tuple(t.shape)}")
    if sizes is not None and tuple(sizes.shape) != (n_batch, 2):
        raise ValueError(f"scan2d: sizes must be (B={n_batch}, 2), got {tuple(sizes.shape)}")


def scan2d(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, sizes=None):
    """The 2D selective scan of DESIGN.md: the CUDA kernel on CUDA tensors when it is built,
    the vectorised PyTorch path otherwise. See `scan2d_ref` for shapes and semantics."""
    _validate(u, delta, A, B, C, D, z, delta_bias, sizes)
    if u.is_cuda and _cuda_available():
        from gigamamba.ops import scan2d_cuda

        return scan2d_cuda.scan2d_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, sizes)
    return scan2d_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, sizes)


def _cuda_available() -> bool:
    try:
        from gigamamba.ops import scan2d_cuda
    except ImportError:
        return False
    return scan2d_cuda.available()


__all__ = ["scan2d", "scan2d_torch", "linear_scan", "grid_mask"]
