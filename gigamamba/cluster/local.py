"""A real multi-node Ray cluster on one machine: one `ray start --head` plus `ray start --address` nodes.

Used by the cluster tests (node loss, driver loss) and handy on a workstation to rehearse a cluster run.
Every node is its own `ray start --block` process in its own process group, with its own temp dir and
ports, all on 127.0.0.1; removing a node SIGKILLs its group, which is what a lost VM or pod looks like to
Ray. Nothing here runs `ray stop`, which would stop every Ray instance on the machine, including other
people's.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
# Ray turns 127.0.0.1 into the host's outward-facing address unless the first switch is off; with it off,
# every Ray process (nodes, their workers, job drivers, and any driver given this env) stays on loopback.
# Token auth is stated rather than left to whether ~/.ray/auth_token happens to exist: nothing here is
# reachable from outside the machine.
MARK_ENV = "GIGAMAMBA_LOCAL_CLUSTER"
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    head: bool = False
    alive: bool = True

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        self.alive = False


@dataclass
class LocalCluster:
    """`with LocalCluster() as c: c.add_node(num_cpus=2); ...` — see module docstring."""

    head_cpus: int = 0
    object_store_mb: int = 150
    root: Path | None = None
    env: dict = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Unix socket paths must stay under ~107 bytes, so the temp root is short and lives in /tmp.
        self.root = Path(self.root or tempfile.mkdtemp(prefix="gmc-", dir="/tmp"))
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.client_port = free_port()

    # --- addresses -----------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The GCS address, for `ray.init(address=...)` and `gigamamba embed --address`."""
        return f"{HOST}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The Ray Jobs API address, for `gigamamba submit --address`."""
        return f"http://{HOST}:{self.dashboard_port}"

    # --- lifecycle -----------------------------------------------------------------------------------
    def process_env(self) -> dict:
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        env.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"})
        env.update(LOOPBACK_ENV)
        # Every process of this cluster (its workers, its job drivers) inherits this mark, which is how
        # shutdown finds the ones that left the nodes' process groups, and how tests find a worker to kill.
        env[MARK_ENV] = str(self.root)
        env.update(self.env)
        return env

    def _ray(self, head: bool) -> list[str]:
        if head:
            ray_bin = Path(sys.executable).parent / "ray"
            return [str(ray_bin) if ray_bin.exists() else "ray"]
        return [sys.executable, "-m", "gigamamba.cluster.local"]

    def _start(self, name: str, args: list[str], head: bool) -> Node:
        temp_dir = self.root / name
        temp_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            *self._ray(head), "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}",
            f"--node-ip-address={HOST}",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            # 0/0: each worker and driver binds a port the kernel picks, the way Ray's own tests run
            # (RAY_USE_RANDOM_PORTS). A fixed range per node (60 ports picked free at node start, this
            # harness until session 10) sat partly inside the kernel's ephemeral range (32768-60999 here), where
            # every outgoing connection of every process on the machine also takes its source port; the raylet
            # checks a port is free when it hands it out, and the worker binds it a moment later.
            "--min-worker-port=0", "--max-worker-port=0",
            *args,
        ]
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.process_env(),
                                    start_new_session=True)
        node = Node(name, proc, temp_dir, log, head=head)
        self.nodes.append(node)
        return node

    def start_head(self, timeout_s: float = 180) -> Node:
        node = self._start("head", [
            "--head", f"--port={self.gcs_port}", f"--num-cpus={self.head_cpus}",
            "--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_port}",
        ], head=True)
        self._wait(lambda: self._dashboard_up(), timeout_s, f"head dashboard at {self.dashboard_url}", node)
        self.wait_for_nodes(1, timeout_s)
        return node

    def add_node(self, num_cpus: int = 1, resources: dict | None = None, timeout_s: float = 120,
                 attempts: int = 3) -> Node:
        """Start one more node and wait until the GCS lists it alive.

        `ray start` gives a raylet 30 s to register; on an overloaded machine that can lapse, so a node
        that gave up is started again (up to `attempts` times) before this fails.
        """
        import json

        n_before = len(self.alive_node_ids())
        args = [f"--address={self.address}", f"--num-cpus={num_cpus}"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        for attempt in range(1, attempts + 1):
            node = self._start(f"node{len(self.nodes)}", args, head=False)
            try:
                self.wait_for_nodes(n_before + 1, timeout_s, node)
                return node
            except (RuntimeError, TimeoutError):
                node.kill(signal.SIGKILL)
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def remove_node(self, node: Node) -> None:
        """Lose a node the hard way: SIGKILL its whole process group (raylet, its workers, its agents)."""
        node.kill(signal.SIGKILL)
        node.proc.wait(timeout=30)

    def shutdown(self) -> None:
        self._stop_jobs()
        for node in reversed(self.nodes):
            if node.alive:
                node.kill(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for node in self.nodes:
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            node.kill(signal.SIGKILL)  # the group may still hold workers after the leader exited
        self._sweep()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        self.start_head()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # --- state ---------------------------------------------------------------------------------------
    def alive_node_ids(self) -> list[str]:
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(address=self.dashboard_url, timeout=10, raise_on_missing_output=False)
        except Exception:  # the dashboard may still be starting
            return []
        return [n.node_id for n in nodes if n.state == "ALIVE"]

    def wait_for_nodes(self, n: int, timeout_s: float = 90, node: Node | None = None) -> None:
        self._wait(lambda: len(self.alive_node_ids()) >= n, timeout_s, f"{n} alive Ray nodes", node)

    def _dashboard_up(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def _wait(self, ready, timeout_s: float, what: str, node: Node | None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            if node is not None and node.proc.poll() is not None:
                raise RuntimeError(f"ray node {node.name} exited while waiting for {what}:\n{self.tail(node)}")
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}"
                           + (f":\n{self.tail(node)}" if node else ""))

    def tail(self, node: Node, n: int = 40) -> str:
        try:
            return "\n".join(node.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # --- teardown helpers ----------------------------------------------------------------------------
    def _stop_jobs(self) -> None:
        if not self._dashboard_up():
            return
        try:
            from ray.job_submission import JobSubmissionClient

            client = JobSubmissionClient(self.dashboard_url)
            for job in client.list_jobs():
                if str(job.status.value) in ("PENDING", "RUNNING") and job.submission_id:
                    client.stop_job(job.submission_id)
        except Exception:  # best effort; the sweep below catches what this misses
            pass

    def _sweep(self) -> None:
        """Kill processes that left our process groups but still belong to this cluster.

        Job drivers are started by Ray in their own session, so killing the nodes' groups misses them;
        they carry this cluster's GCS address or temp root in their environment or command line.
        """
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def processes(self, title: str | None = None) -> list[int]:
        """Pids of live processes that belong to this cluster, optionally only those whose command line
        (Ray sets it to `ray::<Actor>...` for actors) contains `title`."""
        marks = (f"{MARK_ENV}={self.root}".encode(), f"{HOST}:{self.gcs_port}".encode(), str(self.root).encode())
        me, out = os.getpid(), []
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit() or int(pid_dir.name) == me:
                continue
            try:
                cmdline = (pid_dir / "cmdline").read_bytes()
                blob = cmdline + (pid_dir / "environ").read_bytes()
            except OSError:
                continue
            if any(m in blob for m in marks) and (title is None or title.encode() in cmdline):
                out.append(int(pid_dir.name))
        return out


def _start_worker_node(argv: list[str]) -> None:
    """`ray start --address ...` for a further node on this same machine, pinned to loopback.

    With LOOPBACK_ENV, `ray start` refuses to join a second node (it reads the switch as "not a cluster
    platform"); joining is what we want, with addresses still resolved to loopback.
    """
    import ray._private.ray_constants as ray_constants
    import ray._private.services as services
    from ray.scripts.scripts import main

    ray_constants.ENABLE_RAY_CLUSTER = True
    services.get_node_ip_address = lambda address=None: HOST
    sys.argv = ["ray", *argv]
    main()


if __name__ == "__main__":
    _start_worker_node(sys.argv[1:])
