"""The Mamba2D block: a Mamba block whose selective scan runs over the 2D grid (scan2d).

pre-norm (RMSNorm) -> in_proj to (x, z) -> depthwise conv -> SiLU -> x_proj to (dt, B, C) -> dt_proj
-> scan2d (D skip, z gate) -> out_proj, plus the residual.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gigamamba.modules.grid import flip_within, full_sizes, raster_shift
from gigamamba.ops import scan2d
from gigamamba.ops.scan2d import grid_mask

# (flip rows, flip cols) for the scans from each corner: top-left (the paper's), top-right,
# bottom-left, bottom-right.
CORNERS = [(False, False), (False, True), (True, False), (True, True)]


class Mamba2D(nn.Module):
    """One residual Mamba2D layer on x (B, H, W, d_model).

    conv: "causal1d" (the paper's causal conv over raster order, `d_conv` taps) or "dw2d"
    (3x3 depthwise 2D conv). directions: 1 (the paper's top-left scan) or 4 (all corners, averaged).
    """

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 2, dt_rank: int | str = "auto",
                 d_conv: int = 4, conv: str = "causal1d", directions: int = 1,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        if conv not in ("causal1d", "dw2d"):
            raise ValueError(f"Mamba2D conv must be 'causal1d' or 'dw2d', got {conv!r}")
        if directions not in (1, 4):
            raise ValueError(f"Mamba2D directions must be 1 or 4, got {directions!r}")
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.conv_kind, self.directions = conv, directions

        self.norm = nn.RMSNorm(d_model)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        if conv == "causal1d":
            self.conv_weight = nn.Parameter(torch.empty(self.d_inner, d_conv).uniform_(-1, 1) / math.sqrt(d_conv))
            self.conv_bias = nn.Parameter(torch.zeros(self.d_inner))
        else:
            self.conv2d = nn.Conv2d(self.d_inner, self.d_inner, 3, padding=1, groups=self.d_inner)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        # S4D-real initialisation of A, stored as log(-A) so A stays negative.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self._init_dt(dt_min, dt_max, dt_init_floor)

    def _init_dt(self, dt_min, dt_max, floor):
        """Mamba's dt init: softplus(dt_proj.bias) is log-uniform in [dt_min, dt_max].

        The parameters are flagged so a model-wide init (which zeroes Linear biases) skips them:
        the official 2DMamba code loses this init that way.
        """
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp_min(floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.dt_proj.keep_init = True

    def _conv(self, x, sizes):
        """Depthwise conv on x (B, C, H, W); padding cells are zero so they reach nothing real."""
        if self.conv_kind == "dw2d":
            return self.conv2d(x)
        taps = self.conv_weight.shape[1]
        out = self.conv_bias.view(1, -1, 1, 1)
        for k in range(taps):  # tap k reads the cell k steps back in raster order
            out = out + self.conv_weight[:, taps - 1 - k].view(1, -1, 1, 1) * raster_shift(x, sizes, k)
        return out

    def forward(self, x: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        n_batch, H, W, _ = x.shape
        if sizes is None:
            sizes = full_sizes(n_batch, H, W, x.device)
        valid = grid_mask(sizes, H, W, x.device).unsqueeze(1).to(x.dtype)  # (B, 1, H, W)
        xz = self.in_proj(self.norm(x)).permute(0, 3, 1, 2)                 # (B, 2*d_inner, H, W)
        u, z = xz.chunk(2, dim=1)
        u = F.silu(self._conv(u * valid, sizes)) * valid
        y = sum(self._scan(u, z, sizes, corner) for corner in CORNERS[: self.directions]) / self.directions
        return x + self.out_proj(y.permute(0, 2, 3, 1))

    def _scan(self, u, z, sizes, corner):
        flip_rows, flip_cols = corner
        u, z = flip_within(u, sizes, *corner), flip_within(z, sizes, *corner)
        x_dbl = self.x_proj(u.permute(0, 2, 3, 1))                          # (B, H, W, R + 2N)
        dt, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).permute(0, 3, 1, 2)          # bias goes in as delta_bias
        out = scan2d(u, delta.contiguous(), -torch.exp(self.A_log.float()),
                     Bs.permute(0, 3, 1, 2).contiguous(), Cs.permute(0, 3, 1, 2).contiguous(),
                     self.D.float(), z.contiguous(), self.dt_proj.bias.float(), delta_softplus=True,
                     sizes=sizes)
        return flip_within(out, sizes, flip_rows, flip_cols)
