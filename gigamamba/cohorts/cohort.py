"""Cohort CSV: read, validate, derive case ids, targets and survival bins.

Contract (DESIGN.md): `slide_id, case_id` always (case_id may be derived from a TCGA barcode);
`label` for classification; `survival_months, censorship` for survival (censorship = 1 means
censored, the CLAM/MCAT convention); optional `slide_path`, `mpp`.

Every error names the CSV line (header = line 1) and the field, because a cohort of a thousand
slides is fixed by editing one line, not by re-reading a stack trace.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

TCGA_BARCODE = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}", re.IGNORECASE)


class CohortError(ValueError):
    """A cohort that cannot be trained on; the message names the line and the field."""


def case_id_from_barcode(slide_id: str) -> str | None:
    """TCGA-XX-XXXX (the patient) from a TCGA slide barcode, else None."""
    m = TCGA_BARCODE.match(str(slide_id))
    return m.group(0).upper() if m else None


def _where(source: str, idx: int, slide_id=None) -> str:
    line = f"{source} line {idx + 2}"
    return f"{line} (slide_id {slide_id!r})" if slide_id is not None else line


def read_cohort(
    csv: str | Path | pd.DataFrame,
    task: str = "classification",
    label_map: Mapping[str, int] | None = None,
    n_bins: int = 4,
) -> pd.DataFrame:
    """Read and validate a cohort; returns one row per slide with the training target.

    Classification adds `y` (int class index from `label_map`, or from the sorted labels when no map
    is given). Survival adds `time_bin` (quantile bins on uncensored patients) and `event`.
    """
    if isinstance(csv, pd.DataFrame):
        df, source = csv.copy(), "cohort"
        df = df.astype({c: str for c in ("slide_id", "case_id", "label") if c in df.columns})
    else:
        source = str(csv)
        if not Path(csv).is_file():
            raise CohortError(f"cohort CSV {csv} does not exist")
        df = pd.read_csv(csv, dtype={"slide_id": str, "case_id": str, "label": str})
    df.columns = [str(c).strip() for c in df.columns]
    if task not in ("classification", "survival"):
        raise CohortError(f"task must be classification or survival, got {task!r}")
    required = ["slide_id"] + (["label"] if task == "classification" else ["survival_months", "censorship"])
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise CohortError(f"{source}: missing column(s) {missing} for a {task} cohort; has {list(df.columns)}")
    df = df.reset_index(drop=True)
    _check_slide_ids(df, source)
    _fill_case_ids(df, source)
    if task == "classification":
        df = _classification_targets(df, source, label_map)
    else:
        df = _survival_targets(df, source, n_bins)
    return df


def _check_slide_ids(df: pd.DataFrame, source: str) -> None:
    for i, sid in enumerate(df["slide_id"]):
        if pd.isna(sid) or not str(sid).strip():
            raise CohortError(f"{_where(source, i)}: field 'slide_id' is empty")
    df["slide_id"] = df["slide_id"].astype(str).str.strip()
    dup = df["slide_id"].duplicated(keep="first")
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise CohortError(f"{_where(source, i, df.at[i, 'slide_id'])}: field 'slide_id' repeats an earlier row")


def _fill_case_ids(df: pd.DataFrame, source: str) -> None:
    if "case_id" not in df.columns:
        df["case_id"] = None
    for i in range(len(df)):
        cid = df.at[i, "case_id"]
        if pd.isna(cid) or not str(cid).strip() or str(cid) == "nan":
            cid = case_id_from_barcode(df.at[i, "slide_id"])
            if cid is None:
                raise CohortError(
                    f"{_where(source, i, df.at[i, 'slide_id'])}: field 'case_id' is empty and the slide_id "
                    "is not a TCGA barcode to derive it from"
                )
        df.at[i, "case_id"] = str(cid).strip()


def _classification_targets(df: pd.DataFrame, source: str, label_map: Mapping[str, int] | None) -> pd.DataFrame:
    labels = df["label"]
    for i, lab in enumerate(labels):
        if pd.isna(lab) or not str(lab).strip() or str(lab) == "nan":
            raise CohortError(f"{_where(source, i, df.at[i, 'slide_id'])}: field 'label' is empty")
    df["label"] = df["label"].astype(str).str.strip()
    if label_map is None:
        label_map = {lab: k for k, lab in enumerate(sorted(df["label"].unique()))}
    lookup = {str(k): int(v) for k, v in label_map.items()}
    ys = []
    for i, lab in enumerate(df["label"]):
        if lab not in lookup:
            raise CohortError(
                f"{_where(source, i, df.at[i, 'slide_id'])}: field 'label' has unknown label {lab!r}; "
                f"known: {sorted(lookup)}"
            )
        ys.append(lookup[lab])
    df["y"] = np.asarray(ys, dtype=np.int64)
    return df


def _survival_targets(df: pd.DataFrame, source: str, n_bins: int) -> pd.DataFrame:
    for field in ("survival_months", "censorship"):
        values = pd.to_numeric(df[field], errors="coerce")
        for i, v in enumerate(values):
            if v is None or not math.isfinite(float(v)):
                raise CohortError(
                    f"{_where(source, i, df.at[i, 'slide_id'])}: field {field!r} is missing or not a number "
                    f"({df.at[i, field]!r})"
                )
            if field == "survival_months" and v < 0:
                raise CohortError(f"{_where(source, i, df.at[i, 'slide_id'])}: field 'survival_months' is negative ({v})")
            if field == "censorship" and v not in (0, 1):
                raise CohortError(
                    f"{_where(source, i, df.at[i, 'slide_id'])}: field 'censorship' must be 0 (event) or 1 (censored), got {v}"
                )
        df[field] = values.astype(float)
    df["censorship"] = df["censorship"].astype(np.int64)
    patients = df.groupby("case_id", sort=True).agg(t=("survival_months", "first"), c=("censorship", "first"))
    # A patient's slides share one outcome; a disagreement is a data error, not a modelling choice.
    per_case = df.groupby("case_id")[["survival_months", "censorship"]].nunique()
    bad = per_case[(per_case > 1).any(axis=1)]
    if len(bad):
        cid = bad.index[0]
        i = int(np.flatnonzero((df["case_id"] == cid).to_numpy())[1])
        raise CohortError(
            f"{_where(source, i, df.at[i, 'slide_id'])}: fields 'survival_months'/'censorship' disagree with "
            f"another slide of case {cid!r}"
        )
    edges = survival_bin_edges(patients["t"].to_numpy(), patients["c"].to_numpy(), n_bins)
    df["time_bin"] = assign_time_bins(df["survival_months"].to_numpy(), edges)
    df["event"] = (1 - df["censorship"]).astype(np.int64)
    df.attrs["bin_edges"] = edges.tolist()
    return df


def survival_bin_edges(times: np.ndarray, censorship: np.ndarray, n_bins: int = 4) -> np.ndarray:
    """Quantile bin edges of the uncensored patients' times (MCAT/2DMamba practice).

    The outer edges are opened to 0 and +inf so every patient, censored ones included, falls in a bin.
    """
    times = np.asarray(times, dtype=float)
    uncensored = times[np.asarray(censorship) == 0]
    if len(uncensored) < n_bins:
        raise CohortError(
            f"survival binning needs at least {n_bins} uncensored patients for {n_bins} bins, got {len(uncensored)}"
        )
    edges = np.quantile(uncensored, np.linspace(0, 1, n_bins + 1))
    edges[0], edges[-1] = 0.0, np.inf
    if np.any(np.diff(edges) <= 0):
        raise CohortError(f"survival times give repeated quantile edges {edges.tolist()}; use fewer bins")
    return edges


def assign_time_bins(times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    inner = np.asarray(edges)[1:-1]
    return np.searchsorted(inner, np.asarray(times, dtype=float), side="right").astype(np.int64)


def check_in_store(df: pd.DataFrame, complete_slides: Iterable[str], source: str = "cohort") -> None:
    """Fail on the first slide that has no complete grid in the feature store."""
    have = set(map(str, complete_slides))
    for i, sid in enumerate(df["slide_id"]):
        if sid not in have:
            raise CohortError(
                f"{_where(source, i, sid)}: slide is missing from the feature store (not embedded, or its "
                "status is not 'complete'); run `gigamamba embed` or drop the row"
            )


def patient_table(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """One row per case_id with the stratum used for splitting (label, or event for survival)."""
    col = "y" if task == "classification" else "event"
    # A patient whose slides carry different labels is stratified by their most common one.
    strata = df.groupby("case_id", sort=True)[col].agg(lambda s: int(s.mode().iloc[0]))
    return pd.DataFrame({"case_id": strata.index.astype(str), "stratum": strata.to_numpy()})
