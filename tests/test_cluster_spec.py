"""Specs on a cluster: the shared-state check, what `gigamamba submit` would send, and safe YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gigamamba.cli import main
from gigamamba.cluster import check_shared_state
from gigamamba.cluster.jobs import STAGES, WORKING_DIR_EXCLUDES, build_job
from gigamamba.spec import SpecError, load_spec, resolve_spec

ROOT = Path(__file__).resolve().parents[1]


def _spec(tmp_path: Path, **raw) -> dict:
    return resolve_spec(raw, tmp_path, "job")


def _shared_raw(shared: Path, **extra) -> dict:
    raw = {
        "run_dir": str(shared / "runs/job"),
        "store": str(shared / "features.zarr"),
        "train": {"storage_path": str(shared / "ray_results")},
        "tracking": {"uri": "http://127.0.0.1:5000"},
        "cluster": {"shared_paths": [str(shared)]},
    }
    for key, value in extra.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) and isinstance(value, dict) else value
    return raw


def test_shared_paths_and_server_accepted(tmp_path):
    check_shared_state(_spec(tmp_path, **_shared_raw(tmp_path / "shared")))


def test_object_store_uris_accepted(tmp_path):
    raw = _shared_raw(tmp_path / "shared", store="s3://bucket/features.zarr",
                      train={"storage_path": "gs://bucket/ray_results"})
    check_shared_state(_spec(tmp_path, **raw))


def test_default_local_spec_refused_naming_store(tmp_path):
    """The defaults (store under run_dir next to the spec, SQLite MLflow) are one node's disk."""
    with pytest.raises(SpecError, match=r"field 'store' is '.*features\.zarr', which is node-local"):
        check_shared_state(_spec(tmp_path))


@pytest.mark.parametrize("field, raw_update", [
    ("store", {"store": "/home/me/features.zarr"}),
    ("store", {"store": "relative/features.zarr"}),
    ("train.storage_path", {"train": {"storage_path": "/tmp/ray_results"}}),
    ("train.storage_path", {"train": {"storage_path": "file:///var/ray_results"}}),
    ("run_dir", {"run_dir": "/var/tmp/runs"}),
    ("tracking.artifact_location", {"tracking": {"artifact_location": "/home/me/mlartifacts"}}),
])
def test_node_local_field_refused_by_name(tmp_path, field, raw_update):
    raw = _shared_raw(tmp_path / "shared", **raw_update)
    with pytest.raises(SpecError, match=rf"field '{field}' is .*node-local"):
        check_shared_state(_spec(tmp_path, **raw))


@pytest.mark.parametrize("uri", [None, "sqlite:////mnt/shared/mlflow.db", "/mnt/shared/mlruns", "file:///mnt/shared/mlruns"])
def test_mlflow_must_be_a_server(tmp_path, uri):
    raw = _shared_raw(tmp_path / "shared")
    raw["tracking"] = {"uri": uri}
    with pytest.raises(SpecError, match="field 'tracking.uri'.*tracking server"):
        check_shared_state(_spec(tmp_path, **raw))


def test_prefix_is_a_path_component_not_a_string_prefix(tmp_path):
    """/mnt/shared-scratch is not under /mnt/shared."""
    raw = _shared_raw(Path("/mnt/shared"), store="/mnt/shared-scratch/features.zarr")
    with pytest.raises(SpecError, match="field 'store'"):
        check_shared_state(_spec(tmp_path, **raw))
    raw = _shared_raw(Path("/mnt/shared"), store="/mnt/shared/../../home/features.zarr")
    with pytest.raises(SpecError, match="field 'store'"):
        check_shared_state(_spec(tmp_path, **raw))


def test_bad_allow_list_named(tmp_path):
    raw = _shared_raw(tmp_path / "shared")
    raw["cluster"] = {"shared_paths": "relative/dir"}
    with pytest.raises(SpecError, match="cluster.shared_paths"):
        check_shared_state(_spec(tmp_path, **raw))


def test_cluster_defaults_present():
    from gigamamba.spec import DEFAULTS

    assert DEFAULTS["cluster"]["shared_paths"] and all(p.startswith("/") for p in DEFAULTS["cluster"]["shared_paths"])
    assert DEFAULTS["cluster"]["runtime_env"] == {}


def _write(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_build_job_for_a_spec_on_shared_storage(tmp_path, stage):
    shared = tmp_path / "shared"
    raw = _shared_raw(shared)
    raw["cluster"]["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": "2"}, "excludes": ["data/"]}
    spec_path = _write(shared / "specs/job.yaml", raw)
    job = build_job(spec_path, stage=stage, working_dir=ROOT)
    # The spec lives outside the project, so the job reads it from the shared path.
    assert job["entrypoint"] == f"python -m gigamamba {STAGES[stage]} {spec_path}"
    env = job["runtime_env"]
    assert env["working_dir"] == str(ROOT)
    assert env["env_vars"] == {"OMP_NUM_THREADS": "2"}
    assert set(WORKING_DIR_EXCLUDES) <= set(env["excludes"]) and "data/" in env["excludes"]
    assert ".venv/" in env["excludes"] and ".git/" in env["excludes"]
    assert job["submission_id"].startswith(f"gigamamba-job-{stage}-")
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray itself accepts it


def test_build_job_spec_inside_project_is_relative(tmp_path):
    """A spec shipped with working_dir is named relative to it, so it resolves inside the job's copy."""
    project = tmp_path / "proj"
    (project / "pipelines").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    raw = _shared_raw(tmp_path / "shared")
    spec_path = _write(project / "pipelines/cohort.yaml", raw)
    job = build_job(spec_path, stage="all")
    assert job["entrypoint"] == "python -m gigamamba run pipelines/cohort.yaml"
    assert job["runtime_env"]["working_dir"] == str(project)


def test_build_job_refuses_unreadable_spec(tmp_path):
    """A spec neither in the project nor on a shared path could not be read by the cluster."""
    raw = _shared_raw(tmp_path / "shared")
    spec_path = _write(tmp_path / "elsewhere/job.yaml", raw)
    with pytest.raises(SpecError, match="cannot read it"):
        build_job(spec_path, working_dir=ROOT)


def test_submit_refuses_node_local_spec_before_contacting_anyone(tmp_path, capsys):
    """Fails early: exit 2, one line naming the field, and no cluster needed to say so."""
    spec_path = _write(tmp_path / "job.yaml", {"store": "features.zarr"})
    code = main(["submit", str(spec_path), "--address", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2
    assert "field 'store'" in err and "node-local" in err and str(spec_path) in err
    assert len(err.strip().splitlines()) == 1


def test_submit_rejects_unknown_stage(tmp_path):
    with pytest.raises(SystemExit):
        main(["submit", str(tmp_path / "x.yaml"), "--stage", "deploy"])


# --- safety -----------------------------------------------------------------------------------------

def test_yaml_python_tags_refused(tmp_path):
    """A spec cannot run code: yaml.safe_load refuses python/object tags."""
    marker = tmp_path / "pwned"
    spec = tmp_path / "evil.yaml"
    spec.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(spec)
    assert not marker.exists()
    spec.write_text("name: !!python/object:collections.OrderedDict {}\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(spec)


def test_ui_binds_loopback_by_default(tmp_path, capsys):
    """`gigamamba ui` with no options serves on 127.0.0.1 only (checked on the command it would run)."""
    pytest.importorskip("gigamamba.commands.ui", reason="gigamamba ui has not landed")
    (tmp_path / "mlflow.db").touch()
    code = main(["ui", "--run-dir", str(tmp_path), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    command = out.strip().splitlines()[-1].split()
    assert "server" in command and command[command.index("--host") + 1] == "127.0.0.1"
    assert "0.0.0.0" not in out


@pytest.mark.parametrize("slide_id", ["../victim", "a/../../victim", "/abs/victim", "..", "a\\..\\victim", ".zattrs", "-rf"])
def test_slide_ids_cannot_escape_the_store(tmp_path, slide_id):
    store_mod = pytest.importorskip("gigamamba.features.store", reason="the feature store has not landed")
    import numpy as np

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    store = store_mod.GridStore(tmp_path / "store" / "features.zarr", mode="a")
    with pytest.raises(store_mod.StoreError, match="slide_id"):
        store.write_slide(slide_id, np.ones((2, 2, 4), np.float32), np.ones((2, 2), bool), {})
    with pytest.raises(store_mod.StoreError, match="slide_id"):
        store.remove_slide(slide_id)
    assert (victim / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "victim"]


def test_checkpoints_load_weights_only():
    """Every torch.load in the package passes weights_only=True (a checkpoint is data, not code)."""
    import ast

    offenders = []
    for path in sorted((ROOT / "gigamamba").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


def test_address_precedence(monkeypatch):
    from gigamamba.cluster.jobs import DEFAULT_ADDRESS, resolve_address

    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) == DEFAULT_ADDRESS == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1111")
    assert resolve_address(None) == "http://127.0.0.1:1111"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:2222")
    assert resolve_address(None) == "http://127.0.0.1:2222"
    assert resolve_address("http://127.0.0.1:3333") == "http://127.0.0.1:3333"


@pytest.mark.parametrize("argv", [["jobs", "list"], ["jobs", "logs", "x"], ["jobs", "stop", "x"]])
def test_jobs_without_a_cluster_fail_in_one_line(argv, capsys):
    code = main([*argv, "--address", "http://127.0.0.1:9"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith(f"gigamamba jobs {argv[1]}:") and len(err.splitlines()) == 1
