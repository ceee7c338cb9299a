from pathlib import Path

import pytest

from gigamamba.cohorts import DATASETS, get_dataset
from gigamamba.spec import load_spec

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"

EXPECTED = {
    "bracs": ("classification", 3), "dhmc-kidney": ("classification", 5), "panda": ("classification", 6),
    "tcga-nsclc": ("classification", 2), "tcga-brca": ("classification", 2),
    "tcga-kirc": ("survival", 4), "tcga-kirp": ("survival", 4), "tcga-luad": ("survival", 4),
    "tcga-stad": ("survival", 4), "tcga-ucec": ("survival", 4),
}


def test_ten_datasets():
    assert set(DATASETS) == set(EXPECTED)
    for key, (task, n) in EXPECTED.items():
        d = get_dataset(key.upper())
        assert d.task == task and d.n_classes == n and d.source
        if task == "classification":
            assert set(d.labels.values()) == set(range(n))


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_each_dataset_has_a_spec(key):
    spec = load_spec(PIPELINES / f"{key}.yaml")
    assert spec["dataset"] == key
    assert spec["task"] == EXPECTED[key][0]


def test_demo_spec_needs_nothing():
    spec = load_spec(PIPELINES / "demo.yaml")
    assert spec["model"]["name"] in ("mamba2d", "abmil")
