"""From a cohort CSV to per-slide plans: which file, which MPP, which lattice cells to read.

    jobs, rejected = read_slide_jobs(csv, slide_dir)     # rejected: one manifest row per unusable row
    plan = plan_slide(job, tiling, tissue_params)        # SlidePlan, or SlideError with one line

Planning opens each slide once (MPP, thumbnail, tissue mask, lattice); it is cheap next to embedding
and runs as one Ray task per slide.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gigamamba.features.store import StoreError, check_slide_id
from gigamamba.slides.lattice import Lattice, plan_grid, read_geometry, stride_level0
from gigamamba.slides.reader import SlideError, open_slide, resolve_mpp
from gigamamba.slides.tissue import detect_tissue

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm")


class CohortFileError(ValueError):
    """The cohort CSV as a whole cannot be read (missing file, no slide_id column)."""


@dataclass
class SlideJob:
    slide_id: str
    case_id: str
    path: str
    mpp: float | None
    line: int  # CSV line, header = 1

    def to_row(self) -> dict:
        """One Ray Data row. A missing MPP travels as NaN, so the column stays float in Arrow."""
        row = dataclasses.asdict(self)
        row["mpp"] = float("nan") if self.mpp is None else float(self.mpp)
        return row

    @classmethod
    def from_row(cls, row: dict) -> "SlideJob":
        mpp = row["mpp"]
        mpp = None if mpp is None or np.isnan(mpp) else float(mpp)
        return cls(str(row["slide_id"]), str(row["case_id"]), str(row["path"]), mpp, int(row["line"]))


@dataclass
class SlidePlan:
    job: SlideJob
    mpp: tuple[float, float]
    level0_size: tuple[int, int]
    lattice: Lattice
    keep: np.ndarray      # bool (H, W): cells to embed
    level: int            # pyramid level to read from
    read_px: int          # tile width in that level's pixels
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def n_tiles(self) -> int:
        return int(self.keep.sum())

    def attrs(self) -> dict:
        """The slide attrs of schema gigamamba.grid/1 (status is added by the store)."""
        return {"slide_id": self.job.slide_id, "case_id": self.job.case_id, "source": self.job.path,
                "mpp": [float(self.mpp[0]), float(self.mpp[1])],
                "level0_size": [int(self.level0_size[0]), int(self.level0_size[1])],
                **self.lattice.attrs(), "n_tiles": self.n_tiles,
                "read_level": int(self.level), "read_px": int(self.read_px)}


def failure(slide_id: str, error: str, seconds: float = 0.0) -> dict:
    """A manifest row for a slide that could not be embedded."""
    return {"slide_id": str(slide_id), "status": "failed", "error": error, "n_tiles": 0, "H": 0, "W": 0,
            "seconds": float(seconds)}


def _case_id(slide_id: str, value) -> str:
    if value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value).strip():
        return str(value).strip()
    from gigamamba.cohorts.cohort import case_id_from_barcode

    return case_id_from_barcode(slide_id) or slide_id


def _find_slide(slide_dir: Path, slide_id: str) -> Path:
    for suffix in SLIDE_SUFFIXES:
        p = slide_dir / f"{slide_id}{suffix}"
        if p.exists():
            return p
    return slide_dir / f"{slide_id}.svs"  # reported as missing by the planner, with this path


def read_slide_jobs(csv: str | Path, slide_dir: str | Path | None = None) -> tuple[list[SlideJob], list[dict]]:
    """Read the cohort CSV for ingest: (jobs to embed, manifest rows of rejected rows).

    Rows are rejected, not fatal: an unsafe slide_id (e.g. `../x`), a slide_id that occurs more than
    once (every occurrence: which one is right is not ours to guess), a bad `mpp` value.
    slide_path is resolved against slide_dir (default: the CSV's folder); without a slide_path column
    the slide is looked up as <slide_dir>/<slide_id>.<svs|tif|ndpi|...>.
    """
    import pandas as pd

    csv = Path(csv)
    if not csv.is_file():
        raise CohortFileError(f"cohort CSV {csv} does not exist")
    df = pd.read_csv(csv, dtype={"slide_id": str, "case_id": str, "slide_path": str}, keep_default_na=True)
    if "slide_id" not in df.columns:
        raise CohortFileError(f"{csv}: no slide_id column (columns: {', '.join(map(str, df.columns))})")
    base = Path(slide_dir) if slide_dir else csv.parent
    jobs, rejected = [], []
    counts = df["slide_id"].fillna("").astype(str).str.strip().value_counts()
    seen_dup: set[str] = set()
    for idx, row in df.iterrows():
        line = int(idx) + 2
        raw = row["slide_id"]
        sid = "" if raw is None or (isinstance(raw, float) and math.isnan(raw)) else str(raw).strip()
        if counts.get(sid, 0) > 1:
            if sid not in seen_dup:
                lines = [int(i) + 2 for i in df.index[df["slide_id"].astype(str).str.strip() == sid]]
                rejected.append(failure(sid, f"{csv.name}: slide_id {sid!r} appears on lines {lines}; "
                                             "slide ids must be unique"))
                seen_dup.add(sid)
            continue
        try:
            check_slide_id(sid)
        except StoreError as exc:
            rejected.append(failure(sid, f"{csv.name} line {line}: {exc}"))
            continue
        mpp = None
        if "mpp" in df.columns and not pd.isna(row["mpp"]):
            try:
                mpp = float(row["mpp"])
            except ValueError:
                rejected.append(failure(sid, f"{csv.name} line {line}: mpp {row['mpp']!r} is not a number"))
                continue
        if "slide_path" in df.columns and isinstance(row["slide_path"], str) and row["slide_path"].strip():
            p = Path(row["slide_path"].strip()).expanduser()
            path = p if p.is_absolute() else base / p
        else:
            path = _find_slide(base, sid)
        jobs.append(SlideJob(sid, _case_id(sid, row.get("case_id")), str(path), mpp, line))
    return jobs, rejected


def plan_slide(job: SlideJob, tiling: dict, tissue: dict | None = None) -> SlidePlan:
    """Open the slide, resolve its MPP, find tissue and lay the lattice; SlideError on any problem."""
    import openslide

    t0 = time.perf_counter()
    slide = open_slide(job.path, job.slide_id)
    try:
        mpp = resolve_mpp(slide.properties, override=job.mpp, slide_id=job.slide_id)
        patch_px, target_mpp = int(tiling["patch_px"]), float(tiling["target_mpp"])
        stride = stride_level0(patch_px, target_mpp, (mpp[0] + mpp[1]) / 2)
        try:
            mask = detect_tissue(slide, mpp, tissue)
        except openslide.OpenSlideError as exc:
            raise SlideError(f"slide {job.slide_id}: corrupt image data while reading the thumbnail "
                             f"({' '.join(str(exc).split())})") from None
        lattice, keep = plan_grid(mask, slide.dimensions, stride, float(tiling.get("tissue_threshold", 0.25)))
        if not keep.any():
            raise SlideError(f"slide {job.slide_id}: no tissue found (no {patch_px}px tile at {target_mpp} um/px "
                             f"is >= {tiling.get('tissue_threshold', 0.25)} tissue); check the file or lower "
                             "tiling.tissue_threshold")
        level, read_px = read_geometry(list(slide.level_downsamples), stride, patch_px)
        return SlidePlan(job, mpp, tuple(slide.dimensions), lattice, keep, level, read_px,
                         seconds=time.perf_counter() - t0)
    finally:
        slide.close()


def tile_chunks(plan: SlidePlan, tiles_per_chunk: int) -> list[dict]:
    """The plan's cells as Ray Data rows, `tiles_per_chunk` tiles each (row-major order).

    Each row carries what a reader needs and nothing more: slide id and path, read level and size,
    and the cells with their integer level-0 positions, as int32/int64 bytes.
    """
    ii, jj = np.nonzero(plan.keep)
    xs, ys = plan.lattice.cell_to_level0(ii, jj)
    xs, ys = np.floor(xs + 0.5).astype(np.int64), np.floor(ys + 0.5).astype(np.int64)
    out = []
    for start in range(0, len(ii), tiles_per_chunk):
        sl = slice(start, start + tiles_per_chunk)
        out.append({"slide_id": plan.job.slide_id, "path": plan.job.path, "level": plan.level,
                    "read_px": plan.read_px,
                    "cells": np.stack([ii[sl], jj[sl]], 1).astype(np.int32).tobytes(),
                    "xy": np.stack([xs[sl], ys[sl]], 1).astype(np.int64).tobytes()})
    return out
