"""Masked attention pooling: background and padding cells get exactly zero weight."""

from __future__ import annotations

import torch
import torch.nn as nn


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax of scores (B, L) over cells where mask (B, L) is True; zero elsewhere.

    A bag with no True cell gets all-zero weights instead of NaN.
    """
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(weights, nan=0.0) * mask


class AttentionPool(nn.Module):
    """Attention pooling (Ilse et al.); gated = tanh(Vh) * sigmoid(Uh) scores."""

    def __init__(self, dim: int, hidden: int = 128, gated: bool = True, dropout: float = 0.0):
        super().__init__()
        self.V = nn.Linear(dim, hidden)
        self.U = nn.Linear(dim, hidden) if gated else None
        self.w = nn.Linear(hidden, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor):
        """h (B, L, dim), mask (B, L) -> pooled (B, dim), weights (B, L)."""
        a = torch.tanh(self.V(h))
        if self.U is not None:
            a = a * torch.sigmoid(self.U(h))
        weights = masked_softmax(self.w(self.drop(a)).squeeze(-1).float(), mask)
        return torch.einsum("bl,bld->bd", weights.to(h.dtype), h), weights
