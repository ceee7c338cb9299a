"""Discrete-time survival head: hazard logits over n_bins, the NLL loss of MCAT/MambaMIL, risk."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def survival_curve(hazard_logits: torch.Tensor) -> torch.Tensor:
    """S(t_k) = Π_{j<=k} (1 - h_j), from hazard logits (B, n_bins)."""
    return torch.cumprod(1.0 - torch.sigmoid(hazard_logits.float()), dim=1)


def survival_risk(hazard_logits: torch.Tensor) -> torch.Tensor:
    """risk = −Σ_k S(t_k): higher means earlier death (the convention of MCAT/MambaMIL)."""
    return -survival_curve(hazard_logits).sum(dim=1)


def nll_survival_loss(hazard_logits: torch.Tensor, time_bin: torch.Tensor, censorship: torch.Tensor,
                      alpha: float = 0.0, eps: float = 1e-7) -> torch.Tensor:
    """Negative log-likelihood of discrete-time survival (Zadeh & Schmid; MCAT's NLLSurvLoss).

    time_bin (B,) long: the bin of the event or censoring time; censorship (B,): 1 = censored.
    An uncensored patient contributes -log S(t_{y-1}) - log h_y; a censored one -log S(t_y).
    alpha re-weights the uncensored term, as in MCAT ((1-alpha)·all + alpha·uncensored).
    """
    y = time_bin.long().view(-1, 1)
    c = censorship.float().view(-1, 1)
    hazards = torch.sigmoid(hazard_logits.float())
    S = torch.cumprod(1.0 - hazards, dim=1)
    S_padded = torch.cat([torch.ones_like(c), S], dim=1)  # S(t_{-1}) = 1
    log = lambda t: torch.log(t.clamp_min(eps))  # noqa: E731
    uncensored = -(1 - c) * (log(S_padded.gather(1, y)) + log(hazards.gather(1, y)))
    censored = -c * log(S_padded.gather(1, y + 1))
    loss = (1 - alpha) * (censored + uncensored) + alpha * uncensored
    return loss.mean()


def classification_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), label.long())
