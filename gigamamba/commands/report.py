"""`gigamamba report`: dataset x model tables (markdown, CSV) and a chart, read from MLflow."""

from __future__ import annotations

from pathlib import Path


def tracking_uri(args) -> str:
    if getattr(args, "tracking_uri", None):
        return args.tracking_uri
    db = Path(args.run_dir).expanduser().resolve() / "mlflow.db"
    if not db.is_file():
        raise FileNotFoundError(f"no MLflow store at {db}; pass --run-dir of a trained job or --tracking-uri")
    return f"sqlite:///{db}"


def configure(parser) -> None:
    parser.add_argument("--run-dir", default=".", help="folder holding mlflow.db (a job's or the demo's run_dir)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow server or store URI (overrides --run-dir)")
    parser.add_argument("--out", default=None, help="output folder (default: <run-dir>/report)")
    parser.add_argument("--experiment", action="append", default=None, help="only these datasets (repeatable)")


def run(args) -> int:
    import sys

    from gigamamba.train.report import write_report

    try:
        uri = tracking_uri(args)
    except FileNotFoundError as exc:
        print(f"gigamamba report: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.run_dir) / "report"
    paths = write_report(uri, out, args.experiment)
    print(paths["markdown"].read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
