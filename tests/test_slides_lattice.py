"""Lattice maths: stride, cell <-> level-0 round trip, area-exact tissue fractions, 20x vs 40x."""

import numpy as np
import pytest

from gigamamba.slides.lattice import Lattice, plan_grid, read_geometry, stride_level0, tissue_fraction


def test_stride_is_physical():
    assert stride_level0(256, 0.5, 0.5) == 256
    assert stride_level0(256, 0.5, 0.25) == 512
    assert stride_level0(224, 0.5, 0.2527) == pytest.approx(224 * 0.5 / 0.2527)


@pytest.mark.parametrize("stride", [256.0, 512.0, 443.2])
def test_cell_level0_round_trip(stride):
    lat = Lattice(stride, i0=3, j0=7, shape=(20, 30))
    ii, jj = np.meshgrid(np.arange(20), np.arange(30), indexing="ij")
    x, y = lat.cell_to_level0(ii, jj)
    # the corner of a cell and any point inside it map back to that cell
    for dx in (0.0, 0.5, stride - 1e-3):
        bi, bj = lat.level0_to_cell(x + dx, y + dx)
        assert (bi == ii).all() and (bj == jj).all()
    x0, y0 = lat.origin_level0
    assert x0 == 7 * stride and y0 == 3 * stride  # anchored at level-0 (0, 0): origin is a lattice point
    assert lat.attrs() == {"stride_level0": stride, "origin_level0": [7 * stride, 3 * stride], "grid_shape": [20, 30]}


def test_tissue_fraction_is_area_exact():
    # a 100 x 100 mask over a 1000 x 1000 level-0 image: 10 level-0 px per mask px
    mask = np.zeros((100, 100), bool)
    mask[20:40, 30:55] = True  # level-0 x 300..550, y 200..400
    frac = tissue_fraction(mask, (1000, 1000), stride=100.0)
    assert frac.shape == (10, 10)
    assert frac[2, 3] == pytest.approx(1.0) and frac[3, 4] == pytest.approx(1.0)
    assert frac[2, 5] == pytest.approx(0.5)  # x 500..600 half covered
    assert frac.sum() * 100 * 100 == pytest.approx(mask.sum() * 10 * 10)
    # cells finer than mask pixels and a stride that does not divide the slide
    frac = tissue_fraction(mask, (1000, 1000), stride=33.3)
    assert frac.sum() * 33.3 * 33.3 == pytest.approx(mask.sum() * 100, rel=1e-9)


def test_plan_grid_crops_to_kept_cells():
    mask = np.zeros((100, 100), bool)
    mask[20:40, 30:55] = True
    lat, keep = plan_grid(mask, (1000, 1000), stride=100.0, threshold=0.25)
    assert (lat.i0, lat.j0, lat.shape) == (2, 3, (2, 3))
    assert keep.all()
    lat, keep = plan_grid(mask, (1000, 1000), stride=100.0, threshold=0.75)
    assert lat.shape == (2, 2) and keep.all()
    lat, keep = plan_grid(np.zeros((10, 10), bool), (1000, 1000), stride=100.0)
    assert lat.shape == (0, 0) and keep.size == 0


def test_read_geometry_never_upsamples():
    assert read_geometry([1.0, 4.0, 16.0], 256.0, 256) == (0, 256)
    assert read_geometry([1.0, 4.0, 16.0], 512.0, 256) == (0, 512)      # 40x: no level at 2x, read level 0
    assert read_geometry([1.0, 2.0, 8.0], 512.0, 256) == (1, 256)
    assert read_geometry([1.0, 4.0, 16.0], 1024.0, 256) == (1, 256)


def test_20x_and_40x_scans_give_the_same_grid(tmp_path):
    from gigamamba.slides.reader import open_slide, resolve_mpp
    from gigamamba.slides.synth import write_synthetic_cohort
    from gigamamba.slides.tissue import detect_tissue

    grids = {}
    for mag, fmt in ((20, "svs"), (40, "tif")):
        write_synthetic_cohort(tmp_path / f"{mag}", task="spatial", n_slides=1, seed=5, size_px=2048,
                               magnifications=(mag,), formats=(fmt,))
        slide = open_slide(tmp_path / f"{mag}" / "slides" / f"spat000.{fmt}")
        mpp = resolve_mpp(slide.properties)
        stride = stride_level0(128, 0.5, mpp[0])
        lat, keep = plan_grid(detect_tissue(slide, mpp), slide.dimensions, stride, 0.25)
        grids[mag] = (lat, keep, mpp)
    (l20, k20, m20), (l40, k40, m40) = grids[20], grids[40]
    assert m20 == (0.5, 0.5) and m40 == (0.25, 0.25)
    assert l40.stride == 2 * l20.stride
    assert (l20.i0, l20.j0, l20.shape) == (l40.i0, l40.j0, l40.shape)
    assert k20.sum() > 20
    assert (k20 == k40).mean() >= 0.98  # a borderline cell may flip with JPEG noise, no more
    # the same cell is the same physical place: level-0 coordinates scale with the magnification
    x20, y20 = l20.cell_to_level0(2, 3)
    x40, y40 = l40.cell_to_level0(2, 3)
    assert (x40, y40) == (2 * x20, 2 * y20)


def _tissue_fraction_reference(mask, level0_size, stride):
    """tissue_fraction with the cumulative sum over every mask column (it now samples only those it needs)."""
    from gigamamba.slides.lattice import _area_sums

    w0, h0 = level0_size
    h, w = mask.shape
    sx, sy = w0 / w, h0 / h
    n_cols, n_rows = int(np.ceil(w0 / stride)), int(np.ceil(h0 / stride))
    cum_x = np.concatenate([np.zeros((h, 1)), np.cumsum(mask, axis=1, dtype=np.float64)], axis=1)
    cols = _area_sums(cum_x, np.arange(n_cols + 1) * stride / sx, axis=1)
    cum_y = np.concatenate([np.zeros((1, n_cols)), np.cumsum(cols, axis=0)], axis=0)
    cells = _area_sums(cum_y, np.arange(n_rows + 1) * stride / sy, axis=0)
    return cells / ((stride / sx) * (stride / sy))


def test_tissue_fraction_equals_the_full_cumulative_sum():
    rng = np.random.default_rng(0)
    for k in range(60):
        h, w = (int(s) for s in rng.integers(1, 200, 2))
        mask = rng.random((h, w)) > rng.uniform(0.2, 0.9)
        level0 = (int(w * rng.uniform(0.5, 40)) + 1, int(h * rng.uniform(0.5, 40)) + 1)
        stride = [224.0, 448.0, float(rng.uniform(0.3, 3)), float(rng.uniform(3, 500))][k % 4]
        assert np.array_equal(tissue_fraction(mask, level0, stride),
                              _tissue_fraction_reference(mask, level0, stride)), (h, w, level0, stride)
