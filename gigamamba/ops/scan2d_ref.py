"""`scan2d_ref`: the 2D selective scan written exactly as DESIGN.md defines it, in plain loops.

This is the oracle. It is slow on purpose (one Python step per grid cell) and makes no
assumption about dtype: run it in float64 to check every faster path against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_groups(BC: torch.Tensor, n_channels: int) -> torch.Tensor:
    """B or C as (B, N, H, W) or (B, G, N, H, W) -> per-channel (B, D, N, H, W) (a view when G == 1)."""
    if BC.dim() == 4:
        return BC.unsqueeze(1).expand(-1, n_channels, -1, -1, -1)
    groups = BC.shape[1]
    if n_channels % groups:
        raise ValueError(f"D={n_channels} channels do not split into G={groups} groups of B/C")
    return BC.repeat_interleave(n_channels // groups, dim=1)


def effective_delta(delta, delta_bias=None, delta_softplus=False):
    """delta + delta_bias, through softplus when asked: the δ of DESIGN.md."""
    if delta_bias is not None:
        delta = delta + delta_bias.view(1, -1, 1, 1)
    return F.softplus(delta) if delta_softplus else delta


def _scan_one(u, delta, A, Bd, Cd, D, z):
    """One sample's grid: u, delta, z (D, H, W); Bd, Cd (D, N, H, W); A (D, N)."""
    H, W = u.shape[-2:]
    rows_h = []  # h[i][j]: (D, N); kept as Python lists so autograd sees no in-place writes
    for i in range(H):
        hh_prev = torch.zeros_like(A)
        row = []
        for j in range(W):
            d_ij = delta[:, i, j].unsqueeze(-1)                     # (D, 1)
            a_ij = torch.exp(d_ij * A)                               # Ā, shared by both passes
            hh = a_ij * hh_prev + d_ij * Bd[:, :, i, j] * u[:, i, j].unsqueeze(-1)
            h_above = rows_h[i - 1][j] if i > 0 else torch.zeros_like(A)
            row.append(a_ij * h_above + hh)
            hh_prev = hh
        rows_h.append(row)
    y = torch.stack([torch.stack([(Cd[:, :, i, j] * rows_h[i][j]).sum(-1) for j in range(W)], -1)
                     for i in range(H)], -2)                         # (D, H, W)
    if D is not None:
        y = y + D.view(-1, 1, 1) * u
    if z is not None:
        y = y * F.silu(z)
    return y


def scan2d_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, sizes=None):
    """The 2D selective scan, by definition.

    u, delta, z: r(B D H W); A: r(D N); B, C: r(B N H W) or r(B G N H W); D, delta_bias: r(D);
    sizes: optional i(B 2) real (H_b, W_b) per sample, top-left aligned. Padding cells give 0.
    Returns out: r(B D H W), in the dtype of u.
    """
    n_batch, n_ch, H, W = u.shape
    delta = effective_delta(delta, delta_bias, delta_softplus)
    Bd, Cd = expand_groups(B, n_ch), expand_groups(C, n_ch)
    outs = []
    for b in range(n_batch):
        hb, wb = (int(sizes[b, 0]), int(sizes[b, 1])) if sizes is not None else (H, W)
        crop = (slice(None), slice(0, hb), slice(0, wb))
        zb = z[b][crop] if z is not None else None
        yb = _scan_one(u[b][crop], delta[b][crop], A, Bd[b][(slice(None),) + crop],
                       Cd[b][(slice(None),) + crop], D, zb) if hb * wb else u.new_zeros(n_ch, hb, wb)
        outs.append(F.pad(yb, (0, W - wb, 0, H - hb)))
    return torch.stack(outs).to(u.dtype)
