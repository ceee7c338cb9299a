"""Thin helpers over Ray's Jobs SDK (`ray.job_submission.JobSubmissionClient`).

Ray's job server owns scheduling, retries of the driver process and logs; gigamamba only turns a pipeline
spec into an entrypoint plus a runtime_env, and a job id back into status and logs.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import uuid
from pathlib import Path

from gigamamba.cluster.shared_state import check_shared_state, is_shared
from gigamamba.spec import SpecError, deep_merge, load_spec

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Which gigamamba command each --stage runs.
STAGES = {"embed": "embed", "train": "train", "all": "run"}
# Never shipped with working_dir: environments, caches and local run state (gitignore-style patterns).
WORKING_DIR_EXCLUDES = [
    ".venv/", "venv/", ".git/", "runs/", "mlruns/", "build/", "dist/", "*.egg-info/", "__pycache__/",
    ".pytest_cache/", ".devbundle/", ".devbundle-cache/", ".whl/", "gigamamba-demo/",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def resolve_address(address: str | None) -> str:
    """--address, else Ray's own environment variables, else the local dashboard."""
    return address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def client(address: str | None = None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(resolve_address(address))


def find_project(spec_path: Path) -> Path:
    """The project folder to ship as working_dir: the nearest folder above the spec with a pyproject.toml."""
    for folder in [spec_path.resolve().parent, *spec_path.resolve().parents]:
        if (folder / "pyproject.toml").is_file():
            return folder
    import gigamamba

    package_root = Path(gigamamba.__file__).resolve().parent.parent
    if (package_root / "pyproject.toml").is_file():
        return package_root
    raise SpecError(f"{spec_path}: no project folder (with pyproject.toml) above it to ship as working_dir")


def spec_argument(spec_path: Path, project: Path, shared_paths: list[str]) -> str:
    """How the job names the spec: relative to working_dir when shipped with it, else by its shared path."""
    spec_path = spec_path.resolve()
    try:
        return spec_path.relative_to(project).as_posix()
    except ValueError:
        pass
    if is_shared(str(spec_path), shared_paths):
        return str(spec_path)
    raise SpecError(
        f"pipeline spec {spec_path} is neither inside the project {project} (shipped as working_dir) "
        f"nor under one of cluster.shared_paths {shared_paths}, so the cluster cannot read it"
    )


def build_job(spec_path: str | Path, stage: str = "all", working_dir: str | Path | None = None) -> dict:
    """The submit_job keyword arguments for one pipeline stage, after the shared-state check."""
    if stage not in STAGES:
        raise SpecError(f"--stage must be one of {sorted(STAGES)}, got {stage!r}")
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    try:
        check_shared_state(spec)
    except SpecError as exc:
        raise SpecError(f"{spec_path}: {exc}") from exc
    project = Path(working_dir).resolve() if working_dir else find_project(spec_path)
    arg = spec_argument(spec_path, project, spec["cluster"]["shared_paths"])
    user_env = spec["cluster"].get("runtime_env") or {}
    if "working_dir" in user_env:
        raise SpecError(f"{spec_path}: field 'cluster.runtime_env.working_dir' is set by gigamamba submit; remove it")
    runtime_env = deep_merge({"working_dir": str(project), "excludes": list(WORKING_DIR_EXCLUDES)}, user_env)
    if user_env.get("excludes"):
        runtime_env["excludes"] = WORKING_DIR_EXCLUDES + list(user_env["excludes"])
    # `python -m` puts the job's working_dir (the submitted code) first on sys.path, ahead of any
    # gigamamba installed in the image.
    entrypoint = f"python -m gigamamba {STAGES[stage]} {shlex.quote(arg)}"
    return {
        "entrypoint": entrypoint,
        "runtime_env": runtime_env,
        "submission_id": f"gigamamba-{_slug(spec['name'])}-{stage}-{uuid.uuid4().hex[:8]}",
        "metadata": {"gigamamba.spec": arg, "gigamamba.stage": stage, "gigamamba.name": str(spec["name"])},
    }


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40]


def submit(spec_path: str | Path, address: str | None = None, stage: str = "all",
           working_dir: str | Path | None = None) -> str:
    job = build_job(spec_path, stage, working_dir)
    return client(address).submit_job(**job)


def follow(job_id: str, address: str | None = None, out=None) -> str:
    """Stream a job's logs until it ends; returns its final status (SUCCEEDED, FAILED or STOPPED)."""
    out = out or sys.stdout
    jobs = client(address)

    async def _tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(_tail())
    except RuntimeError as exc:  # the log stream closes early if the job server restarts; status still tells
        print(f"gigamamba: log stream for {job_id} ended: {exc}", file=sys.stderr)
    return wait(job_id, address)


def wait(job_id: str, address: str | None = None, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    import time

    jobs = client(address)
    start = time.monotonic()
    while True:
        status = str(jobs.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            return status
        time.sleep(poll_s)


def list_jobs(address: str | None = None) -> list:
    return sorted(client(address).list_jobs(), key=lambda j: j.start_time or 0)


def logs(job_id: str, address: str | None = None) -> str:
    return client(address).get_job_logs(job_id)


def stop(job_id: str, address: str | None = None) -> bool:
    return client(address).stop_job(job_id)
