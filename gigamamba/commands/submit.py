"""`gigamamba submit PIPELINE.yaml --address http://HEAD:8265 [--stage embed|train|all] [--follow]`.

Sends one pipeline stage to a Ray cluster through the Ray Jobs API, with the project as working_dir and
the spec's `cluster.runtime_env`. The spec is checked first: cluster state on a node-local path is refused.
"""

from __future__ import annotations

import sys


def configure(parser) -> None:
    parser.add_argument("spec", metavar="PIPELINE.yaml", help="pipeline spec")
    parser.add_argument("--address", default=None,
                        help="Ray dashboard address, e.g. http://HEAD:8265 "
                             "(default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, or http://127.0.0.1:8265)")
    parser.add_argument("--stage", choices=["embed", "train", "all"], default="all",
                        help="embed, train, or both (gigamamba run); default all")
    parser.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    parser.add_argument("--working-dir", default=None,
                        help="folder to ship as the job's working_dir (default: the project above the spec)")


def run(args) -> int:
    from gigamamba.cluster import jobs
    from gigamamba.spec import SpecError

    try:
        job = jobs.build_job(args.spec, args.stage, args.working_dir)
    except SpecError as exc:
        print(f"gigamamba submit: {exc}", file=sys.stderr)
        return 2
    address = jobs.resolve_address(args.address)
    try:
        job_id = jobs.client(address).submit_job(**job)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        print(f"gigamamba submit: cannot submit to {address}: {exc}", file=sys.stderr)
        return 1
    print(job_id, flush=True)
    if not args.follow:
        return 0
    status = jobs.follow(job_id, address)
    print(f"gigamamba submit: job {job_id} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1
