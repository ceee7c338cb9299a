"""Where a machine's CPU goes while the embed pipeline runs: sampled from /proc, by kind of process.

    with CpuSampler() as cpu:
        embed_cohort(spec)
    cpu.summary(split_at=first_batch_epoch)   # mean cores by kind, before and after a moment

Ray names its worker processes after what they run (`ray::MapBatches(plan_and_read_slides)`,
`ray::MapWorker(MapBatches(TileEmbedder))`, `ray::IDLE`), so a sample of every process's CPU ticks,
classified by its title, says how many cores the read tasks really had, how much the encoder actor,
the driver and Ray's own daemons took, and how much stayed idle. Linux only: elsewhere it records nothing.
Used by `gigamamba bench ingest`; a measurement aid, never on the pipeline's path. Its own scans count
as "driver" (~11 ms of CPU a sample with ~150 processes: ~0.02 of a core at the default interval), and a
process's CPU in the interval it starts or exits in is not seen.
"""

from __future__ import annotations

import os
import threading
import time

KINDS = ("read", "encoder", "driver", "ray_idle_worker", "ray_other_worker", "ray_daemons", "other")


def classify(title: str, pid: int, driver_pid: int) -> str:
    """A process's kind from its command line (Ray workers carry their task's name there)."""
    if pid == driver_pid:
        return "driver"
    if "gigamamba.features.probe" in title:  # the driver's encoder check, in a child process (features/probe.py)
        return "driver"
    if title.startswith("ray::"):
        if "TileEmbedder" in title:
            return "encoder"
        if "read_tiles" in title or "plan_and_read" in title or "plan_rows" in title:
            return "read"
        if title.startswith(("ray::_", "ray::DashboardAgent", "ray::RuntimeEnvAgent")):  # Ray's own actors
            return "ray_daemons"
        if title.startswith("ray::IDLE"):
            return "ray_idle_worker"
        return "ray_other_worker"
    if any(name in title for name in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py",
                                      "runtime_env", "ray/_private", "ray_client_server", "plasma")):
        return "ray_daemons"
    return "other"


def usable_cores() -> int:
    """The CPUs this process may run on (a container's CPU set), not the host's: what the sampler counts
    idle cores against, and how many processes the bench's decode ceiling runs."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _proc_ticks(pid: str) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:  # gone between listing and reading
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return title, int(fields[11]) + int(fields[12])  # utime + stime


def _machine_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies over all cores, from /proc/stat's first line."""
    try:
        with open("/proc/stat") as f:
            parts = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)  # idle + iowait
    total = sum(parts[:8])  # guest and guest_nice (fields 9-10) are already inside user and nice
    return total - idle, total


class CpuSampler:
    """Samples every process every `interval` seconds in a thread; `samples` holds per-interval core counts."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.cores = usable_cores()
        self.samples: list[dict] = []  # {"t": epoch end of interval, "seconds": dt, kind: cores, "idle": cores}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._driver = os.getpid()

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _snapshot(self) -> dict[int, tuple[str, int]]:
        out = {}
        try:
            pids = [p for p in os.listdir("/proc") if p.isdigit()]
        except OSError:
            return out
        for pid in pids:
            got = _proc_ticks(pid)
            if got:
                out[int(pid)] = got
        return out

    def _run(self) -> None:
        if not os.path.isdir("/proc/self"):
            return
        prev, prev_machine, prev_t = self._snapshot(), _machine_ticks(), time.time()
        stopped = False
        while not stopped:
            # one last sample when stopped: the interval since the previous one (a run shorter than one interval
            # still gets a sample)
            stopped = self._stop.wait(self.interval)
            now, machine, t = self._snapshot(), _machine_ticks(), time.time()
            dt = max(t - prev_t, 1e-6)
            sample = {"t": t, "seconds": dt, **{k: 0.0 for k in KINDS}}
            for pid, (title, ticks) in now.items():
                before = prev.get(pid)
                used = ticks - before[1] if before else 0  # a new process counts from the next sample
                if used > 0:
                    # the title now: a worker that switched tasks mid-interval is counted as its new task
                    sample[classify(title, pid, self._driver)] += used / self.hz / dt
            if machine and prev_machine:
                busy = machine[0] - prev_machine[0]
                total = max(machine[1] - prev_machine[1], 1)
                sample["idle"] = self.cores * (1 - busy / total)
            self.samples.append(sample)
            prev, prev_machine, prev_t = now, machine, t

    def summary(self, start: float | None = None, split_at: float | None = None) -> dict:
        """Mean cores per kind (and idle) over the samples after `start`, split before/after `split_at`."""
        def mean(rows):
            span = sum(r["seconds"] for r in rows)
            if not rows or span <= 0:
                return {}
            keys = [*KINDS, "idle"]
            return {"seconds": round(span, 1),
                    **{k: round(sum(r.get(k, 0.0) * r["seconds"] for r in rows) / span, 2) for k in keys}}

        rows = [r for r in self.samples if start is None or r["t"] - r["seconds"] >= start - self.interval]
        out = {"cores": self.cores, "all": mean(rows)}
        if split_at is not None:
            out["before"] = mean([r for r in rows if r["t"] <= split_at])
            out["after"] = mean([r for r in rows if r["t"] > split_at])
        return out


def table(summary: dict) -> str:
    """Mean cores per kind of process, one column per phase ("" when nothing was sampled)."""
    phases = [p for p in ("before", "after", "all") if summary.get(p)]
    if not phases:
        return ""
    names = {"before": "to 1st batch", "after": "after", "all": "whole run"}
    lines = [f"CPU, mean cores of {summary['cores']} (sampled from /proc):",
             f"  {'process kind':<20}" + "".join(f"{names[p]:>14}" for p in phases)]
    lines.append(f"  {'seconds':<20}" + "".join(f"{summary[p]['seconds']:>14.1f}" for p in phases))
    for kind in (*KINDS, "idle"):
        lines.append(f"  {kind:<20}" + "".join(f"{summary[p].get(kind, 0.0):>14.2f}" for p in phases))
    return "\n".join(lines)
