"""Toy feature-grid cohorts written straight into a grid store (no slides, no encoder).

For tests and quick experiments with the training layer: every slide is a small grid of random
features; the label sits in the features the way the synthetic slides put it in the tissue
(classification: a share of "B" cells; spatial: four blocks whose A/B arrangement, rows vs columns,
is the label; survival: the B share sets the hazard).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd


def _cells(rng, kind_b: np.ndarray, dim: int, signal: float) -> np.ndarray:
    feats = rng.normal(0, 1, (*kind_b.shape, dim)).astype(np.float32)
    feats[..., 0] += np.where(kind_b, signal, -signal)
    return feats


def write_toy_cohort(out_dir: str | Path, task: str = "classification", n_slides: int = 20, dim: int = 16,
                     grid: int = 8, seed: int = 0, slides_per_case: int = 1, signal: float = 1.5) -> tuple[Path, Path]:
    """Write `cohort.csv` and `features.zarr` under out_dir; returns (csv path, store path)."""
    from gigamamba.features.store import GridStore

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = GridStore(out / "features.zarr", mode="a")
    store.initialise(encoder={"name": "toy", "dim": dim, "weights": "none", "input_px": 0},
                     tiling={"patch_px": 256, "target_mpp": 0.5, "tissue_threshold": 0.25})
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n_slides) % 2)
    rows = []
    for k in range(n_slides):
        srng = np.random.default_rng([seed, k])
        case = f"case{k // slides_per_case:03d}"
        sid = f"{task[:4]}{k:03d}"
        h = grid + int(srng.integers(-1, 2))
        w = grid + int(srng.integers(-1, 2))
        mask = srng.uniform(size=(h, w)) > 0.15
        row = {"slide_id": sid, "case_id": case}
        if task == "spatial":
            kind_b = np.zeros((h, w), dtype=bool)
            a_first = bool(srng.integers(2))
            for i in range(h):
                for j in range(w):
                    line = (i >= h // 2) if labels[k] == 0 else (j >= w // 2)
                    kind_b[i, j] = line == a_first
            row["label"] = int(labels[k])
        elif task == "classification":
            share = srng.uniform(0.3, 0.5) if labels[k] else 0.0
            kind_b = srng.uniform(size=(h, w)) < share
            row["label"] = int(labels[k])
        else:
            share = float(srng.uniform(0, 0.6))
            kind_b = srng.uniform(size=(h, w)) < share
            hazard = 0.02 * math.exp(4.0 * share)
            t_event, t_censor = srng.exponential(1 / hazard), srng.uniform(12, 150)
            row["survival_months"] = round(float(min(t_event, t_censor)), 2)
            row["censorship"] = int(t_censor < t_event)
        feats = _cells(srng, kind_b, dim, signal)
        store.write_slide(sid, feats, mask, {
            "case_id": case, "source": str(out / "slides" / f"{sid}.svs"), "mpp": [0.5, 0.5],
            "level0_size": [w * 256, h * 256], "stride_level0": 256.0, "origin_level0": [0, 0],
        })
        rows.append(row)
    csv = out / "cohort.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv, out / "features.zarr"
