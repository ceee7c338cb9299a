from pathlib import Path

import pytest
import yaml

from gigamamba.cli import main
from gigamamba.commands.demo import DEMO, cohort_spec
from gigamamba.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def test_demo_yaml_mirrors_embedded_defaults():
    spec = load_spec(ROOT / "pipelines" / "demo.yaml")
    assert spec["encoder"] == {**spec["encoder"], **DEMO["encoder"]}
    for key, value in DEMO["train"].items():
        assert spec["train"][key] == value, key
    for key, value in DEMO["cv"].items():
        assert spec["cv"][key] == value, key
    assert spec["model"]["kwargs"] == DEMO["model_kwargs"]
    assert spec["ingest"]["tissue"] == DEMO["ingest"]["tissue"]
    assert cohort_spec(ROOT, "spatial", 2, 5, 5)["ingest"]["tissue"] == DEMO["ingest"]["tissue"]
    # Paths point into ./gigamamba-demo at the repository root, which git ignores.
    assert Path(spec["cohort"]["csv"]) == ROOT / "gigamamba-demo" / "spatial" / "cohort.csv"
    assert "/gigamamba-demo/" in (ROOT / ".gitignore").read_text()


def test_demo_specs_share_one_store(tmp_path):
    a = cohort_spec(tmp_path, "classification", 2, 5, 5)
    b = cohort_spec(tmp_path, "spatial", 2, 5, 5)
    assert a["tracking"]["uri"] == b["tracking"]["uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert a["store"] != b["store"] and a["dataset"] != b["dataset"]


@pytest.mark.slow
def test_demo_end_to_end_small(ray_local, tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--slides", "10", "--folds", "2", "--epochs", "1",
               "--cohort", "spatial", "--model", "abmil", "--concurrent-folds", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "## demo-spatial" in text and "| abmil | 2 |" in text
    assert f"gigamamba ui --run-dir {out}" in text
    assert (out / "mlflow.db").is_file() and (out / "report" / "report.png").is_file()
    assert len(list((out / "spatial" / "slides").iterdir())) == 10
