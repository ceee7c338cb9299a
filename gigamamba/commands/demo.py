"""`gigamamba demo`: the whole pipeline on a laptop, from nothing, in a few minutes.

1. synthesise two small slide cohorts (real pyramidal TIFF/SVS files): "classification" (label = some
   tumour-like tissue present) and "spatial" (label = how four blobs are arranged, rows vs columns:
   the same tiles in both classes, so only a model that sees the 2D layout can solve it);
2. embed them (Ray Data, a small CNN with random weights: nothing is downloaded);
3. 5-fold cross-validation of mamba2d and abmil on each (Ray Train, MLflow);
4. the report (markdown, CSV, PNG) and where to find the MLflow store and UI.

The settings below are the demo's embedded defaults (pipelines/demo.yaml shows the same as a spec).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

COHORTS = ("classification", "spatial")
MODELS = ("mamba2d", "abmil")

# Tuned on a 2-core CPU: enough slides that 5 folds have 8 test slides each, grids of ~6x7 tiles,
# features standardised per fold, 8 epochs at a high learning rate, and the best epoch chosen by validation
# loss (AUC on 5 validation patients ties too often to choose by).
DEMO = {
    "slides": {"classification": 24, "spatial": 40},
    # The texture task is learnt in a few epochs; the spatial one needs the full schedule. Each epoch
    # costs a checkpoint per fold, so the easy cohort's shorter schedule keeps the demo near 10 minutes.
    "epochs": {"classification": 4, "spatial": 8},
    "size_px": 2048,
    "seed": 0,
    "encoder": {"name": "resnet18", "weights": "random", "batch_size": 64, "input_px": 64},
    # The demo's slides are 2,048 px: a 256 px thumbnail (4 um/px) finds their tissue, and the default ~1000 px
    # one cost 0.8 s a slide on the 2-core machine, about 30 s of the demo's 10 minutes.
    "ingest": {"tissue": {"min_side": 256}},
    "model_kwargs": {"d_model": 64, "d_state": 8},
    "train": {
        "epochs": 8, "lr": 2.0e-3, "monitor": "loss", "weight_decay": 1.0e-2, "accum_steps": 1, "patience": 0, "min_epochs": 0,
        "num_workers": 1, "cpus_per_worker": 1, "torch_threads": 1, "attention_slides": 2, "normalize": True,
    },
    "cv": {"folds": 5, "seed": 0, "max_concurrent_folds": 5},
}


def configure(parser) -> None:
    parser.add_argument("--out", default="gigamamba-demo", help="output folder (default ./gigamamba-demo)")
    parser.add_argument("--slides", type=int, default=None,
                        help=f"slides per cohort (default {', '.join(f'{k} {v}' for k, v in DEMO['slides'].items())})")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs (default {', '.join(f'{k} {v}' for k, v in DEMO['epochs'].items())})")
    parser.add_argument("--folds", type=int, default=DEMO["cv"]["folds"])
    parser.add_argument("--model", action="append", default=None, help=f"models (default {', '.join(MODELS)})")
    parser.add_argument("--cohort", action="append", choices=COHORTS, default=None,
                        help=f"cohorts (default {', '.join(COHORTS)})")
    parser.add_argument("--concurrent-folds", type=int, default=DEMO["cv"]["max_concurrent_folds"],
                        help="folds trained at once (each is its own Ray Train run)")


def cohort_spec(out: Path, cohort: str, epochs: int, folds: int, concurrent: int) -> dict:
    from gigamamba.spec import resolve_spec

    raw = {
        "name": f"demo-{cohort}",
        "dataset": f"demo-{cohort}",
        "task": "classification",
        "run_dir": str(out),
        "cohort": {"csv": str(out / cohort / "cohort.csv")},
        "store": str(out / cohort / "features.zarr"),
        "encoder": dict(DEMO["encoder"]),
        "ingest": {"tissue": dict(DEMO["ingest"]["tissue"])},
        "model": {"name": MODELS[0], "kwargs": dict(DEMO["model_kwargs"])},
        "train": {**DEMO["train"], "epochs": epochs},
        "cv": {**DEMO["cv"], "folds": folds, "max_concurrent_folds": concurrent},
        # Epoch metrics reach MLflow from the driver after each fold: a worker that imports MLflow
        # costs seconds of CPU per fold, and the demo runs 20 folds on 2 cores.
        "tracking": {"uri": f"sqlite:///{out / 'mlflow.db'}", "live": False},
    }
    return resolve_spec(raw, out, raw["name"])


def _synthesise(out: Path, cohort: str, slides: int) -> Path:
    from gigamamba.slides.synth import write_synthetic_cohort

    csv = out / cohort / "cohort.csv"
    stamp = out / cohort / ".demo-settings"
    settings = f"{cohort} {slides} {DEMO['size_px']} {DEMO['seed']}"
    if csv.is_file() and stamp.is_file() and stamp.read_text() == settings:
        return csv  # a rerun reuses the slides (and the embed keeps complete grids)
    csv = write_synthetic_cohort(out / cohort, task=cohort, n_slides=slides, seed=DEMO["seed"], size_px=DEMO["size_px"])
    stamp.write_text(settings)
    return csv


def _start_ray(num_cpus: int) -> None:
    """A local Ray; retried because its 30 s raylet start-up wait is short for a busy laptop."""
    import ray

    from gigamamba.cluster.ray_start import local_ray_kwargs

    for attempt in range(3):
        try:
            # Concurrent folds each hold one logical CPU; the OS shares the real cores between them.
            # No preload_modules: a local Ray preloads nothing (cluster/ray_start.py); with RAY_ADDRESS set,
            # ray.init joins that cluster and num_cpus is left to it.
            ray.init(**local_ray_kwargs({"num_cpus": num_cpus}), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception on a start-up timeout
            if attempt == 2:
                raise
            print(f"gigamamba demo: Ray did not start ({exc}); retrying", file=sys.stderr)
            ray.shutdown()
            time.sleep(5)


def run(args) -> int:
    import ray

    from gigamamba.ingest.pipeline import embed_cohort
    from gigamamba.train.cv import run_cv
    from gigamamba.train.report import write_report

    t0 = time.perf_counter()
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    cohorts = args.cohort or list(COHORTS)
    models = args.model or list(MODELS)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    if not ray.is_initialized():
        _start_ray(max(os.cpu_count() or 1, args.concurrent_folds))
    specs = {}
    for cohort in cohorts:
        n_slides = args.slides or DEMO["slides"][cohort]
        say(f"synthesising {n_slides} {cohort} slides -> {out / cohort}")
        _synthesise(out, cohort, n_slides)
        spec = cohort_spec(out, cohort, args.epochs or DEMO["epochs"][cohort], args.folds, args.concurrent_folds)
        say(f"embedding {cohort} ({spec['encoder']['name']}, random weights) -> {spec['store']}")
        manifest = embed_cohort(spec, progress=False)
        bad = manifest[manifest["status"] != "complete"]
        if len(bad):
            print(f"gigamamba demo: {len(bad)} slide(s) failed to embed: {bad['error'].iloc[0]}", file=sys.stderr)
            return 1
        specs[cohort] = spec
    for cohort, spec in specs.items():
        for model in models:
            say(f"{args.folds}-fold CV of {model} on {cohort}")
            res = run_cv(dict(spec, model={**spec["model"], "name": model}), progress=False)
            summ = res["summary"]
            say(f"  {model} on {cohort}: test AUC {summ.get('test_auc_mean', float('nan')):.3f} "
                f"± {summ.get('test_auc_std', float('nan')):.3f}")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    paths = write_report(uri, out / "report", [f"demo-{c}" for c in cohorts])
    print()
    print(paths["markdown"].read_text())
    say(f"demo finished in {time.perf_counter() - t0:.0f} s")
    print(f"report:       {paths['markdown']}  {paths.get('png', '')}")
    print(f"MLflow store: {uri}")
    print(f"open the UI:  gigamamba ui --run-dir {out}    (then http://127.0.0.1:5000)")
    return 0
