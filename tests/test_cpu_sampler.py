"""The bench's CPU sampler: process titles to kinds, and real CPU time attributed to a real process."""

import resource
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
    ("/usr/bin/python3 -P -m gigamamba.features.probe {} /tmp/x/answer.json", "driver"),
])
def test_classify(title, kind):
    assert classify(title, pid=2, driver_pid=1) == kind


def test_driver_is_the_sampling_process():
    assert classify("python -m gigamamba bench ingest", pid=7, driver_pid=7) == "driver"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_busy_child_is_counted_as_the_kind_its_title_says_for_the_cpu_it_used():
    """A child titled like a Ray read task spins; the sampler's "read" core-seconds match the CPU the child
    itself used (getrusage), however much of a core it got on a loaded machine."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass\n"
    interval = 0.25
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with CpuSampler(interval=interval) as cpu:
        time.sleep(0.3)
        # argv[0] is the title Ray would give a read task; the sampler sees it in /proc/PID/cmdline
        child = subprocess.Popen(["ray::MapBatches(plan_and_read_slides)", "-c", burn], executable=sys.executable)
        split = time.time()
        child.wait()
        time.sleep(2 * interval)  # the last interval of the child's life is seen by the next sample or not at all
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert used >= 1.4
    seen = sum(s["read"] * s["seconds"] for s in cpu.samples)  # core-seconds attributed to "read"
    # a process is first counted from the sample after it appears, and its last interval may be lost when it
    # exits: at most about two intervals of its CPU go unseen; it can never be over-counted
    assert used - 3 * interval <= seen <= used + 0.05, (seen, used)
    s = cpu.summary(split_at=split)
    assert s["before"]["read"] == 0 and s["after"]["read"] > 0
    assert s["after"]["driver"] < 0.5, s  # this process only slept and sampled
    assert "process kind" in table(s)


def test_table_of_nothing_sampled_is_empty():
    assert table({"cores": 4, "all": {}}) == ""
