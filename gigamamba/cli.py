"""The one `gigamamba` command.

Thin by design: each subcommand lives in `gigamamba/commands/<name>.py`, which defines
`configure(parser)` (its flags) and `run(args) -> int` (exit code). Modules load lazily so
that `gigamamba --help` does not import torch or Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module under gigamamba.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "synthesise a cohort, embed it, cross-validate 2DMamba vs ABMIL, write the report"),
    "synth": ("synth", "write synthetic pyramidal slides (TIFF/SVS) and a cohort.csv"),
    "embed": ("embed", "tile and embed a slide cohort into a Zarr feature-grid store (Ray Data)"),
    "inspect": ("inspect", "summarise a feature-grid store (dask)"),
    "train": ("train", "k-fold cross-validation with Ray Train and MLflow"),
    "run": ("run_all", "embed, then train, from one pipeline spec"),
    "report": ("report", "dataset x model comparison tables and chart from MLflow"),
    "ui": ("ui", "start the MLflow UI on 127.0.0.1 over the local store"),
    "bench": ("bench", "benchmarks: scan, ingest, read"),
    "build-ext": ("build_ext", "compile the CUDA scan extension ahead of time"),
    "submit": ("submit", "submit a pipeline to a Ray cluster through the Ray Jobs API"),
    "jobs": ("jobs", "list, follow or stop Ray jobs on a cluster"),
    "datasets": ("datasets", "list the dataset registry (the ten 2DMamba datasets)"),
}


def _load(name: str):
    module, _ = COMMANDS[name]
    return importlib.import_module(f"gigamamba.commands.{module}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gigamamba", description=__doc__.splitlines()[0])
    from gigamamba import __version__

    parser.add_argument("--version", action="version", version=f"gigamamba {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen subcommand's module is imported, to keep start-up fast.
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _load(name).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(_load(args.command).run(args) or 0)
    except KeyboardInterrupt:
        print("gigamamba: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
