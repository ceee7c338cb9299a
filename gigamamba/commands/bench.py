"""`gigamamba bench scan|ingest|read`: benchmarks, whose numbers go into the README (not timed tests)."""

from __future__ import annotations


def configure(parser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="WHAT", required=True)
    from gigamamba.ops import bench as scan_bench

    scan_bench.configure(sub.add_parser("scan", help="2D selective scan: oracle, PyTorch path, CUDA kernel"))
    try:
        from gigamamba.ingest import bench as ingest_bench
    except ImportError:  # ingest not installed in this build
        return
    ingest_bench.configure(sub.add_parser("ingest", help="ingest tiles/s vs encoder-only and CLAM-style loops"))
    from gigamamba.ingest import bench_read

    bench_read.configure(sub.add_parser("read", help="a read slot's tiles/s: decode loop vs Ray task vs Ray Data"))


def run(args) -> int:
    if args.bench == "scan":
        from gigamamba.ops import bench as scan_bench

        return scan_bench.run(args)
    if args.bench == "read":
        from gigamamba.ingest import bench_read

        return bench_read.run(args)
    from gigamamba.ingest import bench as ingest_bench

    return ingest_bench.run(args)
