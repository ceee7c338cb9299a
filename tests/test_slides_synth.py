"""Synthetic cohorts: real files OpenSlide opens, the CSV contract, and the spatial task's design."""

import numpy as np
import pandas as pd
import pytest

from gigamamba.slides.reader import open_slide, resolve_mpp
from gigamamba.slides.synth import write_synthetic_cohort


def _type_b_map(slide, size=64):
    """True where a thumbnail pixel is type-B (purple) tissue, False for type A or glass."""
    rgb = np.asarray(slide.get_thumbnail((size, size)).convert("RGB")).astype(float)
    tissue = rgb.min(-1) < 225
    return tissue & (rgb[..., 0] < 205), tissue & (rgb[..., 0] >= 205)


@pytest.mark.parametrize("task", ["classification", "survival"])
def test_cohort_csv_contract(tmp_path, task):
    csv = write_synthetic_cohort(tmp_path, task=task, n_slides=4, seed=1, size_px=1536)
    df = pd.read_csv(csv, dtype={"slide_id": str})
    cols = {"classification": ["slide_id", "case_id", "label", "slide_path"],
            "survival": ["slide_id", "case_id", "survival_months", "censorship", "slide_path"]}[task]
    assert list(df.columns) == cols and len(df) == 4 and df.slide_id.is_unique
    if task == "classification":
        assert sorted(df.label) == [0, 0, 1, 1]
    else:
        assert (df.survival_months > 0).all() and set(df.censorship) <= {0, 1}
    vendors, mpps = set(), set()
    for row in df.itertuples():
        slide = open_slide(tmp_path / row.slide_path)
        vendors.add(slide.properties["openslide.vendor"])
        mpps.add(resolve_mpp(slide.properties)[0])
        assert slide.level_count >= 2
    assert vendors == {"aperio", "generic-tiff"} and mpps == {0.5, 0.25}


def test_classification_label_changes_texture(tmp_path):
    csv = write_synthetic_cohort(tmp_path, task="classification", n_slides=4, seed=2, size_px=1536)
    df = pd.read_csv(csv)
    for row in df.itertuples():
        b, a = _type_b_map(open_slide(tmp_path / row.slide_path))
        share = b.sum() / max(a.sum() + b.sum(), 1)
        assert (share > 0.1) if row.label == 1 else (share < 0.02)


def test_spatial_task_same_amounts_different_arrangement(tmp_path):
    csv = write_synthetic_cohort(tmp_path, task="spatial", n_slides=4, seed=3, size_px=2048,
                                 magnifications=(20,))
    df = pd.read_csv(csv)
    assert sorted(df.label) == [0, 0, 1, 1]
    for row in df.itertuples():
        b, a = _type_b_map(open_slide(tmp_path / row.slide_path))
        # same amounts of both tissue types, whatever the label
        assert 0.75 < a.sum() / b.sum() < 1.33
        ay, ax = np.nonzero(a)
        by, bx = np.nonzero(b)
        dy, dx = abs(ay.mean() - by.mean()), abs(ax.mean() - bx.mean())
        if row.label == 0:   # A blobs share a row: A above or below B
            assert dy > 3 * dx
        else:                # A blobs share a column: A beside B
            assert dx > 3 * dy
