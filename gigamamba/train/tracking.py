"""MLflow layout (DESIGN.md): experiment = dataset, parent run = CV job, one nested child run per fold.

The driver owns the runs: it creates the parent and each fold's child exactly once, before any worker
starts, so a worker that dies and is restarted by Ray Train never creates a second run for its fold.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

KIND_TAG = "gigamamba.kind"  # "cv" on parents, "fold" on children


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            text = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
            out[key] = text[:6000]
    return out


def experiment_id(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # A local SQLite store would otherwise put artifacts in ./mlruns of whatever directory we run from.
    location = Path(artifact_root, name).resolve().as_uri() if artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another job
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def artifact_root_for(uri: str, run_dir: str) -> str | None:
    return str(Path(run_dir) / "mlartifacts") if uri.startswith("sqlite:") else None


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's per-request limit
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, step) for k, v in metrics.items() if _finite(v)]
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i : i + 1000])


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def create_child(client: MlflowClient, exp_id: str, parent_id: str, fold: int, tags: dict[str, str]) -> str:
    run = client.create_run(
        exp_id,
        run_name=f"fold{fold}",
        tags={**tags, "mlflow.parentRunId": parent_id, KIND_TAG: "fold", "fold": str(fold)},
    )
    return run.info.run_id


def fill_epoch_history(client: MlflowClient, run_id: str, history: list[dict]) -> None:
    """Log each epoch's metrics that live logging did not (a restart or a worker away from the store)."""
    logged: dict[str, set[int]] = {}
    keys = {k for rec in history for k in rec if k != "epoch"}
    for key in keys:
        logged[key] = {m.step for m in client.get_metric_history(run_id, key)}
    ts = int(time.time() * 1000)
    batch = []
    for rec in history:
        step = int(rec["epoch"])
        for k, v in rec.items():
            if k != "epoch" and _finite(v) and step not in logged.get(k, set()):
                batch.append(Metric(k, float(v), ts, step))
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i : i + 1000])
