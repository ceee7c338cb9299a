"""`gigamamba datasets [KEY]`: the dataset registry (the ten 2DMamba datasets), or one entry in full."""

from __future__ import annotations

import sys


def configure(parser) -> None:
    parser.add_argument("key", nargs="?", default=None, help="a dataset key for its full entry")


def run(args) -> int:
    from gigamamba.cohorts import DATASETS, get_dataset

    if args.key:
        d = get_dataset(args.key)
        if d is None:
            print(f"gigamamba datasets: unknown dataset {args.key!r}; known: {', '.join(DATASETS)}", file=sys.stderr)
            return 2
        print(f"{d.key}: {d.title}\n  task: {d.task}")
        if d.task == "classification":
            print(f"  classes: {', '.join(f'{i}={n}' for i, n in enumerate(d.class_names))}")
            print(f"  label map: {d.labels}")
        else:
            print(f"  survival bins: {d.n_bins} (quantiles of uncensored patients)")
        print(f"  organ: {d.organ}\n  data: {d.source}")
        if d.notes:
            print(f"  notes: {d.notes}")
        if d.defaults:
            print(f"  spec defaults: {d.defaults}")
        print(f"  spec: pipelines/{d.key}.yaml")
        return 0
    print(f"{'key':<12} {'task':<15} {'classes':>7}  title")
    for d in DATASETS.values():
        print(f"{d.key:<12} {d.task:<15} {d.n_classes:>7}  {d.title}")
    return 0
