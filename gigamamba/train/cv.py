"""k-fold cross-validation: one Ray Train `TorchTrainer` per fold, MLflow runs owned by the driver.

    cohort CSV ─► validate ─► patient-level folds ─► for each fold: TorchTrainer(train_fold) ─► MLflow child
                                                                                         └─► parent: mean ± std

Each fold's Ray Train run has its own name (`<job>-<parent run id>-fold<k>`) under the run directory,
so a fold never resumes from another fold's checkpoint, while a worker that died inside a fold is
restarted by `FailureConfig` from that fold's last checkpoint.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from gigamamba.cluster.shared_state import check_when_multinode
from gigamamba.cohorts import (
    check_in_store,
    export_clam,
    export_survival,
    get_dataset,
    load_splits,
    read_cohort,
    splits_frame,
)
from gigamamba.train import tracking
from gigamamba.train.data import complete_slides, feature_dim, open_store, training_stats
from gigamamba.train.loop import DEFAULT_MONITOR, train_fold
from gigamamba.train.metrics import mean_std, metric_names

SLIDE_COLUMNS = ["slide_id", "case_id", "label", "y", "survival_months", "censorship", "event", "time_bin"]


def prepare_cohort(spec: dict) -> tuple[pd.DataFrame, dict]:
    """Validated cohort with targets, and the label information the run needs."""
    info = get_dataset(spec.get("dataset"))
    task = spec["task"]
    label_map = info.labels if info and info.task == "classification" and info.labels else None
    n_bins = info.n_bins if info and info.task == "survival" else int(spec["train"].get("n_bins", 4))
    cohort = read_cohort(spec["cohort"]["csv"], task, label_map, n_bins)
    if task == "classification":
        if info and info.class_names:
            class_names = list(info.class_names)
        else:
            by_index = cohort.groupby("y")["label"].first()
            class_names = [str(by_index.get(i, i)) for i in range(int(cohort["y"].max()) + 1)]
        n_classes = len(class_names)
    else:
        class_names, n_classes = [], n_bins
    meta = {"task": task, "n_classes": n_classes, "class_names": class_names, "bin_edges": cohort.attrs.get("bin_edges")}
    return cohort, meta


def _use_gpu(setting) -> bool:
    if isinstance(setting, bool):
        return setting
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def _ensure_ray(spec: dict) -> None:
    from gigamamba.cluster.ray_start import init_ray

    init_ray(spec.get("ray"), include_dashboard=False, ignore_reinit_error=True)


def fold_config(spec: dict, meta: dict, cohort: pd.DataFrame, fold, in_dim: int, tracking_info: dict) -> dict:
    cols = [c for c in SLIDE_COLUMNS if c in cohort.columns]
    slides = {p: fold.slides(cohort, p)[cols].to_dict(orient="list") for p in ("train", "val", "test")}
    return {
        "task": spec["task"],
        "fold": int(fold.k),
        "seed": int(spec["cv"].get("seed", 0)),
        "store": spec["store"],
        "in_dim": int(in_dim),
        "n_classes": int(meta["n_classes"]),
        "model": {"name": spec["model"]["name"], "kwargs": dict(spec["model"].get("kwargs") or {})},
        "train": dict(spec["train"]),
        "slides": slides,
        "tracking": tracking_info,
        "fault": spec["train"].get("fault"),
        "norm": training_stats(spec["store"], slides["train"]["slide_id"]) if spec["train"].get("normalize", True) else None,
    }


def fit_fold(config: dict, run_name: str, storage_path: str, num_workers: int, use_gpu: bool, cpus_per_worker: float,
             max_failures: int) -> dict:
    """Run one fold's TorchTrainer; returns its final metrics and the path of its final checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_fold,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"fold {config['fold']}: training finished without a checkpoint")
    return {"metrics": dict(result.metrics or {}), "checkpoint": result.checkpoint.path, "run_name": run_name}


def _log_fold(client, child_id: str, fold_out: dict, meta: dict, spec: dict, store) -> dict[str, float]:
    """Everything about one finished fold goes into its child run, once."""
    from mlflow.entities import RunStatus

    from gigamamba.train import plots

    ckpt = Path(fold_out["checkpoint"])
    import torch

    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    tracking.fill_epoch_history(client, child_id, state["loop"]["history"])
    final = {k: v for k, v in fold_out["metrics"].items() if k.startswith(("test_", "best_val_")) or k in ("best_epoch", "epochs_run", "restarts")}
    tracking.log_metrics(client, child_id, final, step=int(final.get("best_epoch", 0) or 0))
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        pred = pd.read_parquet(ckpt / "predictions.parquet")
        pred.to_parquet(d / "predictions.parquet", index=False)
        client.log_artifact(child_id, str(d / "predictions.parquet"))
        test = pred[pred["part"] == "test"]
        title = f"{spec['model']['name']} fold {fold_out['fold']} test"
        if meta["task"] == "classification":
            fig = plots.roc_plot(test, d / "roc_test.png", meta["class_names"], title)
        else:
            fig = plots.km_plot(test, d / "km_test.png", title)
        if fig:
            client.log_artifact(child_id, str(fig), "plots")
        att_path = ckpt / "attention.npz"
        if att_path.exists():
            maps = np.load(att_path)
            (d / "heatmaps").mkdir()
            for sid in maps.files:
                try:
                    _, mask = store.read(sid)
                    attrs = store.slide_attrs(sid)
                except Exception:
                    mask, attrs = None, {}
                thumb = plots.slide_thumbnail(attrs, maps[sid].shape)
                plots.heatmap_plot(maps[sid], mask, thumb, d / "heatmaps" / f"{sid}.png", f"{sid} ({spec['model']['name']})")
            client.log_artifacts(child_id, str(d / "heatmaps"), "heatmaps")
    client.set_terminated(child_id, RunStatus.to_string(RunStatus.FINISHED))
    return final


def run_cv(spec: dict, progress: bool = True) -> dict:
    """Cross-validate spec's model on spec's store; returns {parent_run_id, experiment_id, folds, summary}."""
    import mlflow
    from mlflow.entities import RunStatus

    say = print if progress else (lambda *a, **k: None)
    t0 = time.time()
    spec = dict(spec)
    spec["train"] = dict(spec["train"])
    if not spec["train"].get("monitor"):
        spec["train"]["monitor"] = DEFAULT_MONITOR[spec["task"]]
    _ensure_ray(spec)
    check_when_multinode(spec)  # before any MLflow run or checkpoint exists
    cohort, meta = prepare_cohort(spec)
    store = open_store(spec["store"])
    check_in_store(cohort, complete_slides(spec["store"]), str(spec["cohort"]["csv"]))
    folds = load_splits(spec["cv"], cohort, spec["task"])
    if spec["cv"].get("only_folds") is not None:
        keep = {int(k) for k in spec["cv"]["only_folds"]}
        folds = [f for f in folds if f.k in keep]
    in_dim = feature_dim(spec["store"])
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)

    uri = spec["tracking"]["uri"]
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp_name = spec["tracking"].get("experiment") or spec["dataset"]
    exp_id = tracking.experiment_id(client, exp_name, tracking.artifact_root_for(uri, str(run_dir)))
    encoder = (dict(open_store(spec["store"]).attrs).get("encoder") or {}).get("name") or spec["encoder"].get("name")
    tags = {
        "model": spec["model"]["name"], "encoder": str(encoder), "dataset": spec["dataset"],
        "git_commit": tracking.git_commit(), "task": spec["task"], "job": spec["name"],
    }
    parent = client.create_run(exp_id, run_name=f"{spec['name']}-{spec['model']['name']}", tags={**tags, tracking.KIND_TAG: "cv"})
    parent_id = parent.info.run_id
    say(f"gigamamba: MLflow {uri} experiment {exp_name!r} parent run {parent_id}")
    try:
        tracking.log_params(client, parent_id, tracking.flatten(spec))
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            (d / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
            client.log_artifact(parent_id, str(d / "spec.yaml"))
            splits_frame(folds).to_csv(d / "splits.csv", index=False)
            client.log_artifact(parent_id, str(d / "splits.csv"))
            if spec["task"] == "classification":
                export_clam(folds, cohort, d / "splits_clam")
                client.log_artifacts(parent_id, str(d / "splits_clam"), "splits_clam")
            else:
                export_survival(folds, d / "splits_survival")
                client.log_artifacts(parent_id, str(d / "splits_survival"), "splits_survival")

        tc = spec["train"]
        use_gpu = _use_gpu(tc.get("use_gpu", "auto"))
        storage = str(tc.get("storage_path") or (run_dir / "ray_results").resolve())
        jobs = []
        for fold in folds:
            child_id = tracking.create_child(client, exp_id, parent_id, fold.k, tags)
            info = {"uri": uri, "run_id": child_id, "live": bool(spec["tracking"].get("live", True))}
            cfg = fold_config(spec, meta, cohort, fold, in_dim, info)
            # Unique per fold AND per CV job: Ray Train V2 resumes any run whose name it has seen.
            name = f"{spec['name']}-{spec['model']['name']}-{parent_id[:8]}-fold{fold.k}"
            jobs.append((fold, child_id, cfg, name))

        args = lambda cfg, name: (cfg, name, storage, int(tc.get("num_workers", 1)), use_gpu,  # noqa: E731
                                  float(tc.get("cpus_per_worker", 1)), int(tc.get("max_failures", 2)))
        results: dict[int, dict] = {}
        concurrent = max(1, int(spec["cv"].get("max_concurrent_folds", 1) or 1))
        if concurrent == 1:
            for fold, child_id, cfg, name in jobs:
                ft = time.time()
                out = fit_fold(*args(cfg, name))
                out["fold"] = fold.k
                results[fold.k] = _log_fold(client, child_id, out, meta, spec, store)
                say(f"gigamamba: fold {fold.k} done in {time.time() - ft:.0f}s: "
                    + ", ".join(f"{k}={v:.3f}" for k, v in results[fold.k].items() if k.startswith("test_")))
        else:
            import ray

            remote_fit = ray.remote(num_cpus=0)(fit_fold)
            for i in range(0, len(jobs), concurrent):
                batch = jobs[i : i + concurrent]
                outs = ray.get([remote_fit.remote(*args(cfg, name)) for _, _, cfg, name in batch])
                for (fold, child_id, _, _), out in zip(batch, outs):
                    out["fold"] = fold.k
                    results[fold.k] = _log_fold(client, child_id, out, meta, spec, store)

        summary = summarise(results, spec["task"])
        tracking.log_metrics(client, parent_id, summary)
        _log_all_predictions(client, parent_id, results, jobs)
        client.set_terminated(parent_id, RunStatus.to_string(RunStatus.FINISHED))
    except BaseException:
        client.set_terminated(parent_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    say(f"gigamamba: {spec['name']} ({spec['model']['name']}) {len(folds)} folds in {time.time() - t0:.0f}s: "
        + ", ".join(f"{k[:-5]}={summary[k]:.3f}±{summary[k[:-5] + '_std']:.3f}" for k in summary if k.endswith("_mean") and k.startswith("test_")))
    return {"parent_run_id": parent_id, "experiment_id": exp_id, "folds": results, "summary": summary, "tracking_uri": uri}


def summarise(results: dict[int, dict], task: str) -> dict[str, float]:
    out = {}
    for prefix in ("test_", "best_val_"):
        for m in metric_names(task):
            key = prefix + m
            mean, std = mean_std([r.get(key, math.nan) for r in results.values()])
            if not math.isnan(mean):
                out[f"{key}_mean"], out[f"{key}_std"] = mean, std
    return out


def _log_all_predictions(client, parent_id: str, results: dict, jobs) -> None:
    """The folds' predictions in one parquet on the parent, for cross-fold analysis."""
    import os

    frames = []
    # Downloads go to a folder removed afterwards (without dst_path MLflow leaves a new temp folder per call),
    # with MLflow's per-file progress bars off for them unless the user asked for those.
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        with tempfile.TemporaryDirectory() as d:
            for k, (_, child_id, _, _) in enumerate(jobs):
                dst = Path(d) / f"fold{k}"
                dst.mkdir()
                try:
                    frames.append(pd.read_parquet(client.download_artifacts(child_id, "predictions.parquet",
                                                                            dst_path=str(dst))))
                except Exception:  # a fold that failed has no predictions: the others still go in
                    continue
            if frames:
                path = Path(d) / "predictions_all_folds.parquet"
                pd.concat(frames, ignore_index=True).to_parquet(path, index=False)
                client.log_artifact(parent_id, str(path))
    finally:
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
