"""The global tile lattice: cells of `patch_px` pixels at `target_mpp`, anchored at level-0 (0, 0).

    stride = patch_px * target_mpp / slide_mpp          (level-0 pixels per cell, a float)
    cell (i, j) of the grid covers level-0 x in [x0 + j*stride, x0 + (j+1)*stride), likewise y with i
    x0 = j0 * stride, y0 = i0 * stride                   (the grid's corner is a lattice point)

Anchoring at the slide's origin (not at each tissue contour, as CLAM does) means a tile's position
is a pure function of the slide and the tiling, and 20x and 40x scans of the same glass give the
same cells. The grid is cropped to the bounding box of the kept cells (no dataset-wide canvas).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def stride_level0(patch_px: int, target_mpp: float, slide_mpp: float) -> float:
    """Level-0 pixels per cell: `patch_px` pixels at `target_mpp` um/px on a slide of `slide_mpp`."""
    return patch_px * target_mpp / slide_mpp


@dataclass(frozen=True)
class Lattice:
    """A grid cut out of the global lattice: `shape` (H, W) cells from global cell (i0, j0)."""

    stride: float
    i0: int
    j0: int
    shape: tuple[int, int]

    @property
    def origin_level0(self) -> tuple[float, float]:
        """(x0, y0): level-0 position of cell (0, 0)'s top-left corner."""
        return self.j0 * self.stride, self.i0 * self.stride

    def cell_to_level0(self, i, j):
        """Level-0 (x, y) of the top-left corner of cell(s) (i, j); floats, vectorised."""
        return (self.j0 + np.asarray(j)) * self.stride, (self.i0 + np.asarray(i)) * self.stride

    def level0_to_cell(self, x, y):
        """Grid cell (i, j) holding level-0 point(s) (x, y); may fall outside the grid."""
        # The epsilon absorbs float rounding of a corner computed as (j0 + j) * stride.
        j = np.floor(np.asarray(x, dtype=np.float64) / self.stride + 1e-9).astype(np.int64) - self.j0
        i = np.floor(np.asarray(y, dtype=np.float64) / self.stride + 1e-9).astype(np.int64) - self.i0
        return i, j

    def attrs(self) -> dict:
        """The store attrs this lattice fixes (DESIGN.md names)."""
        x0, y0 = self.origin_level0
        return {"stride_level0": float(self.stride), "origin_level0": [float(x0), float(y0)],
                "grid_shape": [int(self.shape[0]), int(self.shape[1])]}


def _area_sums(cum: np.ndarray, edges: np.ndarray, axis: int, index: np.ndarray | None = None) -> np.ndarray:
    """Integral of a piecewise-constant signal between fractional `edges`, from its cumulative sum.

    `cum` holds the cumulative sum at 0..n along `axis`; or, given `index` (sorted, ending at n), only at
    those positions, which must include the samples `_edge_samples` names.
    """
    n = cum.shape[axis] - 1 if index is None else int(index[-1])
    e, lo, hi = _edge_samples(edges, n)
    frac = e - lo
    if index is not None:
        lo, hi = np.searchsorted(index, lo), np.searchsorted(index, hi)
    a = np.take(cum, lo, axis=axis)
    b = np.take(cum, hi, axis=axis)
    shape = [1] * cum.ndim
    shape[axis] = -1
    at = a + frac.reshape(shape) * (b - a)
    return np.diff(at, axis=axis)


def _edge_samples(edges: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(edges clipped to [0, n], the cumulative-sum sample below each, the one above)."""
    e = np.clip(edges, 0, n)
    lo = np.minimum(np.floor(e).astype(np.int64), n - 1 if n > 0 else 0)
    return e, lo, np.minimum(lo + 1, n)


def _column_cumsum_at(mask: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Per-row count of mask pixels left of each column in `cols` (sorted, distinct, from 0 to w).

    Only the columns next to a lattice edge are needed, not all w + 1 cumulative columns: sum the runs
    between them (np.add.reduceat) and accumulate those. The counts are integers, so as float64 they are
    the very values a cumulative sum over all columns gives.
    """
    runs = np.add.reduceat(mask, cols[:-1], axis=1, dtype=np.int32)
    out = np.zeros((mask.shape[0], len(cols)), np.float64)
    np.cumsum(runs, axis=1, out=out[:, 1:])
    return out


def tissue_fraction(mask: np.ndarray, level0_size: tuple[int, int], stride: float) -> np.ndarray:
    """Fraction of each global lattice cell covered by tissue, (n_rows, n_cols) over the whole slide.

    mask: bool (h, w) spanning the level-0 image `level0_size` (w0, h0). The area weighting is exact for
    the mask's pixels (fractional overlaps included), so cells finer than mask pixels still work;
    the parts of edge cells beyond the slide count as glass.
    """
    w0, h0 = level0_size
    h, w = mask.shape
    sx, sy = w0 / w, h0 / h  # level-0 px per mask px
    n_cols, n_rows = math.ceil(w0 / stride), math.ceil(h0 / stride)
    x_edges = np.arange(n_cols + 1) * stride / sx
    _, lo, hi = _edge_samples(x_edges, w)
    at = np.union1d(np.concatenate([lo, hi]), [0, w])
    cols = _area_sums(_column_cumsum_at(mask, at), x_edges, axis=1, index=at)  # (h, n_cols)
    cum_y = np.concatenate([np.zeros((1, n_cols)), np.cumsum(cols, axis=0)], axis=0)
    cells = _area_sums(cum_y, np.arange(n_rows + 1) * stride / sy, axis=0)  # (n_rows, n_cols)
    return cells / ((stride / sx) * (stride / sy))


def plan_grid(mask: np.ndarray, level0_size: tuple[int, int], stride: float,
              threshold: float = 0.25) -> tuple[Lattice, np.ndarray]:
    """(lattice cropped to the kept cells' bounding box, keep mask bool (H, W)).

    A cell is kept when its tissue fraction reaches `threshold`. With nothing kept the lattice has
    shape (0, 0).
    """
    frac = tissue_fraction(mask, level0_size, stride)
    keep = frac >= max(threshold, 1e-9)
    rows = np.flatnonzero(keep.any(1))
    cols = np.flatnonzero(keep.any(0))
    if len(rows) == 0:
        return Lattice(stride, 0, 0, (0, 0)), np.zeros((0, 0), bool)
    i0, i1, j0, j1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return Lattice(stride, int(i0), int(j0), (int(i1 - i0), int(j1 - j0))), keep[i0:i1, j0:j1].copy()


def read_geometry(level_downsamples: list[float], stride: float, patch_px: int) -> tuple[int, int]:
    """(pyramid level, tile width in that level's pixels) to read a cell at `patch_px` resolution.

    The level is the coarsest whose downsample does not exceed stride / patch_px (never upsample
    from a coarser level); the tile is then resized to the encoder's input size.
    """
    want = stride / patch_px
    level = 0
    for k, ds in enumerate(level_downsamples):
        if ds <= want * (1 + 1e-3):
            level = k
    return level, max(1, round(stride / level_downsamples[level]))
