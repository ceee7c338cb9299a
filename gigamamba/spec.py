"""Pipeline specs: the YAML that says *what* to run (slides, tiling, encoder, store, model, CV, tracking).

`load_spec(path)` reads a spec safely, fills every default below, and resolves relative paths
against the spec file's folder, so a spec means the same thing from any working directory.
Each section is owned by the layer that reads it: `cohort`, `tiling`, `encoder`, `store`,
`ingest` by gigamamba.ingest; `train`, `model`, `cv`, `tracking` by gigamamba.train; `ray` by both;
`cluster` by gigamamba.cluster.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

DEFAULTS: dict[str, Any] = {
    "name": None,                    # job name; defaults to the spec file's stem
    "dataset": None,                 # registry key (gigamamba datasets) or free name = MLflow experiment
    "task": "classification",        # classification | survival
    "run_dir": "runs/{name}",        # where local state goes (store, MLflow SQLite, checkpoints)
    "cohort": {
        "csv": None,                 # cohort CSV (DESIGN.md contract)
        "slide_dir": None,           # slide_path is resolved against this; default: the CSV's folder
    },
    "tiling": {"patch_px": 256, "target_mpp": 0.5, "tissue_threshold": 0.25},
    "encoder": {"name": "resnet50-trunc", "weights": "imagenet", "batch_size": 64, "input_px": 224},
    "store": "{run_dir}/features.zarr",
    "ingest": {                      # gigamamba.ingest.pipeline (Ray Data)
        "tiles_per_task": 64,        # tiles per chunk: one read+decode step, one block to the encoder; half
                                     # the per-chunk cost of 32 (README)
        "split_slides": False,       # False: one task plans and reads a slide; True: its chunks over many tasks
        "embed_actors": None,        # encoder actor pool size; None: actors_per_gpu per GPU, else CPUs // 4 (>= 1)
        "actors_per_gpu": 1,         # encoder actors sharing a GPU (fractional num_gpus)
        "calls_per_actor": 2,        # batches an encoder actor assembles at once (the encoder runs one at a time)
        "cpus_per_actor": 1,         # CPU-only clusters: Ray CPUs (= torch threads) per encoder actor
        "gpu_actor_cpus": 0,         # Ray CPUs a GPU encoder actor reserves (0: read tasks may take every CPU;
                                     # README, bench ingest)
        "read_cpus": 1,              # Ray CPUs per read task
        "gpu_wait": "block",         # a GPU encoder actor's thread sleeps while its batch runs ("spin": torch's
                                     # synchronous copies, a busy core; features/encoders.py, README session 13)
        "chunks_per_block": 2,       # chunks of decoded tiles in a read block (Ray Data's unit to the encoder)
        "executor_wait_s": None,     # Ray Data's per-step wait for finished tasks; None: Ray's own (0.1 s in 2.60;
                                     # pipeline.executor_wait, README)
        "limits_refresh_s": 0.1,     # how often Ray Data re-reads its resource limits (Ray's own: 1 s, and one read
                                     # task runs alone until the second read); None: Ray's own (README, session 11)
        "warm_read_workers": True,   # Ray's idle workers import the read tasks' modules at the start (session 11)
        "tissue": {},                # overrides of gigamamba.slides.tissue.DEFAULTS (mpp, blur_um, close_um, ...)
    },
    "ray": {"address": None, "num_cpus": None, "num_gpus": None,
            "preload_modules": []},  # modules a local Ray's idle workers import before work (cluster/ray_start.py)
    "model": {"name": "mamba2d", "kwargs": {}},   # gigamamba.models.create_model(name, in_dim, n_classes, **kwargs)
    "train": {
        "epochs": 20, "lr": 2.0e-4, "weight_decay": 1.0e-2, "warmup_epochs": 0,
        "batch_size": 1,             # slides per step; >1 packs padded grids through the variable-size scan
        "accum_steps": 8,            # gradient accumulation (slides per optimizer step = batch_size x accum_steps)
        "monitor": None,             # validation metric for early stopping / best epoch; None: auc or c_index
        "patience": 5, "min_epochs": 5, "grad_clip": None,
        "num_workers": 1,            # Ray Train workers (DDP ranks) per fold
        "use_gpu": "auto",           # auto: a GPU per worker when the Ray cluster has GPUs
        "cpus_per_worker": 1, "max_failures": 2,   # FailureConfig: restarts from the last checkpoint
        "attention_slides": 3,       # validation slides with attention heatmaps per fold
        "torch_threads": None, "loader_workers": 0, "find_unused_parameters": False,
        "normalize": True,           # standardise features per channel with the fold's training cells
        "storage_path": None,        # Ray Train checkpoints; None: {run_dir}/ray_results (shared FS on clusters)
    },
    "cv": {
        "folds": 5, "seed": 0, "val_fraction": 0.15,
        "splits_dir": None,          # import splits_<k>.csv instead of making splits
        "splits_format": None,       # clam | survival (default by task)
        "max_concurrent_folds": 1, "only_folds": None,
    },
    "tracking": {"uri": None, "experiment": None, "live": True},  # uri None: sqlite:///{run_dir}/mlflow.db
    # Only read when the pipeline runs on a multi-node Ray cluster (gigamamba.cluster).
    "cluster": {
        # Mount points every node sees; store, train.storage_path and run_dir must be under one of them
        # (or be an object-store URI) so that any node can finish what another started.
        "shared_paths": ["/mnt/shared", "/shared", "/nfs", "/gpfs", "/lustre", "/scratch"],
        # Merged into the Ray job's runtime_env by `gigamamba submit` (working_dir is always the project).
        "runtime_env": {},
    },
}

# Keys whose values are filesystem paths (or URIs) to resolve against the spec's folder.
PATH_KEYS = [("cohort", "csv"), ("cohort", "slide_dir"), ("store",), ("run_dir",), ("cv", "splits_dir"), ("train", "storage_path")]


class SpecError(ValueError):
    """A pipeline spec that cannot be run; the message names the file and the field."""


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _is_uri(value: str) -> bool:
    return "://" in value


def _resolve(value: str, base: Path) -> str:
    if _is_uri(value):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _get(d: dict, keys: tuple) -> Any:
    for k in keys[:-1]:
        d = d.get(k) or {}
    return d.get(keys[-1])


def _set(d: dict, keys: tuple, value: Any) -> None:
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def resolve_spec(raw: dict, base_dir: Path, name: str | None = None) -> dict:
    """Fill defaults and resolve paths of an already-parsed spec."""
    if not isinstance(raw, dict):
        raise SpecError("a pipeline spec must be a YAML mapping")
    unknown = set(raw) - set(DEFAULTS)
    if unknown:
        raise SpecError(f"unknown top-level field(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    spec = deep_merge(DEFAULTS, raw)
    spec["name"] = spec["name"] or name or "job"
    spec["dataset"] = spec["dataset"] or spec["name"]
    if spec["task"] not in ("classification", "survival"):
        raise SpecError(f"field 'task' must be classification or survival, got {spec['task']!r}")
    spec["run_dir"] = str(spec["run_dir"]).format(name=spec["name"])
    if isinstance(spec["store"], str):
        spec["store"] = spec["store"].format(run_dir=spec["run_dir"], name=spec["name"])
    for keys in PATH_KEYS:
        value = _get(spec, keys)
        if isinstance(value, str) and value:
            _set(spec, keys, _resolve(value, base_dir))
    if spec["tracking"].get("uri") is None:
        spec["tracking"]["uri"] = f"sqlite:///{Path(spec['run_dir']) / 'mlflow.db'}"
    return spec


def load_spec(path: str | Path, overrides: dict | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"pipeline spec {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return resolve_spec(deep_merge(raw, overrides or {}), path.parent.resolve(), path.stem)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from exc
