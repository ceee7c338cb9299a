"""The Ray Data embed pipeline: a slide cohort to a `gigamamba.grid/1` feature store.

    manifest = embed_cohort(load_spec("pipelines/demo.yaml"))

Reads top to bottom as Ray's own examples do:

    plans   = one Ray task per slide: MPP, tissue mask, lattice            (cheap, CPU)
    ds      = ray.data.from_items(tile chunks of every planned slide)
                .map_batches(read_tiles)                                   CPU tasks: OpenSlide read + decode,
                                                                           handles cached per worker
                .map_batches(TileEmbedder, compute=ActorPoolStrategy)      actors: num_gpus=1 each where GPUs
                                                                           exist, CPU actors otherwise
    driver  = iter_batches: per-slide assembly; when a slide's last tile arrives, one Zarr write of the
              whole slide (one writer per slide), "complete" last, manifest row.

Memory holds the features of the slides in flight, never a slide's pixels (tiles stream through the
object store in bounded blocks). A failing slide (missing file, corrupt tile, no tissue, no MPP) gets a
one-line error in the manifest and the rest of the cohort goes on. A rerun embeds only the slides not
yet complete; overwrite=True redoes everything.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gigamamba.features.store import GridStore
from gigamamba.ingest.plan import SlidePlan, failure, plan_slide, read_slide_jobs, tile_chunks
from gigamamba.slides.reader import SlideError

INGEST_DEFAULTS = {
    "tiles_per_task": 32,     # tiles one read task decodes (one Ray Data row)
    "embed_actors": None,     # actor pool size; None: one per GPU, else max(1, CPUs // 4)
    "cpus_per_actor": 1,      # CPU actors: Ray CPUs (and torch threads) per actor
    "read_cpus": 1,           # Ray CPUs per read task
    "tissue": {},             # overrides of gigamamba.slides.tissue.DEFAULTS
}


# ----------------------------------------------------------------------------- Ray stages

def read_tiles_batch(batch: dict, input_px: int) -> dict:
    """Ray Data stage: chunks of cells -> decoded tiles (N, input_px, input_px, 3) uint8.

    A corrupt tile fails its whole chunk: every row carries the error and a blank tile, and the driver
    fails the slide (a slide with a hole in it is not complete).
    """
    from gigamamba.slides.reader import read_tiles

    sids, ii, jj, tiles, errors = [], [], [], [], []
    for k in range(len(batch["slide_id"])):
        sid = str(batch["slide_id"][k])
        cells = np.frombuffer(batch["cells"][k], np.int32).reshape(-1, 2)
        xy = np.frombuffer(batch["xy"][k], np.int64).reshape(-1, 2)
        try:
            t = read_tiles(str(batch["path"][k]), int(batch["level"][k]), xy[:, 0], xy[:, 1],
                           int(batch["read_px"][k]), input_px)
            err = ""
        except Exception as exc:  # the slide fails, the pipeline goes on
            t = np.zeros((len(cells), input_px, input_px, 3), np.uint8)
            err = f"slide {sid}: " + " ".join(str(exc).split())
        sids += [sid] * len(cells)
        ii.append(cells[:, 0])
        jj.append(cells[:, 1])
        tiles.append(t)
        errors += [err] * len(cells)
    return {"slide_id": np.array(sids, dtype=object), "i": np.concatenate(ii), "j": np.concatenate(jj),
            "tile": np.concatenate(tiles), "error": np.array(errors, dtype=object)}


class TileEmbedder:
    """Ray Data actor: decoded tiles -> float16 features. One encoder per actor, built once."""

    def __init__(self, encoder: dict, threads: int = 1):
        import torch

        from gigamamba.features.encoders import create_encoder

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(threads)))
        self.encoder = create_encoder(encoder["name"], encoder["weights"], int(encoder["input_px"]))

    def __call__(self, batch: dict) -> dict:
        ok = np.array([e == "" for e in batch["error"]], bool)
        feats = np.zeros((len(ok), self.encoder.dim), np.float16)
        if ok.any():
            feats[ok] = self.encoder.embed(batch["tile"][ok]).astype(np.float16)
        return {"slide_id": batch["slide_id"], "i": batch["i"], "j": batch["j"], "features": feats,
                "error": batch["error"]}


def _plan_remote(job, tiling, tissue):
    try:
        return plan_slide(job, tiling, tissue)
    except SlideError as exc:
        return str(exc)
    except Exception as exc:  # an unreadable file can raise anything from deep inside a decoder
        return f"slide {job.slide_id}: cannot read {job.path} ({type(exc).__name__}: {' '.join(str(exc).split())})"


# ----------------------------------------------------------------------------- driver side

@dataclass
class _Assembly:
    """Features of one slide in flight, filled as tile batches arrive."""

    plan: SlidePlan
    dim: int
    started: float = field(default_factory=time.perf_counter)
    received: int = 0
    error: str = ""
    features: np.ndarray | None = None

    def add(self, i: np.ndarray, j: np.ndarray, feats: np.ndarray, errors) -> None:
        if self.features is None:
            self.features = np.zeros((*self.plan.lattice.shape, self.dim), np.float16)
        self.received += len(i)
        bad = [e for e in errors if e]
        if bad and not self.error:
            self.error = bad[0]
        self.features[i, j] = feats

    @property
    def done(self) -> bool:
        return self.received >= self.plan.n_tiles


class _Progress:
    def __init__(self, enabled: bool, n_slides: int, n_tiles: int):
        self.enabled, self.n_slides, self.n_tiles = enabled, n_slides, n_tiles
        self.tiles = self.complete = self.failed = 0
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

    def say(self, force: bool = False, note: str = "") -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < 5):
            return
        self.last = now
        rate = self.tiles / max(now - self.t0, 1e-9)
        print(f"[embed {now - self.t0:5.1f}s] slides {self.complete + self.failed}/{self.n_slides} ({self.failed} failed) | "
              f"tiles {self.tiles}/{self.n_tiles} | {rate:.1f} tiles/s{(' | ' + note) if note else ''}",
              file=sys.stderr, flush=True)


def _ensure_ray(cfg: dict):
    import ray

    if not ray.is_initialized():
        kw = {}
        if not cfg.get("address"):  # resource caps only make sense for a Ray we start ourselves
            kw = {k: cfg[k] for k in ("num_cpus", "num_gpus") if cfg.get(k) is not None}
        ray.init(address=cfg.get("address"), include_dashboard=False, log_to_driver=False, **kw)
    return ray


def _embed_resources(ray, ingest: dict) -> dict:
    """Actor pool size and per-actor resources: one GPU per actor where GPUs exist, CPU actors otherwise."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    if gpus:
        size = int(ingest.get("embed_actors") or gpus)
        return {"size": size, "num_gpus": 1, "num_cpus": 1, "threads": 1}
    per = max(1, int(ingest.get("cpus_per_actor") or 1))
    size = int(ingest.get("embed_actors") or max(1, cpus // 4))
    return {"size": size, "num_gpus": 0, "num_cpus": per, "threads": per}


def _read_memory(tiles: int, input_px: int) -> int:
    # a worker's imports (OpenSlide, PIL, numpy) plus decoded tiles, their resized copies and the output block
    return int(3 * tiles * input_px * input_px * 3 + (192 << 20))


def encoder_spec(spec: dict) -> dict:
    enc = dict(spec["encoder"])
    enc.setdefault("weights", "imagenet")
    enc.setdefault("input_px", 224)
    enc.setdefault("batch_size", 64)
    return enc


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
    import pandas as pd
    import ray.data

    from gigamamba.features.encoders import create_encoder

    started = time.perf_counter()
    cohort = spec["cohort"]
    tiling = {k: spec["tiling"][k] for k in ("patch_px", "target_mpp", "tissue_threshold")}
    enc = encoder_spec(spec)
    ingest = {**INGEST_DEFAULTS, **(spec.get("ingest") or {})}
    jobs, rejected = read_slide_jobs(cohort["csv"], cohort.get("slide_dir"))

    store = GridStore(spec["store"], mode="a")
    complete = set() if overwrite else set(store.complete_slides())
    todo = [j for j in jobs if j.slide_id not in complete]
    kept = [j.slide_id for j in jobs if j.slide_id in complete]

    ray = _ensure_ray(spec.get("ray") or {})
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Slides are planned (MPP, tissue, lattice) in Ray tasks while the driver checks the encoder.
    plan_task = ray.remote(num_cpus=1)(_plan_remote)
    refs = [plan_task.remote(j, tiling, ingest.get("tissue") or {}) for j in todo]
    # Built once here: a wrong name or unavailable weights is a spec error, reported before any write.
    try:
        probe = create_encoder(enc["name"], enc["weights"], int(enc["input_px"]), device="cpu")
        info = probe.info()
        del probe
        store.initialise(encoder=info, tiling=tiling, overwrite=overwrite)
    except Exception:
        for ref in refs:
            ray.cancel(ref)
        raise
    actions = {sid: "kept" for sid in kept}
    for row in rejected:
        actions[row["slide_id"]] = "failed"
    rows = list(rejected)
    if rejected:
        store.update_manifest(rejected)
        for row in rejected:
            if on_slide:
                on_slide(row)
    if todo and progress:
        print(f"[embed {time.perf_counter() - started:5.1f}s] {len(todo)} slide(s) to embed, {len(kept)} already complete, {len(rejected)} rejected; "
              f"encoder {info['name']} ({info['dim']}-d, weights {info['weights']})", file=sys.stderr, flush=True)

    plans: dict[str, SlidePlan] = {}
    for job, result in zip(todo, ray.get(refs)):
        if isinstance(result, str):
            row = failure(job.slide_id, result)
            rows.append(row)
            actions[job.slide_id] = "failed"
            store.update_manifest([row])
            if on_slide:
                on_slide(row)
        else:
            plans[job.slide_id] = result

    tracker = _Progress(progress, len(todo), sum(p.n_tiles for p in plans.values()))
    tracker.t0 = started
    tracker.failed = len(todo) - len(plans)
    tracker.say(force=True, note=f"planned {len(plans)} slide(s), {tracker.n_tiles} tiles")
    if plans:
        items = [item for p in plans.values() for item in tile_chunks(p, int(ingest["tiles_per_task"]))]
        res = _embed_resources(ray, ingest)
        ds = (
            ray.data.from_items(items, override_num_blocks=min(len(items), 1000))
            # The memory hint is real (a chunk of decoded tiles plus OpenSlide's caches), and it also keeps
            # Ray Data from fusing the reads into the embedding actors: decoding stays parallel on CPUs.
            .map_batches(read_tiles_batch, batch_size=1, batch_format="numpy", num_cpus=float(ingest["read_cpus"]),
                         memory=_read_memory(int(ingest["tiles_per_task"]), int(enc["input_px"])),
                         fn_kwargs={"input_px": int(enc["input_px"])})
            .map_batches(TileEmbedder, batch_size=int(enc["batch_size"]), batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=res["size"]),
                         num_gpus=res["num_gpus"], num_cpus=res["num_cpus"],
                         fn_constructor_kwargs={"encoder": enc, "threads": res["threads"]})
        )
        inflight: dict[str, _Assembly] = {}
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            sids = batch["slide_id"]
            for sid in np.unique(sids.astype(str)):
                sel = sids == sid
                asm = inflight.get(sid) or inflight.setdefault(sid, _Assembly(plans[sid], info["dim"]))
                asm.add(batch["i"][sel], batch["j"][sel], batch["features"][sel], batch["error"][sel])
                tracker.got(int(sel.sum()))
                if asm.done:
                    row = _finish(store, inflight.pop(sid))
                    rows.append(row)
                    actions[sid] = "embedded" if row["status"] == "complete" else "failed"
                    tracker.complete += row["status"] == "complete"
                    tracker.failed += row["status"] != "complete"
                    store.update_manifest([row])
                    tracker.say(force=True, note=f"{sid}: {row['status']}")
                    if on_slide:
                        on_slide(row)
            tracker.say()
        for sid, asm in inflight.items():  # only if Ray lost rows: never mark such a slide complete
            row = failure(sid, f"slide {sid}: only {asm.received} of {asm.plan.n_tiles} tiles came back")
            rows.append(row)
            actions[sid] = "failed"
            store.update_manifest([row])

    manifest = store.manifest()
    ids = [j.slide_id for j in jobs] + [r["slide_id"] for r in rejected]
    out = manifest[manifest["slide_id"].isin(ids)].copy()
    out["action"] = out["slide_id"].map(actions).fillna("kept")
    out = out.reset_index(drop=True)
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
