"""`gigamamba ui`: the MLflow UI (`mlflow server`) on 127.0.0.1 over a job's or the demo's store."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from gigamamba.commands.report import tracking_uri


def configure(parser) -> None:
    parser.add_argument("--run-dir", default=".", help="folder holding mlflow.db")
    parser.add_argument("--tracking-uri", default=None, help="a database URI (sqlite:///..., postgresql://...)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")


def server_command(uri: str, port: int, artifact_root: Path | None) -> list[str]:
    # Bound to loopback: the store holds patient-level predictions; reach it remotely through an SSH tunnel.
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    if artifact_root is not None:
        cmd += ["--default-artifact-root", artifact_root.resolve().as_uri()]
    return cmd


def run(args) -> int:
    try:
        uri = tracking_uri(args)
    except FileNotFoundError as exc:
        print(f"gigamamba ui: {exc}", file=sys.stderr)
        return 2
    root = Path(args.run_dir) / "mlartifacts" if not args.tracking_uri else None
    cmd = server_command(uri, args.port, root)
    print(f"MLflow UI on http://127.0.0.1:{args.port}  (store {uri}); Ctrl-C stops it")
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    # MLflow's background job runner (GenAI evaluation jobs) is several extra processes a training store never uses.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(cmd[0], cmd)
    return 0
