"""`gigamamba train` refuses bad input with one line naming the file, row and field (before starting Ray)."""

import pandas as pd

from gigamamba.cli import main
from gigamamba.train.toy import write_toy_cohort


def _spec(tmp_path, csv, store, dataset="toy"):
    path = tmp_path / "job.yaml"
    path.write_text(f"name: job\ndataset: {dataset}\ncohort: {{csv: {csv}}}\nstore: {store}\nrun_dir: {tmp_path}/run\n")
    return path


def test_unknown_label_for_registry_dataset(tmp_path, capsys):
    csv, store = write_toy_cohort(tmp_path / "d", "classification", n_slides=4, dim=4, grid=3)
    df = pd.read_csv(csv)
    df["label"] = ["LUAD", "LUSC", "LUAD", "LUSQ"]
    df.to_csv(csv, index=False)
    assert main(["train", str(_spec(tmp_path, csv, store, "tcga-nsclc"))]) == 2
    err = capsys.readouterr().err
    assert "line 5 (slide_id 'clas003'): field 'label' has unknown label 'LUSQ'" in err


def test_slide_missing_from_store(tmp_path, capsys):
    csv, store = write_toy_cohort(tmp_path / "d", "classification", n_slides=10, dim=4, grid=3)
    df = pd.read_csv(csv)
    df.loc[len(df)] = {"slide_id": "ghost", "case_id": "case999", "label": 1}
    df.to_csv(csv, index=False)
    assert main(["train", str(_spec(tmp_path, csv, store))]) == 2
    assert "line 12 (slide_id 'ghost'): slide is missing from the feature store" in capsys.readouterr().err


def test_too_few_patients_for_folds(tmp_path, capsys):
    csv, store = write_toy_cohort(tmp_path / "d", "classification", n_slides=6, dim=4, grid=3)
    assert main(["train", str(_spec(tmp_path, csv, store)), "--folds", "5"]) == 2
    assert "has only 3 patient(s); need at least 5" in capsys.readouterr().err
