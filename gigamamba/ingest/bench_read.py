"""`gigamamba bench read`: where a read slot's time goes, beside the decode ceiling's loop. No encoder, no GPU.

The same cohort is decoded three ways on N processes (--processes):
    loop      bench ingest's decode ceiling: read_region + decode + resize of pre-planned chunks
    task      plain Ray tasks, at most N at once, each running the pipeline's own read function
              (plan_and_read_slides: plan the slide, then decode its chunks), a slide a task
    ray_data  the pipeline's read stage (read_dataset, one task a slide, TaskPoolStrategy(size=N)) under its
              block size (read_block_size: --chunks-per-block, two by default) and its limits refresh
              (fast_limits_refresh, since session 11), consumed as references; unlike embed_cohort's, no memory
              hint and rows in cohort order (the files are all one size here)
and two costs alone: planning a slide (thumbnail, tissue, lattice) and ray.put of one chunk's worth of block, the
copy into the object store that every decoded tile pays (linear in bytes, so per chunk whatever the block size).
On 16-core H100 nodes the pipeline's read tasks decoded ~10% fewer tiles a core than the ceiling (README, session
9); this splits such a gap into planning, that copy and what is left (Ray's scheduling, the tail of whole-slide
tasks), on any machine.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gigamamba.ingest.bench import add_ray_data_settings
from gigamamba.spec import DEFAULTS


def configure(parser) -> None:
    parser.add_argument("--workdir", default="runs/bench-read", help="the synthetic cohort and results go here")
    parser.add_argument("--slides", type=int, default=8, help="cohort rows (slides) a pass decodes")
    parser.add_argument("--unique-slides", type=int, default=2, help="distinct files the rows cycle through")
    parser.add_argument("--size-px", type=int, default=16384, help="slide side in 20x pixels")
    parser.add_argument("--patch-px", type=int, default=256)
    parser.add_argument("--input-px", type=int, default=224)
    parser.add_argument("--tiles-per-task", type=int, default=DEFAULTS["ingest"]["tiles_per_task"],
                        help="tiles per read chunk (default: the pipeline's, %(default)s)")
    parser.add_argument("--processes", type=int, default=1, help="decode processes / read slots (default 1)")
    parser.add_argument("--passes", type=int, default=2,
                        help="timed passes over the cohort for task and ray_data, after an untimed warm-up; the "
                             "best counts (default 2)")
    parser.add_argument("--decode-seconds", type=float, default=10.0, help="the loop decodes at least this long")
    add_ray_data_settings(parser)
    parser.add_argument("--sample-seconds", type=float, default=0.5,
                        help="the CPU sampler's interval (each sample costs the driver ~10 ms of CPU)")
    parser.add_argument("--out", default=None, help="results JSON (default WORKDIR/read-results.json)")


def plan_and_read_task(row: dict, tiling: dict, tiles_per_chunk: int, input_px: int) -> int:
    """One slide through the pipeline's read function in a plain Ray task: tiles decoded. (Named so that the
    CPU sampler counts its process as a read task, as it counts Ray Data's.)"""
    from gigamamba.ingest.pipeline import plan_and_read_slides

    batch = {key: [value] for key, value in row.items()}
    return sum(len(out["tile"]) for out in plan_and_read_slides(batch, tiling, {}, tiles_per_chunk, input_px))


def _task_pass(ray, rows: list[dict], n: int, tiling: dict, tiles_per_chunk: int, input_px: int) -> tuple[int, float]:
    """Every row as one Ray task, at most n running: (tiles, seconds)."""
    read = ray.remote(num_cpus=1)(plan_and_read_task)
    t0, pending, tiles = time.perf_counter(), [], 0
    for row in rows:
        if len(pending) >= n:
            done, pending = ray.wait(pending, num_returns=1)
            tiles += sum(ray.get(done))
        pending.append(read.remote(row, tiling, tiles_per_chunk, input_px))
    tiles += sum(ray.get(pending))
    return tiles, time.perf_counter() - t0


def _ray_data_pass(ray, rows: list[dict], n: int, tiling: dict, tiles_per_chunk: int, input_px: int,
                   trace_dir: str | None = None, chunks_per_block: int = 2) -> tuple[int, float]:
    """The pipeline's read stage alone, its blocks counted as they arrive (never fetched): (tiles, seconds)."""
    import ray.data

    from gigamamba.ingest.pipeline import read_block_size, read_dataset

    context = ray.data.DataContext.get_current()
    progress, context.enable_progress_bars = context.enable_progress_bars, False
    try:  # datasets copy the context when created
        with read_block_size(tiles_per_chunk, input_px, chunks_per_block):
            ds = read_dataset(ray, rows, {"split_slides": False, "tiles_per_task": tiles_per_chunk}, tiling, {},
                              input_px, {"num_cpus": 1, "compute": ray.data.TaskPoolStrategy(size=n)}, trace_dir)
    finally:
        context.enable_progress_bars = progress
    t0, tiles = time.perf_counter(), 0
    for bundle in ds.iter_internal_ref_bundles():
        tiles += bundle.num_rows()
    return tiles, time.perf_counter() - t0


def _put_ms(ray, row: dict, tiling: dict, tiles_per_chunk: int, input_px: int, repeats: int = 20) -> float:
    """Median ms of ray.put of one chunk's block (real decoded tiles, converted as Ray Data converts them)."""
    from ray.data.block import BlockAccessor

    from gigamamba.ingest.pipeline import plan_and_read_slides

    batch = next(plan_and_read_slides({k: [v] for k, v in row.items()}, tiling, {}, tiles_per_chunk, input_px))
    block = BlockAccessor.batch_to_block(batch)
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        ref = ray.put(block)
        times.append(time.perf_counter() - t0)
        del ref
    return float(np.median(times[2:]) * 1e3)


def run(args) -> int:
    import ray

    from gigamamba.ingest.bench import _machine, bench_cohort, bench_decode, ray_data_settings
    from gigamamba.ingest.cpu_sampler import CpuSampler
    from gigamamba.ingest.pipeline import executor_wait, fast_limits_refresh, read_trace
    from gigamamba.ingest.plan import plan_slide, read_slide_jobs

    if args.processes < 1 or args.passes < 1 or args.slides < 1:
        raise SystemExit("bench read: --processes, --passes and --slides must be >= 1")
    ray_data_settings(args, "bench read")  # the embed spec's checks, before minutes of decoding
    work = Path(args.workdir).resolve()
    unique = min(args.unique_slides or args.slides, args.slides)
    _, cohort_csv, _ = bench_cohort(work, args.slides, unique, args.size_px)
    tiling = {"patch_px": args.patch_px, "target_mpp": 0.5, "tissue_threshold": 0.25}
    jobs, _ = read_slide_jobs(cohort_csv)
    plans = [plan_slide(j, tiling) for j in jobs[:unique]]
    t = time.perf_counter()  # planned again, warm (imports done, files in the page cache), as a read task plans
    for j in jobs[:unique]:
        plan_slide(j, tiling)
    plan_s = (time.perf_counter() - t) / unique
    tiles = sum(plans[k % unique].n_tiles for k in range(len(jobs)))
    n, chunk, px = args.processes, args.tiles_per_task, args.input_px
    res = {"machine": _machine(), "processes": n, "slides": len(jobs), "unique_slides": unique,
           "tiles_per_pass": tiles, "tiles_per_slide": tiles / len(jobs), "tiles_per_task": chunk, "input_px": px,
           "plan_seconds_per_slide": round(plan_s, 4), "tiles": {}, "tiles_per_s": {}, "cpu": {}}
    rates = res["tiles_per_s"]
    rates["loop"] = bench_decode(plans, px, chunk, n, min_seconds=args.decode_seconds, repeats=2)
    print(f"loop ({n} processes): {rates['loop']:.1f} tiles/s", file=sys.stderr)

    res["executor_wait_s"] = args.executor_wait_s  # None: Ray Data's own
    res["chunks_per_block"] = args.chunks_per_block
    res["limits_refresh_s"] = args.limits_refresh_s  # None: Ray Data's own
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False)
    # this process runs Ray Data's scheduling loop, as embed_cohort's does: its per-step wait and its limits refresh
    # are set as embed_cohort sets them, and restored afterwards for a caller's later datasets
    try:
        with executor_wait(args.executor_wait_s), fast_limits_refresh(seconds=args.limits_refresh_s):
            rows = [j.to_row() for j in jobs]
            ray_data_pass = functools.partial(_ray_data_pass, chunks_per_block=args.chunks_per_block)
            for way, one_pass in (("task", _task_pass), ("ray_data", ray_data_pass)):
                one_pass(ray, rows[:n], n, tiling, chunk, px)  # warm-up: n workers started, modules imported
                best = 0.0
                for _ in range(args.passes):
                    with CpuSampler(args.sample_seconds) as cpu:  # who else took the cores: driver, Ray's daemons
                        got, seconds = one_pass(ray, rows, n, tiling, chunk, px)
                    res["tiles"][way] = got
                    if got / seconds > best:
                        best, res["cpu"][way] = got / seconds, cpu.summary()["all"]
                rates[way] = best
                print(f"{way} ({n} at once): {best:.1f} tiles/s", file=sys.stderr)
            res["put_ms_per_chunk"] = round(_put_ms(ray, rows[0], tiling, chunk, px), 3)
            # once more, traced: how long a read slot waits between one slide's task and the next
            with tempfile.TemporaryDirectory(prefix="bench-read-trace-") as trace_dir:
                ray_data_pass(ray, rows, n, tiling, chunk, px, trace_dir)
                res["ray_data_slots"] = slot_timeline(read_trace(trace_dir))
    finally:
        if started_ray:
            ray.shutdown()
    res.update(_shares(res))
    res["tiles_per_s"] = {k: round(v, 2) for k, v in rates.items()}
    out = Path(args.out) if args.out else work / "read-results.json"
    out.write_text(json.dumps(res, indent=2))
    print(_table(res))
    print(f"\nresults: {out}")
    return 0


def slot_timeline(events: list[dict]) -> dict:
    """From read_task_start/read_task_end trace events: when each read process began its first slide (seconds
    after the first began), and the turnaround, a process's idle time from one task's end to its next start."""
    by_pid: dict[int, list[tuple[float, str]]] = {}
    for e in events:
        if e["event"] in ("read_task_start", "read_task_end"):
            by_pid.setdefault(e["pid"], []).append((e["t"], e["event"]))
    if not by_pid:
        return {}
    firsts = sorted(min(t for t, kind in xs if kind == "read_task_start") for xs in by_pid.values())
    turn = []
    for xs in by_pid.values():
        xs.sort()
        turn += [b[0] - a[0] for a, b in zip(xs, xs[1:]) if a[1] == "read_task_end" and b[1] == "read_task_start"]
    out = {"processes": len(by_pid), "first_start_s": [round(t - firsts[0], 3) for t in firsts],
           "turnarounds": len(turn)}
    if turn:
        out.update(turnaround_median_s=round(statistics.median(turn), 4), turnaround_max_s=round(max(turn), 4),
                   turnaround_total_s=round(sum(turn), 3))
    return out


def _shares(res: dict) -> dict:
    """Each cost as a share of the loop's time for the same tiles, and the rate planning alone would leave.

    A process decodes a tile in 1/per_process seconds in the loop; a slide adds its planning, a chunk its put.
    """
    r, n = res["tiles_per_s"], res["processes"]
    tile_s = n / r["loop"]
    slide_s = res["tiles_per_slide"] * tile_s
    chunk_s = min(res["tiles_per_task"], res["tiles_per_slide"]) * tile_s
    plan = res["plan_seconds_per_slide"] / slide_s
    put = res["put_ms_per_chunk"] / 1e3 / chunk_s
    return {"plan_share": round(plan, 4), "put_share": round(put, 4),
            "task_expected_from_planning": round(r["loop"] / (1 + plan), 2),
            "ray_data_expected_from_planning_and_put": round(r["loop"] / (1 + plan + put), 2)}


def _table(res: dict) -> str:
    r, n = res["tiles_per_s"], res["processes"]
    m = res["machine"]
    lines = [f"\nbench read: {res['slides']} slides, {res['tiles_per_pass']} tiles a pass "
             f"({res['tiles_per_slide']:.0f} a slide, {res['tiles_per_task']}-tile chunks of {res['input_px']} px), "
             f"{n} process(es); {m.get('cpu')}, {m.get('usable_cores')} usable cores",
             f"{'way':<10}{'tiles/s':>10}{'a process':>11}{'of loop':>9}"]
    for way in ("loop", "task", "ray_data"):
        if way in r:
            lines.append(f"{way:<10}{r[way]:>10.1f}{r[way] / n:>11.1f}{r[way] / r['loop']:>9.1%}")
    lines.append(f"planning {res['plan_seconds_per_slide']:.3f} s a slide = {res['plan_share']:.1%} of its decode; "
                 f"ray.put of a chunk {res['put_ms_per_chunk']:.2f} ms = {res['put_share']:.1%} of its decode")
    lines.append(f"expected from those alone: task {res['task_expected_from_planning']:.1f}, "
                 f"ray_data {res['ray_data_expected_from_planning_and_put']:.1f} tiles/s")
    slots = res.get("ray_data_slots") or {}
    if slots.get("turnarounds"):
        lines.append(f"ray_data slots: {slots['processes']} read processes, the last began "
                     f"{slots['first_start_s'][-1]:.2f} s after the first; between tasks a process waited "
                     f"{slots['turnaround_median_s'] * 1e3:.0f} ms (median; max {slots['turnaround_max_s'] * 1e3:.0f}, "
                     f"{slots['turnaround_total_s']:.1f} s over {slots['turnarounds']} turnarounds)")
    cpu = {way: c for way, c in res.get("cpu", {}).items() if c}
    if cpu:  # empty off Linux
        lines.append(f"mean cores of {m.get('usable_cores')} in the best pass: " + "; ".join(
            f"{way}: " + ", ".join(f"{k} {c[k]:.2f}" for k in ("read", "driver", "ray_daemons", "idle") if k in c)
            for way, c in cpu.items()))
    return "\n".join(lines)
