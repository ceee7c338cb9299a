import numpy as np
import pandas as pd
import pytest

from gigamamba.cohorts import (
    CohortError, export_clam, export_survival, import_clam, import_survival, make_splits, read_cohort,
)


def _classification_cohort(n_patients=40, n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = f"c{p % n_classes}"
        for s in range(rng.integers(1, 4)):  # 1-3 slides per patient
            rows.append({"slide_id": f"p{p:03d}_s{s}", "case_id": f"p{p:03d}", "label": label})
    return read_cohort(pd.DataFrame(rows))


def _survival_cohort(n_patients=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        t, c = float(rng.uniform(1, 120)), int(rng.uniform() < 0.3)
        for s in range(rng.integers(1, 3)):
            rows.append({"slide_id": f"TCGA-AA-{p:04d}-01Z-00-DX{s + 1}", "survival_months": t, "censorship": c})
    return read_cohort(pd.DataFrame(rows), "survival")


def test_no_patient_on_two_sides_and_tests_partition():
    cohort = _classification_cohort()
    folds = make_splits(cohort, "classification", folds=5, seed=1)
    everyone = set(cohort["case_id"])
    test_union = []
    for f in folds:
        tr, va, te = set(f.train), set(f.val), set(f.test)
        assert not (tr & va) and not (tr & te) and not (va & te)
        assert tr | va | te == everyone
        assert len(va) > 0
        test_union += f.test
        # slide level: no slide of a patient crosses sides
        slides = {p: set(f.slides(cohort, p)["slide_id"]) for p in ("train", "val", "test")}
        assert sum(len(s) for s in slides.values()) == len(cohort)
    assert sorted(test_union) == sorted(everyone)


def test_stratified_by_label():
    cohort = _classification_cohort(n_patients=60, n_classes=3)
    per_patient = cohort.groupby("case_id")["y"].first()
    for f in make_splits(cohort, folds=5, seed=0):
        counts = per_patient.loc[f.test].value_counts()
        assert counts.min() == counts.max() == 4  # 20 patients per class / 5 folds
        val_counts = per_patient.loc[f.val].value_counts()
        assert len(val_counts) == 3


def test_survival_stratified_by_event():
    cohort = _survival_cohort(50)
    events = cohort.groupby("case_id")["event"].first()
    n_events = int(events.sum())
    for f in make_splits(cohort, "survival", folds=5, seed=0):
        assert abs(int(events.loc[f.test].sum()) - n_events / 5) <= 1
        assert all(c.startswith("TCGA-AA-") and len(c) == 12 for c in f.test)


def test_deterministic_by_seed():
    cohort = _classification_cohort()
    a = make_splits(cohort, folds=5, seed=3)
    b = make_splits(cohort.sample(frac=1.0, random_state=9), folds=5, seed=3)  # row order must not matter
    c = make_splits(cohort, folds=5, seed=4)
    assert [(f.train, f.val, f.test) for f in a] == [(f.train, f.val, f.test) for f in b]
    assert [f.test for f in a] != [f.test for f in c]


def test_class_with_fewer_patients_than_folds_fails_clearly():
    cohort = _classification_cohort(n_patients=30, n_classes=2)
    rows = cohort[["slide_id", "case_id", "label"]].to_dict("records")
    rows += [{"slide_id": f"rare{i}", "case_id": f"rare{i}", "label": "rare"} for i in range(3)]
    with pytest.raises(CohortError, match=r"class 'rare' has only 3 patient\(s\); need at least 5"):
        make_splits(read_cohort(pd.DataFrame(rows)), folds=5)
    with pytest.raises(CohortError, match="at least 2"):
        make_splits(cohort, folds=1)


def test_clam_round_trip(tmp_path):
    cohort = _classification_cohort()
    folds = make_splits(cohort, folds=4, seed=2)
    paths = export_clam(folds, cohort, tmp_path / "splits")
    assert [p.name for p in paths] == [f"splits_{k}.csv" for k in range(4)]
    raw = pd.read_csv(paths[0], dtype=str)
    assert {"train", "val", "test"} <= set(raw.columns)
    assert set(raw["test"].dropna()) == set(folds[0].slides(cohort, "test")["slide_id"])
    back = import_clam(tmp_path / "splits", cohort)
    assert [(f.k, f.train, f.val, f.test) for f in back] == [(f.k, f.train, f.val, f.test) for f in folds]


def test_clam_import_refuses_unknown_slide_and_cut_patient(tmp_path):
    cohort = _classification_cohort()
    d = tmp_path / "s"
    d.mkdir()
    pd.DataFrame({"train": ["p000_s0", "zzz"], "val": ["p001_s0", None], "test": ["p002_s0", None]}).to_csv(d / "splits_0.csv")
    with pytest.raises(CohortError, match="'zzz'"):
        import_clam(d, cohort)
    multi = cohort.groupby("case_id")["slide_id"].apply(list)
    case = next(c for c, s in multi.items() if len(s) > 1)
    s0, s1 = multi[case][:2]
    pd.DataFrame({"train": [s0], "val": [None], "test": [s1]}).to_csv(d / "splits_0.csv")
    with pytest.raises(CohortError, match="both train and test"):
        import_clam(d, cohort)


def test_survival_round_trip(tmp_path):
    cohort = _survival_cohort()
    folds = make_splits(cohort, "survival", folds=5, seed=7)
    export_survival(folds, tmp_path / "surv")
    raw = pd.read_csv(tmp_path / "surv" / "splits_2.csv", dtype=str)
    assert set(raw["val"].dropna()) == set(folds[2].test)  # MambaMIL/MCAT: val column = held-out fold
    assert set(raw["train"].dropna()) == set(folds[2].train) | set(folds[2].val)
    back = import_survival(tmp_path / "surv", cohort, seed=7)
    assert [(f.train, f.val, f.test) for f in back] == [(f.train, f.val, f.test) for f in folds]
