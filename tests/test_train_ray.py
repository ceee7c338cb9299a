"""Real Ray Train folds (CPU workers, gloo) logging into a real MLflow SQLite store."""

from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from gigamamba.spec import resolve_spec
from gigamamba.train.cv import run_cv
from gigamamba.train.toy import write_toy_cohort

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    csv, store = write_toy_cohort(root / "data", "classification", n_slides=16, dim=8, grid=5)
    return root, csv, store


def _spec(root: Path, csv, store, name, **train):
    raw = {
        "name": name, "dataset": "toy-cls", "cohort": {"csv": str(csv)}, "store": str(store),
        "run_dir": str(root / name), "model": {"name": "abmil", "kwargs": {"d_model": 16, "attn_hidden": 16}},
        "train": {"epochs": 3, "lr": 1e-2, "accum_steps": 2, "patience": 0, "min_epochs": 0, "num_workers": 2,
                  "torch_threads": 1, "attention_slides": 2, **train},
        "cv": {"folds": 4, "seed": 0, "only_folds": [0]},
    }
    return resolve_spec(raw, root, name)


def _children(client, parent_id):
    return client.search_runs(
        [client.get_run(parent_id).info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )


def test_two_worker_folds_nested_mlflow_and_separate_checkpoints(ray_local, toy, tmp_path):
    root, csv, store = toy
    spec = _spec(root, csv, store, "cv2", epochs=2)
    spec["cv"].update(only_folds=[0, 1], max_concurrent_folds=2)
    out = run_cv(spec, progress=False)
    client = MlflowClient(spec["tracking"]["uri"])
    assert spec["tracking"]["uri"].startswith("sqlite:///")
    parent = client.get_run(out["parent_run_id"])
    assert client.get_experiment(parent.info.experiment_id).name == "toy-cls"
    tags = parent.data.tags
    assert tags["model"] == "abmil" and tags["encoder"] == "toy" and tags["dataset"] == "toy-cls"
    assert len(tags["git_commit"]) >= 7
    assert parent.data.params["train.lr"] == "0.01" and parent.data.params["cv.folds"] == "4"
    for metric in ("auc", "f1", "acc", "bacc"):
        assert f"test_{metric}_mean" in parent.data.metrics and f"test_{metric}_std" in parent.data.metrics
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"spec.yaml", "splits.csv", "splits_clam", "predictions_all_folds.parquet"} <= parent_files

    children = _children(client, parent.info.run_id)
    assert sorted(c.data.tags["fold"] for c in children) == ["0", "1"]
    for child in children:
        assert child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_auc")]
        assert sorted(steps) == [0, 1]  # once per epoch, never twice
        assert "test_auc" in child.data.metrics and child.data.metrics["restarts"] == 0
        files = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert "predictions.parquet" in files and "plots" in files and "heatmaps" in files
        dst = tmp_path / child.info.run_id  # MLflow would leave a temp folder per download without one
        dst.mkdir()
        pred = pd.read_parquet(client.download_artifacts(child.info.run_id, "predictions.parquet", dst_path=str(dst)))
        assert set(pred["part"]) == {"val", "test"}
        assert pred["prob_0"].add(pred["prob_1"]).round(5).eq(1).all()
        heatmaps = client.list_artifacts(child.info.run_id, "heatmaps")
        assert len(heatmaps) == 2 and all(h.path.endswith(".png") for h in heatmaps)
    # The mean over folds on the parent is the mean of the children's test metrics.
    aucs = [c.data.metrics["test_auc"] for c in children]
    assert parent.data.metrics["test_auc_mean"] == pytest.approx(sum(aucs) / 2)

    # Each fold has its own Ray Train run and checkpoints; no directory is shared.
    runs = sorted(p for p in (Path(spec["run_dir"]) / "ray_results").iterdir() if p.is_dir())
    fold_runs = [p for p in runs if p.name.endswith(("-fold0", "-fold1"))]
    assert len(fold_runs) == 2
    ckpts = [{c.name for c in r.glob("checkpoint_*")} for r in fold_runs]
    assert all(ckpts) and not (ckpts[0] & ckpts[1] and fold_runs[0] == fold_runs[1])
    assert fold_runs[0] != fold_runs[1]


def test_worker_fault_resumes_from_checkpoint_and_logs_once(ray_local, toy, tmp_path):
    root, csv, store = toy
    marker = tmp_path / "fault-marker"
    spec = _spec(root, csv, store, "fault", epochs=2, fault={"rank": 1, "epoch": 1, "marker": str(marker)})
    out = run_cv(spec, progress=False)
    assert marker.exists()  # rank 1 did raise at epoch 1, after epoch 0's checkpoint
    client = MlflowClient(spec["tracking"]["uri"])
    children = _children(client, out["parent_run_id"])
    assert len(children) == 1  # the restarted fold is one run
    child = children[0]
    assert child.data.metrics["restarts"] == 1  # resumed from a checkpoint, not from scratch
    assert child.data.metrics["epochs_run"] == 2
    for key in ("val_auc", "train_loss"):
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, key))
        assert steps == [0, 1], key
    assert client.get_run(out["parent_run_id"]).info.status == "FINISHED"


def test_survival_fold_logs_c_index_and_km_plot(ray_local, tmp_path):
    csv, store = write_toy_cohort(tmp_path / "surv", "survival", n_slides=20, dim=8, grid=5)
    raw = {
        "name": "surv", "dataset": "toy-surv", "task": "survival", "cohort": {"csv": str(csv)}, "store": str(store),
        "run_dir": str(tmp_path / "run"), "model": {"name": "abmil", "kwargs": {"d_model": 16, "attn_hidden": 16}},
        "train": {"epochs": 2, "lr": 1e-2, "patience": 0, "min_epochs": 0, "num_workers": 1, "torch_threads": 1,
                  "attention_slides": 1},
        "cv": {"folds": 3, "only_folds": [2]},
    }
    spec = resolve_spec(raw, tmp_path, "surv")
    out = run_cv(spec, progress=False)
    client = MlflowClient(spec["tracking"]["uri"])
    parent = client.get_run(out["parent_run_id"])
    assert 0.0 <= parent.data.metrics["test_c_index_mean"] <= 1.0
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "splits_survival")} == {
        "splits_survival/splits_2.csv"}
    (child,) = _children(client, parent.info.run_id)
    assert [m.step for m in client.get_metric_history(child.info.run_id, "val_c_index")] == [0, 1]
    assert {a.path for a in client.list_artifacts(child.info.run_id, "plots")} == {"plots/km_test.png"}
    pred = pd.read_parquet(client.download_artifacts(child.info.run_id, "predictions.parquet", dst_path=str(tmp_path)))
    assert {"risk", "survival_months", "event"} <= set(pred.columns)


def test_transmil_fold_trains_under_ddp_and_logs_heatmaps(ray_local, toy):
    """TransMIL through the real path: two DDP ranks (gloo), attention heatmaps from its class token."""
    root, csv, store = toy
    spec = _spec(root, csv, store, "tmil", epochs=2)
    spec["model"] = {"name": "transmil", "kwargs": {"d_model": 16, "n_heads": 2, "n_landmarks": 8}}
    out = run_cv(spec, progress=False)
    client = MlflowClient(spec["tracking"]["uri"])
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["model"] == "transmil"
    assert 0.0 <= parent.data.metrics["test_auc_mean"] <= 1.0
    (child,) = _children(client, parent.info.run_id)
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "train_loss")) == [0, 1]
    heatmaps = {a.path for a in client.list_artifacts(child.info.run_id, "heatmaps")}
    assert len(heatmaps) == 2 and all(p.endswith(".png") for p in heatmaps)
