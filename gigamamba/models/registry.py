"""`create_model(name, in_dim, n_classes, **kw)`: one registry for every MIL model."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def wrap(cls):
        _MODELS[name] = cls
        return cls

    return wrap


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, in_dim: int, n_classes: int, **kw) -> nn.Module:
    """Build a MIL model called as `model(features (B,H,W,in_dim), mask (B,H,W) bool) -> logits (B, n_classes)`.

    For survival, n_classes is the number of time bins and the logits are hazard logits.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _MODELS[name](in_dim=in_dim, n_classes=n_classes, **kw)


def init_weights(model: nn.Module) -> None:
    """Xavier Linear weights and zero biases, sparing modules flagged `keep_init` (Mamba's dt_proj)."""
    for m in model.modules():
        if isinstance(m, nn.Linear) and not getattr(m, "keep_init", False):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
