"""MIL models over a slide's 2D feature grid: mamba2d, mamba1d, abmil, meanpool.

All take features (B, H, W, in_dim) and a tissue mask (B, H, W), True = tissue, and optionally
`sizes` (B, 2), the real (H_b, W_b) of each grid in a padded batch. Cells outside the mask never
reach the output: they get a learned pad token before the scan and zero pooling weight after it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gigamamba.modules import AttentionPool, Mamba2D
from gigamamba.modules.pooling import masked_softmax
from gigamamba.models.registry import init_weights, register_model


def _embed(in_dim, d_model, dropout):
    return nn.Sequential(nn.Linear(in_dim, d_model), nn.GELU(), nn.Dropout(dropout))


@register_model("mamba2d")
class Mamba2DMIL(nn.Module):
    """2DMamba: embed, pad token at background, U Mamba2D layers, LayerNorm, masked attention pooling."""

    def __init__(self, in_dim: int, n_classes: int, d_model: int = 128, n_layers: int = 1, d_state: int = 16,
                 expand: int = 2, conv: str = "causal1d", directions: int = 1, dropout: float = 0.25,
                 attn_hidden: int = 128, dt_min: float = 1e-3, dt_max: float = 0.1, **_unused):
        super().__init__()
        self.embed = _embed(in_dim, d_model, dropout)
        self.pad_token = nn.Parameter(torch.zeros(d_model))
        self.layers = nn.ModuleList(Mamba2D(d_model, d_state=d_state, expand=expand, conv=conv,
                                            directions=directions, dt_min=dt_min, dt_max=dt_max)
                                    for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.pool = AttentionPool(d_model, attn_hidden, gated=True)
        self.head = nn.Linear(d_model, n_classes)
        init_weights(self)
        nn.init.normal_(self.pad_token, std=0.02)
        self.last_attention: torch.Tensor | None = None

    def encode(self, features, mask, sizes=None):
        """Per-cell outputs (B, H, W, d_model) of the Mamba2D stack."""
        x = self.embed(features)
        x = torch.where(mask.unsqueeze(-1), x, self.pad_token.to(x.dtype))
        for layer in self.layers:
            x = layer(x, sizes)
        return self.norm(x)

    def forward(self, features, mask, sizes=None):
        n_batch, H, W, _ = features.shape
        h = self.encode(features, mask, sizes)
        pooled, weights = self.pool(h.reshape(n_batch, H * W, -1), mask.reshape(n_batch, H * W))
        self.last_attention = weights.detach().view(n_batch, H, W)
        return self.head(pooled)


@register_model("mamba1d")
class Mamba1DMIL(Mamba2DMIL):
    """The same model on the raster-flattened tissue sequence: scan2d with H = 1 (MambaMIL-like)."""

    def __init__(self, in_dim: int, n_classes: int, **kw):
        kw["conv"] = "causal1d"  # a 2D conv has no meaning on a 1 x L grid
        super().__init__(in_dim, n_classes, **kw)

    def forward(self, features, mask, sizes=None):
        n_batch, H, W, in_dim = features.shape
        flat_mask = mask.reshape(n_batch, H * W)
        lengths = flat_mask.sum(1)
        L = max(int(lengths.max()), 1)
        # Stable sort puts each slide's tissue cells first, in raster order.
        order = torch.argsort((~flat_mask).to(torch.int8), dim=1, stable=True)[:, :L]
        seq = features.reshape(n_batch, H * W, in_dim).gather(1, order.unsqueeze(-1).expand(-1, -1, in_dim))
        seq_mask = torch.arange(L, device=features.device).unsqueeze(0) < lengths.unsqueeze(1)
        seq_sizes = torch.stack([torch.ones_like(lengths), lengths.clamp_min(1)], 1)
        h = self.encode(seq.unsqueeze(1), seq_mask.unsqueeze(1), seq_sizes)
        pooled, weights = self.pool(h.reshape(n_batch, L, -1), seq_mask)
        grid_weights = torch.zeros(n_batch, H * W, device=features.device, dtype=weights.dtype)
        self.last_attention = grid_weights.scatter(1, order, weights).detach().view(n_batch, H, W)
        return self.head(pooled)


@register_model("abmil")
class ABMIL(nn.Module):
    """Gated-attention MIL (Ilse et al., 2018): a bag of tiles, no spatial context."""

    def __init__(self, in_dim: int, n_classes: int, d_model: int = 128, dropout: float = 0.25,
                 attn_hidden: int = 128, **_unused):
        super().__init__()
        self.embed = _embed(in_dim, d_model, dropout)
        self.pool = AttentionPool(d_model, attn_hidden, gated=True)
        self.head = nn.Linear(d_model, n_classes)
        init_weights(self)
        self.last_attention = None

    def forward(self, features, mask, sizes=None):
        n_batch, H, W, _ = features.shape
        h = self.embed(features).reshape(n_batch, H * W, -1)
        pooled, weights = self.pool(h, mask.reshape(n_batch, H * W))
        self.last_attention = weights.detach().view(n_batch, H, W)
        return self.head(pooled)


@register_model("meanpool")
class MeanPoolMIL(nn.Module):
    """Mean of embedded tissue tiles, then a linear head: the simplest baseline."""

    def __init__(self, in_dim: int, n_classes: int, d_model: int = 128, dropout: float = 0.25, **_unused):
        super().__init__()
        self.embed = _embed(in_dim, d_model, dropout)
        self.head = nn.Linear(d_model, n_classes)
        init_weights(self)
        self.last_attention = None

    def forward(self, features, mask, sizes=None):
        n_batch, H, W, _ = features.shape
        m = mask.reshape(n_batch, H * W)
        weights = masked_softmax(torch.zeros(m.shape, device=features.device), m)  # uniform over tissue
        h = self.embed(features).reshape(n_batch, H * W, -1)
        self.last_attention = weights.detach().view(n_batch, H, W)
        return self.head(torch.einsum("bl,bld->bd", weights.to(h.dtype), h))
