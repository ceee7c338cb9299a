"""A real multi-node Ray cluster on this machine (head + 2 worker nodes, each its own `ray start`, all on
127.0.0.1), an MLflow tracking server, and the failures a cluster sees: a node lost while embedding, a
Ray Train worker killed inside a fold, the driver killed while embedding.

One cluster and one cohort serve the whole module (start-up dominates on a 2-core CI machine). The
demo-sized pipeline that `gigamamba submit` runs first also embeds the cohort undisturbed: the reference
that every run with a failure must reproduce.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
N_SLIDES = 8
FOLDS = 2

local = pytest.importorskip("gigamamba.cluster.local")


# ----------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def shared():
    """The 'shared filesystem': every node of a one-machine cluster sees the same /tmp."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="gms-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_launch(shared):
    """Start an MLflow tracking server on 127.0.0.1 without waiting for it (it starts while the cluster does)."""
    port = local.free_port()
    root = shared / "mlflow"
    root.mkdir()
    log = open(root / "server.log", "wb")
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        yield proc, f"http://127.0.0.1:{port}", root / "server.log"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def cluster(mlflow_launch):
    c = local.LocalCluster(head_cpus=0)
    try:
        c.start_head()
        c.add_node(num_cpus=2)
        c.add_node(num_cpus=2)
        yield c
    finally:
        c.shutdown()


def worker_nodes(c) -> list:
    return [n for n in c.nodes if not n.head and n.alive]


def ensure_workers(c, n: int = 2) -> None:
    while len(worker_nodes(c)) < n:
        c.add_node(num_cpus=2)


@pytest.fixture(scope="module")
def mlflow_server(mlflow_launch):
    proc, url, log = mlflow_launch
    deadline = time.monotonic() + 300  # a loaded 2-core machine takes minutes to import the server
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cohort_csv(shared):
    synth = pytest.importorskip("gigamamba.slides.synth", reason="gigamamba.slides.synth has not landed")
    return synth.write_synthetic_cohort(shared / "cohort", "classification", n_slides=N_SLIDES, seed=0, size_px=1536)


def pipeline_spec(shared: Path, name: str, cohort_csv: Path, tracking_uri: str, **overrides) -> Path:
    """pipelines/demo.yaml, resized for a 2-core CI machine, with every piece of state on the shared path."""
    from gigamamba.spec import deep_merge

    demo = ROOT / "pipelines" / "demo.yaml"
    raw = yaml.safe_load(demo.read_text()) if demo.is_file() else {}
    raw = deep_merge(raw, {
        "name": name,
        "dataset": "cluster-tests",
        "task": "classification",
        "run_dir": str(shared / "runs" / name),
        "store": str(shared / "stores" / f"{name}.zarr"),
        "cohort": {"csv": str(cohort_csv), "slide_dir": None},
        # Small and finely chunked, so that there is a 'middle' of embedding to interrupt.
        "encoder": {"name": "resnet18", "weights": "random", "input_px": 96, "batch_size": 8},
        "ingest": {"tiles_per_task": 4, "embed_actors": 1, "cpus_per_actor": 1},
        "ray": {"address": None, "num_cpus": None, "num_gpus": None},
        "train": {"epochs": 2, "num_workers": 1, "cpus_per_worker": 1, "patience": 0, "min_epochs": 0,
                  "accum_steps": 1, "attention_slides": 0, "storage_path": str(shared / "ray_results")},
        "cv": {"folds": FOLDS, "seed": 0},
        "tracking": {"uri": tracking_uri, "experiment": "cluster-tests"},
        "cluster": {"shared_paths": [str(shared)]},
    })
    raw = deep_merge(raw, overrides)
    path = shared / "specs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def gigamamba(args: list[str], env: dict, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gigamamba", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, **kw)


def driver_env(c) -> dict:
    """Environment of a driver started on this machine against the cluster (Ray's own RAY_ADDRESS)."""
    env = c.process_env()
    env["RAY_ADDRESS"] = c.address
    return env


def store_of(spec_path: Path):
    from gigamamba.features.store import GridStore
    from gigamamba.spec import load_spec

    return GridStore(load_spec(spec_path)["store"])


def complete(spec_path: Path) -> list[str]:
    try:
        return store_of(spec_path).complete_slides()
    except Exception:  # not created yet, or a group mid-write
        return []


def assert_same_features(spec_path: Path, reference_path: Path) -> None:
    """Every slide complete, and the same grid as the undisturbed run (fp16 features, exact masks)."""
    got, ref = store_of(spec_path), store_of(reference_path)
    assert got.complete_slides() == ref.complete_slides()
    assert len(ref.complete_slides()) == N_SLIDES
    for sid in ref.complete_slides():
        f1, m1 = got.read(sid)
        f0, m0 = ref.read(sid)
        a1, a0 = got.slide_attrs(sid), ref.slide_attrs(sid)
        for key in ("grid_shape", "origin_level0", "stride_level0", "n_tiles"):
            assert a1[key] == a0[key], f"slide {sid}: {key} {a1[key]} != {a0[key]}"
        np.testing.assert_array_equal(m1, m0, err_msg=f"slide {sid}: mask")
        np.testing.assert_allclose(f1.astype(np.float32), f0.astype(np.float32), rtol=2e-2, atol=2e-2,
                                   err_msg=f"slide {sid}: features")
    manifest = got.manifest()
    assert set(manifest.loc[manifest["status"] == "complete", "slide_id"].astype(str)) == set(ref.complete_slides())


def wait_until(pred, timeout_s: float, what: str, proc: subprocess.Popen | None = None, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n{out[-4000:]}")
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def job_log_digest(client, job_id: str, tail: int = 1500) -> str:
    """A failed job's log, cut for an assertion message: the lines that say why, then the end.

    The end alone was a C++ stack trace when a driver died in Ray's CoreWorker start (CI, stop 13), and the
    line naming the failed check sat 3,000 characters above it.
    """
    import re

    text = client.get_job_logs(job_id)
    why = [line for line in text.splitlines() if re.search(r"Check failed|Failed to|Error|error:|Traceback", line)]
    return "lines that say why:\n" + "\n".join(why[:30]) + f"\n... last {tail} characters:\n" + text[-tail:]


def mlflow_runs(uri: str, job: str) -> tuple[list, list]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cluster-tests")
    assert exp is not None, "no MLflow experiment 'cluster-tests'"
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.job = '{job}'", max_results=100)
    parents = [r for r in runs if r.data.tags.get("gigamamba.kind") == "cv"]
    children = [r for r in runs if r.data.tags.get("gigamamba.kind") == "fold"]
    return parents, children


# ----------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def demo_job(cluster, mlflow_server, shared, cohort_csv):
    """`gigamamba submit --follow` of the whole demo-sized pipeline (embed, then k-fold train)."""
    pytest.importorskip("gigamamba.commands.run_all", reason="`gigamamba run` has not landed")
    spec = pipeline_spec(shared, "demo", cohort_csv, mlflow_server)
    t0 = time.monotonic()
    proc = gigamamba(["submit", str(spec), "--address", cluster.dashboard_url, "--follow"],
                     env=cluster.process_env(), timeout=600)
    return {"spec": spec, "proc": proc, "seconds": time.monotonic() - t0}


@pytest.fixture(scope="module")
def reference(demo_job):
    """The demo job's store: the cohort embedded on the intact cluster, what every disturbed run must reproduce."""
    proc = demo_job["proc"]
    assert proc.returncode == 0, f"the demo job failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
    assert len(complete(demo_job["spec"])) == N_SLIDES
    return demo_job["spec"]


def test_submit_runs_demo_pipeline_to_completion(cluster, demo_job, mlflow_server):
    proc, spec = demo_job["proc"], demo_job["spec"]
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    job_id = proc.stdout.splitlines()[0].strip()
    assert job_id.startswith("gigamamba-demo-all-")

    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(cluster.dashboard_url).get_job_info(job_id)
    assert str(info.status.value) == "SUCCEEDED"
    assert info.entrypoint == f"python -m gigamamba run {spec}"
    assert info.runtime_env["working_dir"].startswith(("gcs://", "_ray_pkg_"))  # uploaded, not a local path
    # The job wrote every slide to the shared store.
    assert store_of(spec).complete_slides() == sorted(store_of(spec).complete_slides())
    assert len(complete(spec)) == N_SLIDES

    parents, children = mlflow_runs(mlflow_server, "demo")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == FOLDS
    assert {c.data.tags.get("mlflow.parentRunId") for c in children} == {parents[0].info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    assert any(k.endswith("_mean") for k in parents[0].data.metrics)

    # `gigamamba jobs list|logs` see the same job.
    env = cluster.process_env()
    listed = gigamamba(["jobs", "list", "--address", cluster.dashboard_url], env=env, timeout=60)
    assert listed.returncode == 0
    row = next(line for line in listed.stdout.splitlines() if line.startswith(job_id))
    assert "SUCCEEDED" in row
    logs = gigamamba(["jobs", "logs", job_id, "--address", cluster.dashboard_url], env=env, timeout=60)
    assert logs.returncode == 0 and "slide(s) to embed" in logs.stdout and "MLflow store" in logs.stdout


def test_jobs_stop_ends_a_running_job(cluster):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    job_id = client.submit_job(entrypoint="python -c \"import time; print('alive', flush=True); time.sleep(300)\"")
    env = cluster.process_env()
    wait_until(lambda: "alive" in client.get_job_logs(job_id), 120, "the job to start")
    stop = gigamamba(["jobs", "stop", job_id, "--address", cluster.dashboard_url], env=env, timeout=60)
    assert stop.returncode == 0 and "stopping" in stop.stdout
    wait_until(lambda: str(client.get_job_status(job_id).value) == "STOPPED", 60, "the job to stop")
    again = gigamamba(["jobs", "stop", job_id, "--address", cluster.dashboard_url], env=env, timeout=60)
    assert again.returncode == 0 and "was not running" in again.stdout


def test_embed_and_train_refuse_node_local_state_on_a_multinode_cluster(cluster, shared, cohort_csv, mlflow_server,
                                                                        tmp_path):
    """`embed`/`train` pointed straight at a multi-node cluster run the same check as `submit`, before writing."""
    ensure_workers(cluster, 1)
    local_store = tmp_path / "node-local.zarr"  # not under cluster.shared_paths
    spec = pipeline_spec(shared, "localstate", cohort_csv, mlflow_server, store=str(local_store))
    embed = gigamamba(["embed", str(spec)], env=driver_env(cluster), timeout=300)
    assert embed.returncode == 2, embed.stdout[-2000:] + embed.stderr[-2000:]
    assert "field 'store'" in embed.stderr and "node-local" in embed.stderr
    assert not local_store.exists()  # refused before the store was created
    spec = pipeline_spec(shared, "sqlitestate", cohort_csv, f"sqlite:///{shared / 'mlflow.db'}")
    train = gigamamba(["train", str(spec)], env=driver_env(cluster), timeout=300)
    assert train.returncode == 2, train.stdout[-2000:] + train.stderr[-2000:]
    assert "tracking.uri" in train.stderr and "tracking server" in train.stderr
    assert not (shared / "mlflow.db").exists()


def test_training_worker_killed_mid_fold(cluster, reference, mlflow_server, shared, cohort_csv):
    """SIGKILL a Ray Train worker after its first checkpoint: the fold resumes from it, finishes, one MLflow run.

    Rank 0 holds at the start of epoch 1 (the `hold` fault hook writes its pid to a marker first), so the kill lands
    at a known point, after epoch 0's checkpoint and before the fold can finish. A kill raced against a fast epoch
    loop once landed after the fold had ended, on a loaded CI machine.
    """
    ensure_workers(cluster, 2)
    from mlflow import MlflowClient

    pytest.importorskip("gigamamba.commands.train", reason="`gigamamba train` has not landed")
    marker = shared / "workerloss-hold.pid"
    marker.unlink(missing_ok=True)
    # Train on the reference's complete store, two DDP ranks, one fold.
    spec = pipeline_spec(shared, "workerloss", cohort_csv, mlflow_server, store=str(store_of(reference).path),
                         train={"epochs": 4, "num_workers": 2, "max_failures": 2,
                                "fault": {"rank": 0, "epoch": 1, "action": "hold", "hold_s": 300,
                                          "marker": str(marker)}},
                         cv={"only_folds": [0]})
    proc = subprocess.Popen([sys.executable, "-m", "gigamamba", "train", str(spec)], env=driver_env(cluster),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        client = MlflowClient(mlflow_server)

        def first_epoch_logged() -> bool:
            _, children = mlflow_runs(mlflow_server, "workerloss") if _experiment_exists(client) else ([], [])
            return bool(children) and bool(client.get_metric_history(children[0].info.run_id, "train_loss"))

        wait_until(lambda: marker.exists() and marker.read_text().strip().isdigit(), 400,
                   "rank 0 to hold at epoch 1", proc, poll_s=0.2)
        wait_until(first_epoch_logged, 120, "the fold's first epoch in MLflow", proc, poll_s=0.2)
        pid = int(marker.read_text())
        assert pid in cluster.processes("RayTrainWorker"), "the holding pid is not a Ray Train worker of this cluster"
        # The fold resumes only from a checkpoint the controller has registered, not merely one rank 0 reported.
        snapshot = _checkpoint_manager_snapshot(shared, spec, mlflow_server, fold=0)
        wait_until(lambda: 0 in _registered_epochs(snapshot), 120,
                   f"the Train controller to register epoch 0's checkpoint in {snapshot}", proc, poll_s=0.2)
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-5000:]
    parents, children = mlflow_runs(mlflow_server, "workerloss")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 1, f"expected one fold run, got {len(children)}"
    child = children[0]
    assert child.info.status == "FINISHED"
    assert child.data.metrics.get("restarts") == 1, child.data.metrics
    # Resumed, not restarted: the restored loop says so, and no epoch was logged twice.
    resumed = [line for line in out.splitlines() if "resumed at epoch" in line]
    assert resumed, f"no resume from checkpoint after the worker was killed:\n{out[-5000:]}"
    assert all(int(line.rsplit(" ", 1)[-1]) >= 1 for line in resumed)
    steps = [m.step for m in MlflowClient(mlflow_server).get_metric_history(child.info.run_id, "train_loss")]
    assert sorted(steps) == list(range(4)), f"epochs logged {sorted(steps)}"


def _experiment_exists(client) -> bool:
    return client.get_experiment_by_name("cluster-tests") is not None


def _checkpoint_manager_snapshot(shared: Path, spec_path: Path, tracking_uri: str, fold: int) -> Path:
    """Where Ray Train V2's controller keeps the fold's registered checkpoints: the run's storage directory.

    `train.storage_path` (see `pipeline_spec`) / the fold's RunConfig name, which `gigamamba.train.cv` builds as
    `{name}-{model}-{parent run id[:8]}-fold{k}`. The CheckpointManager (controller side) rewrites
    `checkpoint_manager_snapshot.json` there each time it registers a checkpoint, and only then.
    """
    from gigamamba.spec import load_spec

    spec = load_spec(spec_path)
    parents, _ = mlflow_runs(tracking_uri, spec["name"])
    assert len(parents) == 1, f"expected one CV parent run for {spec['name']!r}, got {len(parents)}"
    run_name = f"{spec['name']}-{spec['model']['name']}-{parents[0].info.run_id[:8]}-fold{fold}"
    return shared / "ray_results" / run_name / "checkpoint_manager_snapshot.json"


def _registered_epochs(snapshot: Path) -> set[int]:
    """The epochs whose checkpoints the controller has registered (empty until the snapshot is first written)."""
    import json

    try:
        state = json.loads(snapshot.read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return set()
    return {int(r["metrics"]["epoch"]) for r in state.get("checkpoint_results", []) if "epoch" in r.get("metrics", {})}


def test_driver_killed_while_embedding(cluster, reference, mlflow_server, shared, cohort_csv):
    """SIGKILL the embed driver mid-run; the same command again embeds only the missing slides."""
    ensure_workers(cluster, 1)
    spec = pipeline_spec(shared, "driverloss", cohort_csv, mlflow_server)
    cmd = [sys.executable, "-m", "gigamamba", "embed", str(spec)]
    proc = subprocess.Popen(cmd, env=driver_env(cluster), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_until(lambda: 1 <= len(complete(spec)) < N_SLIDES, 300, "embedding to be under way", proc, poll_s=0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    survivors = complete(spec)
    assert 1 <= len(survivors) < N_SLIDES, f"{len(survivors)} slides complete when the driver was killed"
    store_dir = Path(store_of(spec).path)
    stamps = {sid: _mtimes(store_dir / sid) for sid in survivors}

    rerun = subprocess.run(cmd, env=driver_env(cluster), cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"{N_SLIDES - len(survivors)} slide(s) to embed, {len(survivors)} already complete" in rerun.stderr
    for sid in survivors:  # untouched: not a byte of the slides finished before the kill was rewritten
        assert _mtimes(store_dir / sid) == stamps[sid], f"slide {sid} was embedded again"
    assert_same_features(spec, reference)


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


# Last: it leaves the cluster one node short.
def test_worker_node_lost_while_embedding(cluster, reference, mlflow_server, shared, cohort_csv):
    """A worker node dies mid-embedding; the run (or one rerun of it) leaves every slide complete and correct."""
    ensure_workers(cluster, 2)
    spec = pipeline_spec(shared, "nodeloss", cohort_csv, mlflow_server)
    env = cluster.process_env()
    submit = gigamamba(["submit", str(spec), "--stage", "embed", "--address", cluster.dashboard_url], env=env, timeout=120)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip()

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)

    def mid_run() -> bool:
        status = str(client.get_job_status(job_id).value)
        assert status in ("PENDING", "RUNNING"), \
            f"job {status} before the node was lost:\n{job_log_digest(client, job_id)}"
        return 1 <= len(complete(spec)) < N_SLIDES

    wait_until(mid_run, 300, "embedding to be under way")
    done_before = len(complete(spec))
    alive_before = len(cluster.alive_node_ids())
    victim = worker_nodes(cluster)[-1]
    cluster.remove_node(victim)
    wait_until(lambda: str(client.get_job_status(job_id).value) in ("SUCCEEDED", "FAILED", "STOPPED"), 420,
               "the embed job to end after the node loss")
    status = str(client.get_job_status(job_id).value)
    # The loss was real: Ray itself counts one node fewer.
    wait_until(lambda: len(cluster.alive_node_ids()) == alive_before - 1, 120, "Ray to mark the lost node dead")
    reran = False
    if status != "SUCCEEDED" or len(complete(spec)) < N_SLIDES:
        reran = True
        again = gigamamba(["submit", str(spec), "--stage", "embed", "--address", cluster.dashboard_url, "--follow"],
                          env=env, timeout=420)
        assert again.returncode == 0, f"rerun after node loss failed:\n{again.stdout[-3000:]}\n{again.stderr[-2000:]}"
    print(f"node lost with {done_before}/{N_SLIDES} slides complete; first job {status}; rerun needed: {reran}")
    assert_same_features(spec, reference)
