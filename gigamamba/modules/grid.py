"""Helpers for batches of 2D grids of different sizes (top-left aligned, as scan2d's `sizes`)."""

from __future__ import annotations

import torch


def full_sizes(n_batch: int, H: int, W: int, device=None) -> torch.Tensor:
    return torch.tensor([[H, W]], device=device, dtype=torch.long).expand(n_batch, 2).contiguous()


def flip_within(x: torch.Tensor, sizes: torch.Tensor, flip_rows: bool, flip_cols: bool) -> torch.Tensor:
    """Flip each sample of x (B, C, H, W) inside its own real (H_b, W_b) region; padding stays put.

    A plain torch.flip would move the padding to the top-left, so a flipped scan would start
    in padding and a slide's result would depend on the batch's canvas: exactly what we avoid.
    """
    if not (flip_rows or flip_cols):
        return x
    n_batch, _, H, W = x.shape
    dev = x.device
    rows = torch.arange(H, device=dev).expand(n_batch, H)
    cols = torch.arange(W, device=dev).expand(n_batch, W)
    if flip_rows:
        hb = sizes[:, :1].to(dev)
        rows = torch.where(rows < hb, hb - 1 - rows, rows)
    if flip_cols:
        wb = sizes[:, 1:].to(dev)
        cols = torch.where(cols < wb, wb - 1 - cols, cols)
    flat = rows.unsqueeze(-1) * W + cols.unsqueeze(1)                     # (B, H, W) source cell
    idx = flat.reshape(n_batch, 1, H * W).expand(-1, x.shape[1], -1)
    return x.reshape(n_batch, x.shape[1], H * W).gather(2, idx).view_as(x)


def raster_shift(x: torch.Tensor, sizes: torch.Tensor, k: int) -> torch.Tensor:
    """x (B, C, H, W) moved k cells forward in each sample's own raster order (row-major over (H_b, W_b)).

    Cell (i, j) receives the cell k steps before it in raster order, or 0 before the start.
    This is what a causal 1D conv over the flattened slide sees, per sample, whatever the padding.
    """
    if k == 0:
        return x
    n_batch, ch, H, W = x.shape
    dev = x.device
    wb = sizes[:, 1].to(dev).view(-1, 1, 1)
    i = torch.arange(H, device=dev).view(1, H, 1)
    j = torch.arange(W, device=dev).view(1, 1, W)
    src = i * wb + j - k                                                   # raster index in (H_b, W_b)
    ok = (src >= 0) & (j < wb)
    src = torch.where(ok, src, torch.zeros_like(src))
    flat = (src // wb) * W + src % wb                                      # back to the padded layout
    idx = flat.reshape(n_batch, 1, H * W).expand(-1, ch, -1)
    out = x.reshape(n_batch, ch, H * W).gather(2, idx).view_as(x)
    return out * ok.unsqueeze(1).to(x.dtype)
