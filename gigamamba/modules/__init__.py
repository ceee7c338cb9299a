"""Modules: the Mamba2D block and masked attention pooling."""

from gigamamba.modules.mamba2d import Mamba2D
from gigamamba.modules.pooling import AttentionPool, masked_softmax

__all__ = ["Mamba2D", "AttentionPool", "masked_softmax"]
