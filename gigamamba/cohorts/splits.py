"""Patient-level k-fold splits: make them, check them, import and export the common CSV formats.

A split is made on patients (case_id), never on slides, so a patient is never on two sides.
Fold k's test set is the k-th stratified fold; its validation set is carved, stratified, from the
remaining training patients. Everything is deterministic by seed.

Formats:
- CLAM `splits_{k}.csv`: an unnamed index column plus `train`, `val`, `test` columns of slide_ids,
  padded with blanks to the longest column.
- MambaMIL / 2DMamba / MCAT survival `splits_{k}.csv`: `train`, `val` columns of case_ids, where
  `val` is the held-out fold (reported as test). On import our validation set is carved from `train`
  with the same seed, so an export followed by an import gives back the same split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

from gigamamba.cohorts.cohort import CohortError, patient_table

PARTS = ("train", "val", "test")


@dataclass
class Fold:
    """One fold's patients (case_ids), each list sorted."""

    k: int
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)

    def part(self, name: str) -> list[str]:
        return getattr(self, name)

    def slides(self, cohort: pd.DataFrame, name: str) -> pd.DataFrame:
        """The cohort rows (slides) of one part."""
        return cohort[cohort["case_id"].isin(set(self.part(name)))]


def make_splits(
    cohort: pd.DataFrame, task: str = "classification", folds: int = 5, seed: int = 0, val_fraction: float = 0.15
) -> list[Fold]:
    """Stratified, patient-grouped k folds; fold k tests on the k-th fold."""
    if folds < 2:
        raise CohortError(f"cv.folds must be at least 2, got {folds}")
    patients = patient_table(cohort, task)
    counts = patients["stratum"].value_counts().sort_index()
    what = "class" if task == "classification" else "event group"
    for stratum, n in counts.items():
        if n < folds:
            name = _stratum_name(cohort, task, stratum)
            raise CohortError(
                f"cannot make {folds} stratified folds: {what} {name} has only {n} patient(s); "
                f"need at least {folds} (use fewer folds or more patients)"
            )
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    ids = patients["case_id"].to_numpy()
    strata = patients["stratum"].to_numpy()
    out = []
    for k, (train_idx, test_idx) in enumerate(skf.split(ids, strata)):
        train, val = carve_val(ids[train_idx], strata[train_idx], val_fraction, seed + k, fold=k)
        out.append(Fold(k, sorted(train), sorted(val), sorted(ids[test_idx].tolist())))
    check_splits(out)
    return out


def _stratum_name(cohort: pd.DataFrame, task: str, stratum) -> str:
    if task == "classification" and "label" in cohort.columns:
        labels = cohort.loc[cohort["y"] == stratum, "label"]
        if len(labels):
            return repr(labels.iloc[0])
    return repr("event" if stratum == 1 else "censored") if task == "survival" else repr(stratum)


def carve_val(ids, strata, fraction: float, seed: int, fold: int = 0) -> tuple[list[str], list[str]]:
    """Split training patients into train and validation, stratified; returns (train, val)."""
    # Sorting first makes the carve independent of the order the patients came in.
    order = np.argsort(np.asarray(ids, dtype=str), kind="stable")
    ids, strata = np.asarray(ids, dtype=str)[order], np.asarray(strata)[order]
    n_classes = len(np.unique(strata))
    n_val = max(n_classes, int(round(fraction * len(ids))))
    if n_val >= len(ids) or np.min(np.unique(strata, return_counts=True)[1]) < 2:
        raise CohortError(
            f"fold {fold}: cannot carve a stratified validation set from {len(ids)} training patients "
            f"({n_classes} strata, smallest has {np.min(np.unique(strata, return_counts=True)[1])}); "
            "every class needs at least 2 training patients"
        )
    train, val = train_test_split(ids, test_size=n_val, stratify=strata, random_state=seed)
    return train.tolist(), val.tolist()


def check_splits(folds: list[Fold]) -> None:
    """Invariants: within a fold no patient is on two sides; across folds the test sets partition."""
    seen_test: dict[str, int] = {}
    for f in folds:
        sides = {p: set(f.part(p)) for p in PARTS}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            both = sides[a] & sides[b]
            if both:
                raise CohortError(f"fold {f.k}: case {sorted(both)[0]!r} is in both {a} and {b}")
        for cid in sides["test"]:
            if cid in seen_test:
                raise CohortError(f"case {cid!r} is in the test set of folds {seen_test[cid]} and {f.k}")
            seen_test[cid] = f.k


def splits_frame(folds: list[Fold]) -> pd.DataFrame:
    """Long format (fold, part, case_id): our own splits artifact."""
    rows = [(f.k, p, cid) for f in folds for p in PARTS for cid in f.part(p)]
    return pd.DataFrame(rows, columns=["fold", "part", "case_id"])


def folds_from_frame(frame: pd.DataFrame) -> list[Fold]:
    out = []
    for k in sorted(frame["fold"].unique()):
        sub = frame[frame["fold"] == k]
        out.append(Fold(int(k), *[sorted(sub.loc[sub["part"] == p, "case_id"].astype(str)) for p in PARTS]))
    return out


# ---- CLAM: splits_{k}.csv with train/val/test columns of slide_ids -------------------------------------------------


def _padded_columns(columns: dict[str, list[str]]) -> pd.DataFrame:
    n = max((len(v) for v in columns.values()), default=0)
    return pd.DataFrame({k: list(v) + [None] * (n - len(v)) for k, v in columns.items()})


def export_clam(folds: list[Fold], cohort: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in folds:
        cols = {p: sorted(f.slides(cohort, p)["slide_id"].astype(str)) for p in PARTS}
        path = out_dir / f"splits_{f.k}.csv"
        _padded_columns(cols).to_csv(path)
        paths.append(path)
    return paths


def _read_columns(path: Path, wanted: tuple[str, ...]) -> dict[str, list[str]]:
    df = pd.read_csv(path, dtype=str)
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise CohortError(f"{path}: missing column(s) {missing}; has {list(df.columns)}")
    return {c: [v.strip() for v in df[c].dropna() if v.strip()] for c in wanted}


def _split_files(split_dir: str | Path) -> list[tuple[int, Path]]:
    split_dir = Path(split_dir)
    found = []
    for p in split_dir.glob("splits_*.csv"):
        stem = p.stem.split("_", 1)[1]
        if stem.isdigit():
            found.append((int(stem), p))
    if not found:
        raise CohortError(f"{split_dir}: no splits_<k>.csv files")
    return sorted(found)


def import_clam(split_dir: str | Path, cohort: pd.DataFrame) -> list[Fold]:
    """CLAM splits name slides; we map them to patients and refuse splits that cut a patient."""
    slide_case = dict(zip(cohort["slide_id"].astype(str), cohort["case_id"].astype(str)))
    folds = []
    for k, path in _split_files(split_dir):
        cols = _read_columns(path, PARTS)
        parts = {}
        for p in PARTS:
            cases = set()
            for sid in cols[p]:
                if sid not in slide_case:
                    raise CohortError(f"{path}: column {p!r} names slide {sid!r}, which is not in the cohort")
                cases.add(slide_case[sid])
            parts[p] = sorted(cases)
        fold = Fold(k, parts["train"], parts["val"], parts["test"])
        check_splits([fold])
        folds.append(fold)
    return folds


# ---- MambaMIL / 2DMamba / MCAT survival: splits_{k}.csv with train/val columns of case_ids ----------------------


def export_survival(folds: list[Fold], out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in folds:
        path = out_dir / f"splits_{f.k}.csv"
        _padded_columns({"train": sorted(f.train + f.val), "val": f.test}).to_csv(path)
        paths.append(path)
    return paths


def import_survival(
    split_dir: str | Path, cohort: pd.DataFrame, task: str = "survival", seed: int = 0, val_fraction: float = 0.15
) -> list[Fold]:
    known = set(cohort["case_id"].astype(str))
    strata = patient_table(cohort, task).set_index("case_id")["stratum"]
    folds = []
    for k, path in _split_files(split_dir):
        cols = _read_columns(path, ("train", "val"))
        for p in ("train", "val"):
            for cid in cols[p]:
                if cid not in known:
                    raise CohortError(f"{path}: column {p!r} names case {cid!r}, which is not in the cohort")
        train_all = sorted(set(cols["train"]))
        train, val = carve_val(train_all, strata.loc[train_all].to_numpy(), val_fraction, seed + k, fold=k)
        fold = Fold(k, sorted(train), sorted(val), sorted(set(cols["val"])))
        check_splits([fold])
        folds.append(fold)
    check_splits(folds)
    return folds


def load_splits(cv: dict, cohort: pd.DataFrame, task: str) -> list[Fold]:
    """Splits from the spec's `cv` section: imported when `cv.splits_dir` is set, made otherwise."""
    seed, frac = int(cv.get("seed", 0)), float(cv.get("val_fraction", 0.15))
    split_dir = cv.get("splits_dir")
    if split_dir:
        fmt = cv.get("splits_format") or ("survival" if task == "survival" else "clam")
        if fmt == "clam":
            return import_clam(split_dir, cohort)
        if fmt == "survival":
            return import_survival(split_dir, cohort, task, seed, frac)
        raise CohortError(f"cv.splits_format must be clam or survival, got {fmt!r}")
    return make_splits(cohort, task, int(cv.get("folds", 5)), seed, frac)
