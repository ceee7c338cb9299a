"""`gigamamba embed PIPELINE.yaml [--address ADDR] [--overwrite]`: a slide cohort to a Zarr feature-grid store.

Exits 1 when any slide failed (after embedding all the others and printing the summary table),
2 when the spec, the cohort CSV or the encoder cannot be used at all.
"""

from __future__ import annotations

import sys


def configure(parser) -> None:
    parser.add_argument("spec", help="pipeline spec (YAML)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: the spec's ray.address, "
                        "else a local Ray)")
    parser.add_argument("--overwrite", action="store_true", help="re-embed every slide, even complete ones")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args) -> int:
    from gigamamba.features.encoders import EncoderError
    from gigamamba.features.store import StoreError
    from gigamamba.ingest.pipeline import embed_cohort, summary_table
    from gigamamba.ingest.plan import CohortFileError
    from gigamamba.spec import SpecError, load_spec

    try:
        overrides = {"ray": {"address": args.address}} if args.address else None
        spec = load_spec(args.spec, overrides)
        if not spec["cohort"].get("csv"):
            raise SpecError(f"{args.spec}: field cohort.csv is required")
        manifest = embed_cohort(spec, overwrite=args.overwrite, progress=not args.quiet)
    except (SpecError, CohortFileError, EncoderError, StoreError) as exc:
        print(f"gigamamba embed: {exc}", file=sys.stderr)
        return 2
    print(summary_table(manifest))
    failed = int((manifest["status"] != "complete").sum())
    done = int((manifest["status"] == "complete").sum())
    print(f"\n{done} complete, {failed} failed -> {spec['store']}")
    return 1 if failed else 0
