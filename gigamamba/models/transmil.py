"""TransMIL (Shao et al., NeurIPS 2021) over the slide's real 2D grid.

embed -> [class token; tissue tokens] -> Nyström layer -> PPEG -> Nyström layer -> LayerNorm -> head
on the class token. TransMIL squares the bag into a √n×√n image for PPEG; here the tissue tokens sit in
their own (h, w) cells, so the convolutions see true neighbours.

Each slide of a batch is processed on its own, over its tissue tokens only: background cells are
never read, and a slide padded into a bigger batch grid computes exactly what it computes alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gigamamba.models.nystrom import NystromLayer
from gigamamba.models.registry import init_weights, register_model


class PPEG(nn.Module):
    """Pyramid position encoding generator: identity + depthwise 7x7, 5x5 and 3x3 convolutions."""

    def __init__(self, dim: int, kernels=(7, 5, 3)):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in kernels)

    def forward(self, tokens: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """tokens (n, dim) at non-negative grid cells (n, 2) -> tokens (n, dim)."""
        rows, cols = cells[:, 0], cells[:, 1]
        # Non-tissue cells stay zero, so through the zero-padded convs they add nothing a slide's own
        # tokens don't: the same as TransMIL's zero padding, and nothing from background cells.
        # No tissue: a 1x1 zero grid, so the convs still run and DDP sees their (zero) gradients.
        h, w = (int(rows.max()) + 1, int(cols.max()) + 1) if len(cells) else (1, 1)
        grid = tokens.new_zeros(tokens.shape[1], h, w)
        grid[:, rows, cols] = tokens.t()
        mixed = sum(conv(grid.unsqueeze(0))[0] for conv in self.convs)
        return tokens + mixed[:, rows, cols].t()


@register_model("transmil")
class TransMIL(nn.Module):
    """TransMIL: two Nyström-attention layers with a PPEG between them; the class token is classified.

    d_model 256 is TransMIL's 512 halved; n_landmarks 256 (exact attention up to 256 tokens) and 6
    pseudo-inverse iterations follow the paper. `dropout` acts on the tile embedding.
    """

    def __init__(self, in_dim: int, n_classes: int, d_model: int = 256, n_heads: int = 8,
                 n_landmarks: int = 256, pinv_iters: int = 6, value_conv: int = 33, dropout: float = 0.1,
                 **_unused):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, d_model), nn.ReLU(), nn.Dropout(dropout))
        self.cls_token = nn.Parameter(torch.zeros(d_model))
        layer = dict(n_heads=n_heads, n_landmarks=n_landmarks, pinv_iters=pinv_iters, value_conv=value_conv)
        self.layer1 = NystromLayer(d_model, **layer)
        self.ppeg = PPEG(d_model)
        self.layer2 = NystromLayer(d_model, **layer)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)
        init_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)
        self.last_attention: torch.Tensor | None = None

    def forward_one(self, features: torch.Tensor, mask: torch.Tensor):
        """One slide: features (H, W, in_dim), mask (H, W) -> logits (n_classes,), class-token
        attention over the tissue cells (n,) in raster order."""
        cells = mask.nonzero()  # raster order, the same order as features[mask]
        if len(cells):
            cells = cells - cells.amin(0)  # crop to the tissue's bounding box: padding can't matter
        x = self.embed(features[mask])
        x = torch.cat([self.cls_token.to(x.dtype).unsqueeze(0), x])
        x, _ = self.layer1(x)
        x = torch.cat([x[:1], self.ppeg(x[1:], cells)])
        x, row0 = self.layer2(x)
        return self.head(self.norm(x[0])), row0[1:]

    def forward(self, features, mask, sizes=None):
        n_batch, H, W, _ = features.shape
        logits, maps = [], torch.zeros(n_batch, H, W, dtype=features.dtype, device=features.device)
        for b in range(n_batch):
            out, attn = self.forward_one(features[b], mask[b])
            logits.append(out)
            # A heatmap is a distribution over tissue: drop the class token's weight on itself, clip
            # the small negative weights the Nyström approximation can give, and renormalise.
            attn = attn.detach().clamp_min(0)
            maps[b][mask[b]] = (attn / attn.sum().clamp_min(torch.finfo(attn.dtype).tiny)).to(maps.dtype)
        self.last_attention = maps
        return torch.stack(logits)
