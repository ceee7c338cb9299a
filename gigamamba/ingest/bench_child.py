"""`gigamamba bench ingest`'s pipeline phase in a fresh interpreter: `python -m gigamamba.ingest.bench_child JOB OUT`.

The bench's own process imports torch (to name the GPU) and runs the encoder ceiling and the CLAM-style loop
before the pipeline. A pipeline run there would find torch imported and CUDA initialised, so embed_cohort's
encoder check would take a thread, not the child process a fresh `gigamamba embed` gets (features/probe.py),
and the bench would time a start-up no user sees. So the pipeline runs here: this module imports only the
standard library at the top, and before embed_cohort only Ray, the pipeline module and the CPU sampler.
`torch_imported_before_embed` in the results says whether that held.

JOB (JSON, written by bench.run): spec and warm_spec (resolved specs; warm_spec null when not warming),
warm_ray_slides, address, preload, workdir. OUT: this phase's results, written whole or not at all; the
bench fails if this process exits non-zero or leaves no OUT.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time


def run_pipeline(job: dict) -> dict:
    """init_ray, the optional warm-up, then embed_cohort traced and CPU-sampled: results keys, with this
    phase's rates under "tiles_per_s" and its load average under "load_avg_1m_at" (merged by the bench)."""
    import ray  # noqa: F401  before the clock: ray_init_seconds is ray.init alone, as it always was

    from gigamamba.cluster.ray_start import init_ray

    spec, address, preload = job["spec"], job["address"], job["preload"]
    out: dict = {"pipeline_process": "fresh"}
    rates: dict = {}
    t = time.perf_counter()
    # A local Ray as `gigamamba embed` starts one; --preload: idle workers import those modules first
    init_ray({"address": address, "preload_modules": preload}, include_dashboard=False, log_to_driver=False)
    out["ray_init_seconds"] = round(time.perf_counter() - t, 2)
    out["preload_modules"] = None if address else preload
    out["split_slides"] = bool(spec["ingest"]["split_slides"])
    from gigamamba.ingest.pipeline import TRACE_ENV, embed_cohort, read_trace

    out["warm_ray_slides"] = int(job["warm_ray_slides"])
    if job.get("warm_spec"):
        t = time.perf_counter()
        warm = embed_cohort(job["warm_spec"], overwrite=True, progress=False)
        out["warm_ray_seconds"] = round(time.perf_counter() - t, 2)
        print(f"warmed Ray with {len(warm)} slide(s) in {out['warm_ray_seconds']:.1f} s (not timed below)",
              file=sys.stderr)

    trace_dir = tempfile.mkdtemp(prefix="trace-", dir=job["workdir"])
    os.environ[TRACE_ENV] = trace_dir  # left set: this process ends after the run
    from gigamamba.ingest.cpu_sampler import CpuSampler

    # What the bench is for: embed_cohort finding torch not imported, as in a fresh `gigamamba embed`
    out["torch_imported_before_embed"] = "torch" in sys.modules
    t, t_epoch = time.perf_counter(), time.time()
    with CpuSampler() as cpu:  # its driver is os.getpid(): this process, which runs embed_cohort
        manifest = embed_cohort(spec, overwrite=True, progress=True)
    wall = time.perf_counter() - t

    from gigamamba.ingest.bench import _load, startup_breakdown

    out["trace_dir"] = trace_dir
    events = read_trace(trace_dir)
    out["startup_breakdown"] = startup_breakdown(events)
    starts = [e["t"] for e in events if e["event"] == "embed_start"]
    first_batch = out["startup_breakdown"].get("first_batch")
    out["cpu"] = cpu.summary(start=t_epoch, split_at=(min(starts) + first_batch)
                             if starts and first_batch is not None else None)
    done = int(manifest.loc[manifest.status == "complete", "n_tiles"].sum())
    out["end_to_end_tiles"] = done
    rates["end_to_end"] = done / wall
    out["load_avg_1m_at"] = {"end_to_end": _load()}
    out["end_to_end_seconds"] = round(wall, 2)
    # The same tiles over Ray's own start as well: what a first `gigamamba embed` on a fresh node sees
    rates["end_to_end_with_ray_start"] = done / (wall + out["ray_init_seconds"])
    tp = manifest.attrs.get("throughput", {})
    stream = tp.get("streaming_seconds") or 0.0
    # steady state: tiles after the first batch over the time from first to last batch back
    if stream > 1.0 and tp.get("streaming_tiles", 0) > 0:
        rates["steady_state"] = tp["streaming_tiles"] / stream
        out["startup_seconds"] = round(wall - stream, 2)
    print(f"end to end (Ray Data, plan + read + embed + write): {rates['end_to_end']:.1f} tiles/s "
          f"({done} tiles in {wall:.1f} s; first to last tile {stream:.1f} s)", file=sys.stderr)
    out["tiles_per_s"] = rates
    return out


def _end_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """A bench killed outright (the OOM killer, SIGKILL) must not leave this process and its Ray running on
    the GPU: when the parent is gone (we are re-parented), interrupt the run, and exit if that does not end it."""
    import signal
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        print("bench_child: the bench process is gone; stopping", file=sys.stderr)
        # SIGTERM, handled in the main thread (main() and ray.init both make it a SystemExit): the run stops
        # and Ray shuts down at exit as usual. Not SIGINT: a job started in the background by a shell without
        # job control (CI) inherits SIGINT ignored, and Python then raises no KeyboardInterrupt for it.
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    import signal

    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # a clean exit (atexit, Ray's shutdown), not a bare kill
    _end_with_parent(os.getppid())
    with open(argv[0]) as f:
        job = json.load(f)
    out = run_pipeline(job)
    tmp = argv[1] + ".part"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, argv[1])  # whole or absent: the bench never reads half a result
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
