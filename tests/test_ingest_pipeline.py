"""The Ray Data embed pipeline on a tiny real cohort: bad slides, manifest rows, features, rerun, resume.

Real OpenSlide on synthetic SVS/TIFF, real Ray (the shared `ray_local` runtime), real Zarr.
"""

import shutil

import numpy as np
import pandas as pd
import pytest

from gigamamba.features.store import GridStore
from gigamamba.slides.synth import corrupt_tile, truncate_file, write_pyramid_tiff, write_synthetic_cohort
from gigamamba.spec import resolve_spec

pytestmark = pytest.mark.slow

ENCODER = {"name": "test_resnet", "weights": "random", "input_px": 32, "batch_size": 16}
TILING = {"patch_px": 128, "target_mpp": 0.5, "tissue_threshold": 0.25}


def _tissue_point(path):
    from gigamamba.slides.reader import open_slide, resolve_mpp
    from gigamamba.slides.tissue import detect_tissue

    slide = open_slide(path)
    mask = detect_tissue(slide, resolve_mpp(slide.properties))
    ys, xs = np.nonzero(mask)
    k = len(ys) // 2
    scale = slide.dimensions[0] / mask.shape[1]
    return int(xs[k] * scale), int(ys[k] * scale)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """3 good slides (SVS 20x, TIFF 20x, SVS 40x) and one of every kind of bad input."""
    root = tmp_path_factory.mktemp("cohort")
    csv = write_synthetic_cohort(root, task="classification", n_slides=3, seed=4, size_px=1536)
    good = pd.read_csv(csv, dtype={"slide_id": str})
    slides = root / "slides"
    shutil.copy(slides / "clas000.svs", slides / "trunc.svs")
    truncate_file(slides / "trunc.svs", 0.5)
    shutil.copy(slides / "clas001.tif", slides / "badtile.tif")
    corrupt_tile(slides / "badtile.tif", *_tissue_point(slides / "badtile.tif"))
    write_pyramid_tiff(slides / "blank.svs", np.full((1536, 1536, 3), 242, np.uint8), 0.5, aperio=True)
    rgb = np.asarray(__import__("openslide").OpenSlide(str(slides / "clas001.tif")).read_region(
        (0, 0), 0, (1536, 1536)).convert("RGB"))
    write_pyramid_tiff(slides / "nompp.tif", rgb, None)
    write_pyramid_tiff(slides / "nompp_fixed.tif", rgb, None)
    bad = [("trunc", "slides/trunc.svs", None), ("badtile", "slides/badtile.tif", None),
           ("blank", "slides/blank.svs", None), ("nompp", "slides/nompp.tif", None),
           ("nompp_fixed", "slides/nompp_fixed.tif", 0.5), ("gone", "slides/gone.svs", None),
           ("dup", "slides/clas000.svs", None), ("dup", "slides/clas001.tif", None),
           ("../x", "slides/clas000.svs", None)]
    rows = good.assign(mpp=np.nan).to_dict("records")
    rows += [{"slide_id": s, "case_id": f"c-{s}", "label": 0, "slide_path": p, "mpp": m} for s, p, m in bad]
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    return root


def _spec(root, store):
    # A coarse thumbnail (a pyramid level above the corrupt level-0 tile) so that `badtile` fails in the read
    # stage, where the corrupt tile is, not already while planning: that is the path under test.
    return resolve_spec({"cohort": {"csv": "cohort.csv"}, "tiling": TILING, "encoder": ENCODER, "store": store,
                         "ingest": {"tiles_per_task": 8, "tissue": {"min_side": 256}}}, root)


def test_bad_input_gets_one_line_errors_and_the_rest_goes_on(cohort, ray_local):
    from gigamamba.ingest.pipeline import embed_cohort

    df = embed_cohort(_spec(cohort, "a.zarr"), progress=False).set_index("slide_id")
    complete = sorted(df.index[df.status == "complete"])
    assert complete == ["clas000", "clas001", "clas002", "nompp_fixed"]
    err = df.error
    assert "corrupt or truncated" in err["trunc"] or "OpenSlide can read" in err["trunc"]
    assert "corrupt tile" in err["badtile"]
    assert "no tissue" in err["blank"]
    assert "nompp" in err["nompp"] and "`mpp` column" in err["nompp"]
    assert "does not exist" in err["gone"]
    assert "appears on lines" in err["dup"]
    assert "escape" in err["../x"]
    for sid in err.index:
        assert "\n" not in err[sid] and (sid in err[sid] or sid == "dup" or df.status[sid] == "complete")
    assert (df.status[df.error != ""] == "failed").all()
    assert not (cohort / "x").exists() and not (cohort / "x.zarr").exists()

    store = GridStore(cohort / "a.zarr")
    assert store.complete_slides() == complete  # nothing of a failed slide is left complete
    for sid in complete:
        feats, mask = store.read(sid)
        a = store.slide_attrs(sid)
        assert mask.sum() == a["n_tiles"] == df.n_tiles[sid] > 10
        assert [df.H[sid], df.W[sid]] == a["grid_shape"] == list(mask.shape)
        assert np.abs(feats[mask]).sum(-1).min() > 0 and (feats[~mask] == 0).all()
        x0, y0 = a["origin_level0"]
        assert x0 % a["stride_level0"] == 0 and y0 % a["stride_level0"] == 0
    # 20x and 40x scans of the same layout would give the same stride in micrometres
    assert store.slide_attrs("clas002")["stride_level0"] == 2 * store.slide_attrs("clas000")["stride_level0"]


def test_features_sit_in_the_cells_they_came_from(cohort, ray_local):
    """Re-embed a few cells by hand (read_region at the cell's level-0 corner) and compare."""
    from gigamamba.features.encoders import create_encoder
    from gigamamba.slides.reader import read_tiles

    store = _store_a(cohort)
    feats, mask = store.read("clas002")  # a 40x slide: level-0 reads of 256 px resized to 32
    a = store.slide_attrs("clas002")
    ii, jj = np.nonzero(mask)
    pick = [0, len(ii) // 2, len(ii) - 1]
    s = a["stride_level0"]
    xs = [round(a["origin_level0"][0] + jj[k] * s) for k in pick]
    ys = [round(a["origin_level0"][1] + ii[k] * s) for k in pick]
    tiles = read_tiles(a["source"], a["read_level"], np.array(xs), np.array(ys), a["read_px"], 32)
    want = create_encoder(**{k: ENCODER[k] for k in ("name", "weights", "input_px")}, device="cpu").embed(tiles)
    got = feats[ii[pick], jj[pick]].astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-3)


def test_split_slides_mode_gives_the_same_store_and_errors(cohort, ray_local):
    """`ingest.split_slides: true` (a slide's chunks over many read tasks) writes what one task per slide does."""
    from gigamamba.ingest.pipeline import embed_cohort

    one = _store_a(cohort)
    spec = _spec(cohort, "split.zarr")
    spec["ingest"]["split_slides"] = True
    df = embed_cohort(spec, progress=False).set_index("slide_id")
    split = GridStore(cohort / "split.zarr")
    assert split.complete_slides() == one.complete_slides()
    for sid in one.complete_slides():
        (f1, m1), (f2, m2) = one.read(sid), split.read(sid)
        assert (m1 == m2).all()
        # Same tiles, same encoder; tiles meet in other batches, so CPU convolutions may differ in the last bits.
        np.testing.assert_allclose(f2.astype(np.float32), f1.astype(np.float32), rtol=1e-2, atol=1e-3)
        a1, a2 = one.slide_attrs(sid), split.slide_attrs(sid)
        assert {k: v for k, v in a1.items() if k != "seconds"} == {k: v for k, v in a2.items() if k != "seconds"}
    errors = one.manifest().set_index("slide_id")["error"]
    for sid in df.index[df.status == "failed"]:
        assert df.error[sid] == errors[sid], sid


def _store_a(cohort):
    """The store of the first test (embedded here when that test was deselected)."""
    from gigamamba.ingest.pipeline import embed_cohort

    if not (cohort / "a.zarr" / "zarr.json").exists():
        embed_cohort(_spec(cohort, "a.zarr"), progress=False)
    return GridStore(cohort / "a.zarr")


def test_rerun_embeds_only_missing_or_failed(cohort, ray_local):
    from gigamamba.ingest.pipeline import embed_cohort

    store = _store_a(cohort)
    first = store.manifest().set_index("slide_id")
    before = {sid: (store.path / sid / "zarr.json").stat().st_mtime_ns for sid in store.complete_slides()}
    again = embed_cohort(_spec(cohort, "a.zarr"), progress=False).set_index("slide_id")
    assert set(again.index[again.action == "kept"]) == set(before)
    assert set(again.index[again.action == "embedded"]) == set()
    assert set(again.index[again.action == "failed"]) == set(first.index[first.status == "failed"])  # retried
    after = {sid: (store.path / sid / "zarr.json").stat().st_mtime_ns for sid in store.complete_slides()}
    assert after == before  # complete slides were not touched


def test_resume_after_an_interrupt(cohort, ray_local):
    from gigamamba.ingest.pipeline import embed_cohort

    spec = _spec(cohort, "c.zarr")
    seen = []

    def interrupt_after_first_complete(row):
        seen.append(row["slide_id"])
        if row["status"] == "complete":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_cohort(spec, progress=False, on_slide=interrupt_after_first_complete)
    store = GridStore(cohort / "c.zarr")
    done_first = store.complete_slides()
    assert len(done_first) == 1
    for sid in store.slides():  # nothing else may claim to be complete
        assert sid in done_first or store.slides()[sid] != "complete"
    df = embed_cohort(spec, progress=False).set_index("slide_id")
    assert df.action[done_first[0]] == "kept"
    assert set(df.index[df.action == "embedded"]) == {"clas000", "clas001", "clas002", "nompp_fixed"} - set(done_first)
    assert sorted(store.complete_slides()) == ["clas000", "clas001", "clas002", "nompp_fixed"]


def test_embed_command_overwrite_exits_nonzero_with_a_summary(cohort, ray_local, capsys):
    from gigamamba.cli import main

    store = _store_a(cohort)
    before = {sid: store.slide_attrs(sid) for sid in store.complete_slides()}
    (cohort / "p.yaml").write_text(
        "cohort: {csv: cohort.csv}\n"
        f"tiling: {TILING}\nencoder: {ENCODER}\nstore: a.zarr\n"
        "ingest: {tiles_per_task: 8, tissue: {min_side: 256}}\n".replace("'", ""))  # as _spec: same plans
    rc = main(["embed", str(cohort / "p.yaml"), "--overwrite", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "4 complete, 7 failed" in out and "no tissue" in out
    assert out.count(" embedded ") == 4 and " kept " not in out  # --overwrite redid the complete slides
    assert {sid: GridStore(store.path).slide_attrs(sid) for sid in before} == before  # deterministic
    rc = main(["inspect", str(store.path)])
    out = capsys.readouterr().out
    assert rc == 0 and "4 complete" in out and "failures:" in out and "trunc" in out


def test_sigint_mid_run_then_resume(tmp_path, ray_local):
    """A real `gigamamba embed` process interrupted with Ctrl-C after its first complete slide; a rerun
    embeds only the rest, and no slide is ever complete with partial data."""
    import os
    import signal
    import subprocess
    import sys

    from gigamamba.ingest.pipeline import embed_cohort

    n = 8
    write_synthetic_cohort(tmp_path, task="spatial", n_slides=n, seed=7, size_px=1536, magnifications=(20,))
    (tmp_path / "p.yaml").write_text(
        "cohort: {csv: cohort.csv}\n"
        # read_cpus 3 of the 4 Ray CPUs (one is the encoder actor's): one slide read at a time.
        f"tiling: {TILING}\nencoder: {ENCODER}\nstore: s.zarr\ningest: {{tiles_per_task: 4, read_cpus: 3}}\n"
        .replace("'", ""))
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    # A test run started in the background (`cmd &`, nohup) inherits SIGINT ignored, and Python then keeps it
    # ignored: give the child the default disposition, as a terminal would, so Ctrl-C means KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "gigamamba", "embed", str(tmp_path / "p.yaml")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Ctrl-C the moment the driver reports its first complete slide. Polling the manifest instead once missed
    # the whole run on a loaded CI machine: when the encoder actor starts late, every slide completes in one burst.
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if ": complete" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, _ = proc.communicate(timeout=120)
    out = "".join(seen) + out
    assert proc.returncode != 0, f"the run finished before it could be interrupted:\n{out[-2000:]}"
    assert proc.returncode == 130, out[-2000:]
    store = GridStore(tmp_path / "s.zarr")
    done_first = set(store.complete_slides())
    assert 1 <= len(done_first) < n
    for sid in done_first:  # what claims to be complete is whole
        feats, mask = store.read(sid)
        assert mask.sum() == store.slide_attrs(sid)["n_tiles"] and np.abs(feats[mask]).sum(-1).min() > 0
    spec = resolve_spec({"cohort": {"csv": "cohort.csv"}, "tiling": TILING, "encoder": ENCODER, "store": "s.zarr",
                         "ingest": {"tiles_per_task": 4}}, tmp_path)
    df = embed_cohort(spec, progress=False).set_index("slide_id")
    assert set(df.index[df.action == "kept"]) == done_first
    assert set(df.index[df.action == "embedded"]) == set(df.index) - done_first
    assert len(store.complete_slides()) == n


def _first(events, name, **match):
    ts = [e["t"] for e in events if e["event"] == name and all(e.get(k) == v for k, v in match.items())]
    assert ts, f"no {name} {match} in the trace: {sorted({e['event'] for e in events})}"
    return min(ts)


def test_startup_trace_events_exist_and_are_ordered(cohort, ray_local, tmp_path, monkeypatch):
    """GIGAMAMBA_INGEST_TRACE: driver, read tasks and encoder actor each write their events, in order.

    ray_local started before the variable was set, so the workers' events prove trace_dir is passed to them.
    """
    import os

    from gigamamba.ingest import pipeline
    from gigamamba.ingest.pipeline import TRACE_ENV, embed_cohort, read_trace

    trace = tmp_path / "trace"
    monkeypatch.setenv(TRACE_ENV, str(trace))
    started, start = [], pipeline._start_ray_data_coordinator
    monkeypatch.setattr(pipeline, "_start_ray_data_coordinator", lambda d: (started.append(d), start(d)))
    df = embed_cohort(_spec(cohort, "trace.zarr"), overwrite=True, progress=False).set_index("slide_id")
    events = read_trace(trace)
    driver = [e for e in events if e["pid"] == os.getpid()]
    assert [e["event"] for e in driver][0] == "embed_start" and driver[-1]["event"] == "embed_end"
    assert started == [str(trace)]  # Ray Data's coordinator was started beside the run, traced
    (warm,) = [e for e in events if e["event"] == "read_workers_warm"]  # on by default: idle workers imported first
    assert warm["workers"] >= 1
    t = {name: _first(events, name) for name in (
        "embed_start", "dataset_built", "read_task_start", "plan_done", "first_chunk_read", "actor_init_start",
        "actor_imports_done", "actor_model_ready", "actor_first_call_start", "actor_first_call_done",
        "first_batch", "first_slide_complete", "embed_end")}
    assert t["embed_start"] <= t["dataset_built"] <= t["read_task_start"] <= t["plan_done"] <= t["first_chunk_read"]
    assert (t["embed_start"] <= t["actor_init_start"] <= t["actor_imports_done"] <= t["actor_model_ready"]
            <= t["actor_first_call_start"] <= t["actor_first_call_done"] <= t["embed_end"])
    # the first batch back may hold only the error rows of slides that failed planning, so it can come before
    # any chunk is read; a complete slide cannot
    assert t["actor_first_call_done"] <= t["first_batch"] <= t["first_slide_complete"]
    assert t["first_chunk_read"] <= t["first_slide_complete"]
    assert t["first_slide_complete"] <= t["embed_end"] == max(e["t"] for e in events)
    # the stages ran in Ray workers, not in the driver
    for name in ("read_task_start", "first_chunk_read", "actor_model_ready"):
        assert {e["pid"] for e in events if e["event"] == name} - {os.getpid()}, name
    # every slide that reached planning: start, then plan_done; only planned slides read a first chunk
    planned = {e["slide_id"] for e in events if e["event"] == "read_task_start"}
    assert planned == set(df.index) - {"dup", "../x"}  # rejected from the CSV, never planned
    for sid in planned:
        assert _first(events, "read_task_start", slide_id=sid) <= _first(events, "plan_done", slide_id=sid)
    read = {e["slide_id"] for e in events if e["event"] == "first_chunk_read"}
    assert set(df.index[df.status == "complete"]) | {"badtile"} <= read <= planned - {"blank", "nompp", "gone"}
    assert all(e["seconds"] >= 0 for e in events if e["event"] == "plan_done")
    first_call = [e for e in events if e["event"] == "actor_first_call_done"]
    assert all(0 < e["batch"] <= ENCODER["batch_size"] for e in first_call)
    assert len(first_call) == len({e["pid"] for e in events if e["event"] == "actor_init_start"})  # once an actor
    calls = [e for e in events if e["event"] == "actor_call_done"]
    assert 0 < len(calls) <= 16 * len(first_call)  # the first calls only: a trace stays light
    assert all(0 < e["batch"] <= ENCODER["batch_size"] and e["seconds"] > 0 for e in calls)
    # every decoded chunk is traced once: a read slide's chunks add up to its planned tiles
    for sid in read:
        chunk_tiles = sum(e["tiles"] for e in events if e["event"] == "chunk_read" and e["slide_id"] == sid)
        mine = [e for e in events if e.get("slide_id") == sid]
        summary = [(e["event"], e["pid"], round(e["t"] - t["embed_start"], 2), e.get("tiles")) for e in mine]
        assert chunk_tiles == next(e["n_tiles"] for e in mine if e["event"] == "plan_done"), (sid, summary)
    assert {e["slide_id"] for e in events if e["event"] == "chunk_read"} == read
    rows = [e["rows"] for e in events if e["event"] == "driver_batch"]
    assert rows and rows[0] == next(e["rows"] for e in events if e["event"] == "first_batch")

    # Unset: nothing is written anywhere. And with ingest.warm_read_workers off, no warm-up is started.
    monkeypatch.delenv(TRACE_ENV)
    before = sorted(p.name for p in trace.iterdir())
    warmed = []
    monkeypatch.setattr(pipeline, "_warm_read_workers", lambda *args: warmed.append(args))
    spec = _spec(cohort, "trace.zarr")
    spec["ingest"]["warm_read_workers"] = False
    embed_cohort(spec, progress=False)
    assert sorted(p.name for p in trace.iterdir()) == before and read_trace(trace) == events
    assert warmed == []


def test_split_layout_stages_trace_plan_and_first_chunk(cohort, tmp_path):
    """plan_rows and read_tiles_batch (split_slides: true) write the same read-side events, in process."""
    from gigamamba.ingest.pipeline import plan_rows, read_trace, read_tiles_batch

    row = {"slide_id": "clas000", "case_id": "c0", "path": str(cohort / "slides" / "clas000.svs"),
           "mpp": float("nan"), "line": 2}
    chunks = plan_rows(row, TILING, {"min_side": 256}, 8, trace_dir=str(tmp_path))
    assert len(chunks) > 1
    for chunk in chunks[:2]:
        read_tiles_batch({k: [v] for k, v in chunk.items()}, 32, trace_dir=str(tmp_path))
    events = read_trace(tmp_path)
    assert [e["event"] for e in events] == ["read_task_start", "plan_done", "first_chunk_read", "chunk_read",
                                            "chunk_read"]
    assert all(e["slide_id"] == "clas000" for e in events)
    assert events[1]["seconds"] > 0 and events[2]["tiles"] == 8
    assert [e["tiles"] for e in events[3:]] == [8, 8] and all(e["seconds"] > 0 for e in events[3:])
    plan_rows({**row, "slide_id": "nofile", "path": str(tmp_path / "nofile.svs")}, TILING, {}, 8)  # no trace_dir
    assert read_trace(tmp_path) == events


def test_spec_and_pipeline_agree_on_ingest_defaults():
    """A spec without an ingest section and embed_cohort called with a bare spec must cut work the same way
    (the bench's --tiles-per-task default comes from the spec's): one dict, not two kept equal."""
    from gigamamba.ingest.pipeline import INGEST_DEFAULTS, _read_memory
    from gigamamba.spec import DEFAULTS

    assert INGEST_DEFAULTS is DEFAULTS["ingest"]
    from gigamamba.ingest.pipeline import LIMITS_REFRESH_S

    assert INGEST_DEFAULTS["limits_refresh_s"] == LIMITS_REFRESH_S  # the measured setting is the default
    # the read tasks' memory hint is Ray Data's advice, 1.25x what it measured them using: 307 MiB at 64 tiles of
    # 224 px on a GPU node, 291 MiB in the demo's reads (64 px)
    assert _read_memory(INGEST_DEFAULTS["tiles_per_task"], 224) >= 1.25 * (307 << 20)
    assert _read_memory(INGEST_DEFAULTS["tiles_per_task"], 64) >= 1.25 * (291 << 20)


def test_encoder_actors_share_gpus_and_leave_cpus_for_reads():
    """Pool size and per-actor resources from the cluster's GPUs and CPUs (no Ray needed: a stand-in cluster)."""
    from gigamamba.ingest.pipeline import INGEST_DEFAULTS, _embed_resources, _read_slots

    class Cluster:
        def __init__(self, **res):
            self.res = res

        def cluster_resources(self):
            return self.res

    gpu_node = Cluster(CPU=16.0, GPU=1.0)
    # by default a GPU actor reserves no CPU: every CPU goes to the reads (the actor needs ~0.55 of a core)
    res = _embed_resources(gpu_node, INGEST_DEFAULTS)
    assert res == {"size": 1, "num_gpus": 1.0, "num_cpus": 0, "threads": 1, "gpu_wait": "block"}
    assert _embed_resources(gpu_node, {**INGEST_DEFAULTS, "gpu_wait": "spin"})["gpu_wait"] == "spin"
    with pytest.raises(ValueError, match="ingest.gpu_wait must be one of block, spin, got 'sleep'"):
        _embed_resources(gpu_node, {**INGEST_DEFAULTS, "gpu_wait": "sleep"})
    assert _read_slots(gpu_node, INGEST_DEFAULTS, res) == 16
    one = _embed_resources(gpu_node, {**INGEST_DEFAULTS, "gpu_actor_cpus": 1})
    assert one["num_cpus"] == 1 and _read_slots(gpu_node, INGEST_DEFAULTS, one) == 15
    assert _embed_resources(gpu_node, {**INGEST_DEFAULTS, "gpu_actor_cpus": None})["num_cpus"] == 0  # YAML null
    with pytest.raises(ValueError, match="gpu_actor_cpus"):
        _embed_resources(gpu_node, {**INGEST_DEFAULTS, "gpu_actor_cpus": -1})
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="read_cpus"):
            _read_slots(gpu_node, {**INGEST_DEFAULTS, "read_cpus": bad}, one)
    assert _read_slots(gpu_node, {**INGEST_DEFAULTS, "read_cpus": 0.5}, res) == 32  # more read tasks than cores
    # Ray's memory resource caps the reads: 16 CPUs but room for 10 hints (the start-up line says 10)
    hint = 400 << 20
    small = Cluster(CPU=16.0, GPU=1.0, memory=float(10 * hint + (hint // 2)))
    assert _read_slots(small, INGEST_DEFAULTS, res, hint) == 10
    assert _read_slots(small, INGEST_DEFAULTS, res) == 16  # no hint given: CPUs alone
    assert _read_slots(Cluster(CPU=16.0, memory=float(hint // 3)), INGEST_DEFAULTS, res, hint) == 1  # never 0
    assert _read_slots(gpu_node, INGEST_DEFAULTS, res, hint) == 16  # no memory figure: CPUs alone
    two = _embed_resources(gpu_node, {**INGEST_DEFAULTS, "actors_per_gpu": 2, "gpu_actor_cpus": 1})
    assert two["size"] == 2 and two["num_gpus"] == 0.5 and _read_slots(gpu_node, INGEST_DEFAULTS, two) == 14
    # an explicit pool size over 4 GPUs: 6 actors -> 2 a GPU, each half a GPU
    four = _embed_resources(Cluster(CPU=64.0, GPU=4.0), {**INGEST_DEFAULTS, "embed_actors": 6})
    assert four["size"] == 6 and four["num_gpus"] == 0.5
    cpu = _embed_resources(Cluster(CPU=8.0), {**INGEST_DEFAULTS, "cpus_per_actor": 2})
    assert cpu == {"size": 2, "num_gpus": 0, "num_cpus": 2, "threads": 2}


def test_an_unknown_encoder_fails_before_any_slide_or_manifest_is_written(cohort, ray_local):
    """The encoder probe runs in a thread beside Ray's start-up; its error still comes first, in the caller."""
    from gigamamba.features.encoders import EncoderError
    from gigamamba.ingest.pipeline import embed_cohort

    spec = _spec(cohort, "probe.zarr")
    spec["encoder"] = {**spec["encoder"], "name": "no-such-net"}
    with pytest.raises(EncoderError, match="no-such-net"):
        embed_cohort(spec, overwrite=True, progress=False)
    store = GridStore(cohort / "probe.zarr")
    assert store.complete_slides() == [] and len(store.manifest()) == 0



def test_start_up_heartbeat_prints_until_stopped(capsys):
    """The first tiles take 15-20 s on a fresh node: the progress line keeps coming until they do."""
    import time

    from gigamamba.ingest.pipeline import _Progress

    stop = _Progress(True, 3).heartbeat("waiting for the first tiles", every=0.05)
    time.sleep(0.3)
    stop.set()
    time.sleep(0.15)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "waiting for the first tiles" in ln]
    assert len(lines) >= 2 and all(ln.startswith("[embed ") for ln in lines)
    time.sleep(0.2)
    assert "waiting" not in capsys.readouterr().err  # stopped: nothing more
    quiet = _Progress(False, 3).heartbeat("x", every=0.01)
    time.sleep(0.05)
    quiet.set()
    assert capsys.readouterr().err == ""


def test_ray_data_coordinator_is_started_early_and_a_failure_is_only_traced(ray_local, tmp_path, monkeypatch):
    """embed_cohort starts Ray Data's AutoscalingCoordinator at ray_ready (until it answers, Ray Data runs one
    read task). The helper leaves the named actor up and traces it; if Ray Data's internal API is gone, it
    traces that and returns, so the pipeline goes on as before."""
    import builtins

    from gigamamba.ingest.pipeline import _start_ray_data_coordinator, read_trace

    for sub in ("ok", "gone"):
        (tmp_path / sub).mkdir()
    _start_ray_data_coordinator(str(tmp_path / "ok"))
    assert [e["event"] for e in read_trace(tmp_path / "ok")] == ["coordinator_ready"]
    ray_local.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")  # raises if absent

    real_import = builtins.__import__

    def no_internal_api(name, *args, **kwargs):
        if name.startswith("ray.data._internal.cluster_autoscaler"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_internal_api)
    _start_ray_data_coordinator(str(tmp_path / "gone"))  # no exception
    assert [(e["event"], e["error"]) for e in read_trace(tmp_path / "gone")] == [("coordinator_not_started",
                                                                                 "ImportError")]


@pytest.mark.parametrize("chunks_per_block", [1, 2])
def test_read_blocks_hold_chunks_per_block_chunks(cohort, ray_local, chunks_per_block):
    """Ray Data emits a read block once it holds more than its target: the target chunk_block_bytes sets must give
    blocks of exactly `chunks_per_block` chunks (session 10 found 1.5 chunks giving two), the last one shorter."""
    import ray.data

    from gigamamba.ingest.pipeline import read_block_size, read_dataset
    from gigamamba.ingest.plan import plan_slide, read_slide_jobs

    jobs, _ = read_slide_jobs(cohort / "cohort.csv")
    job = next(j for j in jobs if j.slide_id == "clas000")
    chunk, px = 12, 224  # 1.8 MB a chunk: 0.75 of it is above the 1 MiB floor of a block
    n_tiles = plan_slide(job, TILING).n_tiles
    assert n_tiles > 3 * chunk  # enough chunks to see whole blocks and a remainder
    with read_block_size(chunk, px, chunks_per_block):
        ds = read_dataset(ray_local, [job.to_row()], {"split_slides": False, "tiles_per_task": chunk}, TILING, {}, px,
                          {"num_cpus": 1, "compute": ray.data.TaskPoolStrategy(size=1)})
    rows = [m.num_rows for bundle in ds.iter_internal_ref_bundles() for m in bundle.metadata]
    per_block = chunk * chunks_per_block
    assert sum(rows) == n_tiles
    assert rows[:-1] == [per_block] * (len(rows) - 1)
    assert 0 < rows[-1] <= per_block


def test_bad_ingest_settings_are_refused_before_anything_is_written(cohort, tmp_path):
    from gigamamba.ingest.pipeline import embed_cohort

    for key, value, says in (("executor_wait_s", 0, "ingest.executor_wait_s must be"),
                             ("executor_wait_s", "fast", "ingest.executor_wait_s must be"),
                             ("chunks_per_block", 0, "ingest.chunks_per_block must be"),
                             ("limits_refresh_s", 0, "ingest.limits_refresh_s must be"),
                             ("warm_read_workers", "yes", "ingest.warm_read_workers must be true or false"),
                             ("gpu_wait", "sleep", "ingest.gpu_wait must be one of block, spin")):
        spec = _spec(cohort, str(tmp_path / f"{key}-{value}.zarr"))
        spec["ingest"][key] = value
        with pytest.raises(ValueError, match=says):
            embed_cohort(spec, progress=False)
        assert not (tmp_path / f"{key}-{value}.zarr").exists()


def test_read_workers_are_warmed_and_a_failure_is_only_traced(ray_local, tmp_path, monkeypatch):
    from gigamamba.ingest import pipeline

    for sub in ("ok", "gone"):
        (tmp_path / sub).mkdir()
    pipeline._warm_read_workers(2, str(tmp_path / "ok"))
    (event,) = pipeline.read_trace(tmp_path / "ok")
    assert event["event"] == "read_workers_warm" and 1 <= event["workers"] <= 2

    def broken():
        raise ImportError("no such module")

    monkeypatch.setattr(pipeline, "warm_read_imports", broken)
    pipeline._warm_read_workers(1, str(tmp_path / "gone"))  # no exception
    assert [e["event"] for e in pipeline.read_trace(tmp_path / "gone")] == ["read_workers_not_warmed"]


def test_fast_limits_refresh_is_set_inside_and_restored(monkeypatch):
    from ray.data._internal.execution.resource_manager import ResourceManager

    from gigamamba.ingest.pipeline import LIMITS_REFRESH_S, fast_limits_refresh

    default = ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S
    assert default > LIMITS_REFRESH_S  # Ray Data 2.60: 1 s, the wait this shortens
    with fast_limits_refresh():
        assert ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == LIMITS_REFRESH_S
    assert ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == default
    with pytest.raises(RuntimeError), fast_limits_refresh():
        raise RuntimeError("the pipeline failed")
    assert ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == default
    with fast_limits_refresh(seconds=None):  # ingest.limits_refresh_s: null keeps Ray Data's own
        assert ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == default
    with pytest.raises(ValueError, match="ingest.limits_refresh_s must be"), fast_limits_refresh(seconds=-1):
        pass
