"""The dataset registry: the ten datasets of the 2DMamba paper.

Each entry says what the task is, how a cohort CSV's `label` strings map to class indices (several
spellings may map to one class), the defaults that differ from the generic ones, and where users
get the slides and labels. gigamamba downloads nothing: the data sets have their own licences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DatasetInfo:
    key: str
    title: str
    task: str                                  # classification | survival
    labels: dict[str, int] = field(default_factory=dict)   # label string -> class index
    class_names: tuple[str, ...] = ()
    n_bins: int = 4                            # survival: quantile bins on uncensored patients
    organ: str = ""
    source: str = ""                           # where to get slides (and labels)
    notes: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)  # spec overrides (model/train/cv)

    @property
    def n_classes(self) -> int:
        return len(self.class_names) if self.task == "classification" else self.n_bins


def _tcga_survival(code: str, organ: str) -> DatasetInfo:
    return DatasetInfo(
        key=f"tcga-{code.lower()}",
        title=f"TCGA-{code} overall survival",
        task="survival",
        n_bins=4,
        organ=organ,
        source=(
            f"Diagnostic slides (FFPE, *-DX*.svs) of project TCGA-{code} from the GDC portal "
            f"(https://portal.gdc.cancer.gov/projects/TCGA-{code}, gdc-client); survival months and censorship "
            "from the TCGA Pan-Cancer Clinical Data Resource (TCGA-CDR, OS / OS.time) or cBioPortal"
        ),
        notes="5-fold patient-level CV; 4 survival bins from quantiles of uncensored patients; metric: C-index",
        defaults={"train": {"monitor": "c_index"}},
    )


DATASETS: dict[str, DatasetInfo] = {
    d.key: d
    for d in [
        DatasetInfo(
            key="bracs",
            title="BRACS breast carcinoma subtyping (3 classes)",
            task="classification",
            labels={
                "N": 0, "PB": 0, "UDH": 0, "benign": 0,
                "FEA": 1, "ADH": 1, "atypical": 1,
                "DCIS": 2, "IC": 2, "malignant": 2,
            },
            class_names=("benign", "atypical", "malignant"),
            organ="breast",
            source="BRACS (https://www.bracs.icar.cnr.it/), WSIs and labels after registration; official train/val/test split",
            notes="7 subtypes grouped into benign (N, PB, UDH), atypical (FEA, ADH), malignant (DCIS, IC)",
        ),
        DatasetInfo(
            key="dhmc-kidney",
            title="DHMC renal cell carcinoma subtyping (5 classes)",
            task="classification",
            labels={
                "normal": 0, "benign": 0, "Benign": 0,
                "oncocytoma": 1, "Oncocytoma": 1,
                "chromophobe": 2, "Chromophobe": 2,
                "clearcell": 3, "Clearcell": 3, "clear_cell": 3,
                "papillary": 4, "Papillary": 4,
            },
            class_names=("normal", "oncocytoma", "chromophobe", "clear_cell", "papillary"),
            organ="kidney",
            source="DHMC Kidney Cancer data set (https://bmirds.github.io/KidneyCancer/), request access from Dartmouth",
        ),
        DatasetInfo(
            key="panda",
            title="PANDA prostate ISUP grade (6 classes, 0-5)",
            task="classification",
            labels={str(g): g for g in range(6)},
            class_names=tuple(f"ISUP {g}" for g in range(6)),
            organ="prostate",
            source="Kaggle PANDA challenge (https://www.kaggle.com/c/prostate-cancer-grade-assessment): train.csv isup_grade",
            notes="one slide per patient: case_id = slide_id (image_id) unless you provide one",
            defaults={"train": {"epochs": 30}},
        ),
        DatasetInfo(
            key="tcga-nsclc",
            title="TCGA-NSCLC: lung adenocarcinoma vs squamous cell carcinoma",
            task="classification",
            labels={"LUAD": 0, "LUSC": 1},
            class_names=("LUAD", "LUSC"),
            organ="lung",
            source="GDC portal (https://portal.gdc.cancer.gov/), projects TCGA-LUAD and TCGA-LUSC, diagnostic slides",
            notes="label = project; case_id from the TCGA barcode",
        ),
        DatasetInfo(
            key="tcga-brca",
            title="TCGA-BRCA: invasive ductal vs invasive lobular carcinoma",
            task="classification",
            labels={"IDC": 0, "ILC": 1},
            class_names=("IDC", "ILC"),
            organ="breast",
            source=(
                "GDC portal (https://portal.gdc.cancer.gov/projects/TCGA-BRCA), diagnostic slides; histological "
                "type from the TCGA clinical data (Infiltrating Ductal / Lobular Carcinoma)"
            ),
        ),
        _tcga_survival("KIRC", "kidney"),
        _tcga_survival("KIRP", "kidney"),
        _tcga_survival("LUAD", "lung"),
        _tcga_survival("STAD", "stomach"),
        _tcga_survival("UCEC", "uterus"),
    ]
}


def get_dataset(name: str | None) -> DatasetInfo | None:
    """A registry entry by key (case-insensitive), or None for a free-form dataset name."""
    if not name:
        return None
    return DATASETS.get(str(name).lower())
