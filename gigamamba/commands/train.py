"""`gigamamba train PIPELINE.yaml`: patient-level k-fold CV with Ray Train workers and MLflow tracking.

Exits 2 when the spec, the cohort or the splits cannot be used (one line naming the file, row or field).
"""

from __future__ import annotations

import sys


def add_train_flags(parser) -> None:
    parser.add_argument("--model", action="append", default=None,
                        help="model name (mamba2d, abmil, meanpool, mamba1d); repeat to cross-validate several")
    parser.add_argument("--folds", type=int, default=None, help="number of CV folds (default: the spec's cv.folds)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="Ray Train workers (DDP ranks) per fold")
    parser.add_argument("--tracking-uri", default=None, help="MLflow server or store (default: SQLite under run_dir)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: the spec's ray.address)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any spec field, e.g. --set train.lr=1e-3 (value parsed as YAML)")


def configure(parser) -> None:
    parser.add_argument("spec", help="pipeline spec (YAML)")
    add_train_flags(parser)


def overrides_from_args(args) -> dict:
    import yaml

    out: dict = {}

    def put(path: str, value) -> None:
        d = out
        keys = path.split(".")
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = value

    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        put(key.strip(), yaml.safe_load(value))
    if args.folds is not None:
        put("cv.folds", args.folds)
    if args.epochs is not None:
        put("train.epochs", args.epochs)
    if args.workers is not None:
        put("train.num_workers", args.workers)
    if args.tracking_uri:
        put("tracking.uri", args.tracking_uri)
    if args.address:
        put("ray.address", args.address)
    return out


def train_models(spec: dict, models: list[str] | None) -> list[dict]:
    from gigamamba.train.cv import run_cv

    results = []
    for name in models or [spec["model"]["name"]]:
        s = dict(spec, model={**spec["model"], "name": name})
        results.append(run_cv(s))
    return results


def run(args) -> int:
    from gigamamba.cohorts import CohortError
    from gigamamba.spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec, overrides_from_args(args))
        if not spec["cohort"].get("csv"):
            raise SpecError(f"{args.spec}: field cohort.csv is required")
        results = train_models(spec, args.model)
    except (SpecError, CohortError, ValueError) as exc:
        print(f"gigamamba train: {exc}", file=sys.stderr)
        return 2
    uri = results[-1]["tracking_uri"]
    print(f"\nMLflow store: {uri}\nopen the UI: gigamamba ui --tracking-uri {uri}")
    return 0
