import numpy as np
import pandas as pd
import pytest

from gigamamba.cohorts import CohortError, case_id_from_barcode, check_in_store, read_cohort, survival_bin_edges


def _write(tmp_path, rows, name="cohort.csv"):
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_tcga_barcode_gives_case_id(tmp_path):
    assert case_id_from_barcode("TCGA-05-4244-01Z-00-DX1.d4ff32cd") == "TCGA-05-4244"
    assert case_id_from_barcode("slide_7") is None
    path = _write(tmp_path, [{"slide_id": "TCGA-AB-1234-01Z-00-DX1", "label": "LUAD"},
                             {"slide_id": "TCGA-AB-1234-01Z-00-DX2", "label": "LUAD"},
                             {"slide_id": "TCGA-CD-5678-01Z-00-DX1", "label": "LUSC"}])
    df = read_cohort(path, "classification", {"LUAD": 0, "LUSC": 1})
    assert df["case_id"].tolist() == ["TCGA-AB-1234", "TCGA-AB-1234", "TCGA-CD-5678"]
    assert df["y"].tolist() == [0, 0, 1]


def test_slide_id_read_as_string(tmp_path):
    path = _write(tmp_path, [{"slide_id": "007", "case_id": "p1", "label": "a"},
                             {"slide_id": "008", "case_id": "p2", "label": "b"}])
    df = read_cohort(path)
    assert df["slide_id"].tolist() == ["007", "008"]


def test_missing_columns_named(tmp_path):
    path = _write(tmp_path, [{"slide_id": "s1", "case_id": "p1"}])
    with pytest.raises(CohortError, match=r"missing column\(s\) \['label'\]"):
        read_cohort(path)
    with pytest.raises(CohortError, match="survival_months"):
        read_cohort(path, "survival")


def test_unknown_label_names_line_and_field(tmp_path):
    path = _write(tmp_path, [{"slide_id": "s1", "case_id": "p1", "label": "LUAD"},
                             {"slide_id": "s2", "case_id": "p2", "label": "LUXX"}])
    with pytest.raises(CohortError, match=r"line 3 \(slide_id 's2'\): field 'label' has unknown label 'LUXX'"):
        read_cohort(path, "classification", {"LUAD": 0, "LUSC": 1})


def test_missing_case_id_without_barcode(tmp_path):
    path = _write(tmp_path, [{"slide_id": "s1", "label": "a"}])
    with pytest.raises(CohortError, match=r"line 2 .*'case_id' is empty"):
        read_cohort(path)


@pytest.mark.parametrize("value,pattern", [(np.nan, "missing or not a number"), (-3.0, "negative"), ("abc", "not a number")])
def test_bad_survival_time(tmp_path, value, pattern):
    rows = [{"slide_id": f"s{i}", "case_id": f"p{i}", "survival_months": 10.0 + i, "censorship": 0} for i in range(6)]
    rows[4]["survival_months"] = value
    path = _write(tmp_path, rows)
    with pytest.raises(CohortError, match=rf"line 6 \(slide_id 's4'\): field 'survival_months'.*{pattern}"):
        read_cohort(path, "survival")


def test_bad_censorship(tmp_path):
    rows = [{"slide_id": f"s{i}", "case_id": f"p{i}", "survival_months": 10.0 + i, "censorship": 0} for i in range(6)]
    rows[1]["censorship"] = 2
    with pytest.raises(CohortError, match=r"line 3 .*'censorship' must be 0"):
        read_cohort(_write(tmp_path, rows), "survival")


def test_survival_bins_from_uncensored_patients(tmp_path):
    rng = np.random.default_rng(0)
    times = rng.uniform(1, 100, 40)
    cens = (rng.uniform(size=40) < 0.4).astype(int)
    rows = [{"slide_id": f"s{i}", "case_id": f"p{i}", "survival_months": t, "censorship": c}
            for i, (t, c) in enumerate(zip(times, cens))]
    df = read_cohort(_write(tmp_path, rows), "survival", n_bins=4)
    edges = survival_bin_edges(times, cens, 4)
    expected_inner = np.quantile(times[cens == 0], [0.25, 0.5, 0.75])
    np.testing.assert_allclose(edges[1:-1], expected_inner)
    # Uncensored patients fall evenly into the 4 bins (quantiles of exactly them).
    counts = np.bincount(df.loc[df["censorship"] == 0, "time_bin"], minlength=4)
    assert counts.min() >= (cens == 0).sum() // 4 - 1
    assert set(df["time_bin"]) <= {0, 1, 2, 3}
    assert (df["event"] == 1 - df["censorship"]).all()


def test_slide_missing_from_store(tmp_path):
    path = _write(tmp_path, [{"slide_id": "s1", "case_id": "p1", "label": "a"},
                             {"slide_id": "s2", "case_id": "p2", "label": "b"}])
    df = read_cohort(path)
    check_in_store(df, ["s1", "s2", "s3"])
    with pytest.raises(CohortError, match=r"line 3 \(slide_id 's2'\): slide is missing from the feature store"):
        check_in_store(df, ["s1"], str(path))


def test_duplicate_slide(tmp_path):
    path = _write(tmp_path, [{"slide_id": "s1", "case_id": "p1", "label": "a"},
                             {"slide_id": "s1", "case_id": "p2", "label": "b"}])
    with pytest.raises(CohortError, match="line 3.*repeats"):
        read_cohort(path)
