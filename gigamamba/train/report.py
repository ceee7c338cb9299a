"""`gigamamba report`: a dataset x model comparison read back from MLflow.

For every experiment (dataset) the latest finished CV parent run of each model gives one row: the
mean ± std over its folds of every test metric. Output: `report.md` (one table per dataset),
`report.csv` (long format: dataset, model, metric, mean, std, n_folds, run_id) and `report.png`
(bars with std error bars, one panel per dataset).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from gigamamba.train.tracking import KIND_TAG

METRIC_ORDER = ["auc", "bacc", "f1", "acc", "c_index"]


def collect(uri: str, experiments: list[str] | None = None) -> pd.DataFrame:
    """One row per (dataset, model, metric) from the latest finished CV run of each pair."""
    client = MlflowClient(uri)
    exps = client.search_experiments()
    rows = []
    for exp in exps:
        if experiments and exp.name not in experiments:
            continue
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{KIND_TAG}` = 'cv' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
        )
        seen = set()
        for run in runs:
            model = run.data.tags.get("model", "?")
            if model in seen:
                continue
            seen.add(model)
            n_folds = len(client.search_runs(
                [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
            ))
            for key, value in run.data.metrics.items():
                if key.startswith("test_") and key.endswith("_mean"):
                    metric = key[len("test_"):-len("_mean")]
                    if metric == "loss":
                        continue
                    rows.append({
                        "dataset": exp.name, "model": model, "metric": metric, "mean": value,
                        "std": run.data.metrics.get(f"test_{metric}_std", math.nan), "n_folds": n_folds,
                        "encoder": run.data.tags.get("encoder", ""), "run_id": run.info.run_id,
                    })
    df = pd.DataFrame(rows, columns=["dataset", "model", "metric", "mean", "std", "n_folds", "encoder", "run_id"])
    rank = {m: i for i, m in enumerate(METRIC_ORDER)}
    order = df["metric"].map(lambda m: rank.get(m, len(rank)))
    return df.assign(_o=order).sort_values(["dataset", "model", "_o", "metric"]).drop(columns="_o").reset_index(drop=True)


def _metric_sort(metrics) -> list[str]:
    return sorted(metrics, key=lambda m: (METRIC_ORDER.index(m) if m in METRIC_ORDER else 99, m))


def to_markdown(df: pd.DataFrame) -> str:
    lines = ["# gigamamba report", "", "Test metrics, mean ± std over cross-validation folds (per patient).", ""]
    if df.empty:
        return "\n".join(lines + ["No finished CV runs found."]) + "\n"
    for dataset, sub in df.groupby("dataset", sort=True):
        metrics = _metric_sort(sub["metric"].unique())
        lines += [f"## {dataset}", "", "| model | folds | " + " | ".join(metrics) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in metrics) + " |"]
        for model, msub in sub.groupby("model", sort=True):
            cells = []
            for m in metrics:
                r = msub[msub["metric"] == m]
                cells.append(f"{r['mean'].iloc[0]:.3f} ± {r['std'].iloc[0]:.3f}" if len(r) else "")
            lines.append(f"| {model} | {int(msub['n_folds'].iloc[0])} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def chart(df: pd.DataFrame, out: Path) -> Path | None:
    if df.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    datasets = sorted(df["dataset"].unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        sub = df[df["dataset"] == dataset]
        metrics = _metric_sort(sub["metric"].unique())
        models = sorted(sub["model"].unique())
        width = 0.8 / len(models)
        x = np.arange(len(metrics))
        for i, model in enumerate(models):
            msub = sub[sub["model"] == model].set_index("metric").reindex(metrics)
            ax.bar(x + i * width - 0.4 + width / 2, msub["mean"], width, yerr=msub["std"].fillna(0), capsize=3, label=model)
        ax.set_xticks(x, metrics)
        ax.set_ylim(0, 1.05)
        ax.set_title(dataset)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(uri: str, out_dir: str | Path, experiments: list[str] | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = collect(uri, experiments)
    paths = {"markdown": out_dir / "report.md", "csv": out_dir / "report.csv"}
    paths["markdown"].write_text(to_markdown(df))
    df.to_csv(paths["csv"], index=False)
    png = chart(df, out_dir / "report.png")
    if png:
        paths["png"] = png
    return paths
