"""Starting Ray for gigamamba: the one place a local Ray gets our settings, and the preload setting for clusters.

Ray starts one idle worker process per CPU before any work arrives, and runs every task and actor in such a
process. Each encoder actor and Ray Train worker imports torch before it can do anything: 4-6 s on the
16-core H100/H200 machines (README, `bench ingest` start-up trace), while the GPU waits. (timm, +5.5 s there,
is no longer needed: the default encoder is plain torch, gigamamba/features/resnet.py.) Ray's
`preload_python_modules` makes idle workers import them while they wait, so an actor placed on one starts
in well under a second.

That pays where Ray outlives a job: cluster nodes (`ray start`, KubeRay, Slurm) set it with the environment
variable `RAY_preload_python_modules=torch` (cluster/Dockerfile, the Slurm script). For a Ray that a
command starts for itself it is off by default (`ray.preload_modules: []`): every idle worker, the many
read tasks' included, then imports its preload at once. With torch and timm that delayed the first read by
~5 s on a 16-core H200 node and bought nothing end to end (README, bench ingest), and it costs a laptop
memory per worker. Set `ray.preload_modules: [torch]` to have it anyway (add timm when encoding with a timm
model name).
"""

from __future__ import annotations

import os

DEFAULT_PRELOAD = ("torch",)  # what cluster nodes preload (cluster/Dockerfile, Slurm script)


def local_ray_kwargs(rc: dict | None) -> dict:
    """ray.init keyword arguments for a Ray started from spec["ray"] (address, num_cpus, num_gpus, preload_modules)."""
    rc = rc or {}
    if rc.get("address"):  # resources and system config belong to whoever started that cluster
        return {"address": rc["address"]}
    if os.environ.get("RAY_ADDRESS"):  # ray.init() joins that cluster (a Ray Jobs driver, a test's Ray)
        return {}
    kwargs = {k: rc[k] for k in ("num_cpus", "num_gpus") if rc.get(k) is not None}
    names = rc.get("preload_modules") or []
    if isinstance(names, str):  # "torch,timm", as the environment variable spells it
        names = names.split(",")
    preload = [name for name in (str(m).strip() for m in names) if name]
    if preload:
        kwargs["_system_config"] = {"preload_python_modules": preload}
    return kwargs


def init_ray(rc: dict | None = None, **kwargs):
    """ray.init for spec["ray"] unless Ray is already initialised (a test's Ray, the caller's own); returns ray."""
    import ray

    if not ray.is_initialized():
        ray.init(**{**local_ray_kwargs(rc), **kwargs})
    return ray
