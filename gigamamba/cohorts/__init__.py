"""Cohorts: the cohort CSV, patient-level k-fold splits and the dataset registry."""

from gigamamba.cohorts.cohort import (
    CohortError,
    case_id_from_barcode,
    check_in_store,
    read_cohort,
    survival_bin_edges,
)
from gigamamba.cohorts.registry import DATASETS, DatasetInfo, get_dataset
from gigamamba.cohorts.splits import (
    Fold,
    export_clam,
    export_survival,
    import_clam,
    import_survival,
    load_splits,
    make_splits,
    splits_frame,
)

__all__ = [
    "CohortError", "case_id_from_barcode", "check_in_store", "read_cohort", "survival_bin_edges",
    "DATASETS", "DatasetInfo", "get_dataset",
    "Fold", "export_clam", "export_survival", "import_clam", "import_survival", "load_splits", "make_splits",
    "splits_frame",
]
