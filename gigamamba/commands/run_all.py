"""`gigamamba run PIPELINE.yaml`: embed the cohort (slides already complete are kept), then train."""

from __future__ import annotations

import sys

from gigamamba.commands.train import add_train_flags, overrides_from_args, train_models


def configure(parser) -> None:
    parser.add_argument("spec", help="pipeline spec (YAML)")
    parser.add_argument("--overwrite", action="store_true", help="re-embed every slide")
    add_train_flags(parser)


def run(args) -> int:
    from gigamamba.cohorts import CohortError
    from gigamamba.ingest.pipeline import embed_cohort
    from gigamamba.spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec, overrides_from_args(args))
        if not spec["cohort"].get("csv"):
            raise SpecError(f"{args.spec}: field cohort.csv is required")
        manifest = embed_cohort(spec, overwrite=args.overwrite, progress=True)
        failed = manifest[manifest["status"] != "complete"]
        if len(failed):
            print(f"gigamamba run: {len(failed)} slide(s) failed to embed (first: {failed['slide_id'].iloc[0]}: "
                  f"{failed['error'].iloc[0]}); drop them from the cohort CSV or fix them", file=sys.stderr)
            return 1
        results = train_models(spec, args.model)
    except (SpecError, CohortError, ValueError) as exc:
        print(f"gigamamba run: {exc}", file=sys.stderr)
        return 2
    print(f"\nMLflow store: {results[-1]['tracking_uri']}")
    return 0
