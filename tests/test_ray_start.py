"""A local Ray started by gigamamba: idle workers import torch before work arrives (cluster/ray_start.py)."""

import subprocess
import sys
import textwrap

import pytest

from gigamamba.cluster.ray_start import DEFAULT_PRELOAD, local_ray_kwargs


def test_local_ray_kwargs_follow_the_spec(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert local_ray_kwargs(None) == {}
    assert local_ray_kwargs({"preload_modules": list(DEFAULT_PRELOAD)}) == {
        "_system_config": {"preload_python_modules": ["torch"]}}
    got = local_ray_kwargs({"num_cpus": 3, "num_gpus": None, "preload_modules": "torch, numpy"})
    assert got == {"num_cpus": 3, "_system_config": {"preload_python_modules": ["torch", "numpy"]}}
    assert local_ray_kwargs({"num_cpus": 2, "preload_modules": []}) == {"num_cpus": 2}
    assert local_ray_kwargs({"num_cpus": 2, "preload_modules": ""}) == {"num_cpus": 2}
    # a running cluster keeps its own resources and system config: only the address is passed on
    assert local_ray_kwargs({"address": "10.0.0.1:6379", "num_cpus": 8}) == {"address": "10.0.0.1:6379"}
    # RAY_ADDRESS makes ray.init() join a running cluster, which refuses a _system_config
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert local_ray_kwargs({"num_cpus": 2}) == {}


def test_spec_default_preloads_nothing_locally():
    from gigamamba.spec import DEFAULTS

    assert DEFAULTS["ray"]["preload_modules"] == []


_PROBE = textwrap.dedent("""
    import sys
    import ray
    from gigamamba.cluster.ray_start import init_ray

    init_ray({"num_cpus": 1, "preload_modules": sys.argv[1].split(",") if sys.argv[1] else []},
             include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=1)
    class Probe:
        def __init__(self):
            self.seen = "colorsys" in sys.modules  # before this actor imports anything itself

        def get(self):
            return self.seen

    print("PRELOADED" if ray.get(Probe.remote().get.remote()) else "NOT-PRELOADED")
    ray.shutdown()
""")


@pytest.mark.slow
@pytest.mark.parametrize("preload,expected", [("colorsys", "PRELOADED"), ("", "NOT-PRELOADED")])
def test_actor_starts_with_the_preloaded_modules(preload, expected):
    """A real local Ray in a subprocess (Ray starts once a process): the actor's worker already has the module.

    colorsys stands in for torch: a stdlib module nothing in Ray's worker imports, so the test can fail both ways.
    """
    out = subprocess.run([sys.executable, "-c", _PROBE, preload], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == expected, out.stdout
