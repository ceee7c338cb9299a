"""The feature-grid store: one Zarr v3 group per slide, schema `gigamamba.grid/1` (DESIGN.md).

    features.zarr/                 attrs: schema, encoder {name, dim, weights, input_px, mean, std, ...},
                                   tiling {patch_px, target_mpp, tissue_threshold}, version
      _manifest.parquet            one row per slide: slide_id, status, error, n_tiles, H, W, seconds
      <slide_id>/                  attrs: slide_id, case_id, source, mpp [x, y], level0_size [w, h],
                                   stride_level0, origin_level0 [x0, y0], grid_shape [H, W], n_tiles, status
        features  float16 (H, W, D), chunks (h, w, D), zstd; empty cells 0
        mask      bool (H, W), True where a tile was embedded

Reading:
    store = GridStore(path)                      # mode "r"
    for slide_id in store.complete_slides():
        features, mask = store.read(slide_id)    # np.float16 (H, W, D), np.bool_ (H, W)
    mean, std = channel_stats(path)              # per channel, over every tissue cell (dask)

Writing (one writer per slide: Zarr chunks written concurrently by two processes can lose data):
    store = GridStore(path, mode="a"); store.initialise(encoder=..., tiling=...)
    store.write_slide(slide_id, features, mask, attrs)   # "status": "complete" is written last
    store.update_manifest([row, ...])

A slide whose status is not "complete" (a crash mid-write, an older half-written run) is invisible
to readers and is redone by the next `gigamamba embed`.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

SCHEMA = "gigamamba.grid/1"
MANIFEST = "_manifest.parquet"
MANIFEST_COLUMNS = ["slide_id", "status", "error", "n_tiles", "H", "W", "seconds"]
COMPLETE = "complete"
CHUNK_CELLS = 32  # grid cells per chunk side: 32 x 32 x 1024 float16 is 2 MiB raw

_SLIDE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\- ]*$")


class StoreError(ValueError):
    """A store that cannot be used as asked (wrong schema, different encoder/tiling, bad slide id)."""


def check_slide_id(slide_id: Any) -> str:
    """Return `slide_id` as a string if it is safe as one folder name inside the store, else raise.

    Rejects empty ids, path separators, '..', leading dots or dashes, and Zarr's reserved names, so
    an id like `../x` can never write outside the store.
    """
    sid = str(slide_id)
    if not sid or sid != sid.strip():
        raise StoreError(f"slide_id {sid!r} is empty or has leading/trailing spaces")
    if "/" in sid or "\\" in sid or ".." in sid or not _SLIDE_ID.match(sid):
        raise StoreError(f"slide_id {sid!r} is not a safe name (allowed: letters, digits, '.', '_', '-', '+', "
                         "space; no '/', '\\\\' or '..'); it would escape the feature store")
    if sid.startswith("__") or sid == MANIFEST or sid.startswith("zarr."):
        raise StoreError(f"slide_id {sid!r} clashes with a reserved store name")
    return sid


def _plain(value: Any) -> Any:
    """JSON-safe copy of attrs (numpy scalars and arrays to Python)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


class GridStore:
    """A `gigamamba.grid/1` feature-grid store at a local path.

    mode "r": read only (the store must exist). mode "a": read and write, created if missing.
    """

    def __init__(self, path: str | Path, mode: str = "r"):
        import zarr

        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        if mode == "r" and not (self.path / "zarr.json").is_file():
            raise StoreError(f"{self.path} is not a feature store (no zarr.json)")
        # Consolidated metadata would go stale as slides are added one at a time; never use it.
        self._root = zarr.open_group(str(self.path), mode=mode, use_consolidated=False)
        schema = self._root.attrs.get("schema")
        if schema not in (None, SCHEMA):
            raise StoreError(f"{self.path} has schema {schema!r}, expected {SCHEMA!r}")

    # ------------------------------------------------------------------ store level
    @property
    def attrs(self) -> dict:
        """Store attributes: schema, encoder {...}, tiling {...}, version."""
        return dict(self._root.attrs.asdict())

    def initialise(self, encoder: dict, tiling: dict, overwrite: bool = False, **extra: Any) -> None:
        """Record encoder and tiling; refuse to mix features of another encoder or tiling.

        overwrite=True empties the store first (every slide and the manifest).
        """
        from gigamamba import __version__

        if overwrite:
            for name in list(self._group_names()):
                self.remove_slide(name)
            (self.path / MANIFEST).unlink(missing_ok=True)
        current = self.attrs
        new = _plain({"schema": SCHEMA, "encoder": encoder, "tiling": tiling, "version": __version__, **extra})
        if current.get("encoder") and not overwrite:
            for key in ("encoder", "tiling"):
                old = {k: current[key].get(k) for k in new[key]}
                if old != new[key] and self._group_names():
                    raise StoreError(
                        f"{self.path} holds features made with {key} {current[key]}, not {new[key]}; "
                        "use another store or --overwrite")
        self._root.attrs.update(new)

    def _groups(self) -> list:
        # The manifest file sits beside the slide groups; zarr warns about any non-Zarr file it meets.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(self._root.groups())

    def _group_names(self) -> list[str]:
        return sorted(name for name, _ in self._groups())

    def slides(self) -> dict[str, str]:
        """{slide_id: status} of every slide group present, complete or not."""
        out = {}
        for name, group in self._groups():
            try:
                out[name] = str(group.attrs.get("status", "unknown"))
            except Exception:  # a group whose metadata a crash left unreadable
                out[name] = "unreadable"
        return dict(sorted(out.items()))

    def complete_slides(self) -> list[str]:
        """Sorted ids of the slides whose status is "complete"; readers use only these."""
        return [sid for sid, status in self.slides().items() if status == COMPLETE]

    # ------------------------------------------------------------------ slide level
    def _group(self, slide_id: str):
        sid = check_slide_id(slide_id)
        try:
            return self._root[sid]
        except KeyError:
            raise KeyError(f"slide {sid!r} is not in {self.path}") from None

    def slide_attrs(self, slide_id: str) -> dict:
        """Attributes of one slide (slide_id, case_id, mpp, stride_level0, origin_level0, grid_shape, ...)."""
        return dict(self._group(slide_id).attrs.asdict())

    def arrays(self, slide_id: str):
        """(features, mask) as lazy zarr arrays of a complete slide (for dask or partial reads)."""
        group = self._group(slide_id)
        if group.attrs.get("status") != COMPLETE:
            raise KeyError(f"slide {slide_id!r} in {self.path} is not complete (status "
                           f"{group.attrs.get('status')!r}); rerun `gigamamba embed`")
        return group["features"], group["mask"]

    def read(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(features float16 (H, W, D), mask bool (H, W)) of a complete slide."""
        features, mask = self.arrays(slide_id)
        return features[...], mask[...]

    def remove_slide(self, slide_id: str) -> None:
        self._require_write()
        sid = check_slide_id(slide_id)
        target = self.path / sid
        if target.exists():
            shutil.rmtree(target)

    def write_slide(self, slide_id: str, features: np.ndarray, mask: np.ndarray, attrs: dict) -> None:
        """Write one slide's grid in one go, replacing any earlier copy.

        features: (H, W, D), stored as float16; mask: (H, W) bool. attrs: the slide attributes of the
        schema (status is set here). The status "complete" is written only after both arrays are on
        disk, so a crash at any point leaves the slide visibly incomplete, never complete and partial.
        """
        self._require_write()
        sid = check_slide_id(slide_id)
        features = np.asarray(features)
        mask = np.asarray(mask, dtype=bool)
        if features.ndim != 3 or mask.shape != features.shape[:2]:
            raise ValueError(f"slide {sid}: features {features.shape} and mask {mask.shape} do not match")
        h, w, d = features.shape
        self.remove_slide(sid)
        meta = _plain({**attrs, "slide_id": sid, "grid_shape": [h, w], "n_tiles": int(mask.sum()),
                       "status": "writing"})
        group = self._root.create_group(sid, attributes=meta)
        chunks = (max(1, min(h, CHUNK_CELLS)), max(1, min(w, CHUNK_CELLS)), d)
        self._write_array(group, "features", np.where(mask[..., None], features, 0).astype(np.float16), chunks,
                          ["y", "x", "c"])
        self._write_array(group, "mask", mask, chunks[:2], ["y", "x"])
        group.attrs.update({"status": COMPLETE})

    @staticmethod
    def _write_array(group, name: str, data: np.ndarray, chunks: tuple, dims: list[str]) -> None:
        import zarr

        arr = group.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype, fill_value=0,
                                 compressors=zarr.codecs.ZstdCodec(level=3), dimension_names=dims)
        arr[...] = data

    # ------------------------------------------------------------------ manifest
    def manifest(self) -> "pd.DataFrame":  # noqa: F821
        """The manifest: one row per slide (slide_id, status, error, n_tiles, H, W, seconds).

        Without a manifest file (a store written by hand) it is rebuilt from the slide groups.
        """
        import pandas as pd

        file = self.path / MANIFEST
        if file.is_file():
            df = pd.read_parquet(file)
            df["slide_id"] = df["slide_id"].astype(str)
            return df[MANIFEST_COLUMNS].reset_index(drop=True)
        rows = []
        for sid, status in self.slides().items():
            row = {"slide_id": sid, "status": status, "error": "", "n_tiles": 0, "H": 0, "W": 0, "seconds": float("nan")}
            if status == COMPLETE:
                a = self.slide_attrs(sid)
                row.update(n_tiles=a.get("n_tiles", 0), H=a["grid_shape"][0], W=a["grid_shape"][1])
            rows.append(row)
        return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)

    def reconcile_manifest(self) -> list[str]:
        """Make the manifest agree with the slide groups, which are the truth; return the ids mended.

        A crash or Ctrl-C between a slide's "complete" and its manifest row leaves a complete slide
        the manifest does not list (or lists as failed); such rows are rebuilt from the slide's attrs.
        That includes the first slide of a run killed before any manifest was written: with no file,
        nothing is listed (manifest() would rebuild from the groups, and the next upsert would drop them).
        """
        has_file = (self.path / MANIFEST).is_file()
        listed = self.manifest().set_index("slide_id")["status"].to_dict() if has_file else {}
        rows = []
        for sid in self.complete_slides():
            if listed.get(sid) != COMPLETE:
                a = self.slide_attrs(sid)
                rows.append({"slide_id": sid, "status": COMPLETE, "error": "", "n_tiles": a.get("n_tiles", 0),
                             "H": a["grid_shape"][0], "W": a["grid_shape"][1], "seconds": float("nan")})
        if rows:
            self.update_manifest(rows)
        return [r["slide_id"] for r in rows]

    def update_manifest(self, rows: Iterable[dict]) -> "pd.DataFrame":  # noqa: F821
        """Upsert rows by slide_id and rewrite `_manifest.parquet` atomically (temp file + rename)."""
        import pandas as pd

        self._require_write()
        new = pd.DataFrame(list(rows), columns=MANIFEST_COLUMNS)
        old = self.manifest() if (self.path / MANIFEST).is_file() else pd.DataFrame(columns=MANIFEST_COLUMNS)
        old = old[~old["slide_id"].isin(new["slide_id"])]
        df = pd.concat([d for d in (old, new) if len(d)], ignore_index=True) if len(old) or len(new) else new
        df = df.reindex(columns=MANIFEST_COLUMNS)
        df["slide_id"] = df["slide_id"].astype(str)
        df["status"] = df["status"].astype(str)
        df["error"] = df["error"].fillna("").astype(str)
        for col in ("n_tiles", "H", "W"):
            df[col] = pd.to_numeric(df[col], errors="coerce").fillna(0).astype("int64")
        df["seconds"] = pd.to_numeric(df["seconds"], errors="coerce").astype("float64")
        df = df.sort_values("slide_id", kind="stable").reset_index(drop=True)
        tmp = self.path / f".{MANIFEST}.{uuid.uuid4().hex}.tmp"
        df.to_parquet(tmp, index=False)
        os.replace(tmp, self.path / MANIFEST)
        return df

    def _require_write(self) -> None:
        if self.mode != "a":
            raise StoreError(f"{self.path} was opened read-only")


def channel_stats(path: str | Path, slides: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) float32 (D,) over every tissue cell of the complete slides, with dask.

    The arrays are read lazily chunk by chunk, so a cohort larger than memory is fine. `slides`
    restricts the statistics (e.g. to a training fold, so validation data do not leak into them).
    """
    import dask.array as da

    store = GridStore(path)
    ids = store.complete_slides() if slides is None else [str(s) for s in slides]
    sums, sq, counts = [], [], []
    for sid in ids:
        feats, mask = store.arrays(sid)
        f = da.from_zarr(feats).astype(np.float64)
        m = da.from_zarr(mask)
        f = f * m[..., None]
        sums.append(f.sum(axis=(0, 1)))
        sq.append((f * f).sum(axis=(0, 1)))
        counts.append(m.sum())
    if not ids:
        raise StoreError(f"{path} has no complete slides to take statistics from")
    total, total_sq, n = da.compute(da.stack(sums).sum(0), da.stack(sq).sum(0), da.stack(counts).sum())
    if n == 0:
        raise StoreError(f"{path} has no tissue cells to take statistics from")
    mean = total / n
    var = np.maximum(total_sq / n - mean**2, 0.0)
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32)
