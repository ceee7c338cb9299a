"""Grid datasets: one item = one slide's feature grid, read lazily from the Zarr store.

Only the slides a fold needs are opened, one at a time, so a worker's memory holds a batch, not a
cohort. Batches of several slides are padded to the largest (H, W) with zero features and a False
mask, which the models' variable-size scan ignores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset


def _open_store(path: str | Path):
    """GridStore when the feature layer provides it, else a direct reader of schema gigamamba.grid/1."""
    try:
        from gigamamba.features.store import GridStore
    except ImportError:
        return _ZarrGrids(path)
    return GridStore(path)


class _ZarrGrids:
    """Minimal reader of DESIGN.md's grid schema (used only if gigamamba.features.store is absent)."""

    def __init__(self, path):
        import zarr

        self.root = zarr.open_group(str(path), mode="r")

    def complete_slides(self) -> list[str]:
        return sorted(
            name for name, g in self.root.groups() if dict(g.attrs).get("status") == "complete"
        )

    def read(self, slide_id: str):
        g = self.root[slide_id]
        return np.asarray(g["features"][...]), np.asarray(g["mask"][...], dtype=bool)

    def slide_attrs(self, slide_id: str) -> dict:
        return dict(self.root[slide_id].attrs)

    @property
    def attrs(self) -> dict:
        return dict(self.root.attrs)


def open_store(path):
    return _open_store(path)


def complete_slides(path) -> list[str]:
    return list(_open_store(path).complete_slides())


def training_stats(path, slide_ids) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over the tissue cells of the given slides."""
    try:
        from gigamamba.features.store import channel_stats
    except ImportError:
        channel_stats = None
    if channel_stats is not None:
        mean, std = channel_stats(path, list(slide_ids))
    else:
        store = _open_store(path)
        cells = np.concatenate([f[m].astype(np.float64) for f, m in (store.read(s) for s in slide_ids)])
        mean, std = cells.mean(0), cells.std(0)
    std = np.where(np.asarray(std) > 1e-6, std, 1.0)
    return np.asarray(mean, dtype=float).tolist(), np.asarray(std, dtype=float).tolist()


def feature_dim(path) -> int:
    store = _open_store(path)
    enc = dict(store.attrs).get("encoder") or {}
    if enc.get("dim"):
        return int(enc["dim"])
    first = store.complete_slides()[0]
    return int(store.read(first)[0].shape[-1])


class GridDataset(Dataset):
    """Slides of one fold part; each item is (features (H,W,D) float32, mask (H,W) bool, target dict, index)."""

    def __init__(self, store_path: str | Path, slides: pd.DataFrame, task: str, norm: tuple | None = None):
        self.store_path = str(store_path)
        self.slides = slides.reset_index(drop=True)
        self.task = task
        # Per-channel (mean, std) of the fold's training cells: encoder features (random weights above all)
        # come in very different scales per channel.
        self.norm = None if norm is None else tuple(np.asarray(v, dtype=np.float32) for v in norm)
        self._store = None  # opened per worker process, after pickling

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, i: int):
        if self._store is None:
            self._store = _open_store(self.store_path)
        row = self.slides.iloc[i]
        feats, mask = self._store.read(str(row["slide_id"]))
        feats = np.asarray(feats, dtype=np.float32)
        mask = np.asarray(mask, dtype=bool)
        if self.norm is not None:
            feats = np.where(mask[..., None], (feats - self.norm[0]) / self.norm[1], 0.0).astype(np.float32)
        feats = torch.from_numpy(feats)
        mask = torch.from_numpy(mask)
        if self.task == "classification":
            target = {"y": int(row["y"])}
        else:
            target = {"time_bin": int(row["time_bin"]), "censorship": int(row["censorship"])}
        return feats, mask, target, i

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None
        return state


def collate_grids(items):
    """Pad slides to the largest grid: zero features under a False mask; returns (feats, mask, sizes, targets, index)."""
    H = max(f.shape[0] for f, *_ in items)
    W = max(f.shape[1] for f, *_ in items)
    D = items[0][0].shape[-1]
    feats = torch.zeros(len(items), H, W, D)
    mask = torch.zeros(len(items), H, W, dtype=torch.bool)
    for b, (f, m, _, _) in enumerate(items):
        feats[b, : f.shape[0], : f.shape[1]] = f
        mask[b, : m.shape[0], : m.shape[1]] = m
    # The real (H_b, W_b) of each grid tells the variable-size scan where padding starts.
    sizes = torch.tensor([[f.shape[0], f.shape[1]] for f, *_ in items], dtype=torch.long)
    targets = {k: torch.tensor([t[k] for _, _, t, _ in items]) for k in items[0][2]}
    index = torch.tensor([i for *_, i in items])
    return feats, mask, sizes, targets, index
