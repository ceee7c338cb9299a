"""The Ray Data embed pipeline: a slide cohort to a `gigamamba.grid/1` feature store.

    manifest = embed_cohort(load_spec("pipelines/demo.yaml"))

Reads top to bottom as Ray's own examples do, and every stage streams into the next:

    ds = ray.data.from_items(one row per slide to embed, largest file first)
           .map_batches(plan_and_read_slides)            CPU tasks, one per slide: MPP, tissue mask, lattice,
                                                         then OpenSlide read + decode, one tile chunk at a time
                                                         (the first carries the plan), or one error row
           .map_batches(TileEmbedder, ActorPoolStrategy) actors: num_gpus=1 each where GPUs exist, CPU otherwise
    driver = iter_batches: per-slide assembly; when a slide's last tile arrives, one Zarr write of the
             whole slide (one writer per slide), "complete" last, manifest row.

With `ingest.split_slides: true` a slide's chunks are read by many tasks instead (plan_rows, a streaming
repartition to one chunk per block, read_tiles_batch): for cohorts of fewer slides than CPUs. On an H100
with 16 cores and 48 slides it was 2x slower in steady state than one task per slide (README).

Planning is a stage, not a step before the pipeline, so the first slide's tiles reach the encoder while the
rest of the cohort is still being planned.

Memory holds the features of the slides in flight, never a slide's pixels (tiles stream through the
object store in bounded blocks). A failing slide (missing file, corrupt tile, no tissue, no MPP) gets a
one-line error in the manifest and the rest of the cohort goes on. A rerun embeds only the slides not
yet complete; overwrite=True redoes everything.

With GIGAMAMBA_INGEST_TRACE=DIR every stage appends JSON lines {"event", "t", "pid", ...} to DIR/<host>-<pid>.jsonl
(one file a process, so no locking): where the start-up goes, read back by `gigamamba bench ingest`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import socket
import sys
import threading
import time

_IMPORT_T0 = time.time()  # in a Ray worker: when unpickling a stage started importing this module

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gigamamba.cluster.shared_state import check_when_multinode
from gigamamba.features.encoders import GPU_WAITS
from gigamamba.features.probe import EncoderProbe
from gigamamba.features.store import GridStore
from gigamamba.ingest.plan import SlideJob, SlidePlan, failure, plan_slide, read_slide_jobs, tile_chunks
from gigamamba.slides.reader import SlideError
from gigamamba.spec import DEFAULTS

_IMPORT_T1 = time.time()

# The spec's ingest section is the one list of defaults (gigamamba/spec.py says what each key does); embed_cohort
# called with a spec that lacks some keys falls back to the same values. Read-only here: callers merge over it.
INGEST_DEFAULTS = DEFAULTS["ingest"]


# ----------------------------------------------------------------------------- start-up trace

TRACE_ENV = "GIGAMAMBA_INGEST_TRACE"


def trace_dir_from_env() -> str | None:
    value = os.environ.get(TRACE_ENV)
    return os.path.abspath(value) if value else None  # absolute: Ray workers run in other directories


def read_trace(trace_dir: str | Path) -> list[dict]:
    """Every event of every process in trace_dir, sorted by time."""
    events = []
    for f in sorted(Path(trace_dir).glob("*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:  # a blank line, or a process killed mid-write
                pass
    return sorted(events, key=lambda e: e["t"])


def _trace(trace_dir: str | None, event: str, **fields) -> None:
    """Append one event line to trace_dir/<host>-<pid>.jsonl; a no-op when trace_dir is None.

    Workers get trace_dir from the driver as an argument: a Ray started before the variable was set
    (a test's shared Ray, the bench's own ray.init) would not have it in its environment.
    """
    if not trace_dir:
        return
    line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **fields}, default=str)
    try:
        with open(os.path.join(trace_dir, f"{socket.gethostname()}-{os.getpid()}.jsonl"), "a") as f:
            f.write(line + "\n")
    except OSError:  # a trace must never fail the pipeline
        pass


def _worker_times() -> dict:
    """When this process started and imported this module: worker spawn vs imports vs our own code."""
    return {"proc_start": _process_start(), "module_import_start": _IMPORT_T0, "module_import_end": _IMPORT_T1}


def _process_start() -> float | None:
    """This process's start in epoch seconds (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


# ----------------------------------------------------------------------------- Ray stages

def plan_rows(row: dict, tiling: dict, tissue: dict, tiles_per_chunk: int,
              trace_dir: str | None = None) -> list[dict]:
    """Ray Data stage: one slide -> its tile chunks, or one error row when it cannot be planned.

    Every chunk carries the slide's n_tiles and grid shape, so the driver can count tiles as they come
    back; the first chunk also carries the pickled SlidePlan (mask and attrs), needed once per slide.
    """
    import pickle

    job = SlideJob.from_row(row)
    _trace(trace_dir, "read_task_start", slide_id=job.slide_id, **_worker_times())
    t0 = time.perf_counter()
    try:
        plan = plan_slide(job, tiling, tissue)
    except SlideError as exc:
        _trace(trace_dir, "plan_done", slide_id=job.slide_id, seconds=time.perf_counter() - t0, error=True)
        return [_plan_error(job, str(exc))]
    except Exception as exc:  # an unreadable file can raise anything from deep inside a decoder
        _trace(trace_dir, "plan_done", slide_id=job.slide_id, seconds=time.perf_counter() - t0, error=True)
        return [_plan_error(job, f"slide {job.slide_id}: cannot read {job.path} "
                                 f"({type(exc).__name__}: {' '.join(str(exc).split())})")]
    _trace(trace_dir, "plan_done", slide_id=job.slide_id, seconds=time.perf_counter() - t0, n_tiles=plan.n_tiles)
    chunks = tile_chunks(plan, tiles_per_chunk)
    h, w = plan.lattice.shape
    for k, chunk in enumerate(chunks):
        chunk.update(n_tiles=plan.n_tiles, H=int(h), W=int(w), error="", plan=pickle.dumps(plan) if k == 0 else b"")
    return chunks


def _plan_error(job: SlideJob, error: str) -> dict:
    return {"slide_id": job.slide_id, "path": job.path, "level": 0, "read_px": 0, "cells": b"", "xy": b"",
            "n_tiles": 0, "H": 0, "W": 0, "error": error, "plan": b""}


def read_tiles_batch(batch: dict, input_px: int, trace_dir: str | None = None) -> dict:
    """Ray Data stage: chunks of cells -> decoded tiles (N, input_px, input_px, 3) uint8.

    A corrupt tile fails its whole chunk: every row carries the error and a blank tile, and the driver
    fails the slide (a slide with a hole in it is not complete). A slide that could not be planned
    arrives as one chunk with no cells and leaves as one row at cell (-1, -1) with its error.
    """
    from gigamamba.slides.reader import read_tiles

    cols: dict[str, list] = {k: [] for k in ("slide_id", "i", "j", "tile", "error", "plan", "n_tiles", "H", "W")}
    for k in range(len(batch["slide_id"])):
        sid = str(batch["slide_id"][k])
        err = str(batch["error"][k])
        cells = np.frombuffer(batch["cells"][k], np.int32).reshape(-1, 2)
        if err:  # planning failed: pass the error on
            cells = np.full((1, 2), -1, np.int32)
            t = np.zeros((1, input_px, input_px, 3), np.uint8)
        else:
            xy = np.frombuffer(batch["xy"][k], np.int64).reshape(-1, 2)
            t0 = time.perf_counter()
            try:
                t = read_tiles(str(batch["path"][k]), int(batch["level"][k]), xy[:, 0], xy[:, 1],
                               int(batch["read_px"][k]), input_px)
            except Exception as exc:  # the slide fails, the pipeline goes on
                t = np.zeros((len(cells), input_px, input_px, 3), np.uint8)
                err = f"slide {sid}: " + " ".join(str(exc).split())
            seconds = time.perf_counter() - t0
            if len(batch["plan"][k]):  # only a slide's first chunk carries the plan
                _trace(trace_dir, "first_chunk_read", slide_id=sid, tiles=len(cells), seconds=seconds,
                       error=bool(err))
            # every chunk: how far decoding runs ahead of encoder actors that are still starting
            _trace(trace_dir, "chunk_read", slide_id=sid, tiles=len(cells), seconds=seconds)
        n = len(cells)
        cols["slide_id"] += [sid] * n
        cols["i"].append(cells[:, 0])
        cols["j"].append(cells[:, 1])
        cols["tile"].append(t)
        cols["error"] += [err] * n
        cols["plan"] += [bytes(batch["plan"][k])] + [b""] * (n - 1)
        for key in ("n_tiles", "H", "W"):
            cols[key].append(np.full(n, int(batch[key][k]), np.int64))
    out = {k: np.concatenate(v) for k, v in cols.items() if k in ("i", "j", "tile", "n_tiles", "H", "W")}
    out.update({k: np.array(cols[k], dtype=object) for k in ("slide_id", "error", "plan")})
    return out


def plan_and_read_slides(batch: dict, tiling: dict, tissue: dict, tiles_per_chunk: int, input_px: int,
                         trace_dir: str | None = None):
    """Ray Data stage (one task per slide, `split_slides: false`): plan the slide, then yield its decoded
    tile chunks one by one, so they stream to the encoder while the rest of the slide is read."""
    for k in range(len(batch["slide_id"])):
        row = {key: batch[key][k] for key in batch}
        for chunk in plan_rows(row, tiling, tissue, tiles_per_chunk, trace_dir):
            yield read_tiles_batch({key: [value] for key, value in chunk.items()}, input_px, trace_dir)
        # the generator's end: Ray Data still builds and stores the block of any chunk it holds back (blocks hold
        # ingest.chunks_per_block chunks, two by default: chunk_block_bytes), then the task ends; from here to this
        # process's next read_task_start is the turnaround between tasks that `bench read` reports
        _trace(trace_dir, "read_task_end", slide_id=str(row["slide_id"]))


PASS_THROUGH = ("slide_id", "i", "j", "error", "plan", "n_tiles", "H", "W")


class TileEmbedder:
    """Ray Data actor: decoded tiles -> float16 features. One encoder per actor, built once."""

    def __init__(self, encoder: dict, threads: int = 1, trace_dir: str | None = None, gpu_wait: str = "block"):
        self.trace_dir, self.calls = trace_dir, 0
        _trace(trace_dir, "actor_init_start", **_worker_times())
        # torch only: the default encoder is plain torch, and timm (+5.5 s on a 16-core H100 node: it pulls in
        # torchvision, torch._dynamo and sympy) is imported by create_encoder only for a timm model name
        import torch

        from gigamamba.features.encoders import create_encoder

        _trace(trace_dir, "actor_imports_done")
        if trace_dir and torch.cuda.is_available():  # CUDA context creation, apart from building the model
            torch.empty(1, device="cuda")
            torch.cuda.synchronize()
            _trace(trace_dir, "actor_cuda_ready")
        # GPU actors too: their CPU work is a copy, and torch's default of one thread per core fought the
        # decoding tasks while the model was built (6.3 s -> 1.0 s on a 16-core H200 node, bench ingest trace).
        torch.set_num_threads(max(1, int(threads)))
        self.encoder = create_encoder(encoder["name"], encoder["weights"], int(encoder["input_px"]))
        self.encoder.gpu_wait = gpu_wait  # ingest.gpu_wait: on a GPU, sleep (not spin) while a batch runs
        _trace(trace_dir, "actor_model_ready", device=str(self.encoder.device))

    TRACED_CALLS = 16  # enough to see how many calls go by before the driver gets its first batch

    def __call__(self, batch: dict) -> dict:
        first = self.trace_dir is not None and self.calls == 0
        traced = self.trace_dir is not None and self.calls < self.TRACED_CALLS
        self.calls += 1
        t0 = time.perf_counter()
        if first:
            _trace(self.trace_dir, "actor_first_call_start", batch=len(batch["error"]))
        ok = np.array([e == "" for e in batch["error"]], bool)
        feats = np.zeros((len(ok), self.encoder.dim), np.float16)
        if ok.any():
            # all good, the usual case: no boolean-index copy of the tiles (a 38 MB batch at 224 px)
            tiles = batch["tile"] if ok.all() else batch["tile"][ok]
            feats[ok] = self.encoder.embed(tiles)
        if first:
            if self.encoder.device.type == "cuda":  # only here: a sync per batch would cost throughput
                import torch

                torch.cuda.synchronize()
            _trace(self.trace_dir, "actor_first_call_done", batch=len(ok), embedded=int(ok.sum()))
        if traced:
            _trace(self.trace_dir, "actor_call_done", call=self.calls, batch=len(ok),
                   seconds=time.perf_counter() - t0)
        out = {k: batch[k] for k in PASS_THROUGH}
        out["features"] = feats
        return out


# ----------------------------------------------------------------------------- driver side

@dataclass
class _Assembly:
    """Features of one slide in flight, filled as tile batches arrive (the plan may come after some tiles)."""

    slide_id: str
    n_tiles: int
    shape: tuple[int, int]
    dim: int
    plan: SlidePlan | None = None
    started: float = field(default_factory=time.perf_counter)
    received: int = 0
    error: str = ""
    features: np.ndarray | None = None

    def add(self, i: np.ndarray, j: np.ndarray, feats: np.ndarray, errors, plans) -> None:
        import pickle

        if self.features is None:
            self.features = np.zeros((*self.shape, self.dim), np.float16)
        for blob in plans:
            if len(blob):
                self.plan = pickle.loads(blob)
        self.received += len(i)
        bad = [e for e in errors if e]
        if bad and not self.error:
            self.error = bad[0]
        self.features[i, j] = feats

    @property
    def done(self) -> bool:
        return self.plan is not None and self.received >= self.n_tiles


class _Progress:
    def __init__(self, enabled: bool, n_slides: int):
        # n_tiles grows as slides are planned inside the pipeline: the total is not known up front
        self.enabled, self.n_slides, self.n_tiles = enabled, n_slides, 0
        self.tiles = self.complete = self.failed = self.planned = 0
        self.t0 = self.last = time.perf_counter()
        self.first_tile: float | None = None
        self.last_tile: float | None = None
        self.first_batch = 0

    def got(self, n: int) -> None:
        now = time.perf_counter()
        if self.first_tile is None:
            self.first_tile, self.first_batch = now, n
        self.last_tile = now
        self.tiles += n

    def heartbeat(self, note: str, every: float = 5.0):
        """Print `note` with the elapsed time every `every` seconds until the returned event is set."""
        stop = threading.Event()
        if not self.enabled:
            return stop

        def beat():
            while not stop.wait(every):
                print(f"[embed {time.perf_counter() - self.t0:5.1f}s] {note}", file=sys.stderr, flush=True)

        threading.Thread(target=beat, name="embed-heartbeat", daemon=True).start()
        return stop

    def say(self, force: bool = False, note: str = "") -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < 5):
            return
        self.last = now
        rate = self.tiles / max(now - self.t0, 1e-9)
        more = "+" if self.planned < self.n_slides else ""  # the total grows while slides are still planned
        print(f"[embed {now - self.t0:5.1f}s] slides {self.complete + self.failed}/{self.n_slides} ({self.failed} failed) | "
              f"tiles {self.tiles}/{self.n_tiles}{more} | {rate:.1f} tiles/s{(' | ' + note) if note else ''}",
              file=sys.stderr, flush=True)


def _ensure_ray(cfg: dict):
    from gigamamba.cluster.ray_start import init_ray

    return init_ray(cfg, include_dashboard=False, log_to_driver=False)


def _embed_resources(ray, ingest: dict) -> dict:
    """Actor pool size and per-actor resources: one GPU per actor where GPUs exist, CPU actors otherwise."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    if gpus:
        # actors_per_gpu > 1 shares a GPU between actors (fractional num_gpus). On a 16-core H200 node two
        # actors did not beat one (bench ingest: the steady state is decode-bound, and each actor then held a
        # CPU a read task could have had). gpu_actor_cpus (default 0) is the Ray CPUs each reserves: an actor
        # uses ~0.55 of a core for batching and copies, and 16 reads beat 15 on a 16-core H100 node (+7%).
        size = int(ingest.get("embed_actors") or gpus * max(1, int(ingest.get("actors_per_gpu") or 1)))
        share = -(-size // gpus)  # actors per GPU, rounded up
        actor_cpus = float(ingest.get("gpu_actor_cpus") or 0)
        if actor_cpus < 0:
            raise ValueError(f"ingest.gpu_actor_cpus must be >= 0, got {actor_cpus}")
        return {"size": size, "num_gpus": 1.0 / share, "num_cpus": actor_cpus, "threads": 1,
                "gpu_wait": check_gpu_wait(ingest.get("gpu_wait", "block"))}
    per = max(1, int(ingest.get("cpus_per_actor") or 1))
    size = int(ingest.get("embed_actors") or max(1, cpus // 4))
    return {"size": size, "num_gpus": 0, "num_cpus": per, "threads": per}


_PLAN_MEMORY = 512 << 20  # a tissue thumbnail (~1000 px or more a side) with its masks, and OpenSlide's caches


def _read_slots(ray, ingest: dict, res: dict, memory: int | None = None) -> int:
    """Read tasks at once: the cluster's CPUs less those the encoder actors need, and no more than Ray's
    `memory` resource holds at `memory` bytes a task (the read tasks' hint; None: CPUs alone).

    A read task that plans and reads a whole slide holds its CPU for seconds; with every CPU taken by
    reads, the encoder actor could not even start until a slide finished, and the GPU would sit idle.
    The memory cap keeps the start-up line's "up to N read task(s)" to what Ray will actually run.
    """
    per = float(ingest["read_cpus"])
    if not per > 0:  # 0 would ask Ray for unbounded read tasks; NaN and negatives are typos
        raise ValueError(f"ingest.read_cpus must be > 0, got {ingest['read_cpus']}")
    resources = ray.cluster_resources()
    cpus = float(resources.get("CPU", 1))
    free = cpus - res["size"] * res["num_cpus"]
    slots = max(1, int(free // per))
    if memory and resources.get("memory"):
        slots = min(slots, max(1, int(float(resources["memory"]) // memory)))
    return slots


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:  # missing: it fails fast in planning, order does not matter
        return 0


def chunk_block_bytes(tiles: int, input_px: int, chunks_per_block: int = 2) -> int:
    """Ray Data's target block size for the read stage (read_block_size sets it), such that a read task's blocks
    hold `chunks_per_block` chunks of decoded tiles each.

    Ray Data 2.60 emits a block once its buffer holds *more* than the target, and slices a block only at 1.5x
    the target or more (output_buffer.py), so a target of (k - 0.25) chunks gives blocks of exactly k chunks, and
    a slide's odd last chunk goes out alone at the task's end. The default, 2, is what `embed_cohort` has run
    with since 64-tile chunks (its target was 1.5 chunks, meant as one chunk a block: session 10 counted 128-tile
    blocks). 1 halves the tiles a block holds back before the encoder sees them, and doubles the blocks."""
    try:
        k = int(chunks_per_block) if int(chunks_per_block) == chunks_per_block else 0
    except (TypeError, ValueError, OverflowError):
        k = 0
    if k < 1 or isinstance(chunks_per_block, bool):
        raise ValueError(f"ingest.chunks_per_block must be an integer >= 1, got {chunks_per_block!r}")
    return max(1 << 20, int(tiles * input_px * input_px * 3 * (k - 0.25)))


@contextlib.contextmanager
def read_block_size(tiles: int, input_px: int, chunks_per_block: int = 2):
    """Datasets created inside get read blocks of chunk_block_bytes. A read task yields a chunk of decoded tiles
    at a time, and Ray Data would pack them into 128 MiB blocks (~850 tiles) before any reached the encoder.
    Datasets copy the context when created, so the global default is restored on the way out."""
    import ray.data

    with _set_for_now(ray.data.DataContext.get_current(), "target_max_block_size",
                      chunk_block_bytes(tiles, input_px, chunks_per_block)):
        yield


@contextlib.contextmanager
def _set_for_now(holder, name: str, value):
    """Inside, `holder.name` is `value` (a Ray Data setting: a context field, a module global, a class attribute;
    in bench ingest an encoder's gpu_wait); restored on the way out, an error's way included."""
    default = getattr(holder, name)
    setattr(holder, name, value)
    try:
        yield
    finally:
        setattr(holder, name, default)


def _wait_module():
    from ray.data._internal.execution import streaming_executor_state

    return streaming_executor_state


def check_seconds(key: str, seconds) -> float | None:
    """A setting in seconds: None, or a finite number > 0 (ValueError naming `key` otherwise)."""
    if seconds is None:
        return None
    try:
        value = float(seconds) if not isinstance(seconds, bool) else math.nan
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number of seconds > 0 or null, got {seconds!r}") from None
    if not 0 < value < math.inf:
        raise ValueError(f"{key} must be > 0 seconds or null, got {seconds!r}")
    return value


def check_executor_wait(seconds) -> float | None:
    """`ingest.executor_wait_s` checked: None (Ray Data's own wait) or seconds > 0 (ValueError otherwise, and
    when this Ray Data has no such setting, rather than silently running with its default)."""
    value = check_seconds("ingest.executor_wait_s", seconds)
    if value is None:
        return None
    if not hasattr(_wait_module(), "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S"):
        raise ValueError("ingest.executor_wait_s: this Ray Data has no WAIT_FOR_TASK_COMPLETION_TIMEOUT_S to set; "
                         "leave it null")
    return value


def check_gpu_wait(value) -> str:
    """ingest.gpu_wait, one of GPU_WAITS (features/encoders.py): ValueError naming the key otherwise."""
    if value not in GPU_WAITS:
        raise ValueError(f"ingest.gpu_wait must be one of {', '.join(GPU_WAITS)}, got {value!r}")
    return value


def check_ray_data_settings(ingest: dict, input_px: int) -> None:
    """The ingest keys that tune Ray Data (chunks_per_block, executor_wait_s, limits_refresh_s, warm_read_workers),
    and the encoder actor's gpu_wait, checked before anything starts (also on a cluster without GPUs, where
    gpu_wait is not used): ValueError naming the key. embed_cohort and both benches call this."""
    check_gpu_wait(ingest["gpu_wait"])
    check_executor_wait(ingest["executor_wait_s"])
    check_seconds("ingest.limits_refresh_s", ingest["limits_refresh_s"])
    if not isinstance(ingest["warm_read_workers"], bool):
        raise ValueError(f"ingest.warm_read_workers must be true or false, got {ingest['warm_read_workers']!r}")
    chunk_block_bytes(int(ingest["tiles_per_task"]), int(input_px), ingest["chunks_per_block"])


@contextlib.contextmanager
def executor_wait(seconds: float | None):
    """Inside, each step of Ray Data's scheduling loop (in this process) waits at most `seconds` for running tasks
    to finish, instead of Ray Data's 0.1 s; None changes nothing. Restored on the way out.

    The loop waits in ray.wait(every active task, num_returns=all, timeout) before it dispatches, so with many
    tasks running each step lasts the whole timeout, and a read slot freed mid-step idles until the step ends:
    ~150 ms between one slide's task and the next on the 2-core machine, 14 ms with one slot (bench read,
    session 10). Internal API (a module global read at each step): check_executor_wait refuses it when moved."""
    value = check_executor_wait(seconds)
    if value is None:
        yield
        return
    with _set_for_now(_wait_module(), "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S", value):
        yield


def _read_memory(tiles: int, input_px: int) -> int:
    # A worker's imports (Ray, pyarrow, OpenSlide, PIL, numpy) plus decoded tiles, their resized copies and the
    # output block. Ray Data's issue detector measured read tasks at 284 MiB with 32-tile chunks and 307 MiB
    # with 64 (224 px, 16-core H100 nodes), and at 291 MiB in the demo (64 px, 2-core CPU machine; session 8).
    # It warns unless the hint is 1.25x the peak: 364 MiB in the demo, 384 MiB at 64 tiles of 224 px.
    return int(3 * tiles * input_px * input_px * 3 + (368 << 20))


def encoder_spec(spec: dict) -> dict:
    enc = dict(spec["encoder"])
    enc.setdefault("weights", "imagenet")
    enc.setdefault("input_px", 224)
    enc.setdefault("batch_size", 64)
    return enc


def read_dataset(ray, slides: list[dict], ingest: dict, tiling: dict, tissue: dict, input_px: int, read_args: dict,
                 trace_dir: str | None = None):
    """slides -> (plan, read): the read stage of the pipeline as a lazy Ray Data dataset of decoded tile chunks.
    read_args: map_batches' resources and compute for the read tasks (embed_cohort's carry a memory hint)."""
    ds = ray.data.from_items(slides, override_num_blocks=len(slides))
    if ingest["split_slides"]:
        ds = (
            # The planner's memory hint (a thumbnail and its masks) differs from the reader's, so Ray Data
            # keeps the two stages apart and a slide's chunks are read by many tasks, not by its planner.
            ds.flat_map(plan_rows, num_cpus=1, memory=_PLAN_MEMORY,
                        fn_kwargs={"tiling": tiling, "tissue": tissue,
                                   "tiles_per_chunk": int(ingest["tiles_per_task"]), "trace_dir": trace_dir})
            .repartition(target_num_rows_per_block=1)
            .map_batches(read_tiles_batch, batch_size=1, batch_format="numpy",
                         fn_kwargs={"input_px": input_px, "trace_dir": trace_dir}, **read_args)
        )
    else:
        ds = ds.map_batches(plan_and_read_slides, batch_size=1, batch_format="numpy",
                            fn_kwargs={"tiling": tiling, "tissue": tissue, "input_px": input_px,
                                       "tiles_per_chunk": int(ingest["tiles_per_task"]), "trace_dir": trace_dir},
                            **read_args)
    return ds


def _build_dataset(ray, slides: list[dict], ingest: dict, enc: dict, res: dict, tiling: dict, tissue: dict,
                   read_args: dict, trace_dir: str | None = None):
    """slides -> (plan, read) -> encoder actors, as a lazy Ray Data dataset (see the module docstring)."""
    ds = read_dataset(ray, slides, ingest, tiling, tissue, int(enc["input_px"]), read_args, trace_dir)
    # calls_per_actor > 1: Ray Data assembles the next batch from its chunk blocks (and ships the last
    # output) in another thread of the actor while the encoder runs; the encoder calls stay one at a time.
    # With one call at a time the actor spent as long between calls as in them (H200: 26 vs 24 ms a
    # 256-tile batch), which is what limits how fast it works off the tiles decoded while it started.
    pool = ray.data.ActorPoolStrategy(size=res["size"],
                                      max_concurrent_calls_per_actor=max(1, int(ingest["calls_per_actor"])))
    ds = ds.map_batches(TileEmbedder, batch_size=int(enc["batch_size"]), batch_format="numpy", compute=pool,
                        num_gpus=res["num_gpus"], num_cpus=res["num_cpus"],
                        fn_constructor_kwargs={"encoder": enc, "threads": res["threads"], "trace_dir": trace_dir,
                                               "gpu_wait": res.get("gpu_wait", "block")})
    return ds


def _import_zarr(trace_dir: str | None) -> None:
    try:
        import zarr  # noqa: F401  (GridStore imports it again: a dictionary lookup by then)
    except Exception:  # GridStore raises it where it is used
        return
    _trace(trace_dir, "zarr_imported")


def warm_read_imports() -> int:
    """Run in a Ray worker before the pipeline: import what a read task needs, and return the worker's pid.

    A Ray Data read task's worker first imports Ray Data and pyarrow to unpickle the task, then this module, and
    its first slide's planning imports scipy, scikit-image, OpenSlide and PIL. On a fresh Ray every worker pays
    that in its first task: on a 2-core machine the first of 4 sleep-only read tasks started 0.84 s after the
    dataset began and the others 2.1-2.6 s after; with the workers warmed first, 0.14-0.25 s and (Ray Data's
    one-second hold, fast_limits_refresh) 1.16-1.37 s; with the fast refresh too, all within 0.23 s of the first
    (scripts/ray_data_start_probe.py; README, session 11)."""
    import pyarrow  # noqa: F401
    import ray.data  # noqa: F401
    from PIL import Image  # noqa: F401
    from scipy import ndimage  # noqa: F401
    from skimage.filters import threshold_otsu  # noqa: F401

    import openslide  # noqa: F401
    from gigamamba.slides import reader  # noqa: F401

    return os.getpid()


def _warm_read_workers(slots: int, trace_dir: str | None) -> None:
    """Have `slots` of Ray's idle workers import what read tasks need, while the driver opens the store and builds
    the dataset (warm_read_imports says why). Plain tasks of one CPU, as the read tasks are, so Ray hands the read
    tasks the same (pooled) workers. A failure only traces: the read tasks then import as they always did."""
    import ray

    t0, refs = time.perf_counter(), []
    try:
        task = ray.remote(num_cpus=1)(warm_read_imports)
        refs = [task.remote() for _ in range(max(1, int(slots)))]
        pids = ray.get(refs, timeout=120)
    except Exception as exc:  # never the pipeline's problem
        for ref in refs:  # a worker stuck importing must not hold a CPU the read tasks need
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        _trace(trace_dir, "read_workers_not_warmed", error=type(exc).__name__)
        return
    _trace(trace_dir, "read_workers_warm", workers=len(set(pids)), seconds=round(time.perf_counter() - t0, 3))


# How often Ray Data refreshes its view of the resources it may use. Ray Data 2.60 reads them from its coordinator
# actor without blocking: the first read returns nothing and asks, and the answer is read at the next refresh,
# which comes 1 s later (ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S). Until then its budget is zero and an
# idle operator runs one task: the other read tasks started ~1 s after the first, on the GPU nodes and on the
# 2-core machine alike (within 0.23 s at 0.1; README, session 11). Each refresh is a ray.wait(timeout=0) and at
# most one small call to that actor.
LIMITS_REFRESH_S = INGEST_DEFAULTS["limits_refresh_s"]  # 0.1


@contextlib.contextmanager
def fast_limits_refresh(trace_dir: str | None = None, seconds: float | None = LIMITS_REFRESH_S):
    """Inside, Ray Data (in this process) refreshes its resource limits every `seconds` (None: as Ray Data does);
    restored on the way out. Internal API: when the setting has moved, this only traces and Ray Data runs as it
    would."""
    value = check_seconds("ingest.limits_refresh_s", seconds)
    manager = None
    if value is not None:
        try:
            from ray.data._internal.execution.resource_manager import ResourceManager

            default = ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S
            manager = ResourceManager
        except (ImportError, AttributeError) as exc:
            _trace(trace_dir, "limits_refresh_not_set", error=type(exc).__name__)
    if manager is None:
        yield
        return
    with _set_for_now(manager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", min(default, value)):
        yield


def _start_ray_data_coordinator(trace_dir: str | None) -> None:
    """Start Ray Data's AutoscalingCoordinator actor now, in a thread, instead of when the dataset first runs.

    Ray Data 2.60 learns the cluster's resources from this detached actor. Until it answers, the executor
    sees a budget of zero and runs one task per operator: on the 16-core H100 nodes the first read task
    started at 5.1 s and the other fifteen only at 8.1-9.6 s (bench ingest trace, session 9), ~3.5 s of
    15 idle cores. Created at ray_ready, the actor is up before the dataset runs (in one 96-slide run it
    answered at 3.5 s, and the sixteen read tasks started within 2.5 s of each other; README). Ray Data then
    finds it by name (get_if_exists); on a Ray whose coordinator is already up this costs one round trip. A run
    with nothing left to embed creates it too: it is the actor any Ray Data run on that Ray would create.
    Internal API: when it moves, this does nothing and Ray Data starts the actor itself, as before.
    """
    import ray

    try:
        from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator

        coordinator = get_or_create_autoscaling_coordinator()
        ray.get(coordinator.get_reserved_resources.remote("gigamamba-embed-warmup"), timeout=120)
    except Exception as exc:  # never the pipeline's problem
        _trace(trace_dir, "coordinator_not_started", error=type(exc).__name__)
        return
    _trace(trace_dir, "coordinator_ready")


def embed_cohort(spec: dict, overwrite: bool = False, progress: bool = True, on_slide=None):
    """Embed every slide of spec["cohort"]["csv"] into the store spec["store"]; return the manifest.

    spec: `gigamamba.spec.load_spec(...)` output; reads cohort {csv, slide_dir}, tiling, encoder
    {name, weights, input_px, batch_size}, store, ingest (INGEST_DEFAULTS), ray {address}.
    Uses the running Ray if initialised, else ray.init(address=spec["ray"]["address"]) (None: local).
    overwrite: empty the store and embed everything; otherwise complete slides are kept and only
    missing or failed ones are embedded. on_slide(row): called after each slide's manifest row is
    written (progress hooks; an exception raised there stops the run like an interrupt would).
    Returns the manifest of this cohort's slides (pandas DataFrame, DESIGN.md columns plus `action`:
    "embedded", "kept" or "failed").
    """
    started = time.perf_counter()
    trace_dir = trace_dir_from_env()
    if trace_dir:
        os.makedirs(trace_dir, exist_ok=True)
    _trace(trace_dir, "embed_start")
    enc = encoder_spec(spec)
    ingest = {**INGEST_DEFAULTS, **(spec.get("ingest") or {})}
    check_ray_data_settings(ingest, enc["input_px"])  # spec errors before anything is started or written
    # The encoder is checked on the meta device before anything is written (a wrong name or unavailable
    # weights is a spec error). Its imports (torch: ~4 s on a 16-core H100 node; timm too for a timm model
    # name) overlap Ray's start-up, Ray Data's and the first reads instead of preceding them, in a child
    # process unless torch is already imported (features/probe.py says why); it is joined when the first
    # batch is back.
    probe = EncoderProbe(enc)

    import pandas as pd
    import ray.data

    cohort = spec["cohort"]
    tiling = {k: spec["tiling"][k] for k in ("patch_px", "target_mpp", "tissue_threshold")}
    jobs, rejected = read_slide_jobs(cohort["csv"], cohort.get("slide_dir"))

    # Opening the store took 2.6-2.9 s after ray_ready on 16-core GPU nodes in session 6 (0.6 s here, most of
    # it `import zarr`), on the path to the first read. The import runs in a thread while ray.init waits
    # for Ray's processes; opening the store stays after check_when_multinode (nothing touched on a refusal).
    zarr_import = threading.Thread(target=_import_zarr, args=(trace_dir,), name="zarr-import", daemon=True)
    zarr_import.start()
    ray = _ensure_ray(spec.get("ray") or {})
    _trace(trace_dir, "ray_ready")
    coordinator = threading.Thread(target=_start_ray_data_coordinator, args=(trace_dir,),
                                   name="ray-data-coordinator", daemon=True)
    coordinator.start()
    check_when_multinode(spec)  # before the store is touched: nothing written on a refusal
    _trace(trace_dir, "multinode_checked")
    # Ray's idle workers import what read tasks need while the store opens and the dataset is built (started before
    # the store says whether anything is left to embed: a rerun with nothing to do pays a few idle seconds of CPU)
    res = _embed_resources(ray, ingest)
    read_memory = _read_memory(int(ingest["tiles_per_task"]), int(enc["input_px"]))
    slots = _read_slots(ray, ingest, res, read_memory)
    warm = threading.Thread(target=_warm_read_workers, args=(slots, trace_dir), name="warm-read-workers", daemon=True)
    if ingest["warm_read_workers"]:
        warm.start()
    zarr_import.join()
    store = GridStore(spec["store"], mode="a")
    _trace(trace_dir, "store_opened")
    if not overwrite:
        store.reconcile_manifest()
    complete = set() if overwrite else set(store.complete_slides())
    _trace(trace_dir, "store_ready")
    todo = [j for j in jobs if j.slide_id not in complete]
    kept = [j.slide_id for j in jobs if j.slide_id in complete]

    ray.data.DataContext.get_current().enable_progress_bars = False
    actions = {sid: "kept" for sid in kept}
    for row in rejected:
        actions[row["slide_id"]] = "failed"
    rows = list(rejected)
    tracker = _Progress(progress, len(todo))
    tracker.t0 = started
    if todo and progress:
        print(f"[embed {time.perf_counter() - started:5.1f}s] {len(todo)} slide(s) to embed, {len(kept)} already "
              f"complete, {len(rejected)} rejected; encoder {enc['name']} (weights {enc['weights']})",
              file=sys.stderr, flush=True)

    def begin() -> dict:
        """The store's first writes, once the encoder probe has passed: nothing is written before that.

        Called at the first batch back, so the probe's imports overlap Ray Data's start-up and the first
        reads; a probe that fails stops the run with its own error before any write (see the loop)."""
        info = probe.info()
        _trace(trace_dir, "encoder_probe_done")
        store.initialise(encoder=info, tiling=tiling, overwrite=overwrite)
        if rejected:
            store.update_manifest(rejected)
            for row in rejected:
                if on_slide:
                    on_slide(row)
        return info

    def record(row: dict) -> None:
        sid = row["slide_id"]
        rows.append(row)
        actions[sid] = "embedded" if row["status"] == "complete" else "failed"
        if row["status"] == "complete" and not tracker.complete:
            _trace(trace_dir, "first_slide_complete", slide_id=sid)
        tracker.complete += row["status"] == "complete"
        tracker.failed += row["status"] != "complete"
        store.update_manifest([row])
        tracker.say(force=True, note=f"{sid}: {row['status']}" + (f" ({row['error']})" if row["error"] else ""))
        if on_slide:
            on_slide(row)

    if todo:
        slides = [j.to_row() for j in todo]
        # Largest files first: with one task per slide, a big slide started last would run on alone.
        slides.sort(key=lambda row: -_file_size(row["path"]))
        tissue = ingest.get("tissue") or {}
        read_args = {"num_cpus": float(ingest["read_cpus"]),
                     # The memory hint is real (a chunk of decoded tiles plus OpenSlide's caches), and it also
                     # keeps Ray Data from fusing the reads into the embedding actors: decoding stays on CPUs.
                     "memory": read_memory,
                     "compute": ray.data.TaskPoolStrategy(size=slots)}
        _trace(trace_dir, "dataset_start")  # store_ready -> here -> dataset_built: where a slow driver start goes
        # blocks of a few chunks (two by default) keep the GPU fed from the first seconds
        with read_block_size(int(ingest["tiles_per_task"]), int(enc["input_px"]), int(ingest["chunks_per_block"])):
            ds = _build_dataset(ray, slides, ingest, enc, res, tiling, tissue, read_args, trace_dir)
        _trace(trace_dir, "dataset_built", actors=res["size"])
        inflight: dict[str, _Assembly] = {}
        finished: set[str] = set()
        # Ray Data's scheduling loop runs in this process while we iterate: its settings are made here
        with executor_wait(ingest["executor_wait_s"]), fast_limits_refresh(trace_dir, ingest["limits_refresh_s"]):
            # One iterator throughout: each iter() of ds.iter_batches(...) would run the whole pipeline again.
            batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
            # Nothing comes back for the first 15-20 s on a fresh 16-core node (Ray's workers, the encoder's
            # imports): say so every 5 s rather than go quiet
            waiting = tracker.heartbeat(f"starting: {res['size']} encoder actor(s), up to "
                                        f"{read_args['compute'].size} read task(s) at once; waiting for the first tiles")
            try:
                batch = next(batches, None)  # Ray Data starts here; the probe runs meanwhile
            except Exception:
                probe.raise_error()  # a bad encoder fails the actors too: report the probe's own error
                raise
            finally:
                waiting.set()
            info = begin()
            for n_batch, batch in enumerate(itertools.chain([batch], batches) if batch is not None else ()):
                if n_batch == 0:
                    _trace(trace_dir, "first_batch", rows=len(batch["slide_id"]))
                if n_batch < 16:  # the cadence of the first batches back, next to the actor's calls
                    _trace(trace_dir, "driver_batch", batch=n_batch + 1, rows=len(batch["slide_id"]))
                sids = batch["slide_id"].astype(str)
                for sid in np.unique(sids):
                    sel = sids == sid
                    if sid in finished:
                        continue
                    if batch["i"][sel][0] < 0:  # the slide could not be planned
                        finished.add(sid)
                        tracker.planned += 1
                        record(failure(sid, str(batch["error"][sel][0])))
                        continue
                    asm = inflight.get(sid)
                    if asm is None:
                        first = np.flatnonzero(sel)[0]
                        asm = inflight[sid] = _Assembly(sid, int(batch["n_tiles"][first]),
                                                        (int(batch["H"][first]), int(batch["W"][first])), info["dim"])
                        tracker.n_tiles += asm.n_tiles
                        tracker.planned += 1
                    asm.add(batch["i"][sel], batch["j"][sel], batch["features"][sel], batch["error"][sel],
                            batch["plan"][sel])
                    tracker.got(int(sel.sum()))
                    if asm.done:
                        finished.add(sid)
                        record(_finish(store, inflight.pop(sid)))
                tracker.say()
            for sid, asm in inflight.items():  # only if Ray lost rows: never mark such a slide complete
                record(failure(sid, f"slide {sid}: only {asm.received} of {asm.n_tiles} tiles came back"))
    else:
        begin()

    manifest = store.manifest()
    ids = [j.slide_id for j in jobs] + [r["slide_id"] for r in rejected]
    out = manifest[manifest["slide_id"].isin(ids)].copy()
    out["action"] = out["slide_id"].map(actions).fillna("kept")
    out = out.reset_index(drop=True)
    if todo:  # Ray Data waited for the coordinator, and the warm-up ended seconds into the run: these are at once
        coordinator.join(timeout=30)
        if warm.is_alive():
            warm.join(timeout=30)
    # with nothing to embed, neither is waited for: both are daemon threads, and the warm-up's tasks end on their
    # own (or with the Ray this run started)
    _trace(trace_dir, "embed_end", tiles=tracker.tiles)
    streaming = (tracker.last_tile - tracker.first_tile) if tracker.first_tile else 0.0
    # Throughput for benchmarks: the whole call, and the steady state from first to last tile back.
    out.attrs["throughput"] = {"tiles": tracker.tiles, "seconds": time.perf_counter() - started,
                               "streaming_seconds": streaming,
                               "streaming_tiles": tracker.tiles - tracker.first_batch}
    return out


def _finish(store: GridStore, asm: _Assembly) -> dict:
    plan = asm.plan
    seconds = plan.seconds + (time.perf_counter() - asm.started)
    if asm.error:
        store.remove_slide(plan.job.slide_id)
        return failure(plan.job.slide_id, asm.error, seconds)
    try:
        store.write_slide(plan.job.slide_id, asm.features, plan.keep, plan.attrs())
    except Exception as exc:
        return failure(plan.job.slide_id, f"slide {plan.job.slide_id}: writing the store failed "
                                           f"({type(exc).__name__}: {' '.join(str(exc).split())})", seconds)
    h, w = plan.lattice.shape
    return {"slide_id": plan.job.slide_id, "status": "complete", "error": "", "n_tiles": plan.n_tiles,
            "H": h, "W": w, "seconds": round(time.perf_counter() - asm.started + plan.seconds, 3)}


def summary_table(manifest) -> str:
    """A plain-text table of the manifest for the terminal."""
    cols = [c for c in ("slide_id", "status", "action", "n_tiles", "H", "W", "seconds", "error") if c in manifest]
    return manifest[cols].to_string(index=False, max_colwidth=120)


def store_path(spec: dict) -> Path:
    return Path(spec["store"])
