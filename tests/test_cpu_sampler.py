"""The bench's CPU sampler: process titles to kinds, and real CPU time attributed to a real process."""

import subprocess
import sys
import time

import pytest

from gigamamba.ingest.cpu_sampler import CpuSampler, classify, table


@pytest.mark.parametrize("title,kind", [
    ("ray::MapBatches(plan_and_read_slides)", "read"),
    ("ray::MapBatches(read_tiles_batch)", "read"),
    ("ray::FlatMap(plan_rows)", "read"),
    ("ray::MapWorker(MapBatches(TileEmbedder)).submit", "encoder"),
    ("ray::MapWorker(MapBatches(plan_and_read_slides)->MapBatches(TileEmbedder)).__init__", "encoder"),
    ("ray::IDLE", "ray_idle_worker"),
    ("ray::_StatsActor.register_dataset", "ray_daemons"),
    ("ray::RuntimeEnvAgent", "ray_daemons"),
    ("/site/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/ray", "ray_daemons"),
    ("/site/ray/core/src/ray/raylet/raylet --node_ip_address=127.0.0.1", "ray_daemons"),
    ("ray::SomethingElse", "ray_other_worker"),
    ("/usr/bin/python3 -c pass", "other"),
])
def test_classify(title, kind):
    assert classify(title, pid=2, driver_pid=1) == kind


def test_driver_is_the_sampling_process():
    assert classify("python -m gigamamba bench ingest", pid=7, driver_pid=7) == "driver"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_busy_child_shows_as_a_busy_core_and_the_driver_as_nearly_idle():
    burn = "import time\nt = time.time()\nwhile time.time() - t < 2.5: pass\n"
    with CpuSampler(interval=0.25) as cpu:
        time.sleep(0.3)  # the child is new in the first snapshot after it starts
        child = subprocess.Popen([sys.executable, "-c", burn])
        split = time.time()
        child.wait()
    s = cpu.summary(split_at=split)
    assert s["after"]["seconds"] >= 1.5
    # one spinning process: about one core of "other" (the machine may have a little other load too)
    assert 0.6 <= s["after"]["other"] <= 1.6, s
    assert s["after"]["driver"] < 0.5, s  # this process only slept and sampled
    assert s["before"]["other"] < s["after"]["other"]
    assert "process kind" in table(s)
