"""Nyström self-attention (Xiong et al., AAAI 2021) for one sequence, as TransMIL uses it.

softmax(QKᵀ/√d) V is approximated by F A⁺ B V with m landmarks Q̃, K̃ (segment means of Q, K):
F = softmax(QK̃ᵀ/√d) (n×m), A = softmax(Q̃K̃ᵀ/√d) (m×m), B = softmax(Q̃Kᵀ/√d) (m×n), so the cost is
O(n·m) instead of O(n²). A⁺ comes from an iterative Moore–Penrose method (matrix products only).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def segment_means(x: torch.Tensor, m: int) -> torch.Tensor:
    """x (..., n, d), n >= m -> (..., m, d): means of m contiguous segments of near-equal size.

    Segment sizes differ by at most one instead of zero-padding n to a multiple of m, so no fake
    token ever enters a landmark and the result does not depend on n mod m.
    """
    n = x.shape[-2]
    seg = torch.arange(n, device=x.device) * m // n  # non-decreasing, hits every id 0..m-1 when n >= m
    sums = x.new_zeros(*x.shape[:-2], m, x.shape[-1]).index_add_(x.dim() - 2, seg, x)
    return sums / torch.bincount(seg, minlength=m).to(x.dtype).unsqueeze(-1)


def iterative_pinv(a: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Moore–Penrose pseudo-inverse of a (..., m, m) by the iteration used in Nyströmformer.

    Z₀ = Aᵀ / (‖A‖₁‖A‖∞) keeps ‖I − AZ₀‖ < 1, and each step
    Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ))) shrinks the error fast; no SVD, so it runs as matmuls.
    """
    abs_a = a.abs()
    norm_1 = abs_a.sum(-2).amax(-1)    # max column sum
    norm_inf = abs_a.sum(-1).amax(-1)  # max row sum (1 for a softmax matrix)
    z = a.transpose(-1, -2) / (norm_1 * norm_inf)[..., None, None]
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def nystrom_attention(q, k, v, n_landmarks: int, pinv_iters: int = 6):
    """q, k, v (heads, n, d) -> out (heads, n, d), row0 (heads, n): token 0's attention weights.

    Exact softmax attention when n <= n_landmarks: the approximation would save nothing there.
    """
    n = q.shape[-2]
    q = q * q.shape[-1] ** -0.5
    if n <= n_landmarks:
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return attn @ v, attn[..., 0, :]
    q_l, k_l = segment_means(q, n_landmarks), segment_means(k, n_landmarks)
    f = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)
    a_pinv = iterative_pinv(torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1), pinv_iters)
    b = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)
    # Right-to-left products keep every intermediate at n×d or m×n, never n×n.
    out = f @ (a_pinv @ (b @ v))
    row0 = ((f[..., :1, :] @ a_pinv) @ b)[..., 0, :]
    return out, row0


class NystromLayer(nn.Module):
    """Pre-norm residual multi-head Nyström attention over one sequence (n, dim).

    Like TransMIL's layer it has no MLP. `value_conv` > 0 adds Nyströmformer's skip path: a per-head
    depthwise convolution of that length over the values along the sequence.
    """

    def __init__(self, dim: int, n_heads: int = 8, n_landmarks: int = 256, pinv_iters: int = 6,
                 value_conv: int = 33):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"d_model {dim} is not divisible by n_heads {n_heads}")
        if value_conv > 0 and value_conv % 2 == 0:
            raise ValueError(f"value_conv must be odd to keep the sequence length, got {value_conv}")
        self.n_heads, self.n_landmarks, self.pinv_iters = n_heads, n_landmarks, pinv_iters
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)
        self.value_conv = (nn.Conv2d(n_heads, n_heads, (value_conv, 1), padding=(value_conv // 2, 0),
                                     groups=n_heads, bias=False) if value_conv > 0 else None)

    def forward(self, x: torch.Tensor):
        """x (n, dim) -> x + attention (n, dim), row0 (n,): token 0's attention, averaged over heads."""
        n, dim = x.shape
        q, k, v = self.qkv(self.norm(x)).view(n, 3, self.n_heads, dim // self.n_heads).permute(1, 2, 0, 3)
        # At least fp32 and outside autocast: the pseudo-inverse iteration is not stable in bf16.
        ctype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = q.to(ctype), k.to(ctype), v.to(ctype)
            out, row0 = nystrom_attention(q, k, v, self.n_landmarks, self.pinv_iters)
            if self.value_conv is not None:
                out = out + self._conv(v)
        out = out.to(x.dtype).transpose(0, 1).reshape(n, dim)
        return x + self.out(out), row0.mean(0)

    def _conv(self, v):
        """v (heads, n, d) -> the value skip path, computed in v's dtype like the attention."""
        w = self.value_conv.weight.to(v.dtype)
        return nn.functional.conv2d(v.unsqueeze(0), w, padding=self.value_conv.padding, groups=self.n_heads)[0]
