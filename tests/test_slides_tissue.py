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
