"""When do a Ray Data read stage's first tasks start, on a fresh local Ray? (README, ingest benchmark, session 11)

    python scripts/ray_data_start_probe.py WARM INTERVAL CPUS
        WARM      1: first have CPUS idle workers import what read tasks need (pipeline.warm_read_imports); 0: not
        INTERVAL  Ray Data's resource-limits refresh in seconds, set as embed_cohort sets it
                  (pipeline.fast_limits_refresh: at most Ray Data's own), or - for Ray Data's own (1 s in 2.60)
        CPUS      the CPUs Ray is told it has; the read stage runs that many tasks at once

The read tasks only sleep (2 s, four blocks each), so what shows is Ray Data's and Ray's start, not decoding. Prints
the seconds after iteration began at which each of the first CPUS tasks started. Session 11 on the 2-core machine,
CPUS 4: cold 0.84-0.96 then 2.09-2.56 s; warm 0.14-0.25 then 1.16-1.37 s (the one-second hold); warm with INTERVAL
0.1: the first at 0.14-0.61 s and all four within 0.23 s of it.
"""

import json
import os
import sys
import tempfile
import time

import numpy as np


def sleepy_read(batch, log):
    with open(log, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "t": time.time()}) + "\n")
    for _ in range(4):
        time.sleep(0.5)
        yield {"id": np.repeat(batch["id"], 8)}


def main(warm: bool, interval: str, cpus: int) -> None:
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    import ray.data

    from gigamamba.ingest.pipeline import _start_ray_data_coordinator, fast_limits_refresh, warm_read_imports

    _start_ray_data_coordinator(None)  # as embed_cohort starts it, before the dataset runs
    if warm:
        task = ray.remote(num_cpus=1)(warm_read_imports)
        print("warmed workers:", len(set(ray.get([task.remote() for _ in range(cpus)]))))
    time.sleep(2)  # let the start-up's own work settle
    log = tempfile.mktemp(suffix=".jsonl")
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items([{"id": k} for k in range(3 * cpus)], override_num_blocks=3 * cpus)
    ds = ds.map_batches(sleepy_read, batch_size=1, batch_format="numpy", num_cpus=1, memory=100 << 20,
                        fn_kwargs={"log": log}, compute=ray.data.TaskPoolStrategy(size=cpus))
    t0 = time.time()
    with fast_limits_refresh(seconds=None if interval == "-" else float(interval)):  # as embed_cohort iterates
        for _ in ds.iter_batches(batch_size=None):
            pass
    with open(log) as f:
        starts = sorted(json.loads(line)["t"] - t0 for line in f)
    os.unlink(log)
    print(f"warm {int(warm)} interval {interval} cpus {cpus}: first starts",
          " ".join(f"{s:.2f}" for s in starts[:cpus]))
    ray.shutdown()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(sys.argv[1] == "1", sys.argv[2], int(sys.argv[3]))
