"""Training: grid datasets, the per-fold Ray Train loop, k-fold CV with MLflow, metrics and the report."""
