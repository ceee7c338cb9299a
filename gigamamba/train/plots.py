"""Figures logged with each fold: ROC curves, Kaplan-Meier curves by predicted risk, attention heatmaps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from gigamamba.train.metrics import per_patient, prob_columns  # noqa: E402


def roc_plot(pred: pd.DataFrame, out: Path, class_names: list[str] | None = None, title: str = "") -> Path | None:
    from sklearn.metrics import auc, roc_curve

    pat = per_patient(pred, "classification")
    cols = prob_columns(pat)
    if pat["y"].nunique() < 2:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    classes = [1] if len(cols) == 2 else range(len(cols))
    for c in classes:
        y = (pat["y"] == c).astype(int)
        if y.nunique() < 2:
            continue
        fpr, tpr, _ = roc_curve(y, pat[cols[c]])
        name = class_names[c] if class_names and c < len(class_names) else f"class {c}"
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title or "ROC (patients)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def km_plot(pred: pd.DataFrame, out: Path, title: str = "") -> Path | None:
    from sksurv.nonparametric import kaplan_meier_estimator

    pat = per_patient(pred, "survival")
    if len(pat) < 2:
        return None
    high = pat["risk"] > pat["risk"].median()
    fig, ax = plt.subplots(figsize=(4.5, 4.0))
    for name, sel in (("low risk", ~high), ("high risk", high)):
        sub = pat[sel]
        if len(sub) == 0:
            continue
        t, s = kaplan_meier_estimator(sub["event"].astype(bool).to_numpy(), sub["survival_months"].to_numpy())
        ax.step(t, s, where="post", label=f"{name} (n={len(sub)})")
    ax.set(xlabel="months", ylabel="survival probability", ylim=(0, 1.05), title=title or "Kaplan-Meier (patients)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def slide_thumbnail(attrs: dict, grid_shape: tuple[int, int], max_px: int = 512):
    """The slide region under the grid as an RGB array, or None if the slide file is gone or unreadable."""
    source = attrs.get("source")
    if not source or not Path(str(source)).exists():
        return None
    try:
        import openslide

        slide = openslide.OpenSlide(str(source))
        H, W = grid_shape
        stride = float(attrs.get("stride_level0") or 0)
        x0, y0 = (attrs.get("origin_level0") or [0, 0])[:2]
        if stride <= 0:
            return np.asarray(slide.get_thumbnail((max_px, max_px)).convert("RGB"))
        region_w, region_h = W * stride, H * stride
        scale = max(region_w, region_h) / max_px
        level = slide.get_best_level_for_downsample(max(1.0, scale))
        ds = slide.level_downsamples[level]
        size = (max(1, int(region_w / ds)), max(1, int(region_h / ds)))
        img = slide.read_region((int(x0), int(y0)), level, size).convert("RGB")
        img.thumbnail((max_px, max_px))
        slide.close()
        return np.asarray(img)
    except Exception:  # a broken slide file only costs the background
        return None


def heatmap_plot(attention: np.ndarray, mask: np.ndarray | None, thumb, out: Path, title: str = "") -> Path:
    att = np.asarray(attention, dtype=float)
    if mask is not None and mask.shape == att.shape:
        att = np.where(mask, att, np.nan)
    finite = att[np.isfinite(att)]
    if finite.size:
        lo, hi = np.min(finite), np.max(finite)
        att = (att - lo) / (hi - lo) if hi > lo else att * 0
    H, W = att.shape
    fig, ax = plt.subplots(figsize=(5, 5 * H / max(W, 1) + 0.4))
    extent = (0, W, H, 0)
    if thumb is not None:
        ax.imshow(thumb, extent=extent)
        ax.imshow(att, cmap="jet", alpha=0.45, extent=extent, interpolation="nearest")
    else:
        ax.imshow(att, cmap="jet", extent=extent, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
