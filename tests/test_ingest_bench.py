"""`gigamamba bench ingest` on a tiny CPU cohort: the results carry a start-up breakdown that adds up."""

import argparse
import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def test_bench_ingest_reports_a_monotone_startup_breakdown(tmp_path, ray_local, capsys):
    from gigamamba.ingest import bench
    from gigamamba.ingest.pipeline import TRACE_ENV

    parser = argparse.ArgumentParser()
    bench.configure(parser)
    out = tmp_path / "r.json"
    # The pipeline runs in a child interpreter; it joins this session's Ray instead of starting its own
    address = ray_local.get_runtime_context().gcs_address
    args = parser.parse_args(["--workdir", str(tmp_path / "w"), "--out", str(out), "--slides", "2",
                              "--size-px", "1536", "--patch-px", "128", "--encoder", "test_resnet",
                              "--input-px", "32", "--tiles-per-task", "8", "--warm-ray-slides", "1",
                              "--address", address, "--gpu-wait", "spin",
                              "--skip", "decode", "--skip", "encoder", "--skip", "clam"])
    assert bench.run(args) == 0
    assert TRACE_ENV not in os.environ  # set in the pipeline's process only
    res = json.loads(out.read_text())
    b = res["startup_breakdown"]
    # measured as a fresh `gigamamba embed` runs: in a new interpreter with torch not imported before
    # embed_cohort (this process has it imported), so the encoder check took the child-process path
    assert res["pipeline_process"] == "fresh" and res["torch_imported_before_embed"] is False
    assert res["tiles_per_task"] == 8  # the chunk size is recorded: it moves the steady state (README)
    assert res["ingest"]["gpu_wait"] == "spin"  # the flag reaches the spec the pipeline ran with
    assert res["preload_modules"] is None  # joined a running Ray: its preload is whoever started it
    # every planned tile was embedded, and the rate is those tiles over the measured seconds
    assert res["end_to_end_tiles"] == res["tiles"] > 0
    assert abs(res["tiles_per_s"]["end_to_end"] * res["end_to_end_seconds"] - res["tiles"]) <= 0.01 * res["tiles"]
    # the untimed warm-up embedded its one slide into its own store; the measured run, both slides into its own
    from gigamamba.features.store import GridStore

    warm = GridStore(tmp_path / "w" / "store-u2-s1536-warm.zarr")
    assert res["warm_ray_slides"] == 1 and res["warm_ray_seconds"] > 0 and len(warm.complete_slides()) == 1
    assert len(GridStore(tmp_path / "w" / "store-u2-s1536.zarr").complete_slides()) == 2
    text = capsys.readouterr().out
    assert "Ray warmed by 1 slide(s) first" in text
    chains = [
        ["ray_ready", "multinode_checked", "store_opened", "store_ready", "dataset_start", "dataset_built",
         "read_task_start", "plan_done", "first_chunk_read", "first_batch", "first_slide_complete", "embed_end"],
        ["zarr_imported", "store_opened"],  # the import thread is joined before the store opens
        ["actor_init_start", "actor_imports_done", "actor_model_ready", "actor_first_call_start",
         "actor_first_call_done", "first_batch"],
    ]
    for chain in chains:
        values = [b[k] for k in chain]
        assert values == sorted(values), dict(zip(chain, values))
    assert 0 <= b["dataset_built"] and b["embed_end"] <= res["end_to_end_seconds"] + 0.5
    assert b["actors"] == 1 and b["read_processes"] >= 1
    # the rows of the first batch back had all been embedded by then
    assert 1 <= b["actor_calls_before_first_batch"] and b["tiles_embedded_before_first_batch"] >= b["first_batch_rows"]
    # a 2-slide cohort needs far fewer than the traced calls: the counts are exact, not lower bounds
    assert b["actor_calls_lower_bound"] is False
    assert b["actor_module_import_start"] <= b["actor_module_import_end"] <= b["actor_init_start"]
    # decoding seen from the trace: nothing is embedded before it is decoded, and by the first batch back at
    # least that batch's tiles had been decoded; by the end, every tile
    assert 0 <= b["tiles_decoded_before_actor_first_call_start"] <= b["tiles_decoded_before_first_batch"] <= res["tiles"]
    assert b["tiles_decoded_before_first_batch"] >= b["first_batch_rows"]
    assert res["tiles_per_s"]["end_to_end_with_ray_start"] <= res["tiles_per_s"]["end_to_end"]
    assert 0 < b["actor_call_seconds_median"] < res["end_to_end_seconds"]
    assert 0 <= b["actor_gap_seconds_median"] < res["end_to_end_seconds"]
    assert 0 < b["plan_seconds_median"] <= b["plan_seconds_max"] < b["embed_end"]
    assert b["first_chunk_read"] <= b["last_chunk_read"] <= b["embed_end"]
    # the last read process to start its first read task started after the first and before the end
    assert b["read_task_start"] <= b["read_processes_all_started"] <= b["embed_end"]
    if "startup_cost_seconds" in b:  # only when tiles were decoded after the first batch
        assert b["startup_cost_seconds"] <= b["first_batch"]
    # the CPU sampler saw the run: the driver and the read tasks used CPU, and no kind used more than the machine
    cpu = res["cpu"]["all"]
    assert cpu["seconds"] > 0 and cpu["driver"] > 0 and cpu["read"] + cpu["encoder"] > 0, cpu
    assert all(0 <= cpu[k] <= res["cpu"]["cores"] * 1.2 for k in cpu if k != "seconds"), cpu
    if b.get("decode_rate_after_first_batch") and res["cpu"].get("after", {}).get("read", 0) > 0:  # decoded after it
        assert 0 < res["in_run_decode"]["fraction"] and "drift-free view" in text
    assert os.path.isdir(res["trace_dir"]) and os.listdir(res["trace_dir"])
    assert "start-up, seconds after embed_cohort started" in text and "actor_model_ready" in text


def test_a_failed_pipeline_process_fails_the_bench_with_its_exit_code(capsys):
    """The pipeline's child dies (here: a job it cannot read): a one-line error naming its exit code, the
    bench exits with that code, and no rate is reported."""
    from gigamamba.ingest import bench

    with pytest.raises(SystemExit) as exc:
        bench.pipeline_in_fresh_process({})  # KeyError in the child, before Ray is touched
    assert exc.value.code == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("gigamamba bench ingest:")]
    assert len(lines) == 1 and "exited with code 1" in lines[0], lines


def _ended(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line for line in f)  # a zombie has ended
    except OSError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_pipeline_process_stops_when_the_bench_is_killed(tmp_path):
    """A bench killed outright leaves no pipeline process behind: the child notices it was re-parented."""
    pid_file = tmp_path / "pid"
    # SIGINT ignored, as a shell without job control (CI) starts background jobs: the stop must not need it
    child = ("import os, signal, time\n"
             "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
             "from gigamamba.ingest.bench_child import _end_with_parent, _exit_on_sigterm\n"
             "signal.signal(signal.SIGTERM, _exit_on_sigterm)\n"
             "_end_with_parent(os.getppid(), poll_s=0.1)\n"
             f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
             "time.sleep(120)\n")
    # the "bench": starts the child, waits until it is watching, then dies without a word (as on SIGKILL)
    bench = ("import subprocess, sys, time, os\n"
             f"subprocess.Popen([sys.executable, '-c', {child!r}])\n"
             f"while not os.path.exists({str(pid_file)!r}): time.sleep(0.05)\n"
             "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", bench], timeout=60, check=True)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 20
    while not _ended(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _ended(pid), "the pipeline's process outlived the bench"


def test_decode_ceiling_decodes_for_at_least_the_asked_time_twice(tmp_path):
    """A ceiling from one short pass is underestimated; the bench decodes for min_seconds, twice."""
    import time

    from gigamamba.ingest import bench
    from gigamamba.ingest.plan import plan_slide, read_slide_jobs
    from gigamamba.slides.synth import write_synthetic_cohort

    write_synthetic_cohort(tmp_path / "c", task="classification", n_slides=1, seed=0, size_px=1536,
                           magnifications=(20,))
    jobs, _ = read_slide_jobs(tmp_path / "c" / "cohort.csv")
    plans = [plan_slide(jobs[0], {"patch_px": 128, "target_mpp": 0.5, "tissue_threshold": 0.25})]
    t0 = time.perf_counter()
    rate = bench.bench_decode(plans, 32, 8, processes=1, min_seconds=0.75, repeats=2)
    assert time.perf_counter() - t0 >= 1.5
    assert rate > 0


def test_the_table_warns_when_the_decode_ceiling_moved_during_the_run():
    """A node whose CPUs slowed between the two ceiling passes: the fraction is flagged, not silently low."""
    from gigamamba.ingest.bench import _table

    res = {"slides": 288, "tiles": 400896, "tiles_per_slide": 1392, "encoder": "resnet50-trunc", "input_px": 224,
           "batch_size": 256, "machine": {"cpu": "Xeon", "cores": 16},
           "tiles_per_s": {"end_to_end": 3075.0, "decode_ceiling": 5392.9, "decode_ceiling_before_pipeline": 5392.9,
                           "decode_ceiling_after_pipeline": 3742.0},
           "fraction_of_lower_ceiling": 0.57}
    assert "WARNING: the decode ceiling moved -31%" in _table(res)
    res["tiles_per_s"]["decode_ceiling_after_pipeline"] = 5300.0  # within 2%: no warning
    assert "WARNING" not in _table(res)


def test_the_drift_free_view_uses_the_read_processes_own_rate_a_core():
    """End to end over (cores x the read processes' in-run tiles a core-second), beside the ceiling's passes a core;
    absent when the run was not traced or not CPU-sampled. Figures of session 12's run Q7 (README)."""
    from gigamamba.ingest.bench import _table, in_run_decode

    res = {"slides": 288, "tiles": 400896, "tiles_per_slide": 1392, "encoder": "resnet50-trunc", "input_px": 224,
           "batch_size": 256, "machine": {"cpu": "Xeon", "cores": 16}, "decode_processes": 16,
           "tiles_per_s": {"end_to_end": 3005.16, "decode_ceiling": 3701.71, "decode_ceiling_before_pipeline": 3701.71,
                           "decode_ceiling_after_pipeline": 3676.34},
           "startup_breakdown": {"decode_rate_after_first_batch": 3187.0},
           "cpu": {"cores": 16, "after": {"seconds": 118.5, "read": 14.01}}}
    got = in_run_decode(res)
    assert got["tiles_per_read_core_s"] == pytest.approx(3187.0 / 14.01, abs=0.05)
    assert got["ceiling"] == pytest.approx(16 * 3187.0 / 14.01, abs=0.1)
    assert got["fraction"] == pytest.approx(3005.16 / (16 * 3187.0 / 14.01), abs=5e-4)  # 0.826
    assert (got["ceiling_before_per_core"], got["ceiling_after_per_core"]) == (231.4, 229.8)
    # the ceiling's passes a core are over its decode processes, the in-run ceiling over the sampled cores
    halved = in_run_decode({**res, "decode_processes": 8})
    assert (halved["ceiling_before_per_core"], halved["fraction"]) == (462.7, got["fraction"])
    # the same decode rate on half the read cores: each core decoded twice as fast, so the in-run ceiling doubles
    res["cpu"]["after"]["read"] = 7.005
    assert in_run_decode(res)["fraction"] == pytest.approx(got["fraction"] / 2, abs=1e-3)
    res["cpu"]["after"]["read"] = 14.01
    res["in_run_decode"] = got
    assert "227.5 tiles/s a core after the first batch (ceiling passes: 231.4 / 229.8 a core)" in _table(res)
    assert "82.6%" in _table(res)
    for missing in ("cpu", "startup_breakdown"):
        assert in_run_decode({k: v for k, v in res.items() if k != missing}) is None
    res["cpu"]["after"]["read"] = 0.0  # no read process was sampled after the first batch
    assert in_run_decode(res) is None
