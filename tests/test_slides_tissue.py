"""Tissue mask internals: the disk-footprint closing equals the distance-transform closing it shortcuts."""

import numpy as np
import pytest
from scipy import ndimage

from gigamamba.slides import tissue


def _close_by_distance(mask, radius):
    pad = int(np.ceil(radius)) + 1
    padded = np.pad(mask, pad)
    dilated = ndimage.distance_transform_edt(~padded) <= radius
    closed = ndimage.distance_transform_edt(dilated) > radius
    return closed[pad:-pad, pad:-pad] | mask


@pytest.mark.parametrize("radius", [1.0, 1.5, 2.5, 3.9, 4.0, 6.3, 8.0,
                                    # float sqrt(n) whose square rounds below n: the disk must still hold n
                                    *(float(np.sqrt(n)) for n in (13, 18, 26, 29, 37, 52, 61))])
@pytest.mark.parametrize("seed", [0, 1])
def test_disk_closing_equals_the_distance_transform_closing(radius, seed):
    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.random((181, 163)), 2.0) > 0.52  # blobs with gaps, some on the border
    got = tissue._close(mask, radius)
    assert np.array_equal(got, _close_by_distance(mask, radius))
    assert got.sum() > mask.sum()  # it did close something: the comparison is not between two no-ops


def test_large_radius_goes_through_distance_transforms_and_closes_a_gap():
    mask = np.zeros((80, 80), bool)
    mask[20:60, 10:38] = True
    mask[20:60, 42:70] = True  # a 4 px gap
    assert tissue._close(mask, 12.0)[40, 39]  # past the disk threshold: still bridged
    assert tissue._close(mask, 2.5)[40, 39] and not tissue._close(mask, 1.0)[40, 39]


def test_saturation_threshold_sees_stain_not_glass():
    rgb = np.full((120, 120, 3), 235, np.uint8)  # glass
    rgb[30:90, 30:90] = (200, 80, 160)            # stained tissue
    rgb[0, 0] = 0                                 # a black pixel: saturation 0, no division by zero
    mask = tissue.tissue_mask(rgb, mask_mpp=8.0)
    assert mask[60, 60] and not mask[5, 110] and not mask[0, 0]
    assert abs(int(mask.sum()) - 60 * 60) < 0.1 * 60 * 60


def _random_masks(seed, n=12):
    rng = np.random.default_rng(seed)
    for k in range(n):
        shape = tuple(int(s) for s in rng.integers(1, 90, 2))  # down to 1 px, smaller than the disk
        if k % 4 == 0:
            yield rng.random(shape) > 0.5  # salt and pepper
        else:
            yield ndimage.gaussian_filter(rng.random(shape), rng.uniform(0.7, 3.0)) > rng.uniform(0.46, 0.54)


@pytest.mark.parametrize("radius", [1.0, 1.5, 2.5, 4.0, 6.3, 8.0, float(np.sqrt(13)), float(np.sqrt(61))])
def test_disk_morphology_equals_ndimage_with_the_disk_footprint(radius):
    disk = tissue._disk(radius)
    for mask in _random_masks(int(radius * 10)):
        assert np.array_equal(tissue._disk_morphology(mask, radius, erode=False),
                              ndimage.binary_dilation(mask, structure=disk))
        assert np.array_equal(tissue._disk_morphology(mask, radius, erode=True),
                              ndimage.binary_erosion(mask, structure=disk, border_value=0))


@pytest.mark.parametrize("sigma", [0.5, 1.3, 2.0, 4.0])
def test_blur_is_gaussian_filter_bit_for_bit(sigma):
    rng = np.random.default_rng(3)
    for shape in [(1024, 1024), (37, 500), (301, 7), (1, 1)]:  # 1024: the usual thumbnail
        image = (rng.random(shape) ** 3).astype(np.float32)
        assert np.array_equal(tissue._blur(image, sigma), ndimage.gaussian_filter(image, sigma))


def _fill_holes_reference(mask, min_px):
    """Holes under min_px filled, background on the border kept: the three labellings it took before."""
    holes = tissue._remove_small(~mask, min_px)
    border = np.zeros_like(mask)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    labels, _ = ndimage.label(~mask)
    outside = np.isin(labels, np.unique(labels[border & ~mask]))
    return mask | (~mask & ~holes & ~outside)


@pytest.mark.parametrize("min_px", [1.5, 4.0, 30.0, 1e9])
def test_fill_small_holes_equals_the_reference(min_px):
    for mask in _random_masks(7, n=20):
        assert np.array_equal(tissue._fill_small_holes(mask, min_px), _fill_holes_reference(mask, min_px))
    ring = np.zeros((20, 20), bool)
    ring[3:12, 3:12] = True
    ring[5:8, 5:8] = False  # a 9 px hole
    ring[0:4, 14:19] = True
    ring[0:2, 15:18] = False  # a 6 px bay open to the top border: background, however small
    got = tissue._fill_small_holes(ring, 10.0)
    assert got[5:8, 5:8].all() and not got[0:2, 15:18].any()
    assert not tissue._fill_small_holes(ring, 9.0)[5:8, 5:8].any()


def test_thumbnail_equals_openslide_get_thumbnail():
    import openslide
    from PIL import Image

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (300, 420, 4), np.uint8)
    rgba[..., 3] = 255
    for alpha in (False, True):
        if alpha:  # transparent and half-transparent parts: composited on the background colour
            rgba[:50, :, 3] = 0
            rgba[100:120, :, 3] = 128
        slide = openslide.ImageSlide(Image.fromarray(rgba if alpha else np.ascontiguousarray(rgba[..., :3])))
        for size in [(420, 300), (500, 400), (210, 150), (100, 90), (37, 61)]:
            want = np.asarray(slide.get_thumbnail(size).convert("RGB"))
            assert np.array_equal(tissue._thumbnail(slide, size), want), (alpha, size)
