"""`gigamamba bench read` on a tiny CPU cohort: each way decodes every planned tile once, and the shares add up."""

import argparse
import json

import pytest

pytestmark = pytest.mark.slow


def test_bench_read_decodes_the_whole_cohort_each_way(tmp_path, ray_local):
    from gigamamba.ingest import bench_read
    from gigamamba.ingest.plan import plan_slide, read_slide_jobs

    parser = argparse.ArgumentParser()
    bench_read.configure(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args(["--workdir", str(tmp_path / "w"), "--out", str(out), "--slides", "3",
                              "--unique-slides", "2", "--size-px", "2048", "--patch-px", "128", "--input-px", "32",
                              "--tiles-per-task", "8", "--processes", "2", "--passes", "1",
                              "--decode-seconds", "0.5", "--sample-seconds", "0.05"])
    assert bench_read.run(args) == 0
    res = json.loads(out.read_text())

    # the tiles a pass must decode, planned here independently of the bench: rows cycle through the 2 files
    csv = tmp_path / "w" / "cohort-u2-s2048" / "cohort-3.csv"
    jobs, rejected = read_slide_jobs(csv)
    assert not rejected and len(jobs) == 3
    tiling = {"patch_px": 128, "target_mpp": 0.5, "tissue_threshold": 0.25}
    planned = sum(plan_slide(j, tiling).n_tiles for j in jobs)
    assert res["tiles_per_pass"] == planned > 3 * 8  # several chunks a slide
    # no chunk lost or counted twice, by the plain tasks or by Ray Data's blocks
    assert res["tiles"] == {"task": planned, "ray_data": planned}
    rates = res["tiles_per_s"]
    assert set(rates) == {"loop", "task", "ray_data"} and min(rates.values()) > 0
    assert res["put_ms_per_chunk"] > 0 and res["plan_seconds_per_slide"] > 0
    # the shares are the costs over the loop's time for the same tiles, and the expectations follow from them
    tile_s = res["processes"] / rates["loop"]
    chunk_s = 8 * tile_s
    assert res["put_share"] == pytest.approx(res["put_ms_per_chunk"] / 1e3 / chunk_s, rel=1e-2)
    assert res["task_expected_from_planning"] == pytest.approx(rates["loop"] / (1 + res["plan_share"]), rel=1e-3)
    # the traced Ray Data pass: every slide but each process's first followed a turnaround. Which processes run
    # them is Ray's choice: slides this small may all go to one (Ray Data starts its second read task ~1 s after
    # the first, README), or, in this session's shared Ray with idle workers, one each.
    slots = res["ray_data_slots"]
    assert slots["processes"] in (1, 2, 3) and len(slots["first_start_s"]) == slots["processes"]
    assert slots["first_start_s"][0] == 0 and slots["first_start_s"] == sorted(slots["first_start_s"])
    assert slots["turnarounds"] == 3 - slots["processes"]
    if slots["turnarounds"]:
        assert 0 <= slots["turnaround_median_s"] <= slots["turnaround_max_s"]
    # every timed pass was sampled (the sampler takes a last sample when stopped, however short the pass), and
    # the plain task is named so that the sampler counts its process as a read task, as it counts Ray Data's
    assert set(res["cpu"]) == {"task", "ray_data"} and all("read" in c for c in res["cpu"].values())
    from gigamamba.ingest.cpu_sampler import classify

    assert classify(f"ray::{bench_read.plan_and_read_task.__name__}()", 1, 2) == "read"


def test_executor_wait_is_set_inside_restored_after_and_bad_values_refused(monkeypatch):
    from ray.data._internal.execution import streaming_executor_state as state

    from gigamamba.ingest.pipeline import executor_wait

    default = state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S
    with executor_wait(0.02):
        assert state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == 0.02  # what Ray Data's scheduling loop reads each step
    assert state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == default
    with pytest.raises(RuntimeError, match="boom"), executor_wait(0.03):
        raise RuntimeError("boom")
    assert state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == default  # restored on an error too
    with executor_wait(None):
        assert state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == default
    for bad in (0, -1, "soon", float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="ingest.executor_wait_s must be"), executor_wait(bad):
            pass
    monkeypatch.delattr(state, "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S")
    with pytest.raises(ValueError, match="has no WAIT_FOR_TASK_COMPLETION_TIMEOUT_S"), executor_wait(0.02):
        pass


def test_bench_read_refuses_bad_settings_before_decoding(tmp_path, capsys):
    from gigamamba.cli import main

    for flag, value, says in (("--executor-wait-s", "0", "executor_wait_s must be"),
                              ("--limits-refresh-s", "-1", "limits_refresh_s must be"),
                              ("--chunks-per-block", "0", "chunks_per_block must be")):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "read", "--workdir", str(tmp_path / "w"), flag, value])
        assert says in str(exc.value.code)
    assert not (tmp_path / "w").exists()  # refused before any cohort was written


def test_chunk_block_bytes_targets_k_chunks_and_refuses_non_integers():
    from gigamamba.ingest.pipeline import chunk_block_bytes

    chunk = 64 * 224 * 224 * 3  # bytes of a chunk of decoded tiles
    # Ray Data emits a block once it holds more than the target and slices one only at 1.5x it: k - 0.25 chunks
    # gives blocks of exactly k chunks
    assert chunk_block_bytes(64, 224, 1) == int(0.75 * chunk)
    assert chunk_block_bytes(64, 224, 2) == int(1.75 * chunk)
    assert chunk_block_bytes(64, 224, 2.0) == int(1.75 * chunk)
    assert chunk_block_bytes(4, 32, 1) == 1 << 20  # tiny demo tiles: never below 1 MiB a block
    for bad in (0, -1, 2.5, True, "2", float("inf"), float("nan"), None):
        with pytest.raises(ValueError, match="ingest.chunks_per_block must be an integer >= 1"):
            chunk_block_bytes(64, 224, bad)
