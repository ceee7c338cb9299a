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


def feature_dim(path) -> int:
    store = _open_store(path)
    enc = dict(store.attrs).get("encoder") or {}
    if enc.get("dim"):
        return int(enc["dim"])
    first = store.complete_slides()[0]
    return int(store.read(first)[0].shape[-1])


class GridDataset(Dataset):
    """Slides of one fold part; each item is (features (H,W,D) float32, mask (H,W) bool, target dict, index)."""

    def __init__(self, store_path: str | Path, slides: pd.DataFrame, task: str):
        self.store_path = str(store_path)
        self.slides = slides.reset_index(drop=True)
        self.task = task
        self._store = None  # opened per worker process, after pickling

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, i: int):
        if self._store is None:
            self._store = _open_store(self.store_path)
        row = self.slides.iloc[i]
        feats, mask = self._store.read(str(row["slide_id"]))
        feats = torch.from_numpy(np.asarray(feats, dtype=np.float32))
        mask = torch.from_numpy(np.asarray(mask, dtype=bool))
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
    """Pad slides to the largest grid; padding is zero features under a False mask."""
    H = max(f.shape[0] for f, *_ in items)
    W = max(f.shape[1] for f, *_ in items)
    D = items[0][0].shape[-1]
    feats = torch.zeros(len(items), H, W, D)
    mask = torch.zeros(len(items), H, W, dtype=torch.bool)
    for b, (f, m, _, _) in enumerate(items):
        feats[b, : f.shape[0], : f.shape[1]] = f
        mask[b, : m.shape[0], : m.shape[1]] = m
    targets = {k: torch.tensor([t[k] for _, _, t, _ in items]) for k in items[0][2]}
    index = torch.tensor([i for *_, i in items])
    return feats, mask, targets, index
