"""Ingest: the Ray Data pipeline from a slide cohort to a feature-grid store, and its benchmark."""
