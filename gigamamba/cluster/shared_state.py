"""Refuse, before any work starts, a spec that would leave cluster state on one node's disk.

On a cluster a slide may be embedded on one node and resumed on another, a Ray Train worker may restart
on a different node, and the driver may run anywhere. So the feature store, Ray Train's storage_path and
run_dir must be on a filesystem that every node mounts (an allow-list of mount prefixes, the spec's
`cluster.shared_paths`) or behind an object-store URI that fsspec/pyarrow open from any node; MLflow must
be a tracking server, since a SQLite file is one node's file and SQLite over NFS corrupts under
concurrent writers.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath
from urllib.parse import urlparse

from gigamamba.spec import SpecError

OBJECT_STORE_SCHEMES = ("s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "hdfs")
TRACKING_SCHEMES = ("http", "https")

# (field as users write it, getter) for everything a run writes and later reads back. run_dir also holds
# Ray Train's checkpoints (run_dir/ray_results) when train.storage_path is unset.
STATE_FIELDS = (
    ("store", lambda spec: spec.get("store")),
    ("train.storage_path", lambda spec: (spec.get("train") or {}).get("storage_path")),
    ("run_dir", lambda spec: spec.get("run_dir")),
    ("tracking.artifact_location", lambda spec: (spec.get("tracking") or {}).get("artifact_location")),
)
# Fields that must be set on a cluster (a None would fall back to a node-local default).
REQUIRED = ("store", "run_dir")


def _scheme(value: str) -> str:
    return urlparse(value).scheme.lower() if "://" in value else ""


def _under(path: str, prefix: str) -> bool:
    path_p = PurePosixPath(os.path.normpath(path))
    prefix_p = PurePosixPath(os.path.normpath(os.path.expanduser(prefix)))
    return path_p == prefix_p or prefix_p in path_p.parents


def is_shared(value: str, shared_paths: list[str]) -> bool:
    """A URI of an object store, or an absolute path under one of the shared mount prefixes."""
    scheme = _scheme(value)
    if scheme in OBJECT_STORE_SCHEMES:
        return True
    if scheme == "file":
        value = urlparse(value).path
    elif scheme:
        return False
    return os.path.isabs(value) and any(_under(value, p) for p in shared_paths)


def _shared_paths(spec: dict) -> list[str]:
    paths = (spec.get("cluster") or {}).get("shared_paths") or []
    if isinstance(paths, str) or not all(isinstance(p, str) and os.path.isabs(os.path.expanduser(p)) for p in paths):
        raise SpecError(f"field 'cluster.shared_paths' must be a list of absolute mount prefixes, got {paths!r}")
    return list(paths)


def check_shared_state(spec: dict) -> None:
    """Raise SpecError naming the first field that would put cluster state on a node-local path.

    `spec` is a resolved spec (gigamamba.spec.load_spec): relative paths are already absolute, resolved
    against the spec's folder, which on a cluster is inside the job's private working_dir copy on one node.
    """
    shared = _shared_paths(spec)
    where = f"one of cluster.shared_paths {shared}" if shared else "a shared filesystem (cluster.shared_paths is empty)"
    for field, get in STATE_FIELDS:
        value = get(spec)
        if value in (None, ""):
            if field in REQUIRED:
                raise SpecError(
                    f"field '{field}' is not set; on a Ray cluster it must be a path under {where} "
                    f"or an object-store URI ({', '.join(s + '://' for s in OBJECT_STORE_SCHEMES[:3])}...)"
                )
            continue
        if not isinstance(value, str):
            raise SpecError(f"field '{field}' must be a path or URI string, got {value!r}")
        if _scheme(value) == "mlflow-artifacts" and field == "tracking.artifact_location":
            continue  # proxied through the tracking server, which is checked below
        if not is_shared(value, shared):
            raise SpecError(
                f"field '{field}' is {value!r}, which is node-local; on a Ray cluster it must be a path under "
                f"{where} or an object-store URI (s3://, gs://)"
            )
    uri = (spec.get("tracking") or {}).get("uri")
    if not isinstance(uri, str) or _scheme(uri) not in TRACKING_SCHEMES:
        raise SpecError(
            f"field 'tracking.uri' is {uri!r}; on a Ray cluster MLflow must be a tracking server "
            "(http://HOST:PORT or https://...), not a local SQLite file or directory"
        )


def check_when_multinode(spec: dict) -> None:
    """check_shared_state, when the connected Ray has more than one live node.

    `gigamamba submit` checks before it submits; this covers `embed`/`train`/`run` pointed at a cluster
    directly (--address, ray.address or RAY_ADDRESS). One node, a laptop's or a single-node `ray start`, keeps
    node-local paths and a SQLite MLflow store, as the defaults have them.
    """
    import ray

    if sum(1 for node in ray.nodes() if node.get("Alive")) > 1:
        check_shared_state(spec)
