"""The training loop of one fold: the same function runs on 1 or N Ray Train workers (DDP).

Every epoch: train (gradient accumulation, bf16 autocast on GPU), evaluate validation on every rank's
shard and gather, checkpoint (rank 0), report. The checkpoint carries the whole loop state (model,
optimizer, schedule, epoch, early-stopping state, history, best weights), so a worker that died
resumes where the last checkpoint left off. After the last epoch the best-validation weights
predict validation and test; those predictions and a few attention maps go into a final checkpoint.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from gigamamba.train.data import GridDataset, collate_grids
from gigamamba.train.metrics import compute_metrics

DEFAULT_MONITOR = {"classification": "auc", "survival": "c_index"}


# ---- losses ----------------------------------------------------------------------------------------------------


def _survival_fns():
    """nll_survival_loss and survival_risk from the model layer (heads or losses, whichever holds them)."""
    for mod in ("gigamamba.models.heads", "gigamamba.models.losses", "gigamamba.models"):
        try:
            m = __import__(mod, fromlist=["nll_survival_loss"])
        except ImportError:
            continue
        if hasattr(m, "nll_survival_loss") and hasattr(m, "survival_risk"):
            return m.nll_survival_loss, m.survival_risk
    raise ImportError("gigamamba.models provides no nll_survival_loss / survival_risk")


def compute_loss(logits: torch.Tensor, targets: dict, task: str) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(logits.float(), targets["y"])
    nll, _ = _survival_fns()
    return nll(logits.float(), targets["time_bin"], targets["censorship"])


def predictions_from_logits(logits: torch.Tensor, task: str) -> np.ndarray:
    logits = logits.float()
    if task == "classification":
        return torch.softmax(logits, dim=-1).cpu().numpy()
    _, risk = _survival_fns()
    return risk(logits).reshape(-1, 1).cpu().numpy()


# ---- helpers ---------------------------------------------------------------------------------------------------


def _rank_world():
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _maybe_fault(fault: dict | None, rank: int, epoch: int) -> None:
    """Test hook: one rank fails once at the start of one epoch; a marker file makes it happen only once.

    `action: raise` (default) raises. `action: hold` writes this process's pid into the marker and waits up to
    `hold_s` seconds, so a test can SIGKILL exactly this worker at a known point: after the previous epoch's
    checkpoint was reported, before the next one exists. Racing a kill against a fast epoch loop is flaky.
    """
    if not fault or int(fault.get("rank", -1)) != rank or int(fault.get("epoch", -1)) != epoch:
        return
    marker = fault["marker"]
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    if fault.get("action", "raise") == "hold":
        import time

        time.sleep(float(fault.get("hold_s", 300)))
        return
    raise RuntimeError(f"injected fault on rank {rank} at epoch {epoch}")


def _lr_lambda(total_steps: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


@torch.no_grad()
def predict(model, dataset: GridDataset, device, task: str, rank: int, world: int, batch_size: int = 1) -> pd.DataFrame:
    """Per-slide predictions over the whole dataset: each rank takes a strided shard, then all gather."""
    model.eval()
    rows = []
    idx = list(range(rank, len(dataset), world))
    for start in range(0, len(idx), batch_size):
        items = [dataset[i] for i in idx[start : start + batch_size]]
        feats, mask, sizes, _, index = collate_grids(items)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(feats.to(device), mask.to(device), sizes=sizes.to(device))
        preds = predictions_from_logits(logits, task)
        for b, i in enumerate(index.tolist()):
            rows.append((i, preds[b]))
    if world > 1 and torch.distributed.is_initialized():
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    rows.sort(key=lambda r: r[0])
    base = dataset.slides.iloc[[i for i, _ in rows]].reset_index(drop=True)
    keep = [c for c in ("slide_id", "case_id", "label", "y", "survival_months", "censorship", "event", "time_bin") if c in base]
    out = base[keep].copy()
    preds = np.stack([p for _, p in rows]) if rows else np.zeros((0, 1))
    if task == "classification":
        for c in range(preds.shape[1]):
            out[f"prob_{c}"] = preds[:, c]
    else:
        out["risk"] = preds[:, 0]
    return out


def _evaluate(model, dataset, device, task, rank, world):
    pred = predict(model, dataset, device, task, rank, world)
    return pred, compute_metrics(pred, task)


def _attention_maps(model, dataset: GridDataset, device, n: int) -> dict[str, np.ndarray]:
    maps = {}
    model.eval()
    for i in range(min(n, len(dataset))):
        feats, mask, sizes, _, _ = collate_grids([dataset[i]])
        with torch.no_grad():
            model(feats.to(device), mask.to(device), sizes=sizes.to(device))
        att = getattr(model, "last_attention", None)
        if att is None:
            return {}
        maps[str(dataset.slides.iloc[i]["slide_id"])] = att[0].float().cpu().numpy()
    return maps


def _log_live(tracking: dict, epoch: int, metrics: dict) -> None:
    """Per-epoch metrics to the fold's MLflow run while it trains; the driver fills any gap afterwards."""
    if not tracking or not tracking.get("run_id") or not tracking.get("live", True):
        return
    try:
        from mlflow import MlflowClient
        from mlflow.entities import Metric
        import time

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, epoch) for k, v in metrics.items() if _is_number(v)]
        MlflowClient(tracking["uri"]).log_batch(tracking["run_id"], metrics=batch)
    except Exception as exc:  # tracking must never kill training
        print(f"gigamamba: live MLflow logging failed at epoch {epoch}: {exc}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def build_model(model_cfg: dict, in_dim: int, n_classes: int):
    """A registry model (`mamba2d`, `abmil`, ...) or, for experiments, a `package.module:factory` path."""
    name = model_cfg["name"]
    kwargs = dict(model_cfg.get("kwargs") or {})
    if ":" in name:
        import importlib

        module, factory = name.split(":", 1)
        return getattr(importlib.import_module(module), factory)(in_dim, n_classes, **kwargs)
    from gigamamba.models import create_model

    return create_model(name, in_dim, n_classes, **kwargs)


# ---- the loop --------------------------------------------------------------------------------------------------


def train_fold(config: dict) -> None:
    """Ray Train worker function for one fold (`train_loop_config` = config built by gigamamba.train.cv)."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    rank, world = _rank_world()
    task = config["task"]
    tc = config["train"]
    seed = int(config.get("seed", 0)) + int(config["fold"])
    torch.manual_seed(seed)
    np.random.seed(seed)
    if tc.get("torch_threads"):
        torch.set_num_threads(int(tc["torch_threads"]))
    device = ray.train.torch.get_device()

    norm = config.get("norm")
    parts = {p: GridDataset(config["store"], pd.DataFrame(config["slides"][p]), task, norm) for p in ("train", "val", "test")}
    model = build_model(config["model"], config["in_dim"], config["n_classes"])
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": bool(tc.get("find_unused_parameters", False))})
    net = _unwrap(model)

    bs = int(tc.get("batch_size", 1))
    accum = max(1, int(tc.get("accum_steps", 1)))
    sampler = DistributedSampler(parts["train"], num_replicas=world, rank=rank, shuffle=True, seed=seed) if world > 1 else None
    loader = DataLoader(
        parts["train"], batch_size=bs, shuffle=sampler is None, sampler=sampler, collate_fn=collate_grids,
        num_workers=int(tc.get("loader_workers", 0)), generator=torch.Generator().manual_seed(seed),
    )
    epochs = int(tc["epochs"])
    steps_per_epoch = math.ceil(len(loader) / accum)
    opt = torch.optim.AdamW(net.parameters(), lr=float(tc["lr"]), weight_decay=float(tc["weight_decay"]))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(epochs * steps_per_epoch, int(tc.get("warmup_epochs", 0)) * steps_per_epoch)
    )

    monitor = tc.get("monitor") or DEFAULT_MONITOR[task]
    lower_better = monitor.endswith("loss")
    state = {"epoch": 0, "best": None, "best_epoch": -1, "bad_epochs": 0, "history": []}
    best_weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            saved = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
            best_weights = torch.load(Path(d) / "best.pt", map_location="cpu", weights_only=True)
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        state = saved["loop"]
        state["restarts"] = int(state.get("restarts", 0)) + 1
        print(f"gigamamba: fold {config['fold']} rank {rank} resumed at epoch {state['epoch']}")

    patience = int(tc.get("patience", 0) or 0)
    min_epochs = int(tc.get("min_epochs", 0) or 0)
    stopped = state.get("stopped", False)
    while state["epoch"] < epochs and not stopped:
        epoch = state["epoch"]
        _maybe_fault(config.get("fault"), rank, epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        total, n = 0.0, 0
        opt.zero_grad(set_to_none=True)
        for step, (feats, mask, sizes, targets, _) in enumerate(loader):
            last_micro = (step + 1) % accum == 0 or step + 1 == len(loader)
            sync = model.no_sync() if (world > 1 and not last_micro and hasattr(model, "no_sync")) else _null()
            with sync:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(feats.to(device), mask.to(device), sizes=sizes.to(device))
                loss = compute_loss(logits, {k: v.to(device) for k, v in targets.items()}, task)
                (loss / accum).backward()
            if last_micro:
                if tc.get("grad_clip"):
                    torch.nn.utils.clip_grad_norm_(net.parameters(), float(tc["grad_clip"]))
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            total += float(loss.detach()) * len(feats)
            n += len(feats)
        train_loss = total / max(1, n)
        if world > 1 and torch.distributed.is_initialized():
            t = torch.tensor([total, float(n)], dtype=torch.float64, device=device)  # NCCL reduces GPU tensors only
            torch.distributed.all_reduce(t)
            train_loss = float(t[0] / max(1.0, float(t[1])))

        _, val = _evaluate(net, parts["val"], device, task, rank, world)
        record = {"epoch": epoch, "train_loss": train_loss, "lr": float(sched.get_last_lr()[0])}
        record.update({f"val_{k}": v for k, v in val.items()})
        score = record.get(f"val_{monitor}", record.get(monitor))
        valid = score is not None and not (isinstance(score, float) and math.isnan(score))
        better = valid and (state["best"] is None or (score < state["best"] if lower_better else score > state["best"]))
        # A tiny validation set often ties on AUC; the validation loss breaks the tie.
        tie_loss = record.get("val_loss")
        tied = (valid and state["best"] is not None and score == state["best"] and tie_loss is not None
                and tie_loss < state.get("best_loss", math.inf))
        improved = better or tied
        if improved or state["best_epoch"] < 0:
            state["best"] = score if improved else state["best"]
            state["best_loss"] = record.get("val_loss", math.inf)
            state["best_epoch"] = epoch
            state["bad_epochs"] = 0
            best_weights = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["history"].append(record)
        state["epoch"] = epoch + 1
        if patience and state["bad_epochs"] >= patience and state["epoch"] >= min_epochs:
            stopped = True
        state["stopped"] = stopped
        _report(rank, net, opt, sched, state, best_weights, metrics=dict(record, fold=config["fold"]))
        if rank == 0:
            _log_live(config.get("tracking"), epoch, record)

    # Test metrics are those of the best validation epoch: reload its weights and predict once.
    net.load_state_dict(best_weights)
    val_pred, val = _evaluate(net, parts["val"], device, task, rank, world)
    test_pred, test = _evaluate(net, parts["test"], device, task, rank, world)
    final = {"fold": config["fold"], "final": 1, "best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
             "restarts": int(state.get("restarts", 0))}
    final.update({f"best_val_{k}": v for k, v in val.items()})
    final.update({f"test_{k}": v for k, v in test.items()})
    extra = {}
    if rank == 0:
        pred = pd.concat([val_pred.assign(part="val"), test_pred.assign(part="test")], ignore_index=True)
        pred.insert(0, "fold", int(config["fold"]))
        extra["predictions.parquet"] = pred
        maps = _attention_maps(net, parts["val"], device, int(tc.get("attention_slides", 3)))
        if maps:
            extra["attention.npz"] = maps
    _report(rank, net, opt, sched, state, best_weights, metrics=final, extra=extra)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _report(rank, net, opt, sched, state, best_weights, metrics: dict, extra: dict | None = None) -> None:
    """All ranks report; rank 0 attaches the checkpoint (Ray Train V2 keeps rank 0's)."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(
            {"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "loop": state},
            Path(d) / "state.pt",
        )
        torch.save(best_weights, Path(d) / "best.pt")
        for name, obj in (extra or {}).items():
            if name.endswith(".parquet"):
                obj.to_parquet(Path(d) / name, index=False)
            elif name.endswith(".npz"):
                np.savez_compressed(Path(d) / name, **obj)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
