"""Reading a cohort for ingest: paths, overrides and row-level rejections (no Ray needed)."""

import pandas as pd
import pytest

from gigamamba.ingest.plan import CohortFileError, plan_slide, read_slide_jobs
from gigamamba.slides.reader import SlideError


def test_paths_case_ids_and_overrides(tmp_path):
    (tmp_path / "slides").mkdir()
    (tmp_path / "TCGA-AB-1234-01Z-00-DX1.svs").write_bytes(b"")
    pd.DataFrame({"slide_id": ["TCGA-AB-1234-01Z-00-DX1", "S2", "007"], "slide_path": [None, "slides/s2.tif", None],
                  "mpp": [None, 0.25, None]}).to_csv(tmp_path / "c.csv", index=False)
    jobs, rejected = read_slide_jobs(tmp_path / "c.csv")
    assert rejected == []
    by_id = {j.slide_id: j for j in jobs}
    assert set(by_id) == {"TCGA-AB-1234-01Z-00-DX1", "S2", "007"}  # ids stay strings ("007", not 7)
    tcga = by_id["TCGA-AB-1234-01Z-00-DX1"]
    assert tcga.case_id == "TCGA-AB-1234" and tcga.path == str(tmp_path / "TCGA-AB-1234-01Z-00-DX1.svs")
    assert by_id["S2"].path == str(tmp_path / "slides" / "s2.tif") and by_id["S2"].mpp == 0.25
    assert by_id["007"].mpp is None and by_id["007"].line == 4


def test_rows_are_rejected_one_by_one(tmp_path):
    pd.DataFrame({"slide_id": ["A", "../x", "B", "A", "C"], "case_id": ["1", "2", "3", "4", "5"],
                  "mpp": ["", "", "fast", "", ""]}).to_csv(tmp_path / "c.csv", index=False)
    jobs, rejected = read_slide_jobs(tmp_path / "c.csv", slide_dir=tmp_path / "elsewhere")
    assert [j.slide_id for j in jobs] == ["C"] and jobs[0].path.startswith(str(tmp_path / "elsewhere"))
    errors = {r["slide_id"]: r["error"] for r in rejected}
    assert set(errors) == {"A", "../x", "B"} and all(r["status"] == "failed" for r in rejected)
    assert "lines [2, 5]" in errors["A"] and "escape" in errors["../x"] and "line 3" in errors["../x"]
    assert "not a number" in errors["B"]


def test_unusable_cohort_files(tmp_path):
    with pytest.raises(CohortFileError, match="does not exist"):
        read_slide_jobs(tmp_path / "none.csv")
    pd.DataFrame({"slide": ["a"]}).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(CohortFileError, match="no slide_id column"):
        read_slide_jobs(tmp_path / "c.csv")


def test_plan_of_a_missing_file_names_slide_and_path(tmp_path):
    pd.DataFrame({"slide_id": ["gone"]}).to_csv(tmp_path / "c.csv", index=False)
    jobs, _ = read_slide_jobs(tmp_path / "c.csv")
    with pytest.raises(SlideError, match=r"slide gone: file .*gone\.svs does not exist"):
        plan_slide(jobs[0], {"patch_px": 256, "target_mpp": 0.5, "tissue_threshold": 0.25})
