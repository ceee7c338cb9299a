"""`gigamamba report` against a real MLflow SQLite store laid out as DESIGN.md says (parent + nested folds)."""

import pandas as pd
import pytest
from mlflow import MlflowClient

from gigamamba.cli import main
from gigamamba.train import tracking
from gigamamba.train.report import collect, write_report


def _cv_run(client, exp_id, model, aucs, start_offset=0):
    parent = client.create_run(exp_id, tags={"model": model, "encoder": "toy", "dataset": "d", tracking.KIND_TAG: "cv"},
                               start_time=1_000_000 + start_offset)
    pid = parent.info.run_id
    for k, auc in enumerate(aucs):
        cid = tracking.create_child(client, exp_id, pid, k, {"model": model})
        tracking.log_metrics(client, cid, {"test_auc": auc})
        client.set_terminated(cid)
    mean = sum(aucs) / len(aucs)
    std = pd.Series(aucs).std()
    tracking.log_metrics(client, pid, {"test_auc_mean": mean, "test_auc_std": std, "best_val_auc_mean": 0.1})
    client.set_terminated(pid)
    return pid


def test_report_tables_and_chart(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    a = tracking.experiment_id(client, "cohort-a", str(tmp_path / "mlartifacts"))
    b = tracking.experiment_id(client, "cohort-b", str(tmp_path / "mlartifacts"))
    _cv_run(client, a, "abmil", [0.5, 0.6, 0.7], start_offset=0)
    _cv_run(client, a, "abmil", [0.9, 0.9, 0.9], start_offset=-500)  # older run of the same pair: ignored
    _cv_run(client, a, "mamba2d", [0.9, 1.0, 0.95])
    _cv_run(client, b, "mamba2d", [0.8, 0.8])
    failed = client.create_run(b, tags={"model": "abmil", tracking.KIND_TAG: "cv"})
    client.set_terminated(failed.info.run_id, "FAILED")

    df = collect(uri)
    row = df[(df["dataset"] == "cohort-a") & (df["model"] == "abmil")].iloc[0]
    assert row["mean"] == pytest.approx(0.6) and row["std"] == pytest.approx(0.1) and row["n_folds"] == 3
    assert set(df["metric"]) == {"auc"}  # validation summaries are not test results
    assert not ((df["dataset"] == "cohort-b") & (df["model"] == "abmil")).any()  # failed runs are left out

    paths = write_report(uri, tmp_path / "report")
    md = paths["markdown"].read_text()
    assert "## cohort-a" in md and "| abmil | 3 | 0.600 ± 0.100 |" in md and "| mamba2d | 3 | 0.950 ± 0.050 |" in md
    csv = pd.read_csv(paths["csv"])
    assert len(csv) == 3
    assert paths["png"].stat().st_size > 1000

    # The command reads the same store from a run directory.
    assert main(["report", "--run-dir", str(tmp_path), "--out", str(tmp_path / "r2")]) == 0
    assert (tmp_path / "r2" / "report.md").read_text() == md


def test_report_and_ui_need_a_store(tmp_path, capsys):
    assert main(["report", "--run-dir", str(tmp_path)]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    (tmp_path / "mlflow.db").touch()
    assert main(["ui", "--run-dir", str(tmp_path), "--dry-run", "--port", "5077"]) == 0
    out = capsys.readouterr().out
    assert "--host 127.0.0.1" in out and "--port 5077" in out and f"sqlite:///{tmp_path / 'mlflow.db'}" in out
