"""Ops: the 2D selective scan (`scan2d`, dispatched) beside its definition (`scan2d_ref`)."""

from gigamamba.ops.scan2d import scan2d, scan2d_torch
from gigamamba.ops.scan2d_ref import scan2d_ref

__all__ = ["scan2d", "scan2d_torch", "scan2d_ref"]
