"""Tissue detection on a low-resolution image of the slide.

Saturation separates stained tissue from glass whatever the stain intensity, so the mask is an Otsu
threshold on the HSV saturation (with a floor, so an empty slide stays empty), blurred first, then a
morphological closing and the removal of small objects and small holes. All sizes are in micrometres,
so the same parameters work whatever the thumbnail's resolution.

    rgb, mask_mpp = tissue_thumbnail(slide, (mpp_x, mpp_y))
    mask = tissue_mask(rgb, mask_mpp)              # bool (h, w)
"""

from __future__ import annotations

import numpy as np

DEFAULTS = {
    "mpp": 8.0,              # thumbnail resolution (um/px), about 1.25x
    "min_side": 1000,        # ... or finer, so the longer side has at least ~1000 px when the slide allows
    "blur_um": 16.0,         # Gaussian sigma of the saturation blur
    "min_saturation": 0.07,  # floor of the Otsu threshold: below it is glass even on a tissue-free slide
    "close_um": 32.0,        # radius of the closing that bridges small gaps inside tissue
    "min_object_um2": 20000.0,  # tissue pieces smaller than this (about 140 x 140 um) are dust
    "min_hole_um2": 20000.0,    # holes smaller than this inside tissue are filled
}


def tissue_thumbnail(slide, mpp: tuple[float, float], params: dict | None = None) -> tuple[np.ndarray, float]:
    """(rgb uint8 (h, w, 3), um per thumbnail pixel along x) at about `params['mpp']` um/px.

    Resolution is raised (up to level 0) when that would leave the longer side under `min_side` pixels.
    """
    p = {**DEFAULTS, **(params or {})}
    w0, h0 = slide.dimensions
    mpp_x = mpp[0]
    target = p["mpp"]
    longest_um = max(w0 * mpp_x, h0 * mpp[1])
    target = min(target, longest_um / p["min_side"])
    down = max(1.0, target / mpp_x)
    size = (max(1, round(w0 / down)), max(1, round(h0 / down)))
    thumb = slide.get_thumbnail(size).convert("RGB")
    rgb = np.asarray(thumb)
    return rgb, w0 * mpp_x / rgb.shape[1]


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def _close(mask: np.ndarray, radius: float) -> np.ndarray:
    """Closing with a disk of `radius` pixels, through distance transforms (linear time in any radius)."""
    from scipy import ndimage

    if radius < 1 or not mask.any():
        return mask
    pad = int(np.ceil(radius)) + 1
    # Padding keeps tissue that touches the border from being eaten by the erosion step.
    padded = np.pad(mask, pad)
    dilated = ndimage.distance_transform_edt(~padded) <= radius
    closed = ndimage.distance_transform_edt(dilated) > radius
    return closed[pad:-pad, pad:-pad] | mask


def tissue_mask(rgb: np.ndarray, mask_mpp: float, params: dict | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail whose pixels are `mask_mpp` um wide."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    p = {**DEFAULTS, **(params or {})}
    rgbf = rgb.astype(np.float32)
    mx, mn = rgbf.max(-1), rgbf.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    sat = ndimage.gaussian_filter(sat, max(p["blur_um"] / mask_mpp, 0.5))
    try:
        thr = threshold_otsu(sat) if sat.max() > sat.min() else 1.0
    except ValueError:
        thr = 1.0
    mask = sat > max(thr, p["min_saturation"])
    mask = _close(mask, p["close_um"] / mask_mpp)
    px_area = mask_mpp**2
    mask = _remove_small(mask, p["min_object_um2"] / px_area)
    holes = _remove_small(~mask, p["min_hole_um2"] / px_area + 1e-9)
    # Background touching the border stays background even when small.
    border = np.zeros_like(mask)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    labels, _ = ndimage.label(~mask)
    outside = np.isin(labels, np.unique(labels[border & ~mask]))
    return mask | (~mask & ~holes & ~outside)


def detect_tissue(slide, mpp: tuple[float, float], params: dict | None = None) -> np.ndarray:
    """Tissue mask bool (h, w) of an open slide; it spans the whole level-0 image."""
    rgb, mask_mpp = tissue_thumbnail(slide, mpp, params)
    return tissue_mask(rgb, mask_mpp, params)
