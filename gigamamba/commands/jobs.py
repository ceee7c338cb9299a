"""`gigamamba jobs list|logs|stop`: the Ray jobs on a cluster, through the Ray Jobs API."""

from __future__ import annotations

import sys
from datetime import datetime, timezone


def configure(parser) -> None:
    address = {"default": None, "help": "Ray dashboard address, e.g. http://HEAD:8265 "
                                        "(default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, or http://127.0.0.1:8265)"}
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("list", help="every job on the cluster, oldest first")
    p.add_argument("--address", **address)
    p = sub.add_parser("logs", help="a job's logs")
    p.add_argument("job_id")
    p.add_argument("--address", **address)
    p.add_argument("--follow", action="store_true", help="stream until the job ends")
    p = sub.add_parser("stop", help="stop a running job")
    p.add_argument("job_id")
    p.add_argument("--address", **address)


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def run(args) -> int:
    from gigamamba.cluster import jobs

    try:
        if args.action == "list":
            rows = jobs.list_jobs(args.address)
            print(f"{'JOB ID':<44} {'STATUS':<10} {'STARTED (UTC)':<19}  ENTRYPOINT")
            for job in rows:
                job_id = job.submission_id or job.job_id or "-"
                print(f"{job_id:<44} {str(job.status.value):<10} {_when(job.start_time):<19}  {job.entrypoint}")
            return 0
        if args.action == "logs":
            if args.follow:
                status = jobs.follow(args.job_id, args.address)
                return 0 if status == "SUCCEEDED" else 1
            sys.stdout.write(jobs.logs(args.job_id, args.address))
            return 0
        stopped = jobs.stop(args.job_id, args.address)
        print(f"{args.job_id} {'stopping' if stopped else 'was not running'}")
        return 0
    except (ConnectionError, RuntimeError, ValueError) as exc:
        print(f"gigamamba jobs {args.action}: {exc}", file=sys.stderr)
        return 1
